"""Atomic checkpoints: ``<run>/checkpoints/ckpt-00001234/`` holding

    model.safetensors   online weights (fp32)
    ema.safetensors     EMA weights
    state.pt            optimizer, RNG states, step / stage, data position (torch.save, loads weights_only)
    config.json         the run's resolved config (rebuilds the model for `maskdm sample` / `eval`)
    meta.json           step, stage, time: for humans

A checkpoint is written into a hidden temporary folder, every file fsync'ed, then the folder is renamed
into place: a reader (or a resume after a crash or kill mid-save) sees a complete checkpoint or none.
Only complete ``ckpt-<step>`` folders are ever listed; stale temporaries are swept on the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["find_checkpoint", "list_checkpoints", "load_state", "load_weights", "save_checkpoint"]

_NAME = re.compile(r"^ckpt-(\d{8})$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write(path: Path, writer) -> None:
    writer(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _tensors(state_dict: dict) -> dict:
    """Contiguous CPU tensors with their own storage (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``ckpt_dir``, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save_checkpoint(ckpt_dir: str | Path, step: int, model_state: dict, ema_state: dict, state: dict,
                    config: dict, keep_last: int = 3, meta: dict | None = None) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep_last``. Returns its path."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(".tmp-*"):  # left by a killed save; never a valid checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    final = ckpt_dir / f"ckpt-{step:08d}"
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    _write(tmp / "model.safetensors", lambda p: save_file(_tensors(model_state), str(p), metadata={"step": str(step)}))
    _write(tmp / "ema.safetensors", lambda p: save_file(_tensors(ema_state), str(p), metadata={"step": str(step)}))
    _write(tmp / "state.pt", lambda p: torch.save(state, p))
    _write(tmp / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    info = {"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **(meta or {})}
    _write(tmp / "meta.json", lambda p: p.write_text(json.dumps(info, indent=2)))
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
        old = ckpt_dir / f".tmp-old-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)  # the commit point
    _fsync_dir(ckpt_dir)
    for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        trash = ckpt_dir / f".tmp-del-{old.name}-{os.getpid()}"
        os.rename(old, trash)  # leave no partly deleted ckpt-* behind
        shutil.rmtree(trash, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """Resolve ``path`` to a checkpoint folder: a ``ckpt-*`` folder itself, a ``checkpoints/`` folder or a run
    folder (its newest checkpoint)."""
    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file():
        return path
    for d in (path, path / "checkpoints"):
        found = list_checkpoints(d)
        if found:
            return found[-1]
    raise FileNotFoundError(f"no checkpoint at {path} (expected a ckpt-XXXXXXXX folder, or a run folder with "
                            f"checkpoints/ckpt-XXXXXXXX inside)")


def load_weights(path: str | Path, which: str = "online", device="cpu") -> dict:
    """State dict of a checkpoint (``which``: online or ema) or of a ``.safetensors`` file."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        return load_file(str(path), device=str(device))
    if which not in ("online", "ema"):
        raise ValueError(f"which must be 'online' or 'ema', got {which!r}")
    ckpt = find_checkpoint(path)
    return load_file(str(ckpt / ("model.safetensors" if which == "online" else "ema.safetensors")), device=str(device))


def load_state(ckpt: str | Path) -> dict:
    return torch.load(Path(ckpt) / "state.pt", map_location="cpu", weights_only=True)


def load_config_dict(ckpt: str | Path) -> dict:
    return json.loads((Path(ckpt) / "config.json").read_text())
