"""Faults a user can cause, through the command line: each ends in one stderr line naming the file, key or value,
and a non-zero exit (2: the input, 3: a diverged run); --debug shows the traceback instead. Nothing is deleted
that is not a run folder, and a second run cannot use a folder in use."""

import errno
import json
import os
from pathlib import Path

import pytest

from maskdm import checkpoint as C
from maskdm.cli import main
from maskdm.run_dir import MARKER, RunLock
from tests.test_train import tiny_config


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    _, path = tiny_config(tmp, "unused")
    return path


def run(cfg_path, out, *extra):
    return main(["train", "--config", str(cfg_path), f"train.out_dir={out}", *extra])


def one_step_run(cfg_path, out, capsys):
    """A run folder with one checkpoint (one optimizer step); its output is discarded."""
    assert run(cfg_path, out, "stages.pretrain.steps=1", "stages.finetune.steps=0") == 0
    capsys.readouterr()


def test_overwrite_never_empties_the_working_directory(cfg_path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")
    assert run(cfg_path, ".", "--overwrite") == 2
    assert "refuses to empty train.out_dir=." in one_line(capsys)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_text("x")
    assert run(cfg_path, other, "--overwrite") == 2
    assert f"train.out_dir={other}: it is not a maskdm run folder" in one_line(capsys)
    assert run(cfg_path, other) == 2  # nor does a fresh run write into it
    assert "not a maskdm run folder" in one_line(capsys)
    assert (other / "a.jpg").is_file() and not (other / MARKER).exists()


def test_overwrite_starts_a_run_folder_over(cfg_path, tmp_path, capsys):
    out = tmp_path / "again"
    short = ["stages.pretrain.steps=1", "stages.finetune.steps=0"]
    assert run(cfg_path, out, *short) == 0
    (out / "stray.txt").write_text("from the old run")
    assert run(cfg_path, out, *short) == 2  # without --overwrite: the old run's checkpoints are kept
    assert "already holds checkpoints" in one_line(capsys)
    assert run(cfg_path, out, *short, "--overwrite") == 0
    assert not (out / "stray.txt").exists() and (out / MARKER).is_file()
    assert [p.name for p in C.list_checkpoints(out / "checkpoints")] == ["ckpt-00000001"]


def test_diverging_run_exits_3_keeping_no_bad_checkpoint(cfg_path, tmp_path, capsys):
    out = tmp_path / "div"
    assert run(cfg_path, out, "stages.pretrain.lr=1e12", "stages.pretrain.grad_clip=0") == 3
    err = one_line(capsys)
    assert "training diverged in stage 'pretrain'" in err and "stages[0].lr" in err
    for ck in C.list_checkpoints(out / "checkpoints"):
        import torch

        assert all(torch.isfinite(v).all() for v in C.load_weights(ck).values()), ck


def test_second_live_run_and_debug_traceback(cfg_path, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / MARKER).write_text("{}")
    lock = RunLock(out).acquire()  # a live run holds it
    try:
        assert run(cfg_path, out) == 2
        assert f"is in use by another run (pid {os.getpid()} on host" in one_line(capsys)
        from maskdm.run_dir import RunLockedError

        with pytest.raises(RunLockedError):
            run(cfg_path, out, "--debug")
    finally:
        lock.release()


def test_disk_full_during_a_checkpoint(cfg_path, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    real, calls = C.torch.save, []

    def full_on_second(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(obj, path, *a, **k)

    monkeypatch.setattr(C.torch, "save", full_on_second)
    assert run(cfg_path, out) == 2
    err = one_line(capsys)
    assert "cannot write checkpoint" in err and "ckpt-00000005" in err and "No space left on device" in err
    assert [p.name for p in C.list_checkpoints(out / "checkpoints")] == ["ckpt-00000003"]
    assert C.verify_checkpoint(out / "checkpoints" / "ckpt-00000003") is None


def test_unwritable_or_misplaced_out_dir(cfg_path, tmp_path, monkeypatch, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert run(cfg_path, afile / "sub") == 2  # a file where a folder is needed
    assert str(afile / "sub") in one_line(capsys)
    assert run(cfg_path, afile) == 2
    assert f"train.out_dir={afile} exists and is not a folder" in one_line(capsys)

    def denied(self, *a, **k):  # the tests run as root, which ignores permission bits: simulate a read-only disk
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    assert run(cfg_path, tmp_path / "ro") == 2
    assert one_line(capsys) == f"maskdm train: {tmp_path / 'ro'}: Permission denied"


def test_shape_mismatched_checkpoints(cfg_path, tmp_path, capsys):
    out = tmp_path / "small"
    one_step_run(cfg_path, out, capsys)
    assert run(cfg_path, out, "stages.pretrain.steps=1", "stages.finetune.steps=0", "model.embed_dim=48",
               "--resume") == 2
    err = one_line(capsys)
    assert "model.safetensors does not fit this model" in err and "48) in the model built from this config" in err
    assert run(cfg_path, tmp_path / "ft", f"train.init_from={out}", "model.embed_dim=48") == 2
    assert f"{out} does not fit this model" in one_line(capsys)


def test_corrupt_checkpoint_for_sample_and_resume(cfg_path, tmp_path, capsys):
    out = tmp_path / "c"
    one_step_run(cfg_path, out, capsys)
    ck = C.find_checkpoint(out)
    f = ck / "ema.safetensors"
    f.write_bytes(f.read_bytes()[:-4] + b"\xff\xff\xff\x7f")  # flipped data bytes: a NaN weight, same size
    assert main(["sample", "--ckpt", str(out), "--num", "2", "--steps", "2", "--out", str(tmp_path / "g.png")]) == 2
    assert f"{f} does not match its sha256" in one_line(capsys)
    assert run(cfg_path, out, "stages.pretrain.steps=1", "stages.finetune.steps=0", "--resume") == 2
    assert "no checkpoint in" in one_line(capsys)  # the only one fails: no silent restart from scratch


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--ckpt", "x", "--num", "0"], "argument --num: expected an integer >= 1, got 0"),
    (["sample", "--ckpt", "x", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
    (["sample", "--ckpt", "x", "--eta", "nan"], "argument --eta: expected a finite number >= 0, got nan"),
    (["eval", "--ckpt", "x", "--num", "1"], "argument --num: expected an integer >= 2, got 1"),
    (["eval", "--ckpt", "x", "--num", "zero"], "argument --num: expected an integer >= 2, got 'zero'"),
    (["eval", "--ckpt", "x", "--batch-size", "-3"], "argument --batch-size: expected an integer >= 1, got -3"),
])
def test_bad_numbers_on_the_command_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert needle in one_line(capsys)


@pytest.mark.parametrize("overrides, needle", [
    (["stages.pretrain.batch_size=0"], "stages[0].batch_size = 0 is not allowed"),
    (["stages.pretrain.lr=nan"], "stages[0].lr = 'nan': expected a finite number"),
    (["stages.pretrain.lr=.inf"], "stages[0].lr = inf: expected a finite number"),
])
def test_bad_config_values(cfg_path, tmp_path, overrides, needle, capsys):
    assert run(cfg_path, tmp_path / "o", *overrides) == 2
    assert needle in one_line(capsys)


def test_missing_and_corrupt_config_files(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert f"config file not found: {tmp_path / 'none.yaml'}" in one_line(capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n  {name: a\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert f"{bad}: not valid YAML" in one_line(capsys)
    bad.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["train", "--config", str(bad)]) == 2
    assert f"{bad}: not valid YAML" in one_line(capsys)


def test_sample_from_a_checkpoint_whose_weights_do_not_fit_its_config(cfg_path, tmp_path, capsys):
    out = tmp_path / "s"
    one_step_run(cfg_path, out, capsys)
    ck = C.find_checkpoint(out)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model"]["embed_dim"] = 48
    (ck / "config.json").write_text(json.dumps(cfg))
    assert main(["sample", "--ckpt", str(out), "--num", "2", "--steps", "2", "--out", str(tmp_path / "g.png")]) == 2
    err = one_line(capsys)
    assert "does not fit this model" in err and str(ck) in err
