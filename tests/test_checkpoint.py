"""Checkpoint files and run folders: manifests catch truncated and corrupted files, --resume's choice falls back to
the newest checkpoint that verifies, failed saves leave the old checkpoints whole, the run marker limits what
--overwrite may delete, and the run lock keeps a second run out (a dead run's lock is taken over)."""

import errno
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from maskdm import checkpoint as C
from maskdm.run_dir import LOCK, MARKER, RunDirError, RunLock, RunLockedError, prepare_run_dir


def _save(d, step, value=1.0, keep_last=3):
    w = {"w": torch.full((1000,), float(value))}
    return C.save_checkpoint(d, step, w, w, {"step": step}, {"step": step}, keep_last=keep_last)


def test_manifest_lists_every_file_and_verifies(tmp_path):
    ck = _save(tmp_path, 1)
    listed = json.loads((ck / C.MANIFEST).read_text())["files"]
    assert sorted(listed) == ["config.json", "ema.safetensors", "meta.json", "model.safetensors", "state.pt"]
    assert all(v["bytes"] == (ck / k).stat().st_size for k, v in listed.items())
    assert C.verify_checkpoint(ck) is None


def test_truncated_and_corrupted_files_are_named(tmp_path):
    ck = _save(tmp_path, 1)
    f = ck / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    assert "truncated" in C.verify_checkpoint(ck) and str(f) in C.verify_checkpoint(ck)
    with pytest.raises(C.CheckpointError, match="model.safetensors has .* bytes"):
        C.load_weights(ck)
    f.write_bytes(data[:-8] + bytes(8))  # same size, data bytes changed: loads fine, only the hash can tell
    assert "corrupted" in C.verify_checkpoint(ck)
    with pytest.raises(C.CheckpointError, match="does not match its sha256"):
        C.load_weights(ck)
    assert C.load_weights(ck, "ema")["w"].sum() == 1000  # the other file is whole and still loads
    f.write_bytes(data)
    (ck / "state.pt").unlink()
    assert "state.pt is missing" in C.verify_checkpoint(ck)


def test_resume_choice_falls_back_to_the_newest_that_verifies(tmp_path):
    for s in (1, 2, 3):
        _save(tmp_path, s, value=s)
    (tmp_path / "ckpt-00000003" / "model.safetensors").write_bytes(b"")  # the newest: truncated
    warnings = []
    assert C.newest_verified(tmp_path, warn=warnings.append).name == "ckpt-00000002"
    assert len(warnings) == 1 and "ckpt-00000003 fails verification" in warnings[0]
    for s in (1, 2):
        (tmp_path / f"ckpt-{s:08d}" / "state.pt").write_bytes(b"garbage")
    with pytest.raises(C.CheckpointError, match="no checkpoint in .* verifies"):
        C.newest_verified(tmp_path, warn=lambda *a: None)
    assert C.newest_verified(tmp_path / "none") is None


def test_checkpoint_without_manifest_still_loads(tmp_path):
    ck = _save(tmp_path, 1)
    (ck / C.MANIFEST).unlink()  # written before manifests existed
    assert C.verify_checkpoint(ck) is None and C.load_weights(ck)["w"].shape == (1000,)


def test_unreadable_files_raise_naming_them(tmp_path):
    ck = _save(tmp_path, 1)
    (ck / C.MANIFEST).unlink()  # no manifest: the readers' own checks must name the file
    (ck / "state.pt").write_bytes(b"not a zip")
    with pytest.raises(C.CheckpointError, match=r"state\.pt is not a readable training state"):
        C.load_state(ck)
    (ck / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(C.CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        C.load_weights(ck)
    (ck / "config.json").write_text("{")
    with pytest.raises(C.CheckpointError, match=r"config\.json is not a readable config"):
        C.load_config_dict(ck)


def test_disk_full_during_save_keeps_the_old_checkpoints(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x"))

    monkeypatch.setattr(C.torch, "save", full)
    with pytest.raises(C.CheckpointError, match=r"cannot write checkpoint .*ckpt-00000002: No space left on device"):
        _save(tmp_path, 2)
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["ckpt-00000001"]
    assert not list(tmp_path.glob(".tmp-*"))  # the failed save cleaned up after itself
    assert C.verify_checkpoint(tmp_path / "ckpt-00000001") is None


def test_load_into_names_the_mismatch():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(C.CheckpointError, match=r"src\.safetensors does not fit this model: weight has shape "
                                                r"\(2, 4\) there, \(2, 3\) in the model"):
        C.load_into(model, {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, "src.safetensors")
    with pytest.raises(C.CheckpointError, match="1 missing key"):
        C.load_into(model, {"weight": torch.zeros(2, 3)}, "src")


# ------------------------------------------------------------------------------------------- run folders
def test_overwrite_refuses_the_working_directory_and_foreign_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious.txt").write_text("x")
    (tmp_path / MARKER).write_text("{}")  # even a marked working directory is never emptied
    for out in (".", str(tmp_path), ".."):
        with pytest.raises(RunDirError, match="refuses to empty .*working directory"):
            prepare_run_dir(out, resume=False, overwrite=True)
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "a.png").write_text("x")
    with pytest.raises(RunDirError, match=f"refuses to empty train.out_dir={foreign}: it is not a maskdm run"):
        prepare_run_dir(foreign, resume=False, overwrite=True)
    with pytest.raises(RunDirError, match="non-empty folder that is not a maskdm run folder"):
        prepare_run_dir(foreign, resume=False, overwrite=False)
    assert (tmp_path / "precious.txt").is_file() and (foreign / "a.png").is_file()


def test_overwrite_empties_a_run_folder(tmp_path):
    out = tmp_path / "run"
    prepare_run_dir(out, resume=False, overwrite=False).release()
    assert (out / MARKER).is_file() and not (out / LOCK).exists()
    (out / "checkpoints").mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    lock = prepare_run_dir(out, resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [LOCK, MARKER]
    lock.release()


def test_run_folder_from_before_markers_may_resume(tmp_path):
    out = tmp_path / "old"
    _save(out / "checkpoints", 1)
    with pytest.raises(RunDirError, match="not a maskdm run folder"):
        prepare_run_dir(out, resume=False, overwrite=False)
    prepare_run_dir(out, resume=True, overwrite=False).release()
    assert (out / MARKER).is_file()


def test_second_live_run_is_refused(tmp_path):
    out = tmp_path / "run"
    lock = prepare_run_dir(out, resume=False, overwrite=False)
    with pytest.raises(RunLockedError, match=rf"in use by another run \(pid {os.getpid()} on host "):
        prepare_run_dir(out, resume=True, overwrite=False)
    with pytest.raises(RunLockedError):
        prepare_run_dir(out, resume=False, overwrite=True)  # and --overwrite deletes nothing while it is held
    assert (out / MARKER).is_file()
    lock.release()
    prepare_run_dir(out, resume=True, overwrite=False).release()


_HOLDER = """
import sys, time
from maskdm.run_dir import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {p.pid}"):
            RunLock(out).acquire()
    finally:
        p.kill()  # kill -9: the lock file stays behind with the dead pid in it
        p.wait()
    assert json.loads((out / LOCK).read_text())["pid"] == p.pid
    said = []
    t0 = time.monotonic()
    lock = RunLock(out).acquire(log=said.append)
    assert time.monotonic() - t0 < 5
    assert said and f"stale lock of pid {p.pid}" in said[0]
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_resumed_optimizer_keeps_its_own_implementation_and_lr():
    # A checkpoint from a captured step (capturable, a tensor lr) or a CPU run (fused=None) resumed with fused
    # AdamW: load_state_dict alone would take the saved group's flags; load_optimizer_state keeps this run's.
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    saved_opt = torch.optim.AdamW([w], lr=1e-3)
    w.grad = torch.randn_like(w)
    saved_opt.step()
    state = saved_opt.state_dict()
    state["param_groups"][0].update(capturable=True, lr=torch.tensor(1e-3))
    plain = torch.optim.AdamW([w], lr=2e-3, fused=True)
    plain.load_state_dict(state)
    assert plain.param_groups[0]["fused"] is None  # the behaviour worked around
    opt = torch.optim.AdamW([w], lr=2e-3, fused=True)
    C.load_optimizer_state(opt, state)
    g = opt.param_groups[0]
    assert g["fused"] is True and g["capturable"] is False and g["lr"] == 2e-3 and isinstance(g["lr"], float)
    assert opt.state[w]["step"].dtype == torch.float32 and opt.state[w]["step"].item() == 1
    assert torch.equal(opt.state[w]["exp_avg"], saved_opt.state[w]["exp_avg"])
    opt.step()  # fused AdamW runs on the restored state
    assert opt.state[w]["step"].item() == 2
    with pytest.raises(ValueError, match="parameter groups"):
        C.load_optimizer_state(torch.optim.AdamW([{"params": [w]}, {"params": [torch.nn.Parameter(torch.ones(1))]}]),
                               state)
