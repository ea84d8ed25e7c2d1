"""The `maskdm` command line end to end on a tiny config: masked pre-training + fine-tuning, final samples and
FID, then `sample`, `eval` and `info` on the result; config errors exit 2 naming the key."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from maskdm.cli import main
from tests.test_train import REPO, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    _, cfg_path = tiny_config(tmp, "unused")
    out = tmp / "run"
    rc = main(["train", "--config", str(cfg_path), f"train.out_dir={out}", "eval.enabled=true", "eval.num=8",
               "eval.steps=3", "eval.batch_size=8", "eval.resize=64", "eval.grid=8"])
    assert rc == 0
    return tmp, out


def test_train_masked_then_finetune_samples_and_evaluates(trained, capsys):
    _, out = trained
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 9
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in recs] == ["pretrain"] * 5 + ["finetune"] * 4
    assert all(r["loss"] > 0 and r["img_per_s"] > 0 for r in recs)
    res = json.loads((out / "eval.json").read_text())
    assert res["backbone_id"] == "effnet-lite0" and "efficientnet-lite0" in res["backbone"]
    assert set(res["models"]) == {"trained", "untrained"}
    assert all(r["num_fake"] == 8 and r["fid"] > 0 for r in res["models"].values())
    for f in (out / "samples" / "final.png", out / "loss.png", Path(summary["checkpoint"]) / "model.safetensors"):
        assert f.is_file(), f


def test_train_reports_the_steps_it_ran_when_a_stage_is_cut(tmp_path, capsys):
    _, cfg_path = tiny_config(tmp_path, "cut")
    assert main(["train", "--config", str(cfg_path), "stages.pretrain.max_minutes=1e-6", "train.ckpt_every=0"]) == 0
    last = [ln for ln in capsys.readouterr().out.splitlines() if " optimizer steps in " in ln]
    # 1 pretrain step (cut by its cap) + 4 finetune steps ran; the step counter itself ends at 9
    assert len(last) == 1 and last[0].startswith("[train] 5 optimizer steps in ")
    assert last[0].endswith("stages cut by time: pretrain after 1 steps")


def test_sample_command(trained):
    from PIL import Image

    tmp, out = trained
    grid = tmp / "grid.png"
    assert main(["sample", "--ckpt", str(out), "--num", "6", "--steps", "3", "--sampler", "ddim",
                 "--out", str(grid), "--nrow", "3"]) == 0
    assert Image.open(grid).size == (3 * 18 + 2, 2 * 18 + 2)  # 16px images, 2px padding
    assert main(["sample", "--ckpt", str(out / "checkpoints" / "ckpt-00000009"), "--num", "2", "--sampler", "ddpm",
                 "--weights", "online", "--out", str(tmp / "ddpm.png")]) == 0
    assert (tmp / "ddpm.png").is_file()


def test_eval_command(trained):
    tmp, out = trained
    res_path = tmp / "eval.json"
    assert main(["eval", "--ckpt", str(out), "--data", f"fashion_mnist:test:{tmp / 'fm'}", "--num", "6",
                 "--steps", "2", "--resize", "64", "--out", str(res_path)]) == 0
    res = json.loads(res_path.read_text())
    assert res["data"] == "fashion_mnist/test" and res["models"]["trained"]["num_real"] == 6
    assert "efficientnet-lite0" in res["backbone"]


def test_config_errors_exit_2_naming_the_key(trained, capsys):
    tmp, _ = trained
    _, cfg_path = tiny_config(tmp, "unused", data_root=tmp / "fm")
    assert main(["train", "--config", str(cfg_path), "stages.pretrain.mask=blok"]) == 2
    err = capsys.readouterr().err
    assert "stages[0].mask" in err and "none, random, block, crop" in err
    assert main(["train", "--config", str(cfg_path), "train.lr=1"]) == 2
    assert "unknown config key 'train.lr'" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(tmp / "nothing"), "--out", str(tmp / "x.png")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_missing_dataset_message(tmp_path, capsys):
    rc = main(["train", "--config", str(REPO / "configs" / "fashion_mnist_quick.yaml"),
               f"data.root={tmp_path / 'none'}", f"train.out_dir={tmp_path / 'o'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "none" / "train-images-idx3-ubyte.gz") in err
    assert "apt-get install dataset-fashion-mnist" in err


def test_info_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "maskdm", "info"], check=False, cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch" in r.stdout and "varlen_attention" in r.stdout and ("GPU" in r.stdout or "cuda:0" in r.stdout)
