"""The training loop: masked pre-training then full fine-tuning stages, one process or many (torchrun).

    maskdm train --config configs/fashion_mnist_quick.yaml [key=value ...] [--resume]
    torchrun --nproc_per_node 8 -m maskdm train --config configs/celebahq256_b_pretrain90.yaml

Determinism: every random draw of step ``s`` (timesteps, noise, flips, masks) comes from generators seeded
by ``(seed, s)`` over the *global* batch, and each rank keeps its share (positions ``rank::world``), matching
the batch ``DistributedSampler`` gives it. The data order is a pure function of ``(seed, stage, epoch)``.
So ``--resume`` replays exactly the uninterrupted run, and a run gives the same batches (up to float
reduction order) on 1 or N processes with the same global batch.

DDP: the model is wrapped in ``DistributedDataParallel`` and every forward of the loss goes through the
wrapper (``_Denoiser`` routes the packed-token path through ``DDP.forward``), so gradients are all-reduced.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from maskdm_kernels import Visible

from . import checkpoint as ckpt_io
from . import masking
from .config import Config, StageConfig
from .data import BatchPlan, build_dataset, infinite_batches, to_model_range
from .sample import build_model, generate, make_diffusion, save_grid

__all__ = ["step_generator", "train"]

_MASK64 = (1 << 63) - 1


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser over a running hash)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK64


def step_generator(seed: int, step: int, stream: int, device) -> torch.Generator:
    """The generator of random stream ``stream`` at global step ``step``."""
    return torch.Generator(device=device).manual_seed(_mix(seed, step, stream))


# ------------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ctrl: object = None  # a gloo group for host-side control messages (stop flag)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup(device_pref: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    if want_cuda and local >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK={local} but {torch.cuda.device_count()} CUDA device(s) are visible: run one "
                           f"process per GPU (torchrun --nproc_per_node {torch.cuda.device_count()}), or set "
                           f"train.device=cpu")
    if want_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    ctrl = None
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if want_cuda else "gloo",
                                    device_id=device if want_cuda else None)
        ctrl = dist.new_group(backend="gloo") if want_cuda else dist.group.WORLD
    return Dist(rank, world, local, device, ctrl)


class _Denoiser(nn.Module):
    """The module DDP wraps: one ``forward`` for both entry points of ``MaskedViT``, so the masked path
    (``forward_tokens``) also runs inside ``DDP.forward`` and its gradients are all-reduced."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, inputs: Tensor, t: Tensor, vis: Visible | None = None, tokens: bool = False, **kw) -> Tensor:
        if tokens:
            return self.net.forward_tokens(inputs, t, vis, **kw)
        return self.net(inputs, t, vis, **kw)


class _LossView:
    """What ``GaussianDiffusion.loss`` calls: both of its model calls go through ``module`` (DDP or not)."""

    def __init__(self, module: nn.Module, net: nn.Module):
        self.module = module
        self.patch_size = net.patch_size

    def __call__(self, x: Tensor, t: Tensor, **kw) -> Tensor:
        return self.module(x, t, **kw)

    def forward_tokens(self, tokens: Tensor, t: Tensor, vis: Visible, **kw) -> Tensor:
        return self.module(tokens, t, vis, tokens=True, **kw)


# ------------------------------------------------------------------------------------------------- inputs
def _rows(vis: Visible, rank: int, world: int) -> Visible:
    """Samples ``rank::world`` of a layout."""
    if world == 1:
        return vis
    B = vis.batch_size
    if vis.uniform:
        ids = vis.ids.view(B, vis.max_seqlen)[rank::world].reshape(-1).contiguous()
        b = ids.numel() // max(vis.max_seqlen, 1)
        cu = torch.arange(b + 1, device=ids.device, dtype=torch.int32) * vis.max_seqlen
        return Visible(ids, cu, vis.max_seqlen, vis.num_patches, True)
    keep = torch.zeros(B, vis.num_patches, dtype=torch.bool, device=vis.device)
    keep[vis.sample_index(), vis.ids.long()] = True
    return Visible.from_mask(~keep[rank::world])  # varlen: one host sync


def make_mask(stage: StageConfig, batch: int, grid: tuple[int, int], device, generator) -> Visible | None:
    if stage.mask == "none":
        return None
    ratio = list(stage.mask_ratio) if isinstance(stage.mask_ratio, tuple) else stage.mask_ratio
    if stage.mask == "random":
        return masking.random_patches(batch, grid, ratio, device=device, generator=generator)
    if stage.mask == "block":
        return masking.block_patches(batch, grid, ratio, block_size=stage.block_size, device=device,
                                     generator=generator)
    return masking.crop_patches(batch, grid, stage.crop_size, device=device, generator=generator)


def step_inputs(seed: int, step: int, stage: StageConfig, global_batch: int, shape: tuple, grid: tuple,
                timesteps: int, hflip: float, d: Dist):
    """(t, noise, flip, vis) of this rank at global step ``step``: drawn for the global batch, sliced."""
    dev, r, w = d.device, d.rank, d.world
    t = torch.randint(0, timesteps, (global_batch,), generator=step_generator(seed, step, 0, dev), device=dev)
    noise = torch.randn((global_batch, *shape), generator=step_generator(seed, step, 1, dev), device=dev)
    flip = None
    if hflip > 0:
        flip = torch.rand(global_batch, generator=step_generator(seed, step, 2, dev), device=dev)[r::w] < hflip
    # Varlen ratios draw their per-sample counts on the host: give them a CPU generator so they are seeded too.
    mdev = "cpu" if isinstance(stage.mask_ratio, tuple) else dev
    vis = make_mask(stage, global_batch, grid, dev, step_generator(seed, step, 3, mdev))
    vis = _rows(vis, r, w) if vis is not None else None
    return t[r::w].contiguous(), noise[r::w].contiguous(), flip, vis


# ------------------------------------------------------------------------------------------------- pieces
class EMA:
    """Exponential moving average of a model's parameters (fp32), kept as a module for sampling."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    def reset(self, model: nn.Module) -> None:
        self.model.load_state_dict(model.state_dict())

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def _lr(stage: StageConfig, local_step: int) -> float:
    if stage.warmup_steps > 0:
        return stage.lr * min(1.0, (local_step + 1) / stage.warmup_steps)
    return stage.lr


def _ema_decay(stage: StageConfig, n: int) -> float:
    return min(stage.ema_decay, (1 + n) / (10 + n)) if stage.ema_warmup else stage.ema_decay


def _optimizer(model: nn.Module, stage: StageConfig, device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=tuple(stage.betas),
                             weight_decay=stage.weight_decay, fused=device.type == "cuda" or None)


def _param_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and returns. A second Ctrl-C aborts."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class _Log:
    """metrics.jsonl (+ TensorBoard) on rank 0."""

    def __init__(self, out: Path, resume_step: int | None, tensorboard: bool, main: bool):
        self.main = main
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not main:
            return
        if resume_step is not None and self.path.is_file():  # drop what the interrupted run logged past the ckpt
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif self.path.is_file():
            self.path.unlink()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)

    def write(self, rec: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_loss(metrics_path: Path, out_png: Path, boundaries: list[tuple[int, str]] = ()) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.is_file():
        return None
    recs = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    recs = [r for r in recs if "loss" in r]
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name in dict.fromkeys(r["stage"] for r in recs):
        pts = [(r["step"], r["loss"]) for r in recs if r["stage"] == name]
        ax.plot(*zip(*pts), label=name, lw=1)
    for step, name in boundaries:
        ax.axvline(step, color="gray", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (visible patches)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def check_tensorboard(enabled: bool) -> None:
    if enabled:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise RuntimeError("train.tensorboard=true needs the tensorboard package: "
                               "pip install tensorboard") from None


# ---------------------------------------------------------------------------------------------- the loop
def train(cfg: Config, resume: bool = False, log=print, on_step=None, evaluate: bool = False,
          overwrite: bool = False, on_stage=None) -> dict:
    """Run every stage of ``cfg``; returns a summary (paths, steps, whether it was interrupted).

    ``on_step(step)``, if given, is called on every rank after each optimizer step (``step`` counts from 1); a
    true return value ends the current stage there (as its ``max_minutes`` would: ``maskdm compare``'s budget).
    ``on_stage(index, stage, ema_model)``, if given, is called as each stage's first step is about to run.
    ``evaluate``: afterwards sample and score (``cfg.eval``) on every rank, see ``evaluate_after_training``.
    ``overwrite``: delete ``train.out_dir`` first (a fresh run where an old one was).
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    check_tensorboard(cfg.train.tensorboard)
    d = _setup(cfg.train.device)
    log = log if d.main else (lambda *a, **k: None)
    try:
        if overwrite:
            if d.main and Path(cfg.train.out_dir).exists():
                import shutil

                shutil.rmtree(cfg.train.out_dir)
            if d.world > 1:
                dist.barrier(group=d.ctrl)
        with _StopFlag() as stop:
            summary = _train(cfg, resume, d, stop, log, on_step, on_stage)
        if evaluate and not summary["interrupted"]:
            t0 = time.time()
            summary.update(evaluate_after_training(cfg, summary, d, log))
            summary["eval_seconds"] = round(time.time() - t0, 1)
        return summary
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, resume: bool, d: Dist, stop: _StopFlag, log, on_step, on_stage=None) -> dict:
    tr = cfg.train
    if tr.threads:
        torch.set_num_threads(tr.threads)
    for i, s in enumerate(cfg.stages):
        if s.batch_size % d.world:
            raise ValueError(f"stages[{i}].batch_size={s.batch_size} must be divisible by the {d.world} processes")
    out = Path(tr.out_dir)
    ckdir = out / "checkpoints"
    bf16 = tr.precision == "bf16" or (tr.precision == "auto" and d.device.type == "cuda")

    dataset = build_dataset(cfg.data)
    channels = dataset.channels
    torch.manual_seed(tr.seed)
    model = build_model(cfg, channels).to(d.device)
    diffusion = make_diffusion(cfg)
    shape = (channels, cfg.data.image_size, cfg.data.image_size)
    grid = model.grid_size

    step, opt_state, opt_stage, resumed_from = 0, None, -1, None
    existing = ckpt_io.list_checkpoints(ckdir)
    if resume and existing:
        resumed_from = existing[-1]
        model.load_state_dict(ckpt_io.load_weights(resumed_from, "online", d.device))
        state = ckpt_io.load_state(resumed_from)
        step, opt_state, opt_stage = int(state["step"]), state["optimizer"], int(state["stage"])
        _restore_rng(state.get("rng", {}), d)
        changed = _diff(ckpt_io.load_config_dict(resumed_from), cfg.to_dict())
        if changed:
            log(f"[train] warning: resuming with a config that differs from the checkpoint's in {', '.join(changed)}; "
                f"the run is no longer the uninterrupted one")
    elif existing and not resume:
        raise FileExistsError(f"{ckdir} already holds checkpoints (newest {existing[-1].name}); pass --resume to "
                              f"continue that run, or set train.out_dir to a new folder")
    elif tr.init_from:
        src = tr.init_from
        model.load_state_dict(ckpt_io.load_weights(src, tr.init_weights, d.device))
        log(f"[train] initialised from {src} ({tr.init_weights} weights)")
    ema = EMA(model)
    if resumed_from is not None:
        ema.model.load_state_dict(ckpt_io.load_weights(resumed_from, "ema", d.device))
        log(f"[train] resuming from {resumed_from} at step {step}")
    elif resume:
        log(f"[train] --resume: no checkpoint in {ckdir}, starting from step 0")

    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    logger = _Log(out, step if resumed_from is not None else None, tr.tensorboard, d.main)
    module = _Denoiser(model)
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    view = _LossView(module, model)
    nparams = sum(p.numel() for p in model.parameters())
    log(f"[train] {cfg.model.name}: {nparams / 1e6:.2f}M parameters, {dataset.name}: {len(dataset)} images "
        f"{shape}, device {d.device} x {d.world} process(es), {'bf16 autocast' if bf16 else 'fp32'}")

    interrupted = 0
    optimizer_steps = 0
    truncated: dict[str, int] = {}
    last_ckpt: Path | None = None
    grids: list[Path] = []
    boundaries: list[tuple[int, str]] = []

    def save(si: int, local: int, optimizer) -> Path | None:
        nonlocal last_ckpt
        if d.main:
            plan_len = plan.__len__()
            state = {"step": step, "stage": si, "stage_step": local, "optimizer": optimizer.state_dict(),
                     "rng": _rng_state(d), "world_size": d.world,
                     "data": {"stage": si, "epoch": local // plan_len, "batch_in_epoch": local % plan_len,
                              "seed": data_seed, "global_batch": stage.batch_size}}
            last_ckpt = ckpt_io.save_checkpoint(ckdir, step, model.state_dict(), ema.model.state_dict(), state,
                                                cfg.to_dict(), keep_last=tr.keep_last,
                                                meta={"stage": stage.name, "stage_step": local})
        if d.world > 1:
            dist.barrier(group=d.ctrl)
        return last_ckpt

    def sample_grid(tag: str) -> None:
        if not d.main:
            return
        x = generate(ema.model, diffusion, tr.sample_num, sampler="ddim", steps=tr.sample_steps, eta=tr.sample_eta,
                     batch_size=min(tr.sample_num, 256), seed=tr.seed, device=d.device, autocast=bf16)
        grids.append(save_grid(x, out / "samples" / f"{tag}.png"))

    for si, stage in enumerate(cfg.stages):
        start = cfg.stage_start(si)
        end = start + stage.steps
        boundaries.append((start, stage.name))
        if step >= end or stage.steps == 0:
            continue
        local = step - start
        fresh = opt_state is None or opt_stage != si
        if fresh and local == 0 and si > 0 and stage.init_weights == "ema":
            model.load_state_dict(ema.model.state_dict())
        if fresh and local == 0:
            ema.reset(model)
        optimizer = _optimizer(model, stage, d.device)
        if not fresh:
            optimizer.load_state_dict(opt_state)
        opt_state = None
        data_seed = _mix(tr.seed, si) & 0x7FFFFFFF
        plan = BatchPlan(len(dataset), stage.batch_size // d.world, data_seed, d.rank, d.world)
        batches = infinite_batches(dataset, plan, local, cfg.data.num_workers, d.device.type == "cuda")
        masked = "full images" if stage.mask == "none" else f"{stage.mask} mask {stage.mask_ratio}" + (
            f", block {stage.block_size}" if stage.mask == "block" else "")
        log(f"[train] stage {si} '{stage.name}': steps {start}..{end} ({masked}), batch {stage.batch_size}, "
            f"lr {stage.lr:g}, {len(plan)} steps/epoch")
        bar = None
        if d.main and tr.progress:
            from tqdm import tqdm

            bar = tqdm(total=stage.steps, initial=local, desc=stage.name, unit="step", mininterval=1.0,
                       dynamic_ncols=True)
        if on_stage is not None:
            on_stage(si, stage, ema.model)
        t_stage = time.monotonic()
        win_loss = torch.zeros((), device=d.device)
        win_n, win_t = 0, time.perf_counter()
        autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        for local, batch in batches:
            if local >= stage.steps:
                break
            lr = _lr(stage, local)
            for g in optimizer.param_groups:
                g["lr"] = lr
            t, noise, flip, vis = step_inputs(tr.seed, step, stage, stage.batch_size, shape, grid,
                                              diffusion.num_timesteps, cfg.data.hflip, d)
            x0 = to_model_range(batch, d.device, flip)
            with autocast:
                loss = diffusion.loss(view, x0, vis, t=t, noise=noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip) if stage.grad_clip > 0 \
                else None
            optimizer.step()
            ema.update(model, _ema_decay(stage, local))
            step += 1
            optimizer_steps += 1
            win_loss += loss.detach().float()
            win_n += 1
            ended = bool(on_step(step)) if on_step is not None else False
            done = local + 1 == stage.steps
            over_time = ended or stage.max_minutes is not None and time.monotonic() - t_stage > 60 * stage.max_minutes
            signalled, timed_out = _agree_stop(stop, d, over_time)  # the same on every rank
            timed_out = timed_out and not done
            if step % tr.log_every == 0 or done or signalled or timed_out:
                if d.world > 1:
                    dist.all_reduce(win_loss)
                    win_loss /= d.world
                now = time.perf_counter()
                ips = win_n * stage.batch_size / max(now - win_t, 1e-9)
                rec = {"step": step, "stage": stage.name, "loss": float(win_loss) / win_n, "lr": lr,
                       "img_per_s": round(ips, 1), "time": round(time.time(), 3)}
                if gnorm is not None:
                    rec["grad_norm"] = float(gnorm)
                logger.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{ips:.0f}", refresh=False)
                win_loss.zero_()
                win_n, win_t = 0, time.perf_counter()
            if bar is not None:
                bar.update(1)
            if signalled:
                save(si, local + 1, optimizer)
                interrupted = stop.signum or signal.SIGTERM
                break
            if timed_out:
                why = "on_step ended it" if ended or stage.max_minutes is None else \
                    f"reached max_minutes={stage.max_minutes:g}"
                log(f"[train] stage '{stage.name}' {why} after {local + 1} of "
                    f"{stage.steps} steps; moving on")
                truncated[stage.name] = local + 1
                step = end  # the next stage starts where it would have
                break
            if not done and tr.sample_every and step % tr.sample_every == 0:
                sample_grid(f"step_{step:08d}")
            if not done and tr.ckpt_every and step % tr.ckpt_every == 0:
                save(si, local + 1, optimizer)
        batches.close()
        if bar is not None:
            bar.close()
        if interrupted:
            log(f"[train] stopped by signal {interrupted} at step {step}; checkpoint {last_ckpt}")
            break
        save(si, stage.steps, optimizer)
        sample_grid(f"{stage.name}_end_step_{step:08d}")
        grid = grids[-1] if grids else "-"
        log(f"[train] stage '{stage.name}' done at step {step}: checkpoint {last_ckpt}, grid {grid}")

    summary = {"out_dir": str(out), "step": step, "interrupted": int(interrupted), "checkpoint": str(last_ckpt),
               "metrics": str(logger.path), "grids": [str(g) for g in grids], "world_size": d.world,
               "optimizer_steps_this_run": optimizer_steps, "stages_cut_by_time": truncated}
    logger.close()
    if d.world > 1:
        digests = [None] * d.world
        dist.all_gather_object(digests, _param_digest(model), group=d.ctrl)
        summary["rank_param_sha256"] = digests
        summary["ranks_identical"] = len(set(digests)) == 1
        if d.main:
            (out / "ddp_check.json").write_text(json.dumps({"step": step, "world_size": d.world,
                                                            "rank_param_sha256": digests,
                                                            "ranks_identical": summary["ranks_identical"]}, indent=2))
        if not summary["ranks_identical"]:
            raise RuntimeError(f"DDP ranks diverged: parameter digests {digests}")
        log(f"[train] DDP: the {d.world} ranks hold bit-identical weights (sha256 {digests[0][:16]}...)")
    if d.main and not interrupted:
        png = plot_loss(logger.path, out / "loss.png", boundaries[1:])
        summary["loss_curve"] = str(png) if png else None
    return summary


def _diff(a, b, path: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in dict.fromkeys([*a, *b])
                for k in _diff(a.get(key), b.get(key), f"{path}.{key}".lstrip("."))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [k for i, (x, y) in enumerate(zip(a, b)) for k in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def _agree_stop(stop: _StopFlag, d: Dist, over_time: bool) -> tuple[bool, bool]:
    """(signalled, over time), agreed by all ranks so they stop at the same step: the flags are max-reduced over
    a host (gloo) group, no GPU sync."""
    if d.world == 1:
        return bool(stop.signum), over_time
    flags = torch.tensor([stop.signum, int(over_time)], dtype=torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=d.ctrl)
    signum, timed_out = (int(f) for f in flags)
    if signum and not stop.signum:
        stop.signum = signum
    return bool(signum), bool(timed_out)


def _rng_state(d: Dist) -> dict:
    st = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if d.device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(d.device)
    return st


def _restore_rng(st: dict, d: Dist) -> None:
    # Training draws come from (seed, step)-keyed generators; the global states are restored for anything else.
    if "torch" in st:
        torch.set_rng_state(st["torch"])
    if "python" in st:
        random.setstate((3, tuple(st["python"]), None))
    if "cuda" in st and d.device.type == "cuda":
        torch.cuda.set_rng_state(st["cuda"], d.device)


def evaluate_after_training(cfg: Config, summary: dict, d: Dist | None = None, log=print) -> dict:
    """Sample and score the final EMA (or online) weights and, for reference, the untrained model (the run's
    initial weights, rebuilt from the seed), against ``eval.num`` training images. With several processes
    the sampling is spread over the ranks. Writes ``<out_dir>/eval.json`` and ``samples/final.png``."""
    from .evaluate import real_images, score_models, write_json

    d = d or Dist()
    ev = cfg.eval
    out = Path(cfg.train.out_dir)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dataset = build_dataset(cfg.data)
    ck = ckpt_io.find_checkpoint(out)
    model = build_model(cfg, dataset.channels)
    model.load_state_dict(ckpt_io.load_weights(ck, ev.weights))
    models = {"trained": model.to(d.device).eval()}
    if ev.baseline_untrained:
        torch.manual_seed(cfg.train.seed)  # the very initial weights of the run
        models["untrained"] = build_model(cfg, dataset.channels).to(d.device).eval()
    real = real_images(dataset, ev.num, seed=ev.seed)
    grid_path = out / "samples" / "final.png"
    res = score_models(models, make_diffusion(cfg), real, num=ev.num, sampler=ev.sampler, steps=ev.steps, eta=ev.eta,
                       batch_size=ev.batch_size, seed=ev.seed, backbone=ev.backbone, resize=ev.resize,
                       inception_weights=ev.inception_weights, device=d.device, autocast=d.device.type == "cuda",
                       grids={"trained": grid_path} if d.main else None, grid_size=min(ev.grid, ev.batch_size),
                       log=log)
    res.update(checkpoint=str(ck), weights=ev.weights, data=dataset.name, step=summary.get("step"))
    path = out / "eval.json"
    if d.main:
        write_json(res, path)
    return {"eval_json": str(path), "final_grid": str(grid_path), "eval": res}
