"""The run folder (``train.out_dir``): its marker, its lock, and what ``--overwrite`` may delete.

    .maskdm-run    written when a run starts: marks the folder as a maskdm run folder. ``--overwrite`` empties
                   only a folder holding it, and never the working directory, one of its parents or $HOME.
    .maskdm-lock   held (flock) while a run uses the folder; holds the pid and host. A second run into the same
                   folder fails with ``RunLockedError`` naming them; the lock of a process that has ended is
                   released by the kernel, so the next run takes it over (and says so).

A fresh run refuses a non-empty folder without the marker (it would mix its files into someone else's).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

__all__ = ["LOCK", "MARKER", "RunDirError", "RunLock", "RunLockedError", "prepare_run_dir"]

MARKER = ".maskdm-run"
LOCK = ".maskdm-lock"


class RunDirError(RuntimeError):
    """The run folder cannot be used as asked; the message names it and says why."""


class RunLockedError(RunDirError):
    """Another live run holds the folder's lock."""


def _kind(out: Path) -> str:
    """missing | empty | run | foreign (non-empty, no marker)."""
    if not out.exists():
        return "missing"
    if not out.is_dir():
        raise RunDirError(f"train.out_dir={out} exists and is not a folder")
    names = {p.name for p in out.iterdir()}
    if MARKER in names:
        return "run"
    return "empty" if names <= {LOCK} else "foreign"


def _has_checkpoints(out: Path) -> bool:
    from .checkpoint import list_checkpoints

    return bool(list_checkpoints(out / "checkpoints"))


def _refuse_unsafe_overwrite(out: Path, kind: str) -> None:
    real = out.resolve()
    here = Path.cwd().resolve()
    if real == here or here.is_relative_to(real) or real == Path.home().resolve():
        raise RunDirError(f"--overwrite refuses to empty train.out_dir={out} ({real}): it is the working directory, "
                          f"one of its parents or the home folder; set train.out_dir to a run folder of its own")
    if kind == "foreign":
        raise RunDirError(f"--overwrite refuses to empty train.out_dir={out}: it is not a maskdm run folder (no "
                          f"{MARKER} marker inside); delete it yourself or choose another train.out_dir")


def _empty(out: Path, keep: set[str]) -> None:
    for p in out.iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def prepare_run_dir(out: str | Path, resume: bool, overwrite: bool, log=print) -> RunLock:
    """Check ``out`` may be used, lock it, empty it for ``overwrite``, write the marker. Returns the held lock
    (release it when the run ends)."""
    out = Path(out)
    kind = _kind(out)
    if overwrite:
        _refuse_unsafe_overwrite(out, kind)
    elif kind == "foreign" and not (resume and _has_checkpoints(out)):  # a pre-marker run folder may resume
        raise RunDirError(f"train.out_dir={out} is a non-empty folder that is not a maskdm run folder (no {MARKER} "
                          f"marker inside); choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out).acquire(log)
    try:
        if overwrite and kind == "run":
            _empty(out, keep={LOCK})
        marker = out / MARKER
        if not marker.is_file():
            marker.write_text(json.dumps({"maskdm_run": 1, "created": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    except BaseException:
        lock.release()
        raise
    return lock


class RunLock:
    """An exclusive ``flock`` on ``<out>/.maskdm-lock`` holding ``{"pid", "host", "since"}``."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self.fd: int | None = None

    def acquire(self, log=print) -> RunLock:
        for _ in range(100):  # retried only when a releasing run unlinked the file between our open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read(fd))
                os.close(fd)
                raise RunLockedError(f"train.out_dir={self.path.parent} is in use by another run ({holder}); wait "
                                     f"for it to end or choose another train.out_dir") from None
            if not _same_file(fd, self.path):
                os.close(fd)
                continue
            old = _read(fd)
            if old:
                log(f"[train] taking over the stale lock of {_describe(old)}: that process has ended")
            info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
            self.fd = fd
            return self
        raise RunDirError(f"could not lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while still holding it: a waiting opener then sees a different file and retries
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def _describe(info: dict) -> str:
    if not info:
        return "a process that left no pid"
    return f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('since')}"
