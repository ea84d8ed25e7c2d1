"""`maskdm compare` on a tiny config: a time-budgeted run writes valid JSON + PNG and keeps to its budget with
evaluation excluded; the step-budgeted mode repeats its FID/KID points exactly; Ctrl-C keeps what was measured;
bad budgets and mismatched arms are named errors."""

import json
import os
import signal
import textwrap

import pytest
from PIL import Image

from maskdm.cli import main
from maskdm.compare import Clock, run_compare, stage_fractions
from maskdm.config import ConfigError, load_config
from tests.test_data import write_fake_fashion_mnist

EVAL = ["--eval-num", "8", "--eval-steps", "2", "--eval-batch-size", "8", "--resize", "32"]


def arm_configs(tmp_path, pretrain_fraction=0.5):
    """A from-scratch arm and a masked-then-full arm of a ~40k-parameter model on 16x16 fake Fashion-MNIST."""
    root = tmp_path / "fm"
    if not root.exists():
        write_fake_fashion_mnist(root, n_train=48)
    common = textwrap.dedent(f"""
        model: {{name: uvit-tiny, patch_size: 2, embed_dim: 32, depth: 3, num_heads: 2}}
        data: {{dataset: fashion_mnist, root: {root}, image_size: 16}}
        diffusion: {{schedule: cosine, timesteps: 100}}
        train: {{threads: 1, sample_num: 2, sample_steps: 2, log_every: 50}}
    """)
    scratch, masked = tmp_path / "scratch.yaml", tmp_path / "masked.yaml"
    scratch.write_text(common + "stages: [{name: train, batch_size: 8, lr: 1.0e-3, ema_decay: 0.9}]\n")
    masked.write_text(common + textwrap.dedent(f"""
        stages:
          - {{name: pretrain, budget_fraction: {pretrain_fraction}, batch_size: 8, lr: 1.0e-3, ema_decay: 0.9,
             mask: block, mask_ratio: 0.75, block_size: 2}}
          - {{name: finetune, batch_size: 8, lr: 1.0e-3, ema_decay: 0.9}}
    """))
    return [str(scratch), str(masked)]


def test_time_budget_json_png_and_budget(tmp_path):
    configs = arm_configs(tmp_path)
    out = tmp_path / "cmp"
    minutes = 0.04  # 2.4 s of training per arm
    rc = main(["compare", "--config", configs[0], "--config", configs[1], "--minutes", str(minutes), "--evals", "2",
               "--out", str(out), "--eval-at-start", *EVAL])
    assert rc == 0
    res = json.loads((out / "compare.json").read_text())
    assert res["device"].startswith("cpu")
    assert res["budget"] == {"minutes": minutes, "steps": None, "evals": 2, "clock": "wall"}
    assert len(res["load_average"]["start"]) == 3 and len(res["load_average"]["end"]) == 3
    assert res["protocol"]["num_generated"] == 8 and "efficientnet-lite0" in res["protocol"]["backbone"]
    assert [a["name"] for a in res["arms"]] == ["scratch", "masked"] and not res["interrupted"]
    assert " --eval-at-start " in res["command"] and "--eval-num 8" in res["command"] and "False" not in res["command"]
    budget = 60 * minutes
    starts = [arm["points"][0] for arm in res["arms"]]
    assert all(p["seconds"] == 0 and p["step"] == 0 for p in starts)
    assert starts[0]["fid"] == starts[1]["fid"]  # same model config and seed: the same initial weights
    for arm in res["arms"]:
        assert arm["status"] == "done" and arm["images_per_s"] > 0 and arm["eval_seconds"] > 0
        pts = arm["points"][1:]
        assert len(pts) == 2
        assert all(p["fid"] > 0 and p["kid"] == p["kid"] and p["step"] > 0 for p in pts)
        assert pts[0]["seconds"] >= budget / 2 and pts[0]["step"] < pts[1]["step"]
        # The budget: the clock is read after every step, so training overshoots it by at most the last step
        # (a few ms for this model; 1 s allows for a loaded machine descheduling the process once).
        assert budget <= pts[-1]["seconds"] == arm["train_seconds"] <= budget + 1.0
        assert sum(s["steps"] for s in arm["stages"]) == pts[-1]["step"]
        # Evaluation is not training time: the arm's wall time holds both.
        assert arm["wall_seconds"] >= arm["train_seconds"] + arm["eval_seconds"] - 0.5
    pre, fine = res["arms"][1]["stages"]
    assert (pre["name"], pre["fraction"], fine["fraction"]) == ("pretrain", 0.5, 0.5)
    assert budget / 2 <= fine["start_seconds"] <= budget / 2 + 1.0 and fine["start_step"] == pre["steps"] > 0
    assert pre["images_per_s"] > 0 and pre["mask_ratio"] == 0.75
    with Image.open(out / "compare.png") as im:
        assert im.format == "PNG" and im.size[0] > 500


def test_step_budget_repeats_its_points(tmp_path):
    configs = arm_configs(tmp_path, pretrain_fraction=0.4)
    arms = [(f"arm{i}", p, load_config(p)) for i, p in enumerate(configs)]
    kw = {"steps": 10, "evals": 2, "eval_num": 8, "eval_steps": 2, "eval_batch_size": 8, "resize": 32,
          "log": lambda *a: None}
    first = run_compare(arms, tmp_path / "a", **kw)
    again = run_compare(arms, tmp_path / "b", **kw)
    other_seed = run_compare(arms[:1], tmp_path / "c", seed=1, **kw)

    def pts(r):
        return [[(p["step"], p["stage"], p["fid"], p["kid"]) for p in a["points"]] for a in r["arms"]]

    # Same seed, same steps, one thread: bit-identical training and sampling, so equal FID/KID points.
    assert pts(first) == pts(again)
    assert [[p[:2] for p in a] for a in pts(first)] == [[(5, "train"), (10, "train")], [(5, "finetune"),
                                                                                        (10, "finetune")]]
    assert [s["steps"] for s in first["arms"][1]["stages"]] == [4, 6]
    assert pts(other_seed)[0] != pts(first)[0]  # the comparison above can fail


def test_ctrl_c_keeps_what_was_measured(tmp_path):
    configs = arm_configs(tmp_path)
    arms = [(f"arm{i}", p, load_config(p)) for i, p in enumerate(configs)]

    def log(msg):
        if "FID" in msg:  # the first point is measured: Ctrl-C, as a user would
            os.kill(os.getpid(), signal.SIGINT)

    res = run_compare(arms, tmp_path / "cmp", minutes=0.2, evals=4, eval_num=8, eval_steps=2, eval_batch_size=8,
                      resize=32, clock="cpu", log=log)
    assert res["interrupted"] and res["arms"][0]["status"] == "interrupted" and res["arms"][1]["status"] == "pending"
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["interrupted"] and len(saved["arms"][0]["points"]) == 1
    first = saved["arms"][0]["points"][0]
    assert saved["budget"]["clock"] == "cpu" and first["seconds"] >= 3.0  # the first of 4 points over 12 CPU s
    assert first["wall_seconds"] >= first["seconds"] - 0.5  # one training thread: CPU time <= wall time
    assert (tmp_path / "cmp" / "compare.png").is_file()


def test_budget_fractions_and_errors(tmp_path, capsys):
    configs = arm_configs(tmp_path, pretrain_fraction=0.3)
    assert stage_fractions(load_config(configs[1])) == pytest.approx([0.3, 0.7])
    assert stage_fractions(load_config(configs[0])) == [1.0]
    both = load_config(configs[1], ["stages.finetune.budget_fraction=0.5"])
    with pytest.raises(ConfigError, match="budget_fraction .* sum to 0.8; expected 1"):
        stage_fractions(both)
    with pytest.raises(ConfigError, match=r"stages\[0\].budget_fraction"):
        load_config(configs[1], ["stages.pretrain.budget_fraction=1.5"])
    other = load_config(configs[0], ["data.image_size=8"])
    with pytest.raises(ValueError, match="same data.*data.image_size"):
        run_compare([("a", configs[1], load_config(configs[1])), ("b", "x.yaml", other)], tmp_path / "e", steps=4)
    with pytest.raises(ValueError, match="train.seed differ"):
        run_compare([("a", "a", load_config(configs[0])), ("b", "b", load_config(configs[0], ["train.seed=3"]))],
                    tmp_path / "e", steps=4)
    with pytest.raises(ValueError, match="--steps 2: stage 'pretrain' gets 0 steps"):
        run_compare([("a", "a", load_config(configs[1], ["stages.pretrain.budget_fraction=0.1"]))], tmp_path / "e",
                    steps=2, eval_num=4, eval_steps=1, resize=32, log=lambda *a: None)
    with pytest.raises(SystemExit):  # argparse: one budget only
        main(["compare", "--config", configs[0], "--minutes", "1", "--steps", "3", "--out", str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--config", "--minutes", "--steps", "--evals", "--out", "--set", "--seed", "--eval-num",
                "--eval-steps", "--backbone", "budget_fraction"):
        assert opt in text, opt


@pytest.mark.parametrize("kind", ["wall", "cpu"])
def test_clock_pauses(kind):
    clock = Clock(kind)
    sum(i * i for i in range(200_000))  # some CPU work
    clock.pause()
    a, w = clock(), clock.wall()
    assert a > 0 and w > 0
    sum(i * i for i in range(200_000))
    assert (clock(), clock.wall()) == (a, w)  # paused: neither clock runs
    clock.resume()
    sum(i * i for i in range(200_000))
    assert clock() > a and clock.wall() > w
    with pytest.raises(ValueError, match="clock must be one of wall, cpu"):
        Clock("gpu")
