"""Atomic checkpoints: ``<run>/checkpoints/ckpt-00001234/`` holding

    model.safetensors   online weights (fp32)
    ema.safetensors     EMA weights
    state.pt            optimizer, RNG states, step / stage, data position (torch.save, loads weights_only)
    config.json         the run's resolved config (rebuilds the model for `maskdm sample` / `eval`)
    meta.json           step, stage, time: for humans
    manifest.json       sha256 and size of each file above; written last

A checkpoint is written into a hidden temporary folder, every file fsync'ed, then the folder is renamed
into place: a reader (or a resume after a crash or kill mid-save) sees a complete checkpoint or none.
Only complete ``ckpt-<step>`` folders are ever listed; stale temporaries are swept on the next save.
The manifest catches what happens to a checkpoint later (truncation, flipped bytes): ``verify_checkpoint``
checks it, ``--resume`` falls back to the newest checkpoint that verifies, and ``load_weights`` checks the one
file it reads. A failed save (disk full, permissions) removes its temporary folder and raises
``CheckpointError`` naming the checkpoint; the checkpoints already there are untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["CheckpointError", "find_checkpoint", "list_checkpoints", "load_into", "load_optimizer_state", "load_state",
           "load_weights", "newest_verified", "save_checkpoint", "verify_checkpoint"]

_NAME = re.compile(r"^ckpt-(\d{8})$")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read or used; the message names the file."""


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
    final = ckpt_dir / f"ckpt-{step:08d}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(".tmp-*"):  # left by a killed save; never a valid checkpoint
            shutil.rmtree(stale, ignore_errors=True)
        tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {final}: {_reason(e)}") from e
    try:
        _write_files(tmp, step, model_state, ema_state, state, config, meta)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {_reason(e)}") from e
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


def _write_files(tmp: Path, step: int, model_state: dict, ema_state: dict, state: dict, config: dict,
                 meta: dict | None) -> None:
    _write(tmp / "model.safetensors", lambda p: save_file(_tensors(model_state), str(p), metadata={"step": str(step)}))
    _write(tmp / "ema.safetensors", lambda p: save_file(_tensors(ema_state), str(p), metadata={"step": str(step)}))
    _write(tmp / "state.pt", lambda p: torch.save(state, p))
    _write(tmp / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    info = {"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **(meta or {})}
    _write(tmp / "meta.json", lambda p: p.write_text(json.dumps(info, indent=2)))
    files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
    _write(tmp / MANIFEST, lambda p: p.write_text(json.dumps({"format": 1, "files": files}, indent=2)))
    _fsync_dir(tmp)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
    return " ".join(str(e).split()) or type(e).__name__


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_checkpoint(ckpt: str | Path, files: tuple[str, ...] | None = None) -> str | None:
    """None if the checkpoint's files (or just ``files``) match its manifest, else what is wrong. A checkpoint
    written before manifests existed has nothing to check against and passes."""
    ckpt = Path(ckpt)
    man = ckpt / MANIFEST
    if not man.is_file():
        return None
    try:
        listed = json.loads(man.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{man} is unreadable ({_reason(e)})"
    for name in files or tuple(listed):
        p = ckpt / name
        want = listed.get(name)
        if want is None:
            return f"{p} is not listed in {MANIFEST}"
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != want["bytes"]:
            return f"{p} has {p.stat().st_size} bytes, the manifest says {want['bytes']} (truncated?)"
        if _sha256(p) != want["sha256"]:
            return f"{p} does not match its sha256 in {MANIFEST} (corrupted)"
    return None


def newest_verified(ckpt_dir: str | Path, warn=print) -> Path | None:
    """The newest checkpoint in ``ckpt_dir`` whose files match their manifest, warning about each newer one that
    does not; None if there is none at all. Raises ``CheckpointError`` if there are some but none verifies."""
    found = list_checkpoints(ckpt_dir)
    problems = []
    for ck in reversed(found):
        problem = verify_checkpoint(ck)
        if problem is None:
            return ck
        problems.append(problem)
        warn(f"[train] warning: checkpoint {ck.name} fails verification: {problem}; falling back to the previous one")
    if found:
        raise CheckpointError(f"no checkpoint in {ckpt_dir} verifies: {'; '.join(problems)}")
    return None


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


def load_weights(path: str | Path, which: str = "online", device="cpu", verify: bool = True) -> dict:
    """State dict of a checkpoint (``which``: online or ema) or of a ``.safetensors`` file, checked against the
    checkpoint's manifest (``verify``; off where ``verify_checkpoint`` just passed)."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        return _load_safetensors(path, device)
    if which not in ("online", "ema"):
        raise ValueError(f"which must be 'online' or 'ema', got {which!r}")
    ckpt = find_checkpoint(path)
    name = "model.safetensors" if which == "online" else "ema.safetensors"
    problem = verify_checkpoint(ckpt, (name,)) if verify else None
    if problem:
        raise CheckpointError(problem)
    return _load_safetensors(ckpt / name, device)


def _load_safetensors(path: Path, device) -> dict:
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {_reason(e)}") from None


def load_into(model: nn.Module, state_dict: dict, source: str | Path) -> None:
    """``model.load_state_dict(state_dict)`` with one-line errors naming ``source`` and the first mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    if missing or extra:
        raise CheckpointError(f"{source} does not fit this model: {len(missing)} missing key(s) (first "
                              f"{missing[:1]}), {len(extra)} unexpected key(s) (first {extra[:1]}); was it written "
                              f"for another model config?")
    for k, v in own.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source} does not fit this model: {k} has shape {tuple(state_dict[k].shape)} "
                                  f"there, {tuple(v.shape)} in the model built from this config")
    model.load_state_dict(state_dict)


# How an optimizer runs, not what it learned: a resumed run keeps its own (a checkpoint from a CPU run carries
# fused=None, one from a captured step capturable=True and a device-tensor lr).
_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping ``optimizer``'s implementation flags and its (float) lr.

    ``load_state_dict`` replaces every param group with the saved one, so a CPU run's checkpoint resumed on a GPU
    would run foreach AdamW with its step counters on the host (and a captured step then fails its capturable
    check). The step counters follow the flags kept: on the parameter's device, float32, when fused or
    capturable."""
    if len(state["param_groups"]) == len(optimizer.param_groups):  # else load_state_dict names the mismatch
        groups = [{**saved, **{k: own[k] for k in _IMPLEMENTATION if k in own}, "lr": own["lr"]}
                  for saved, own in zip(state["param_groups"], optimizer.param_groups)]
        state = {**state, "param_groups": groups}
    optimizer.load_state_dict(state)


def load_state(ckpt: str | Path) -> dict:
    path = Path(ckpt) / "state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a readable training state: {_reason(e)}") from None


def load_config_dict(ckpt: str | Path) -> dict:
    path = Path(ckpt) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable config: {_reason(e)}") from None
