"""train.compile: a compiled run gives the eager run's losses, never recompiles per step, and the graph-captured
step (CUDA only) gives the eager step's losses and weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from maskdm import GaussianDiffusion, masking
from maskdm.config import ConfigError
from maskdm.ema import EMA
from maskdm.model import MaskedViT
from maskdm.sample import load_for_sampling
from maskdm.step import Denoiser, TrainStep, resolve_compile, step_options
from maskdm.train import train
from tests.test_train import tiny_config

# A varlen masked stage (static capacity when compiled, exact layout when not) then a full stage; a one-block model
# (CPU inductor compile time grows with the graph).
STAGES = ["stages.0.mask_ratio=[0.5, 0.9]", "stages.0.steps=4", "stages.1.steps=3", "train.ckpt_every=0",
          "model.depth=1", "model.embed_dim=16"]


def records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_resolve_compile_and_config():
    assert resolve_compile("auto", "cpu") == "off"
    assert resolve_compile("auto", "cuda") == "reduce-overhead"
    assert resolve_compile("auto", "cuda", cuda_graph=True) == "default"
    assert resolve_compile("max-autotune", "cpu") == "max-autotune"
    assert resolve_compile(False, "cuda") == "off" and resolve_compile(True, "cpu") == "default"  # YAML off / on
    with pytest.raises(ValueError, match="train.compile must be one of"):
        resolve_compile("fast", "cpu")


def test_config_rejects_bad_compile_settings(tmp_path):
    with pytest.raises(ConfigError, match="train.compile"):
        tiny_config(tmp_path, "a", ["train.compile=fast"])
    with pytest.raises(ConfigError, match="train.compile"):
        tiny_config(tmp_path, "b", ["train.compile=reduce-overhead", "train.cuda_graph=true"])
    with pytest.raises(ConfigError, match="train.cuda_graph"):
        tiny_config(tmp_path, "c", ["train.cuda_graph=true", "train.device=cpu"])


def test_step_options_pick_a_capacity_only_when_shapes_must_stay_static(tmp_path):
    cfg, _ = tiny_config(tmp_path, "o", STAGES + ["train.compile=default"])
    opts = step_options(cfg.train, cfg.stages[0], 8, (8, 8), "cpu")
    assert opts["compile"] == "default" and opts["capacity"] == masking.static_capacity(8, 8, (0.5, 0.9), 2, slack=4.0)
    assert step_options(cfg.train, cfg.stages[1], 8, (8, 8), "cpu")["capacity"] is None  # full images
    cfg_off, _ = tiny_config(tmp_path, "p", STAGES + ["train.compile=off"])
    assert step_options(cfg_off.train, cfg_off.stages[0], 8, (8, 8), "cpu") == {
        "compile": "off", "capacity": None, "cuda_graph": False}


def test_compiled_run_matches_eager_run_and_never_recompiles(tmp_path):
    """`maskdm train` with train.compile=default vs off, fp32 on CPU: the same per-step losses over a varlen masked
    stage (static capacity vs exact layout) and a full stage. Inductor's fused kernels reorder float32 sums, and
    the weights drift apart by that rounding over the steps: 1e-3 relative is far above it and far below what a
    wrong mask, weight or layout gives (without the filler weights the padded loss is B / (B + F) = 8/14 of it)."""
    torch._dynamo.reset()
    runs = {}
    for mode in ("off", "default"):
        cfg, _ = tiny_config(tmp_path, mode, STAGES + [f"train.compile={mode}"])
        train(cfg, log=lambda *a: None)
        runs[mode] = records(Path(cfg.train.out_dir))
    off, on = runs["off"], runs["default"]
    assert [r["step"] for r in on] == [r["step"] for r in off] == list(range(1, 8))
    for a, b in zip(on, off):
        assert abs(a["loss"] - b["loss"]) <= 1e-3 * abs(b["loss"]), (a["step"], a["loss"], b["loss"])
    assert all("compiles" not in r for r in off)
    # Each stage compiles its loss once (first step), then never again, as one graph: no graph break (a break
    # leaves eager Python inside the step and splits reduce-overhead's CUDA graph).
    assert [r["recompiles"] for r in on] == [0] * 7
    assert [r["graph_breaks"] for r in on] == [0] * 7
    assert on[0]["compiles"] >= 1 and on[4]["compiles"] >= 1
    # `maskdm sample` / `eval` load the run's weights with its compiled forward (the shape its grids compiled)
    model, _, cfg = load_for_sampling(tmp_path / "default")
    assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule) and cfg.train.compile == "default"
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([0, 10, 50, 99])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), model._orig_mod(x, t), rtol=1e-4, atol=1e-5)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return MaskedViT(img_size=16, patch_size=2, in_chans=3, embed_dim=32, depth=3, num_heads=2).train()


def _steps(device, cuda_graph: bool, masks, n=5, bf16=False, compile="off", capacity=None, out=None):
    """Losses and final weights of ``n`` steps of one TrainStep (fixed inputs per step, seeded)."""
    model = _tiny().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device == "cuda" or None)
    ema = EMA(model)
    step = TrainStep(model, Denoiser(model), GaussianDiffusion(timesteps=100), opt, ema, 1.0, bf16,
                     cuda_graph=cuda_graph, compile=compile, capacity=capacity)
    if out is not None:
        out["step"] = step
    g = torch.Generator().manual_seed(5)
    losses = []
    for i in range(n):
        x0 = (torch.rand(4, 3, 16, 16, generator=g) * 2 - 1).to(device)
        noise = torch.randn(4, 3, 16, 16, generator=g).to(device)
        t = torch.randint(0, 100, (4,), generator=g).to(device)
        vis = masks(i, g)
        res = step(x0, t, noise, None if vis is None else vis.to(device), lr=1e-3 * (i + 1) / n, ema_decay=0.5)
        losses.append(res.loss.item())
    return torch.tensor(losses), [p.detach().cpu() for p in model.parameters()], \
        [p.detach().cpu() for p in ema.model.parameters()]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
@pytest.mark.parametrize("kind", ["uniform", "full"])
def test_cuda_graph_step_matches_eager_on_cuda(kind):
    """The captured step (3 warm-up steps, capture, replays) follows the eager step: same losses, weights, EMA,
    with the lr and EMA weight changing every step (read from device tensors, not frozen into the graph)."""
    def masks(i, g):
        return None if kind == "full" else masking.block_patches(4, 8, 0.75, block_size=2, generator=g)

    le, pe, ee = _steps("cuda", False, masks, n=6)
    lg, pg, eg = _steps("cuda", True, masks, n=6)
    # fp32 on the GPU: the same kernels in the same order, replayed; only cuBLAS workspaces differ
    torch.testing.assert_close(lg, le, rtol=1e-5, atol=1e-6)
    for a, b in zip(pg + eg, pe + ee):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compile's CUDA graphs need a CUDA device")
@pytest.mark.parametrize("compile,cuda_graph", [("reduce-overhead", False), ("default", True)])
def test_compiled_varlen_step_on_cuda_matches_exact_eager(compile, cuda_graph):
    """Per-sample ratios on the static-capacity layout, compiled with CUDA graphs (compile's own, or the whole step
    captured): the exact eager step's losses and weights, and no recompile while T changes every step."""
    cap = masking.static_capacity(4, 8, (0.5, 0.9), 2)

    def masks(i, g):
        return masking.block_patches(4, 8, (0.5, 0.9), block_size=2, generator=g)

    torch._dynamo.reset()
    le, pe, ee = _steps("cuda", False, masks, n=6)
    out = {}
    lc, pc, ec = _steps("cuda", cuda_graph, masks, n=6, compile=compile, capacity=cap, out=out)
    # fp32: Inductor's fused kernels reorder sums; 6 AdamW steps at lr <= 1e-3 keep the drift near 1e-6
    torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-5)
    for a, b in zip(pc + ec, pe + ee):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert out["step"].recompiles == 0 and out["step"].compiles >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
def test_cuda_graph_step_rejects_a_new_shape():
    def masks(i, g):
        return masking.block_patches(4, 8, 0.75 if i < 4 else 0.5, block_size=2, generator=g)

    with pytest.raises(ValueError, match="same input shapes|same layout"):
        _steps("cuda", True, masks, n=5)


def test_cuda_graph_needs_cuda_and_one_process():
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="a CUDA device"):
        TrainStep(model, Denoiser(model), GaussianDiffusion(), opt, EMA(model), 1.0, False, cuda_graph=True)
    with pytest.raises(ValueError, match="resolved mode"):
        TrainStep(model, Denoiser(model), GaussianDiffusion(), opt, EMA(model), 1.0, False, compile="auto")
