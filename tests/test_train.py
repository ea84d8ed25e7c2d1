"""Training loop: exact resume, signal handling, atomic checkpoints, DDP over 2 gloo processes, init_from."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maskdm import checkpoint as C
from maskdm.config import load_config
from maskdm.train import train
from tests.test_data import write_fake_fashion_mnist

REPO = Path(__file__).resolve().parent.parent


def tiny_config(tmp_path, out: str, extra=(), data_root=None):
    """A 2-stage (block-masked, then full) config of a ~40k-parameter model on 16x16 fake Fashion-MNIST."""
    root = data_root or write_fake_fashion_mnist(tmp_path / "fm", n_train=48)
    p = tmp_path / "tiny.yaml"
    p.write_text(textwrap.dedent(f"""
        model: {{name: uvit-tiny, patch_size: 2, embed_dim: 32, depth: 3, num_heads: 2}}
        data: {{dataset: fashion_mnist, root: {root}, image_size: 16, hflip: 0.5}}
        diffusion: {{schedule: cosine, timesteps: 100}}
        stages:
          - {{name: pretrain, steps: 5, batch_size: 8, lr: 1.0e-3, warmup_steps: 2, mask: block, mask_ratio: 0.75,
             block_size: 2, ema_decay: 0.9}}
          - {{name: finetune, steps: 4, batch_size: 8, lr: 5.0e-4, ema_decay: 0.9, init_weights: ema}}
        train: {{out_dir: {tmp_path / out}, log_every: 1, ckpt_every: 3, keep_last: 2, sample_num: 4, sample_steps: 3,
                threads: 1, progress: false}}
        eval: {{enabled: false}}
    """))
    return load_config(p, list(extra)), p


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def weights(out: Path, which="model") -> dict:
    return load_file(str(C.find_checkpoint(out) / f"{which}.safetensors"))


def assert_same_weights(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for k, v in a.items():
        if atol == 0.0:
            assert torch.equal(v, b[k]), k
        else:
            torch.testing.assert_close(v, b[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    cfg, _ = tiny_config(tmp, "ref")
    summary = train(cfg, log=lambda *a: None)
    return tmp, Path(cfg.train.out_dir), summary


def test_uninterrupted_run_outputs(reference_run):
    _, out, summary = reference_run
    assert summary["step"] == 9 and not summary["interrupted"]
    assert [s for s, _ in losses(out)] == list(range(1, 10))
    assert [p.name for p in C.list_checkpoints(out / "checkpoints")] == ["ckpt-00000006", "ckpt-00000009"]  # keep 2
    assert (out / "loss.png").is_file() and (out / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["finetune_end_step_00000009.png",
                                                                       "pretrain_end_step_00000005.png"]
    state = C.load_state(C.find_checkpoint(out))
    assert state["step"] == 9 and state["stage"] == 1 and state["data"]["global_batch"] == 8


def test_sigterm_saves_and_resume_is_exact(reference_run):
    """Kill (SIGTERM) after 4 steps, mid pre-training; resume: the loss sequence and the final online and EMA
    weights equal the uninterrupted run's bit for bit."""
    tmp, ref_out, _ = reference_run
    cfg, _ = tiny_config(tmp, "killed", data_root=tmp / "fm")

    def kill_at_4(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(cfg, log=lambda *a: None, on_step=kill_at_4)
    out = Path(cfg.train.out_dir)
    assert first["interrupted"] == signal.SIGTERM and first["step"] == 4
    assert C.find_checkpoint(out).name == "ckpt-00000004"
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, log=lambda *a: None)
    second = train(cfg, resume=True, log=lambda *a: None)
    assert second["step"] == 9 and not second["interrupted"]
    assert losses(out) == losses(ref_out)
    assert_same_weights(weights(out), weights(ref_out))
    assert_same_weights(weights(out, "ema"), weights(ref_out, "ema"))


def test_resume_after_crash_from_periodic_checkpoint(reference_run, tmp_path):
    """A crash (no signal) after step 7: only ckpt-6 survives (in the fine-tune stage, past the stage switch);
    the resumed run rewrites the log past step 6 and ends where the uninterrupted one did."""
    tmp, ref_out, _ = reference_run
    cfg, _ = tiny_config(tmp, "crash", data_root=tmp / "fm")
    out = Path(cfg.train.out_dir)

    class Crash(Exception):
        pass

    def crash_at_7(step):
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, log=lambda *a: None, on_step=crash_at_7)
    assert C.find_checkpoint(out).name == "ckpt-00000006"
    train(cfg, resume=True, log=lambda *a: None)
    assert losses(out) == losses(ref_out)
    assert_same_weights(weights(out, "ema"), weights(ref_out, "ema"))


_SAVER = r"""
import sys, torch
from maskdm.checkpoint import save_checkpoint
d = sys.argv[1]
big = {"w": torch.randn(3_000_000)}
step = 0
while True:
    step += 1
    big["w"].fill_(step)
    save_checkpoint(d, step, big, big, {"step": step}, {"step": step}, keep_last=2)
    print(step, flush=True)
"""


def test_kill_during_save_never_leaves_a_partial_checkpoint(tmp_path):
    d = tmp_path / "ck"
    interrupted_saves = 0
    for i in range(3):
        p = subprocess.Popen([sys.executable, "-c", _SAVER, str(d)], stdout=subprocess.PIPE, cwd=REPO)
        p.stdout.readline()  # at least one complete save
        time.sleep(0.05 + 0.07 * i)  # then kill -9 somewhere inside a later save
        p.kill()
        p.wait()
        interrupted_saves += bool(list(d.glob(".tmp-*")))  # a save was cut short (its temporary is left)
        found = C.list_checkpoints(d)
        assert found
        for ck in found:  # every visible checkpoint is whole and self-consistent
            step = int(ck.name.split("-")[1])
            w = load_file(str(ck / "model.safetensors"))["w"]
            assert w.numel() == 3_000_000 and bool((w == step).all())
            assert C.load_state(ck)["step"] == step
            assert json.loads((ck / "meta.json").read_text())["step"] == step
    assert interrupted_saves >= 1  # saving is ~all the loop's time: kills land inside a save
    C.save_checkpoint(d, 10_000, {"w": torch.ones(2)}, {"w": torch.ones(2)}, {"step": 10_000}, {})
    assert not list(d.glob(".tmp-*"))  # stale temporaries of killed saves are swept


_EVAL = ["eval.enabled=true", "eval.num=8", "eval.batch_size=4", "eval.steps=2", "eval.resize=64", "eval.grid=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_match_one_process(reference_run):
    """torchrun, 2 CPU processes (gloo), global batch 8 = 2 x 4: the ranks end bit-identical, and match one
    process on the whole batch (the reference run) up to float reduction order. The final evaluation is spread
    over the 2 ranks and scores the untrained model exactly as one process does."""
    tmp, ref_out, _ = reference_run
    _, cfg_path = tiny_config(tmp, "unused", data_root=tmp / "fm")
    out = tmp / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "maskdm", "train", "--config", str(cfg_path),
           f"train.out_dir={out}", *_EVAL]
    r = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check = json.loads((out / "ddp_check.json").read_text())
    assert check["world_size"] == 2 and check["ranks_identical"]
    assert len(set(check["rank_param_sha256"])) == 1
    ddp_losses, ref_losses = losses(out), losses(ref_out)
    assert [s for s, _ in ddp_losses] == [s for s, _ in ref_losses]
    for (_, a), (_, b) in zip(ddp_losses, ref_losses):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b))
    assert_same_weights(weights(out), weights(ref_out), atol=1e-5)

    from maskdm.config import load_config as load
    from maskdm.train import evaluate_after_training

    ddp_eval = json.loads((out / "eval.json").read_text())
    assert ddp_eval["world_size"] == 2 and ddp_eval["models"]["untrained"]["num_fake"] == 8
    cfg = load(cfg_path, [f"train.out_dir={out}", *_EVAL])
    single = evaluate_after_training(cfg, {}, log=lambda *a: None)["eval"]
    assert single["world_size"] == 1
    for name in ("untrained", "trained"):
        a, b = ddp_eval["models"][name], single["models"][name]
        assert a["num_real"] == b["num_real"] == 8
        assert abs(a["fid"] - b["fid"]) <= 1e-3 * abs(b["fid"]), (name, a, b)


def test_init_from_ema_weights(reference_run, tmp_path):
    tmp, ref_out, _ = reference_run
    src = C.find_checkpoint(ref_out)
    cfg, _ = tiny_config(tmp_path, "ft", data_root=tmp / "fm", extra=[
        f"train.init_from={ref_out}", "train.init_weights=ema", "stages.pretrain.steps=0", "stages.finetune.steps=1",
        "stages.finetune.lr=1e-9", "stages.finetune.weight_decay=0"])
    train(cfg, log=lambda *a: None)
    got, ema_src = weights(Path(cfg.train.out_dir)), load_file(str(src / "ema.safetensors"))
    assert_same_weights(got, ema_src, atol=1e-6)  # one step at lr 1e-9 barely moves them
    online_src = load_file(str(src / "model.safetensors"))
    assert any(not torch.allclose(got[k], online_src[k], atol=1e-4) for k in got)


def test_max_minutes_cuts_a_stage(tmp_path):
    cfg, _ = tiny_config(tmp_path, "cut", extra=["stages.pretrain.max_minutes=1e-6", "train.ckpt_every=0"])
    summary = train(cfg, log=lambda *a: None)
    assert summary["stages_cut_by_time"] == {"pretrain": 1}
    steps = [s for s, _ in losses(Path(cfg.train.out_dir))]
    assert steps == [1, 6, 7, 8, 9]  # the fine-tune stage still starts at its planned step 5
    assert [p.name for p in C.list_checkpoints(Path(cfg.train.out_dir) / "checkpoints")] == \
        ["ckpt-00000005", "ckpt-00000009"]


def test_precision_and_batch_errors(tmp_path):
    cfg, _ = tiny_config(tmp_path, "bad", extra=["stages.pretrain.batch_size=100"])
    with pytest.raises(ValueError, match="smaller than one global batch"):
        train(cfg, log=lambda *a: None)


def test_more_ranks_than_gpus_fails_with_the_fix(monkeypatch):
    """Two processes on a one-GPU machine: say to run one per GPU, before any CUDA call."""
    from maskdm.distributed import setup

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=1 but 1 CUDA device.*--nproc_per_node 1"):
        setup("auto")


def test_ema_pytorch_schedule_values():
    """ema_pytorch(beta=0.999) defaults: copy (decay 0) for the stage's first 100 steps; at 1-based step s > 100,
    decay = 1 - (1 + s - 101)^(-2/3) clamped to [0, beta]. Values from the formula by hand."""
    from maskdm.ema import ema_decay

    assert [ema_decay("ema_pytorch", 0.999, n) for n in (0, 50, 99, 100)] == [0.0] * 4  # s = 1, 51, 100, 101
    assert ema_decay("ema_pytorch", 0.999, 101) == pytest.approx(1 - 2 ** (-2 / 3), rel=1e-12)  # s = 102: k = 1
    assert ema_decay("ema_pytorch", 0.999, 1099) == pytest.approx(0.99, rel=1e-12)  # s = 1100, k = 999: 1 - 1000^(-2/3)
    k999 = 0.001 ** (-1.5) - 1  # 1 - (1 + k)^(-2/3) = 0.999 at k = 31621.8 (k = n - 100): capped at beta from there
    assert ema_decay("ema_pytorch", 0.999, int(k999) + 100) < 0.999 == ema_decay("ema_pytorch", 0.999, int(k999) + 101)
    assert ema_decay("ema_pytorch", 0.9, 10**6) == 0.9
    assert ema_decay("constant", 0.99, 0) == 0.99 and ema_decay("warmup", 0.99, 0) == pytest.approx(0.1)


def test_ema_update_is_foreach_lerp_and_copy():
    """One update equals decay * ema + (1 - decay) * online per parameter (float32: lerp rounds once, so within
    a few ulps), buffers copied; decay 0 gives an exact copy (the ema_pytorch warm-up)."""
    from maskdm.ema import EMA

    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = EMA(net)
    before = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
        net[1].running_mean.fill_(2.0)
    ema.update(0.9)
    for e, b, p in zip(ema.model.parameters(), before, net.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p, rtol=1e-6, atol=1e-6)
    assert torch.equal(ema.model[1].running_mean, net[1].running_mean)
    ema.update(0.0)
    assert all(torch.equal(e, p) for e, p in zip(ema.model.parameters(), net.parameters()))


def test_ema_warmup_key_migrates():
    from maskdm.config import config_from_dict

    cfg = config_from_dict({"stages": [{"name": "a", "ema_warmup": True}, {"name": "b", "ema_warmup": False}]})
    assert [s.ema_schedule for s in cfg.stages] == ["warmup", "constant"]


def test_two_masked_stages_of_different_strategies(tmp_path):
    """A block-masked stage, then a varlen random-masked stage (per-sample ratios), then full images: each stage
    draws its own masks on the model's patch grid (the second masked stage used to crash on a reused name)."""
    cfg, _ = tiny_config(tmp_path, "two", extra=["train.ckpt_every=0"])
    from maskdm.config import StageConfig

    cfg.stages.insert(1, StageConfig(name="random", steps=3, batch_size=8, lr=1e-3, mask="random",
                                     mask_ratio=(0.5, 0.9), ema_decay=0.9, ema_schedule="ema_pytorch"))
    summary = train(cfg, log=lambda *a: None)
    out = Path(cfg.train.out_dir)
    assert summary["step"] == 12 and not summary["interrupted"]
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in recs] == ["pretrain"] * 5 + ["random"] * 3 + ["finetune"] * 4
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in recs)
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [
        "finetune_end_step_00000012.png", "pretrain_end_step_00000005.png", "random_end_step_00000008.png"]
    ck8 = out / "checkpoints" / "ckpt-00000008"  # the random stage's end: ema_pytorch still in its copy phase
    assert_same_weights(load_file(str(ck8 / "ema.safetensors")), load_file(str(ck8 / "model.safetensors")))
    ck12 = out / "checkpoints" / "ckpt-00000012"  # constant 0.9 in the fine-tune: the EMA lags the weights
    assert not torch.equal(*(load_file(str(ck12 / f))["head.weight"] for f in ("ema.safetensors", "model.safetensors")))


def test_resume_falls_back_past_a_truncated_newest_checkpoint(reference_run, capsys):
    """Killed after step 4 (checkpoints 3 and 4 kept), the newest then truncated: --resume warns, starts from
    ckpt-3 and still ends bit-identical to the uninterrupted run."""
    tmp, ref_out, _ = reference_run
    cfg, _ = tiny_config(tmp, "fallback", data_root=tmp / "fm")
    out = Path(cfg.train.out_dir)

    def kill_at_4(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    train(cfg, log=lambda *a: None, on_step=kill_at_4)
    assert [p.name for p in C.list_checkpoints(out / "checkpoints")] == ["ckpt-00000003", "ckpt-00000004"]
    f = out / "checkpoints" / "ckpt-00000004" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    said = []
    summary = train(cfg, resume=True, log=said.append)
    assert any("ckpt-00000004 fails verification" in s and "truncated" in s for s in said), said
    assert any("resuming from" in s and "ckpt-00000003" in s for s in said), said
    assert summary["step"] == 9
    assert losses(out) == losses(ref_out)
    assert_same_weights(weights(out), weights(ref_out))
    assert_same_weights(weights(out, "ema"), weights(ref_out, "ema"))


@pytest.mark.parametrize("bad_step, where, kept", [
    (2, r"between steps 1 and 3 \(found before writing a checkpoint", []),  # the check before the ckpt-3 save
    (5, r"between steps 4 and 5 \(mean loss nan", ["ckpt-00000003"]),  # the stage-end log point, before its save
])
def test_non_finite_step_stops_without_saving(tmp_path, monkeypatch, bad_step, where, kept):
    """NaN pixels in the batch of one step make its loss and grad norm NaN. With log_every=100 the run stops at
    the next log point or checkpoint, whichever comes first, writes no checkpoint from then on and keeps the
    earlier ones (all finite)."""
    import maskdm.train as T

    real, calls = T.to_model_range, []

    def nan_at(*args, **kwargs):
        calls.append(1)
        x = real(*args, **kwargs)
        return x * float("nan") if len(calls) == bad_step else x

    monkeypatch.setattr(T, "to_model_range", nan_at)
    cfg, _ = tiny_config(tmp_path, "nan", extra=["train.log_every=100"])
    with pytest.raises(T.DivergedError, match=rf"stage 'pretrain'.*{where}.*checkpoint is "
                                              rf"{'.*ckpt-00000003' if kept else 'none'}"):
        train(cfg, log=lambda *a: None)
    out = Path(cfg.train.out_dir)
    assert [p.name for p in C.list_checkpoints(out / "checkpoints")] == kept
    for ck in C.list_checkpoints(out / "checkpoints"):
        assert all(torch.isfinite(v).all() for v in C.load_weights(ck).values())
