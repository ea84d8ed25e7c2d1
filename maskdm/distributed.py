"""Process set-up for one process or many (torchrun), and the host-side agreements between ranks.

Control messages (stop flags, errors found on rank 0, weight digests) go over a gloo group (``Dist.ctrl``), so
they never wait on the GPU stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Dist", "StopFlag", "agree_stop", "barrier", "check_ranks_identical", "on_main", "setup",
           "teardown"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ctrl: object = None  # a gloo group for host-side control messages

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_pref: str) -> Dist:
    """Read torchrun's environment, pick the device, and join the process group when there are several ranks."""
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


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier(group=d.ctrl)


class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and returns. A second Ctrl-C aborts."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
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


def agree_stop(stop: StopFlag, d: Dist, over_time: bool) -> tuple[bool, bool]:
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


def param_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_ranks_identical(model: nn.Module, d: Dist, step: int, out: Path, log) -> dict:
    """Gather every rank's weight digest; write ``ddp_check.json``; raise if the ranks diverged."""
    digests = [None] * d.world
    dist.all_gather_object(digests, param_digest(model), group=d.ctrl)
    same = len(set(digests)) == 1
    if d.main:
        (out / "ddp_check.json").write_text(json.dumps({"step": step, "world_size": d.world,
                                                        "rank_param_sha256": digests, "ranks_identical": same},
                                                       indent=2))
    if not same:
        raise RuntimeError(f"DDP ranks diverged: parameter digests {digests}")
    log(f"[train] DDP: the {d.world} ranks hold bit-identical weights (sha256 {digests[0][:16]}...)")
    return {"rank_param_sha256": digests, "ranks_identical": same}


def on_main(d: Dist, fn, *args, share: bool = True):
    """``fn(*args)`` on rank 0 only. Every rank returns its result (``share``: broadcast, else None off rank 0)
    or raises if it failed, so no rank is left waiting at a later collective."""
    result, error = None, None
    if d.main:
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    if d.world > 1:
        box = [result if share and error is None else None, None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=0, group=d.ctrl)
        if not d.main:
            if box[1] is not None:
                raise RuntimeError(f"rank 0 failed: {box[1]}")
            result = box[0]
    if error is not None:
        raise error
    return result
