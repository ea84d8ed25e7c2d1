"""The training loop: masked pre-training then full fine-tuning stages, one process or many (torchrun).

    maskdm train --config configs/fashion_mnist_quick.yaml [key=value ...] [--resume]
    torchrun --nproc_per_node 8 -m maskdm train --config configs/celebahq256_b_pretrain90.yaml

Where things are: this file runs the stages (resume, logging and checkpoint points, signals); ``inputs.py``
draws each step's inputs; ``step.py`` is the device work of one step; ``distributed.py`` the process set-up;
``metrics.py`` the on-device loss window and ``metrics.jsonl``; ``run_dir.py`` the run folder's marker and lock;
``checkpoint.py`` the checkpoint files; ``ema.py`` the EMA and its schedules.

Determinism: every random draw of step ``s`` (timesteps, noise, flips, masks) comes from generators seeded
by ``(seed, s)`` over the *global* batch, and each rank keeps its share (positions ``rank::world``), matching
the batch ``DistributedSampler`` gives it. The data order is a pure function of ``(seed, stage, epoch)``.
So ``--resume`` replays exactly the uninterrupted run, and a run gives the same batches (up to float
reduction order) on 1 or N processes with the same global batch.

Divergence: a non-finite loss or gradient norm stops the run with ``DivergedError``. It is checked where the loop
reads the device anyway (every ``train.log_every`` steps, and before each checkpoint or sample grid), so no
non-finite checkpoint is ever written and the last good ones are kept.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt_io
from .config import Config, StageConfig
from .data import BatchPlan, build_dataset, infinite_batches, to_model_range
from .distributed import Dist, StopFlag, agree_stop, barrier, check_ranks_identical, on_main, setup, teardown
from .ema import EMA, ema_decay
from .inputs import make_mask, mix_seed, restore_rng, rng_state, step_generator, step_inputs
from .metrics import MetricsLog, Window, check_tensorboard, plot_loss
from .run_dir import prepare_run_dir
from .sample import build_model, generate, make_diffusion, save_grid
from .step import Denoiser, TrainStep, compile_forward, resolve_compile, step_options

__all__ = ["DivergedError", "evaluate_after_training", "make_mask", "step_generator", "step_inputs", "train"]


class DivergedError(RuntimeError):
    """A non-finite loss or gradient norm; the message names the stage, the steps and the last good checkpoint."""


# ----------------------------------------------------------------------------------------------- the run
@dataclass
class _Run:
    """Everything the stages share; the loop's only mutable state."""

    cfg: Config
    d: Dist
    log: object
    dataset: object
    model: nn.Module
    diffusion: object
    shape: tuple
    patch_grid: tuple
    bf16: bool
    ema: EMA | None = None
    module: nn.Module | None = None  # what the forward goes through: Denoiser, or DDP around it
    logger: MetricsLog | None = None
    step: int = 0
    opt_state: dict | None = None
    opt_stage: int = -1
    resumed_from: Path | None = None
    interrupted: int = 0
    optimizer_steps: int = 0
    truncated: dict = field(default_factory=dict)
    last_ckpt: Path | None = None
    grids: list = field(default_factory=list)
    boundaries: list = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.out_dir)

    @property
    def ckdir(self) -> Path:
        return self.out / "checkpoints"


@dataclass
class _Stage:
    """One stage while it runs."""

    index: int
    cfg: StageConfig
    start: int
    optimizer: torch.optim.Optimizer
    step: TrainStep
    plan: BatchPlan
    data_seed: int
    window: Window
    stop: StopFlag
    on_step: object = None
    bar: object = None
    t0: float = field(default_factory=time.monotonic)
    checked: int = 0  # the last step known finite (checked at a log point or before a save)

    @property
    def end(self) -> int:
        return self.start + self.cfg.steps


def _quiet(*args, **kwargs) -> None:
    pass


def train(cfg: Config, resume: bool = False, log=print, on_step=None, evaluate: bool = False,
          overwrite: bool = False, on_stage=None) -> dict:
    """Run every stage of ``cfg``; returns a summary (paths, steps, whether it was interrupted).

    ``on_step(step)``, if given, is called on every rank after each optimizer step (``step`` counts from 1); a
    true return value ends the current stage there (as its ``max_minutes`` would: ``maskdm compare``'s budget).
    ``on_stage(index, stage, ema_model)``, if given, is called as each stage's first step is about to run.
    ``evaluate``: afterwards sample and score (``cfg.eval``) on every rank, see ``evaluate_after_training``.
    ``overwrite``: empty ``train.out_dir`` first, if it is a maskdm run folder (see ``run_dir.py``).
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    check_tensorboard(cfg.train.tensorboard)
    d = setup(cfg.train.device)
    log = log if d.main else _quiet
    lock = None
    try:
        lock = on_main(d, prepare_run_dir, cfg.train.out_dir, resume, overwrite, log, share=False)
        with StopFlag() as stop:
            run = _start(cfg, d, resume, log)
            summary = _run_stages(run, stop, on_step, on_stage)
        if evaluate and not summary["interrupted"]:
            t0 = time.time()
            summary.update(evaluate_after_training(cfg, summary, d, log))
            summary["eval_seconds"] = round(time.time() - t0, 1)
        return summary
    finally:
        if lock is not None:
            lock.release()
        teardown(d)


def _start(cfg: Config, d: Dist, resume: bool, log) -> _Run:
    """Build the data, model and EMA; resume or initialise; write config.yaml; wrap for DDP."""
    tr = cfg.train
    if tr.threads:
        torch.set_num_threads(tr.threads)
    for i, s in enumerate(cfg.stages):
        if s.batch_size % d.world:
            raise ValueError(f"stages[{i}].batch_size={s.batch_size} must be divisible by the {d.world} processes")
    dataset = build_dataset(cfg.data)
    torch.manual_seed(tr.seed)
    model = build_model(cfg, dataset.channels).to(d.device)
    bf16 = tr.precision == "bf16" or (tr.precision == "auto" and d.device.type == "cuda")
    run = _Run(cfg, d, log, dataset, model, make_diffusion(cfg), (dataset.channels, cfg.data.image_size,
               cfg.data.image_size), model.grid_size, bf16)
    _load_start(run, resume)
    if d.main:
        import yaml

        (run.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run.logger = MetricsLog(run.out, run.step if run.resumed_from is not None else None, tr.tensorboard, d.main)
    run.module = Denoiser(model)
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run.module = DDP(run.module, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    nparams = sum(p.numel() for p in model.parameters())
    log(f"[train] {cfg.model.name}: {nparams / 1e6:.2f}M parameters, {dataset.name}: {len(dataset)} images "
        f"{run.shape}, device {d.device} x {d.world} process(es), {'bf16 autocast' if bf16 else 'fp32'}")
    return run


def _load_start(run: _Run, resume: bool) -> None:
    """The starting weights: the newest checkpoint that verifies (``resume``), ``train.init_from``, or the
    seeded initialisation."""
    tr, d = run.cfg.train, run.d
    existing = ckpt_io.list_checkpoints(run.ckdir)
    if existing and not resume:
        raise FileExistsError(f"{run.ckdir} already holds checkpoints (newest {existing[-1].name}); pass --resume "
                              f"to continue that run, --overwrite to start it over, or set train.out_dir to a new "
                              f"folder")
    if existing:
        ck = Path(on_main(d, _newest_verified, run))
        _resume_from(run, ck)
        return
    if resume:
        run.log(f"[train] --resume: no checkpoint in {run.ckdir}, starting from step 0")
    if tr.init_from:
        src = tr.init_from
        ckpt_io.load_into(run.model, ckpt_io.load_weights(src, tr.init_weights, d.device), src)
        run.log(f"[train] initialised from {src} ({tr.init_weights} weights)")
    run.ema = EMA(run.model)


def _newest_verified(run: _Run) -> str:
    return str(ckpt_io.newest_verified(run.ckdir, warn=run.log))


def _resume_from(run: _Run, ck: Path) -> None:
    dev = run.d.device
    ckpt_io.load_into(run.model, ckpt_io.load_weights(ck, "online", dev, verify=False), ck / "model.safetensors")
    run.ema = EMA(run.model)
    ckpt_io.load_into(run.ema.model, ckpt_io.load_weights(ck, "ema", dev, verify=False), ck / "ema.safetensors")
    state = ckpt_io.load_state(ck)
    run.step, run.opt_state, run.opt_stage = int(state["step"]), state["optimizer"], int(state["stage"])
    run.resumed_from = ck
    restore_rng(state.get("rng", {}), run.d)
    changed = _diff(ckpt_io.load_config_dict(ck), run.cfg.to_dict())
    if changed:
        run.log(f"[train] warning: resuming with a config that differs from the checkpoint's in "
                f"{', '.join(changed)}; the run is no longer the uninterrupted one")
    run.log(f"[train] resuming from {ck} at step {run.step}")


def _run_stages(run: _Run, stop: StopFlag, on_step, on_stage) -> dict:
    for si, stage in enumerate(run.cfg.stages):
        start = run.cfg.stage_start(si)
        run.boundaries.append((start, stage.name))
        if run.step >= start + stage.steps or stage.steps == 0:
            continue
        st = _begin_stage(run, si, stage, stop, on_step)
        if on_stage is not None:
            on_stage(si, stage, run.ema.model)
        _run_stage(run, st)
        if run.interrupted:
            run.log(f"[train] stopped by signal {run.interrupted} at step {run.step}; checkpoint {run.last_ckpt}")
            break
    return _finish(run)


def _begin_stage(run: _Run, si: int, stage: StageConfig, stop: StopFlag, on_step) -> _Stage:
    """The stage's optimizer (restored when resuming inside it), its data plan and its step."""
    cfg, d = run.cfg, run.d
    start = cfg.stage_start(si)
    local = run.step - start
    fresh = run.opt_state is None or run.opt_stage != si
    if fresh and local == 0 and si > 0 and stage.init_weights == "ema":
        run.model.load_state_dict(run.ema.model.state_dict())
    if fresh and local == 0:
        run.ema.reset(run.model)
    optimizer = torch.optim.AdamW(run.model.parameters(), lr=stage.lr, betas=tuple(stage.betas),
                                  weight_decay=stage.weight_decay, fused=d.device.type == "cuda" or None)
    if not fresh:
        try:
            ckpt_io.load_optimizer_state(optimizer, run.opt_state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise ckpt_io.CheckpointError(f"{run.resumed_from / 'state.pt'}: its optimizer state does not fit this "
                                          f"model and stage ({' '.join(str(e).split())})") from None
    run.opt_state = None
    data_seed = mix_seed(cfg.train.seed, si) & 0x7FFFFFFF
    plan = BatchPlan(len(run.dataset), stage.batch_size // d.world, data_seed, d.rank, d.world)
    step = TrainStep(run.model, run.module, run.diffusion, optimizer, run.ema, stage.grad_clip, run.bf16,
                     **step_options(cfg.train, stage, stage.batch_size // d.world, run.patch_grid, d.device))
    masked = "full images" if stage.mask == "none" else f"{stage.mask} mask {stage.mask_ratio}" + (
        f", block {stage.block_size}" if stage.mask == "block" else "")
    run.log(f"[train] stage {si} '{stage.name}': steps {start}..{start + stage.steps} ({masked}), batch "
            f"{stage.batch_size}, lr {stage.lr:g}, ema {stage.ema_schedule} {stage.ema_decay:g}, {len(plan)} "
            f"steps/epoch")
    bar = None
    if d.main and cfg.train.progress:
        from tqdm import tqdm

        bar = tqdm(total=stage.steps, initial=local, desc=stage.name, unit="step", mininterval=1.0,
                   dynamic_ncols=True)
    return _Stage(si, stage, start, optimizer, step, plan, data_seed, Window(d.device), stop, on_step, bar)


def _run_stage(run: _Run, st: _Stage) -> None:
    st.t0 = time.monotonic()  # the stage's time cap counts from here
    batches = infinite_batches(run.dataset, st.plan, run.step - st.start, run.cfg.data.num_workers,
                               run.d.device.type == "cuda")
    try:
        for local, batch in batches:
            if local >= st.cfg.steps or _one_step(run, st, local, batch):
                break
    finally:
        batches.close()
        if st.bar is not None:
            st.bar.close()
    if run.interrupted:
        return
    _save(run, st, st.cfg.steps)
    _sample_grid(run, f"{st.cfg.name}_end_step_{run.step:08d}", st)
    run.log(f"[train] stage '{st.cfg.name}' done at step {run.step}: checkpoint {run.last_ckpt}, grid "
            f"{run.grids[-1] if run.grids else '-'}")


def _one_step(run: _Run, st: _Stage, local: int, batch) -> bool:
    """One optimizer step and what follows it (log, signals, time cap, grids, checkpoints). True: leave the
    stage."""
    cfg, d, stage = run.cfg, run.d, st.cfg
    lr = stage.lr * min(1.0, (local + 1) / stage.warmup_steps) if stage.warmup_steps > 0 else stage.lr
    t, noise, flip, vis = step_inputs(cfg.train.seed, run.step, stage, stage.batch_size, run.shape, run.patch_grid,
                                      run.diffusion.num_timesteps, cfg.data.hflip, d)
    res = st.step(to_model_range(batch, d.device, flip), t, noise, vis, lr,
                  ema_decay(stage.ema_schedule, stage.ema_decay, local))
    st.window.add(res.loss, res.grad_norm)
    run.step += 1
    run.optimizer_steps += 1
    ended = bool(st.on_step(run.step)) if st.on_step is not None else False
    done = local + 1 == stage.steps
    over_time = ended or stage.max_minutes is not None and time.monotonic() - st.t0 > 60 * stage.max_minutes
    signalled, timed_out = agree_stop(st.stop, d, over_time)  # the same on every rank
    timed_out = timed_out and not done
    if run.step % cfg.train.log_every == 0 or done or signalled or timed_out:
        _log_window(run, st, lr)
    if st.bar is not None:
        st.bar.update(1)
    if signalled:
        _save(run, st, local + 1)
        run.interrupted = st.stop.signum or signal.SIGTERM
        return True
    if timed_out:
        why = "on_step ended it" if ended or stage.max_minutes is None else \
            f"reached max_minutes={stage.max_minutes:g}"
        run.log(f"[train] stage '{stage.name}' {why} after {local + 1} of {stage.steps} steps; moving on")
        run.truncated[stage.name] = local + 1
        run.step = st.end  # the next stage starts where it would have
        return True
    if not done and cfg.train.sample_every and run.step % cfg.train.sample_every == 0:
        _sample_grid(run, f"step_{run.step:08d}", st)
    if not done and cfg.train.ckpt_every and run.step % cfg.train.ckpt_every == 0:
        _save(run, st, local + 1)
    return False


def _log_window(run: _Run, st: _Stage, lr: float) -> None:
    """Write the window's record (the loop's one host sync per log_every steps); stop if it went non-finite."""
    first = max(run.step - st.window.n, st.checked) + 1
    rec, bad = st.window.flush(run.d, run.step, st.cfg.name, lr, st.cfg.batch_size)
    rec.update(st.step.compile_stats())  # compiled steps: graphs built, and how many after the stage's first step
    run.logger.write(rec)
    if st.bar is not None:
        st.bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}", refresh=False)
    if bad:
        _diverged(run, st, first, f"mean loss {rec['loss']:.4g}, mean grad norm {rec['grad_norm']:.4g}")
    st.checked = run.step


def _guard(run: _Run, st: _Stage) -> None:
    """Before anything is written from the weights: stop if a step since the last log point went non-finite."""
    if st.window.nonfinite(run.d):
        _diverged(run, st, max(run.step - st.window.n, st.checked) + 1, "found before writing a checkpoint or grid")
    st.checked = run.step


def _diverged(run: _Run, st: _Stage, first: int, detail: str) -> None:
    good = ckpt_io.list_checkpoints(run.ckdir)
    i = st.index
    steps = f"at step {first}" if first == run.step else f"between steps {first} and {run.step}"
    raise DivergedError(f"training diverged in stage '{st.cfg.name}': a non-finite loss or gradient norm {steps} "
                        f"({detail}); stopped without saving, the newest good "
                        f"checkpoint is {good[-1] if good else 'none'}; lower stages[{i}].lr or set "
                        f"stages[{i}].grad_clip, then --resume")


def _save(run: _Run, st: _Stage, local: int) -> None:
    """A checkpoint at the current step (``local`` steps into the stage), written by rank 0."""
    _guard(run, st)
    run.last_ckpt = Path(on_main(run.d, _write_checkpoint, run, st, local))
    barrier(run.d)


def _write_checkpoint(run: _Run, st: _Stage, local: int) -> str:
    n = len(st.plan)
    state = {"step": run.step, "stage": st.index, "stage_step": local, "optimizer": st.optimizer.state_dict(),
             "rng": rng_state(run.d), "world_size": run.d.world,
             "data": {"stage": st.index, "epoch": local // n, "batch_in_epoch": local % n, "seed": st.data_seed,
                      "global_batch": st.cfg.batch_size}}
    tr = run.cfg.train
    return str(ckpt_io.save_checkpoint(run.ckdir, run.step, run.model.state_dict(), run.ema.model.state_dict(),
                                       state, run.cfg.to_dict(), keep_last=tr.keep_last,
                                       meta={"stage": st.cfg.name, "stage_step": local}))


def _sample_grid(run: _Run, tag: str, st: _Stage) -> None:
    _guard(run, st)
    if not run.d.main:
        return
    tr = run.cfg.train
    net = compile_forward(run.ema.model, resolve_compile(tr.compile, run.d.device))
    x = generate(net, run.diffusion, tr.sample_num, sampler="ddim", steps=tr.sample_steps,
                 eta=tr.sample_eta, batch_size=min(tr.sample_num, 256), seed=tr.seed, device=run.d.device,
                 autocast=run.bf16)
    run.grids.append(save_grid(x, run.out / "samples" / f"{tag}.png"))


def _finish(run: _Run) -> dict:
    d = run.d
    summary = {"out_dir": str(run.out), "step": run.step, "interrupted": int(run.interrupted),
               "checkpoint": str(run.last_ckpt), "metrics": str(run.logger.path), "grids": [str(g) for g in run.grids],
               "world_size": d.world, "optimizer_steps_this_run": run.optimizer_steps,
               "stages_cut_by_time": run.truncated}
    run.logger.close()
    if d.world > 1:
        summary.update(check_ranks_identical(run.model, d, run.step, run.out, run.log))
    if d.main and not run.interrupted:
        png = plot_loss(run.logger.path, run.out / "loss.png", run.boundaries[1:])
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


def evaluate_after_training(cfg: Config, summary: dict, d: Dist | None = None, log=print) -> dict:
    """Sample and score the final EMA (or online) weights and, for reference, the untrained model (the run's
    initial weights, rebuilt from the seed), against ``eval.num`` training images. With several processes
    the sampling is spread over the ranks. Writes ``<out_dir>/eval.json`` and ``samples/final.png``."""
    from .evaluate import eval_options, real_set, score_models, write_json

    d = d or Dist()
    ev = cfg.eval
    out = Path(cfg.train.out_dir)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dataset = build_dataset(cfg.data)
    ck = ckpt_io.find_checkpoint(out)
    model = build_model(cfg, dataset.channels)
    ckpt_io.load_into(model, ckpt_io.load_weights(ck, ev.weights), ck)
    models = {"trained": model.to(d.device).eval()}
    if ev.baseline_untrained:
        torch.manual_seed(cfg.train.seed)  # the very initial weights of the run
        models["untrained"] = build_model(cfg, dataset.channels).to(d.device).eval()
    mode = resolve_compile(cfg.train.compile, d.device)
    models = {k: compile_forward(m, mode) for k, m in models.items()}  # the sampler's forward, compiled
    real = real_set(dataset, ev.real, ev.num, seed=ev.seed)  # eval.real: all | sample
    grid_path = out / "samples" / "final.png"
    res = score_models(models, make_diffusion(cfg), real, **eval_options(ev, d.device, cfg.data.cache_dir),
                       grids={"trained": grid_path} if d.main else None, grid_size=min(ev.grid, ev.batch_size),
                       log=log)
    res.update(checkpoint=str(ck), weights=ev.weights, data=dataset.name, step=summary.get("step"))
    path = out / "eval.json"
    if d.main:
        write_json(res, path)
    return {"eval_json": str(path), "final_grid": str(grid_path), "eval": res}
