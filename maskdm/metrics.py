"""Training metrics: values accumulated on the device between log points, ``metrics.jsonl`` (+ TensorBoard),
and the loss curve.

The loop syncs with the device once per ``train.log_every`` steps (``Window.flush``), and that one read also
tells whether any step since the last one had a non-finite loss or gradient norm (the sums would be).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["MetricsLog", "Window", "check_tensorboard", "plot_loss"]


class Window:
    """The loss and gradient-norm sums of the steps since the last log point, kept on the device. A non-finite
    value in any step makes its sum non-finite, so the sums also answer "did any step go non-finite?" (a finite
    overflow would need values near 3e38: a divergence too). ``add`` is two in-place adds and never syncs."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.grad_norm = torch.zeros((), device=device)
        self.n = 0
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """``loss``, ``grad_norm``: 0-dim fp32 device tensors of one step."""
        self.loss += loss
        self.grad_norm += grad_norm
        self.n += 1

    def nonfinite(self, d) -> bool:
        """Whether any rank saw a non-finite value since the last flush (one sync; a collective with ranks)."""
        bad = (~torch.isfinite(self.loss + self.grad_norm)).float()
        if d.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad)

    def flush(self, d, step: int, stage: str, lr: float, global_batch: int) -> tuple[dict, bool]:
        """The log record of the window (loss and grad norm averaged over steps and ranks) and whether it saw a
        non-finite value; then start a new window. One all-reduce and one host sync."""
        vals = torch.stack([self.loss, self.grad_norm])
        if d.world > 1:
            dist.all_reduce(vals)
        loss_sum, gnorm_sum = vals.tolist()
        now, n = time.perf_counter(), max(self.n, 1)
        rec = {"step": step, "stage": stage, "loss": loss_sum / d.world / n, "lr": lr,
               "grad_norm": gnorm_sum / d.world / n, "img_per_s": round(self.n * global_batch / max(now - self.t0, 1e-9), 1),
               "time": round(time.time(), 3)}
        self.loss.zero_()
        self.grad_norm.zero_()
        self.n, self.t0 = 0, time.perf_counter()
        return rec, not math.isfinite(loss_sum + gnorm_sum)


class MetricsLog:
    """``metrics.jsonl`` (+ TensorBoard) on rank 0."""

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
    for step, _ in boundaries:
        ax.axvline(step, color="gray", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (visible patches)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out_png)


def save_figure(fig, path: Path) -> Path:
    """Lay out, save and close a matplotlib figure; written under a temporary name and renamed, so a reader (or a
    crash mid-write) never sees half a PNG."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def check_tensorboard(enabled: bool) -> None:
    if enabled:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise RuntimeError("train.tensorboard=true needs the tensorboard package: "
                               "pip install tensorboard") from None
