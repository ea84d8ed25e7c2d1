"""``maskdm`` command line: train, sample, eval, info.

    maskdm train --config FILE [key=value ...] [--resume]
    maskdm sample --ckpt PATH --num N --steps S --sampler ddim|ddpm --out grid.png
    maskdm eval --ckpt PATH --data SPEC --num N
    maskdm info

Every error ends in one line on stderr naming the file, key or value, and a non-zero exit: 2 for a fault of the
input (config, files, folders, numbers), 3 for a diverged run, 1 for anything else; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from . import compare, import_ref

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """Every (sub)command takes ``--debug``; a bad argument is one line, exit 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="on an error, show the full traceback instead of one line")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {value}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="maskdm", description="Masked diffusion pre-training (MaskDM): train, sample, "
                                "evaluate. Multi-GPU: torchrun --nproc_per_node N -m maskdm train ...")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train the stages of a config (then sample + evaluate if eval.enabled)")
    t.add_argument("--config", required=True, help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.seed=1 stages.pretrain.steps=500 stages.1.lr=1e-5")
    t.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint of train.out_dir")
    t.add_argument("--overwrite", action="store_true",
                   help="empty train.out_dir first and start over (only a maskdm run folder, never the working "
                   "directory)")
    t.add_argument("--no-eval", action="store_true", help="skip the final sampling + FID even if eval.enabled")

    s = sub.add_parser("sample", help="sample a grid from a checkpoint")
    s.add_argument("--ckpt", required=True, help="checkpoint folder (ckpt-XXXXXXXX) or run folder (its newest)")
    s.add_argument("--num", type=_int_at_least(1), default=64)
    s.add_argument("--steps", type=_int_at_least(1), default=50, help="DDIM steps (ddpm always uses all T)")
    s.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    s.add_argument("--eta", type=_nonneg_float, default=0.0, help="DDIM eta (0: deterministic; the paper: 1.0 with 250 steps)")
    s.add_argument("--out", default="grid.png", help="PNG grid path")
    s.add_argument("--weights", choices=["ema", "online"], default="ema")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=_int_at_least(1), default=256)
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--nrow", type=_int_at_least(1), default=None)
    _sampler_options(s)

    e = sub.add_parser("eval", help="FID / KID of a checkpoint's samples against a dataset")
    e.add_argument("--ckpt", required=True, help="checkpoint folder or run folder")
    e.add_argument("--data", default=None, help="fashion_mnist[:train|test][:ROOT], folder:PATH or PATH "
                   "(default: the checkpoint's training data)")
    e.add_argument("--num", type=_int_at_least(2), default=1000, help="generated images, and as many real ones")
    e.add_argument("--steps", type=_int_at_least(1), default=250)
    e.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    e.add_argument("--eta", type=_nonneg_float, default=1.0)
    e.add_argument("--batch-size", type=_int_at_least(1), default=250)
    e.add_argument("--weights", choices=["ema", "online"], default="ema")
    e.add_argument("--backbone", choices=["effnet-lite0", "inception"], default="effnet-lite0")
    e.add_argument("--inception-weights", default=None,
                   help="FID Inception weights file; selects --backbone inception (needs torch-fidelity)")
    e.add_argument("--resize", type=_int_at_least(32), default=224, help="backbone input size (effnet-lite0)")
    e.add_argument("--baseline", action="store_true", help="also score the untrained model (same seed)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default=None)
    e.add_argument("--out", default=None, help="results JSON (default: eval-<backbone>-<step>.json beside the ckpt)")
    e.add_argument("--real", choices=["sample", "all"], default="sample",
                   help="real set: 'sample' = --num random training images; 'all' = every training image, streamed, "
                   "features cached per dataset + backbone (the paper's protocol)")
    e.add_argument("--feature-cache", default=None, help="real-feature cache folder (default: ~/.cache/maskdm)")
    _sampler_options(e)

    sub.add_parser("info", help="versions, kernel backends, GPU")
    compare.add_arguments(sub.add_parser("compare", help="FID against wall-clock of several configs at one budget"))
    import_ref.add_arguments(sub.add_parser("import-ref", help="a MaskDM reference checkpoint as a run folder"))
    return p


def _sampler_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ddim-grid", choices=["uniform", "reference"], default="uniform",
                   help="DDIM timesteps: round(linspace(0, T-1, steps)) or the MaskDM reference's {999, 995, ..., 3}")
    p.add_argument("--ddim-eps", choices=["recompute", "model"], default="recompute",
                   help="eps after clipping x0: recomputed from it, or the model's (the reference)")
    p.add_argument("--fp32", action="store_true", help="sample in fp32 (default: bf16 autocast on CUDA)")


def _device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_train(args) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    from .train import train

    t0 = time.time()
    summary = train(cfg, resume=args.resume, evaluate=cfg.eval.enabled and not args.no_eval, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:
        return 128 + summary["interrupted"] if summary["interrupted"] else 0
    if summary["interrupted"]:
        print(f"[train] interrupted; resume with: maskdm train --config {args.config} "
              + "".join(f"{o} " for o in args.overrides) + "--resume")
        return 128 + summary["interrupted"]
    res = summary.pop("eval", None)
    summary["total_seconds"] = round(time.time() - t0, 1)
    summary["train_seconds"] = round(summary["total_seconds"] - summary.get("eval_seconds", 0.0), 1)
    Path(cfg.train.out_dir, "summary.json").write_text(json.dumps(summary, indent=2))
    cut = summary.get("stages_cut_by_time") or {}
    print(f"[train] {summary['optimizer_steps_this_run']} optimizer steps in {summary['train_seconds']:.0f}s"
          + (f", evaluation {summary['eval_seconds']:.0f}s" if "eval_seconds" in summary else "")
          + (f"; stages cut by time: {', '.join(f'{k} after {v} steps' for k, v in cut.items())}" if cut else ""))
    print("[done] outputs:")
    for k, label in (("final_grid", "sample grid"), ("eval_json", "FID/KID results"), ("loss_curve", "loss curve"),
                     ("metrics", "training metrics"), ("checkpoint", "checkpoint")):
        if summary.get(k):
            print(f"  {label:17}: {summary[k]}")
    if res:
        for name, r in res["models"].items():
            print(f"  FID ({res['backbone_id']}) {name:9}: {r['fid']:.2f}   KID {r['kid_mean']:.4f} "
                  f"({r['num_fake']} samples, {res['sampler']} {res['steps']} steps)")
    return 0


def cmd_sample(args) -> int:
    from .sample import generate, load_for_sampling, save_grid

    device = _device(args.device)
    model, diffusion, _ = load_for_sampling(args.ckpt, args.weights, device)
    from tqdm import tqdm

    total = args.num * (args.steps if args.sampler == "ddim" else diffusion.num_timesteps)
    with tqdm(total=total, desc="sampling", unit="img-step", mininterval=1.0) as bar:
        x = generate(model, diffusion, args.num, sampler=args.sampler, steps=args.steps, eta=args.eta,
                     batch_size=args.batch_size, seed=args.seed, device=device,
                     autocast=device.type == "cuda" and not args.fp32, progress=bar.update, grid=args.ddim_grid,
                     eps_mode=args.ddim_eps)
    path = save_grid(x, args.out, nrow=args.nrow)
    print(f"[sample] {args.num} images ({args.sampler}, {args.steps if args.sampler == 'ddim' else 'all'} steps, "
          f"{args.weights} weights) -> {path}")
    return 0


def cmd_eval(args) -> int:
    import torch

    from .checkpoint import find_checkpoint
    from .data import build_dataset, parse_data_spec
    from .evaluate import real_set, score_models, write_json
    from .sample import build_model, data_channels, load_for_sampling

    device = _device(args.device)
    backbone = "inception" if args.inception_weights else args.backbone
    ck = find_checkpoint(args.ckpt)
    model, diffusion, cfg = load_for_sampling(ck, args.weights, device)
    data_cfg = cfg.data if args.data is None else parse_data_spec(args.data, cfg.data.image_size, data_channels(cfg))
    dataset = build_dataset(data_cfg)
    models = {"trained": model}
    if args.baseline:
        torch.manual_seed(cfg.train.seed)
        models["untrained"] = build_model(cfg, data_channels(cfg)).to(device).eval()
    real = real_set(dataset, args.real, args.num, seed=args.seed)
    res = score_models(models, diffusion, real, num=args.num, sampler=args.sampler, steps=args.steps, eta=args.eta,
                       batch_size=args.batch_size, seed=args.seed, backbone=backbone, resize=args.resize,
                       inception_weights=args.inception_weights, device=device,
                       autocast=device.type == "cuda" and not args.fp32, grid=args.ddim_grid, eps_mode=args.ddim_eps,
                       feature_cache=args.feature_cache or data_cfg.cache_dir)
    res.update(checkpoint=str(ck), weights=args.weights, data=dataset.name)
    out = Path(args.out) if args.out else ck.parent.parent / f"eval-{backbone}-{ck.name}.json"
    write_json(res, out)
    print(f"[eval] results ({res['backbone']}) -> {out}")
    return 0


def cmd_info(args) -> int:
    import platform

    import torch

    import maskdm_kernels
    from maskdm_kernels import info as kinfo

    print(f"maskdm {_version()}  python {platform.python_version()}  torch {torch.__version__}")
    for mod in ("torchmetrics", "safetensors", "efficientnet_lite_pytorch"):
        try:
            m = __import__(mod)
            print(f"  {mod}: {getattr(m, '__version__', 'installed')}")
        except ImportError:
            print(f"  {mod}: not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        print(f"  GPU: none visible (CPU threads: {torch.get_num_threads()})")
    print(f"  distributed backends: nccl={torch.distributed.is_nccl_available()} "
          f"gloo={torch.distributed.is_gloo_available()}")
    print()
    print(kinfo.report())
    del maskdm_kernels
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("maskdm")
    except PackageNotFoundError:
        return "0.1.0 (not installed)"


def _one_line(e: BaseException) -> str:
    """The error as one line: an OS error names its file; anything unexpected says it is internal."""
    from .config import ConfigError

    if isinstance(e, OSError) and e.strerror:
        files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        msg = f"{files}: {e.strerror}" if files else e.strerror
    else:
        msg = str(e) or type(e).__name__
    msg = " ".join(msg.split())
    if isinstance(e, ConfigError):
        return f"config error: {msg}"
    if _exit_code(e) == 1:
        return f"{type(e).__name__}: {msg} (rerun with --debug for the traceback)"
    return msg


def _exit_code(e: BaseException) -> int:
    from .checkpoint import CheckpointError
    from .run_dir import RunDirError
    from .train import DivergedError

    if isinstance(e, DivergedError):
        return 3
    user = (ValueError, OSError, CheckpointError, RunDirError)  # ConfigError is a ValueError; OSError: files
    return 2 if isinstance(e, user) else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "info": cmd_info, "compare": compare.main,
                "import-ref": import_ref.main}
    try:
        return handlers[args.cmd](args)
    except KeyboardInterrupt:
        print(f"maskdm {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        print(f"maskdm {args.cmd}: {_one_line(e)}", file=sys.stderr)
        return _exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
