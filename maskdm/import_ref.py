"""``maskdm import-ref``: a checkpoint of the MaskDM reference code (github.com/jiachenlei/maskdm) as a run folder.

    maskdm import-ref model-20.pt --config configs/celebahq256_b_finetune.yaml --out runs/ref_celebahq

The reference saves ``{"step", "model", "ema", "opt", "scaler"}``: ``model`` is its ``GaussianDiffusion`` (the
network under ``model.``, plus schedule buffers), ``ema`` is ``ema_pytorch.EMA`` (``ema_model.model.`` and
``online_model.model.``). A bare ``MaskedUViT`` state dict (``encoder.*``, ``encoder_to_output.*``) is accepted
too. The result is a run folder with one checkpoint (``checkpoints/ckpt-<step>``: online and EMA weights, the
config) that ``maskdm sample``, ``maskdm eval`` and a fine-tune's ``train.init_from`` read like any other.

Name and layout mapping (``D`` = width, ``p`` = patch, ``C`` = channels, ``k`` = extra tokens):

    encoder.patch_embed.proj.weight (D, C, p, p)  -> patch_embed.weight (D, p*p*C): the conv with kernel = stride
                                                     = p is a linear map on (p1 p2 c)-ordered patch pixels
    encoder.encoder_pos_embed (1, k + N, D)       -> pos_embed: rows [class, time] become [time, class] (attention
                                                     is order-free, so only the rows move)
    encoder.label_emb.weight (K, D) + encoder.uncond_embed (1, D) -> label_emb.weight (K + 1, D), last = no class
    *.attn.q_bias, *.attn.v_bias (D,)             -> *.attn.qkv.bias = [q_bias, 0, v_bias] (model.qkv_bias: true;
                                                     a key bias shifts every score of a query equally, so the
                                                     softmax ignores it and it stays 0 in training)
    encoder.{in_blocks,mid_block,out_blocks,norm,time_embed}.* -> the same names without ``encoder.``
    encoder_to_output.*                           -> head.*

The reference's schedule buffers (betas, ...) are not imported: the diffusion comes from ``--config``.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["add_arguments", "convert_state_dict", "import_reference", "main", "split_reference_checkpoint"]

_SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2", "p2_loss_weight", "loss_weight"}


def _network(sd: dict, prefix: str) -> dict:
    """The MaskedUViT entries of ``sd`` under ``prefix`` (prefix removed)."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def split_reference_checkpoint(obj, source: str = "checkpoint") -> tuple[dict, dict, int]:
    """(online, EMA, step) MaskedUViT state dicts of a loaded reference checkpoint (or one bare state dict, used
    as both)."""
    if not isinstance(obj, dict):  # a wrong file, a user fault: ValueError (one line, exit 2 in the CLI)
        raise ValueError(f"{source}: expected a dict (a reference checkpoint or a state dict), "  # noqa: TRY004
                         f"got {type(obj).__name__}")
    if any(k.startswith("encoder.") for k in obj):
        return obj, obj, 0
    if "model" not in obj and "ema" not in obj:
        raise ValueError(f"{source}: neither a reference checkpoint (keys 'model', 'ema') nor a MaskedUViT state dict "
                         f"(keys 'encoder.*'); found keys {sorted(obj)[:8]}")
    online = _network(obj.get("model") or {}, "model.")
    ema = _network(obj.get("ema") or {}, "ema_model.model.")
    if not online:
        online = _network(obj.get("ema") or {}, "online_model.model.")
    if not online and not ema:
        raise ValueError(f"{source}: no network weights under 'model' (model.encoder.*) or 'ema' "
                         f"(ema_model.model.encoder.*)")
    step = obj.get("step", 0)
    return online or ema, ema or online, int(step.item() if isinstance(step, Tensor) else step)


def convert_state_dict(ref: dict, source: str = "reference state dict") -> dict:
    """A reference ``MaskedUViT`` state dict -> a ``MaskedViT`` state dict (tensors are not copied unless
    reshaped). Raises ``ValueError`` naming keys it does not know."""
    ref = {k: v for k, v in ref.items() if k not in _SCHEDULE_BUFFERS}
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(k: str) -> Tensor:
        if k not in ref:
            raise ValueError(f"{source}: missing key {k!r} (is this a MaskDM reference checkpoint?)")
        used.add(k)
        return ref[k]

    w = take("encoder.patch_embed.proj.weight")  # (D, C, p, p)
    out["patch_embed.weight"] = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()  # (D, p*p*C)
    out["patch_embed.bias"] = take("encoder.patch_embed.proj.bias")
    pos = take("encoder.encoder_pos_embed")  # (1, k + N, D): [class,] time, patches
    if "encoder.label_emb.weight" in ref:
        out["pos_embed"] = torch.cat([pos[:, 1:2], pos[:, 0:1], pos[:, 2:]], dim=1)
        out["label_emb.weight"] = torch.cat([take("encoder.label_emb.weight"), take("encoder.uncond_embed")], 0)
    else:
        out["pos_embed"] = pos
    for k in ref:
        if k in used:
            continue
        if k.startswith("encoder_to_output."):
            out["head." + k.removeprefix("encoder_to_output.")] = take(k)
        elif k.endswith(".attn.q_bias"):
            v_key = k.removesuffix("q_bias") + "v_bias"
            q, v = take(k), take(v_key)
            out[k.removeprefix("encoder.").removesuffix("q_bias") + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
        elif k.endswith(".attn.v_bias"):
            continue  # taken with its q_bias
        elif k.startswith(("encoder.in_blocks.", "encoder.mid_block.", "encoder.out_blocks.", "encoder.norm.",
                           "encoder.time_embed.")):
            out[k.removeprefix("encoder.")] = take(k)
    left = sorted(set(ref) - used)
    if left:
        raise ValueError(f"{source}: {len(left)} key(s) with no MaskedViT counterpart, first {left[:3]}")
    return out


def import_reference(ckpt: str | Path, config: str | Path, out_dir: str | Path, overrides: list[str] | None = None,
                     overwrite: bool = False, log=print) -> Path:
    """Convert ``ckpt`` for the model of ``config`` and write the run folder ``out_dir``; returns its checkpoint."""
    from . import checkpoint as ckpt_io
    from .config import load_config
    from .run_dir import prepare_run_dir
    from .sample import build_model, data_channels

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"reference checkpoint not found: {ckpt}")
    cfg = load_config(config, [*(overrides or []), f"train.out_dir={out_dir}"])
    try:  # tensors, dicts and numbers only: no code runs while loading
        obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{ckpt}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    online, ema, step = split_reference_checkpoint(obj, str(ckpt))
    if any(k.endswith(".attn.q_bias") for k in online) and not cfg.model.qkv_bias:
        raise ValueError(f"{ckpt} was trained with qkv_bias (q/v biases): add model.qkv_bias=true to the import")
    model = build_model(cfg, data_channels(cfg))
    states = {}
    for which, ref in (("online", online), ("ema", ema)):
        sd = convert_state_dict(ref, f"{ckpt} ({which} weights)")
        ckpt_io.load_into(model, sd, f"{ckpt} ({which} weights) with --config {config}")  # names + shapes
        states[which] = model.state_dict()
        states[which] = {k: v.clone() for k, v in states[which].items()}
    lock = prepare_run_dir(out_dir, resume=False, overwrite=overwrite, log=log)
    try:
        existing = ckpt_io.list_checkpoints(Path(out_dir) / "checkpoints")
        if existing:
            raise FileExistsError(f"{out_dir} already holds checkpoints (newest {existing[-1].name}); choose a new "
                                  f"--out or pass --overwrite")
        import yaml

        Path(out_dir, "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        state = {"step": step, "stage": len(cfg.stages) - 1, "optimizer": None, "imported_from": str(ckpt)}
        path = ckpt_io.save_checkpoint(Path(out_dir) / "checkpoints", step, states["online"], states["ema"], state,
                                       cfg.to_dict(), keep_last=1, meta={"imported_from": str(ckpt.resolve())})
    finally:
        lock.release()
    log(f"[import-ref] {ckpt} (step {step}) -> {path}")
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="reference checkpoint (model-N.pt of jiachenlei/maskdm, or a MaskedUViT state dict)")
    p.add_argument("--config", required=True, help="our config describing the same model (configs/...)")
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing maskdm run folder at --out")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.qkv_bias=true")


def main(args: argparse.Namespace) -> int:
    import_reference(args.ckpt, args.config, args.out, args.overrides, overwrite=args.overwrite)
    return 0
