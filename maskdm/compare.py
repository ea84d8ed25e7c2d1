"""``maskdm compare``: FID and KID against training wall-clock for several recipes at one budget.

    maskdm compare --config configs/compare/fmnist32_scratch.yaml --config configs/compare/fmnist32_mask75.yaml \\
        --minutes 4 --evals 4 --out runs/compare32

Each config is an *arm*. The arms train one after the other on this machine, with the same seed and data, for the
same training time ``--minutes``; a stage gets the share ``stages[i].budget_fraction`` of it (stages without one
share what the others leave), so "pre-train masked for 40%, then fine-tune" is one arm. A stage's ``steps`` and
``max_minutes`` are ignored here: the budget decides where it ends. ``K = --evals`` times, at ``k/K`` of the budget,
the clock stops, the arm's EMA weights are sampled and scored (one protocol for every arm, against one set of real
images), and the clock resumes: evaluation time, and the checkpoint + sample grid at a stage switch, are reported
apart and never eat into training. ``DIR/compare.json`` is rewritten (atomically) after every point, so Ctrl-C keeps
what was measured; ``DIR/compare.png`` plots FID and KID against minutes with the stage switches marked.

``--clock cpu`` counts this process's CPU time instead of wall-clock: on a CPU machine shared with other work, the
arms (run one after the other) then get the same compute whatever the load did meanwhile; both are recorded.
``--steps S`` replaces the time budget with one of ``S`` optimizer steps (split by the same fractions, points at
``k/K`` of the steps): the points then depend only on the seed, which makes a run repeatable (the test mode).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["Clock", "add_arguments", "main", "plot", "run_compare", "stage_fractions"]

_HUGE = 10**9  # a stage's step count when the time budget ends it
_CLOCKS = {"wall": time.monotonic, "cpu": time.process_time}


class Clock:
    """Seconds of training, not counting the time spent paused (evaluation, stage switches).

    ``kind="wall"``: monotonic wall-clock. ``kind="cpu"``: this process's CPU time (all its threads), which other
    load on a shared machine barely changes (with one training thread it is the wall time the same work takes on an
    idle core). ``wall()`` is the wall-clock with the same pauses, whatever the kind.
    """

    def __init__(self, kind: str = "wall"):
        if kind not in _CLOCKS:
            raise ValueError(f"clock must be one of {', '.join(_CLOCKS)}, got {kind!r}")
        self.kind = kind
        self._src = (_CLOCKS[kind], time.monotonic)
        self._start = [f() for f in self._src]
        self._paused_at: list[float] | None = None
        self._paused = [0.0, 0.0]

    def _read(self, i: int) -> float:
        now = self._paused_at[i] if self._paused_at is not None else self._src[i]()
        return now - self._start[i] - self._paused[i]

    def __call__(self) -> float:
        return self._read(0)

    def wall(self) -> float:
        return self._read(1)

    @property
    def paused(self) -> bool:
        return self._paused_at is not None

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = [f() for f in self._src]

    def resume(self) -> None:
        if self._paused_at is not None:
            for i, f in enumerate(self._src):
                self._paused[i] += f() - self._paused_at[i]
            self._paused_at = None


def stage_fractions(cfg) -> list[float]:
    """Each stage's share of the budget: ``budget_fraction`` where given, an equal share of the rest otherwise."""
    from .config import ConfigError

    given = [s.budget_fraction for s in cfg.stages]
    total = sum(f for f in given if f is not None)
    missing = [i for i, f in enumerate(given) if f is None]
    if not missing:
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"stages[*].budget_fraction = {given} sum to {total:g}; expected 1 (or leave one "
                              f"stage's null to give it the rest)")
        return given
    rest = 1.0 - total
    if rest <= 1e-9:
        raise ConfigError(f"stages[*].budget_fraction = {given} leave nothing for stage(s) {missing}; expected the "
                          f"given fractions to sum to less than 1")
    return [f if f is not None else rest / len(missing) for f in given]


def _arm_config(cfg, fractions: list[float], steps: int | None, seed: int, out_dir: Path):
    cfg = copy.deepcopy(cfg)
    bounds = _cumulative(fractions)
    for i, s in enumerate(cfg.stages):
        s.max_minutes = None
        if steps is None:
            s.steps = _HUGE
        else:
            s.steps = round(steps * bounds[i]) - (round(steps * bounds[i - 1]) if i else 0)
            if s.steps < 1:
                raise ValueError(f"--steps {steps}: stage {s.name!r} gets {s.steps} steps at budget_fraction "
                                 f"{fractions[i]:g}; expected a larger --steps")
    tr = cfg.train
    tr.seed, tr.out_dir, tr.progress, tr.ckpt_every, tr.sample_every, tr.tensorboard = \
        seed, str(out_dir), False, 0, 0, False
    cfg.eval.enabled = False
    return cfg


def _cumulative(fractions: list[float]) -> list[float]:
    out, acc = [], 0.0
    for f in fractions:
        acc += f
        out.append(acc)
    out[-1] = 1.0  # the last stage ends exactly at the budget
    return out


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return []


def _log(msg: str) -> None:
    print(msg, flush=True)  # progress reaches a log file as it happens


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


class Evaluator:
    """One evaluation protocol for every arm: ``num`` DDIM/DDPM samples of the given weights against ``num`` real
    images (features computed once), FID and KID on one backbone."""

    def __init__(self, dataset, device, *, num: int, sampler: str, steps: int, eta: float, batch_size: int,
                 seed: int, backbone: str, resize: int, inception_weights: str | None):
        from .evaluate import FeatureMetrics, backbone_name, make_backbone, real_images

        self.device, self.num, self.sampler, self.steps, self.eta = device, num, sampler, steps, eta
        self.batch_size, self.seed = batch_size, seed
        real = real_images(dataset, num, seed=seed)
        feat = make_backbone(backbone, resize, inception_weights, device)
        self.metrics = FeatureMetrics(feat, kid_subset_size=min(1000, num, real.shape[0]), device=device)
        for i in range(0, real.shape[0], batch_size):
            self.metrics.update(real[i:i + batch_size], real=True)
        self.protocol = {"num_generated": num, "num_real": int(real.shape[0]), "sampler": sampler, "steps": steps,
                         "eta": eta, "seed": seed, "backbone": backbone_name(backbone, resize), "weights": "ema",
                         "data": dataset.name}

    def __call__(self, model, diffusion) -> dict:
        import torch

        from .sample import generate, to_uint8

        self.metrics.reset_fake()
        for i, start in enumerate(range(0, self.num, self.batch_size)):
            b = min(self.batch_size, self.num - start)
            x = generate(model, diffusion, b, sampler=self.sampler, steps=self.steps, eta=self.eta, batch_size=b,
                         seed=self.seed, first_batch=i, device=self.device, autocast=self.device.type == "cuda")
            self.metrics.update(to_uint8(x), real=False)
        with torch.random.fork_rng(devices=[]):  # KID's random subsets: seeded, and the global RNG left alone
            torch.manual_seed(self.seed)
            return self.metrics.compute()


class _Arm:
    """The callbacks of one arm's ``train`` run: stage switches, the budget, evaluation points, progress."""

    def __init__(self, rec: dict, cfg, fractions, budget_s: float | None, budget_steps: int | None, evals: int,
                 evaluate, diffusion, save, log, device, clock: str, at_start: bool = False):
        self.rec, self.cfg, self.evaluate, self.diffusion = rec, cfg, evaluate, diffusion
        self.save, self.log, self.device, self.at_start = save, log, device, at_start
        self.budget_s, self.budget_steps = budget_s, budget_steps
        total = budget_s if budget_s is not None else budget_steps
        bounds = _cumulative(fractions)
        self.stage_end = [total * b for b in bounds] if budget_s is not None else \
            [round(budget_steps * b) for b in bounds]
        self.targets = [total * k / evals for k in range(1, evals + 1)]
        if budget_steps is not None:
            self.targets = [round(t) for t in self.targets]
        self.clock = Clock(clock)
        self.clock.pause()  # runs from the first stage's start
        self.n = 0  # optimizer steps of this arm
        self.si = -1
        self.ema = None
        self.images = 0
        self.last_beat = time.monotonic()

    def on_stage(self, index: int, stage, ema_model) -> None:
        self.si, self.ema = index, ema_model
        self.rec["stages"][index].update(start_seconds=round(self.clock(), 3),
                                         start_wall_seconds=round(self.clock.wall(), 3), start_step=self.n)
        if index == 0 and self.at_start:
            self._point([])  # the initial weights (the EMA starts as a copy of them)
        self.clock.resume()

    def on_step(self, step: int) -> bool:
        st = self.rec["stages"][self.si]
        self.n += 1
        self.images += self.cfg.stages[self.si].batch_size
        st["steps"] += 1
        st["images"] += self.cfg.stages[self.si].batch_size
        progress = self.clock() if self.budget_s is not None else self.n
        ending = progress >= self.stage_end[self.si]
        due = [k for k, t in enumerate(self.targets) if progress >= t]
        if due or ending:
            self._sync()
        if ending:
            self.clock.pause()  # the checkpoint and sample grid at the stage's end are not training
            st["seconds"] = round(self.clock() - st["start_seconds"], 3)
            st["images_per_s"] = round(st["images"] / max(st["seconds"], 1e-9), 1)
        if due:
            self._point(due)
        elif time.monotonic() - self.last_beat > 30:
            self.last_beat = time.monotonic()
            unit = f"{self.clock() / 60:.2f}/{self.budget_s / 60:g} min" if self.budget_s is not None else \
                f"{self.n}/{self.budget_steps} steps"
            self.log(f"[compare] {self.rec['name']}: {self.cfg.stages[self.si].name} {unit}, step {self.n}, "
                     f"{self.images / max(self.clock(), 1e-9):.0f} img/s")
        return ending and self.budget_s is not None

    def _sync(self) -> None:
        if self.device.type == "cuda":  # queued training work belongs to the training time
            import torch

            torch.cuda.synchronize(self.device)

    def _point(self, due: list[int]) -> None:
        paused = self.clock.paused
        self.clock.pause()
        seconds, wall = self.clock(), self.clock.wall()
        t0 = time.monotonic()
        r = self.evaluate(self.ema, self.diffusion)
        took = time.monotonic() - t0
        if due:
            self.targets = self.targets[max(due) + 1:]
        point = {"seconds": round(seconds, 3), "wall_seconds": round(wall, 3), "step": self.n,
                 "stage": self.cfg.stages[self.si].name, "fid": r["fid"], "kid": r["kid_mean"], "kid_std": r["kid_std"],
                 "eval_seconds": round(took, 2)}
        self.rec["points"].append(point)
        self.rec["eval_seconds"] = round(self.rec["eval_seconds"] + took, 2)
        self.rec["train_seconds"] = round(seconds, 3)
        self.rec["train_wall_seconds"] = round(wall, 3)
        self.rec["images_per_s"] = round(self.images / max(seconds, 1e-9), 1)
        self.log(f"[compare] {self.rec['name']}: {seconds / 60:.2f} min, step {self.n} ({point['stage']}): "
                 f"FID {r['fid']:.2f}  KID {r['kid_mean']:.4f}  (evaluation {took:.0f}s, not counted)")
        self.save()
        if not paused:
            self.clock.resume()
        self.last_beat = time.monotonic()


def run_compare(arms: list[tuple[str, str, object]], out: str | Path, *, minutes: float | None = None,
                steps: int | None = None, evals: int = 4, eval_num: int = 200, eval_sampler: str = "ddim",
                eval_steps: int = 50, eval_eta: float = 1.0, eval_batch_size: int = 100, eval_seed: int = 0,
                backbone: str = "effnet-lite0", resize: int = 128, inception_weights: str | None = None,
                seed: int | None = None, clock: str = "wall", eval_at_start: bool = False, command: str | None = None,
                log=None) -> dict:
    """Train and score every arm (``(name, config path, Config)``) at one budget; returns what compare.json holds.

    Exactly one of ``minutes`` (training time per arm, on ``clock``: wall or cpu) and ``steps`` (optimizer steps
    per arm) is given.
    """
    import torch

    from .data import build_dataset
    from .sample import make_diffusion
    from .train import train

    log = log or _log

    if (minutes is None) == (steps is None):
        raise ValueError("give exactly one budget: minutes (wall-clock) or steps (the repeatable mode)")
    if minutes is not None and minutes <= 0 or steps is not None and steps < 1 or evals < 1:
        raise ValueError(f"minutes={minutes}, steps={steps}, evals={evals}: expected a positive budget and evals >= 1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("maskdm compare runs in one process (the arms share the machine one after the other); "
                           "run it without torchrun")
    names = [a[0] for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {names}")
    first = arms[0][2]
    seeds = {a[2].train.seed for a in arms}
    if seed is None and len(seeds) > 1:
        raise ValueError(f"the arms' train.seed differ ({sorted(seeds)}); pass --seed to use one for all")
    seed = first.train.seed if seed is None else seed
    for name, path, cfg in arms[1:]:
        if cfg.data != first.data:
            diff = [k for k in first.data.__dict__ if getattr(first.data, k) != getattr(cfg.data, k)]
            raise ValueError(f"arms must train on the same data: {path} differs from {arms[0][1]} in "
                             f"data.{', data.'.join(diff)}")
    out = Path(out)
    fractions = {name: stage_fractions(cfg) for name, _, cfg in arms}  # errors before any work
    acfgs = {name: _arm_config(cfg, fractions[name], steps, seed, out / "runs" / name) for name, _, cfg in arms}

    out.mkdir(parents=True, exist_ok=True)
    if first.train.threads:
        torch.set_num_threads(first.train.threads)
    pref = first.train.device
    device = torch.device("cuda" if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()) else "cpu")
    if clock == "cpu" and device.type == "cuda":
        raise ValueError("clock='cpu' measures this process's CPU time, not GPU work: use the wall clock on a GPU")
    Clock(clock)  # a bad kind fails here, before any work
    json_path, png_path = out / "compare.json", out / "compare.png"
    result = {"device": _device_name(device), "torch": torch.__version__,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
              "budget": {"minutes": minutes, "steps": steps, "evals": evals, "clock": clock}, "seed": seed,
              "load_average": {"start": _load(), "end": None}, "arms": []}
    t0 = time.monotonic()
    dataset = build_dataset(first.data)
    evaluator = Evaluator(dataset, device, num=eval_num, sampler=eval_sampler, steps=eval_steps, eta=eval_eta,
                          batch_size=eval_batch_size, seed=eval_seed, backbone=backbone, resize=resize,
                          inception_weights=inception_weights)
    result["protocol"] = {**evaluator.protocol, "real_feature_seconds": round(time.monotonic() - t0, 1)}
    del dataset
    for name, path, cfg in arms:
        result["arms"].append({"name": name, "config": str(path), "status": "pending", "points": [],
                               "stages": [{"name": s.name, "mask": s.mask, "mask_ratio": s.mask_ratio,
                                           "fraction": f, "steps": 0, "images": 0}
                                          for s, f in zip(cfg.stages, fractions[name])],
                               "train_seconds": 0.0, "eval_seconds": 0.0, "images_per_s": None})

    def save() -> None:
        _write_json(result, json_path)

    save()
    log(f"[compare] {len(arms)} arms, budget {f'{minutes:g} min' if minutes is not None else f'{steps} steps'} "
        f"each, {evals} evaluation points ({eval_num} samples, {eval_sampler} {eval_steps} steps) on "
        f"{result['device']}; results -> {json_path}")
    interrupted = False
    try:
        for i, (name, path, cfg) in enumerate(arms):
            rec = result["arms"][i]
            acfg = acfgs[name]
            rec.update(status="running", load_average={"start": _load(), "end": None})
            log(f"[compare] arm {i + 1}/{len(arms)} {name!r} ({path}): stages "
                + ", ".join(f"{s['name']} {s['fraction']:.0%}" for s in rec["stages"]))
            arm = _Arm(rec, acfg, fractions[name], None if minutes is None else 60.0 * minutes, steps, evals,
                       evaluator, make_diffusion(acfg), save, log, device, clock, eval_at_start)
            wall = time.monotonic()
            summary = train(acfg, log=lambda *a: None, on_step=arm.on_step, on_stage=arm.on_stage, overwrite=True)
            rec.update(wall_seconds=round(time.monotonic() - wall, 1), load_average={**rec["load_average"],
                                                                                     "end": _load()})
            rec["switch_seconds"] = round(rec["wall_seconds"] - rec.get("train_wall_seconds", 0.0)
                                          - rec["eval_seconds"], 1)
            if summary["interrupted"]:
                rec["status"] = "interrupted"
                interrupted = True
                break
            rec["status"] = "done"
            save()
    except KeyboardInterrupt:
        interrupted = True
        for rec in result["arms"]:
            if rec["status"] == "running":
                rec["status"] = "interrupted"
    result["interrupted"] = interrupted
    result["load_average"]["end"] = _load()
    result["wall_seconds"] = round(time.monotonic() - t0, 1)
    save()
    plot(result, png_path)
    log(f"[compare] {'interrupted; kept' if interrupted else 'done:'} {json_path} and {png_path}")
    return result


def plot(result: dict, path: str | Path) -> Path:
    """FID and KID against training minutes, one line per arm, stage switches marked (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import save_figure

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for j, arm in enumerate(result["arms"]):
        color = f"C{j}"
        pts = arm["points"]
        for ax, key in zip(axes, ("fid", "kid")):
            if pts:
                ax.plot([p["seconds"] / 60 for p in pts], [p[key] for p in pts], "o-", color=color, lw=1.5,
                        label=f"{arm['name']} ({arm['images_per_s'] or 0:.0f} img/s)")
            for st in arm["stages"][1:]:
                if "start_seconds" in st:
                    ax.axvline(st["start_seconds"] / 60, color=color, ls=":", lw=1)
    b = result["budget"]
    cpu = b.get("clock") == "cpu"
    budget = f"{b['minutes']:g} {'CPU-' if cpu else ''}min" if b["minutes"] is not None else f"{b['steps']} steps"
    for ax, label, key in zip(axes, ("FID", "KID"), ("fid", "kid")):
        values = [p[key] for arm in result["arms"] for p in arm["points"] if p[key] > 0]
        ax.set_xlabel("training minutes (" + ("process CPU time" if cpu else "wall-clock") + ", evaluation excluded)")
        ax.set_ylabel(f"{label} ({result.get('protocol', {}).get('backbone', '')[:18]})")
        if values and max(values) > 4 * min(values):  # log only where the values span a range
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    pr = result.get("protocol", {})
    fig.suptitle(f"budget {budget} per arm on {result['device'][:70]}; {pr.get('num_generated', '?')} samples "
                 f"({pr.get('sampler', '')} {pr.get('steps', '')} steps) per point; dotted: stage switch", fontsize=9)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.description = __doc__.split("\n\n", 2)[2].split("\n\n")[0].replace("\n", " ")
    p.add_argument("--config", action="append", required=True, metavar="FILE",
                   help="an arm's YAML config (repeat: one per arm; the arm is named after the file)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="training time per arm on --clock (evaluation excluded)")
    budget.add_argument("--steps", type=int, help="instead of --minutes: optimizer steps per arm; the points then "
                        "depend only on the seed (repeatable, the test mode)")
    p.add_argument("--evals", type=int, default=4, help="evaluation points per arm, at k/K of the budget")
    p.add_argument("--eval-at-start", action="store_true", help="also score each arm's initial weights (a point at "
                   "0 minutes, step 0: where an untrained model stands under this protocol)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="what --minutes counts: wall-clock, or "
                   "this process's CPU time (fairer between arms run one after the other on a shared CPU machine; "
                   "with one training thread it is the time on an idle core); both are recorded")
    p.add_argument("--out", required=True, help="output folder: compare.json, compare.png, runs/<arm>/")
    p.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="a dotted override applied to every arm, e.g. --set train.threads=1")
    p.add_argument("--seed", type=int, default=None, help="train.seed for every arm (default: the arms' own, "
                   "which must agree)")
    e = p.add_argument_group("evaluation protocol (the same for every arm)")
    e.add_argument("--eval-num", type=int, default=200, help="generated images per point, and as many real ones")
    e.add_argument("--eval-sampler", choices=["ddim", "ddpm"], default="ddim")
    e.add_argument("--eval-steps", type=int, default=50, help="DDIM steps")
    e.add_argument("--eval-eta", type=float, default=1.0, help="DDIM eta")
    e.add_argument("--eval-batch-size", type=int, default=100)
    e.add_argument("--eval-seed", type=int, default=0, help="seeds the samples, the real images and KID's subsets")
    e.add_argument("--backbone", choices=["effnet-lite0", "inception"], default="effnet-lite0")
    e.add_argument("--resize", type=int, default=128, help="backbone input size (effnet-lite0)")
    e.add_argument("--inception-weights", default=None, help="FID Inception weights file (--backbone inception)")


def _command(args) -> str:
    """The command line that reproduces this run (options as parsed)."""
    parts = ["maskdm compare", *(f"--config {c}" for c in args.config), *(f"--set {s}" for s in args.set)]
    for k, v in vars(args).items():
        if k in ("config", "set", "cmd") or v is None or v is False:
            continue
        parts.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}"))
    return " ".join(parts)


def main(args) -> int:
    from .config import load_config

    arms = []
    for path in args.config:
        name = Path(path).stem
        cfg = load_config(path, args.set)
        arms.append((name, path, cfg))
    res = run_compare(arms, args.out, minutes=args.minutes, steps=args.steps, evals=args.evals,
                      eval_num=args.eval_num, eval_sampler=args.eval_sampler, eval_steps=args.eval_steps,
                      eval_eta=args.eval_eta, eval_batch_size=args.eval_batch_size, eval_seed=args.eval_seed,
                      backbone=args.backbone, resize=args.resize, inception_weights=args.inception_weights,
                      seed=args.seed, clock=args.clock, eval_at_start=args.eval_at_start, command=_command(args))
    return 130 if res["interrupted"] else 0
