"""One optimizer step (forward, backward, AdamW) of MaskedViT, in images/s, four ways.

Providers:
  full           the full DDPM step (every patch), ``GaussianDiffusion.loss(model, x0)``;
  maskdm_kernels the masked step on maskdm_kernels: fused gather + noising -> packed model -> fused loss;
  maskdm_style   a MaskDM-style masked step in pure PyTorch: noised full image, patchify, boolean-mask indexing
                 (a host sync), attention that materialises the score matrix, unfused loss;
  torch_best     a best-effort PyTorch masked step: ``torch.gather`` of the visible patches, noising on them
                 only, SDPA, ``F.mse_loss``.
All providers share the same weights; before timing, each masked provider's loss is checked against the
maskdm_kernels loss on the same inputs, so a provider that skipped work would fail rather than look fast.

Cases: CPU ``uvit-tiny`` 32x32, p=2, fp32, B=64 (block-4 masks on the 16x16 grid: 0.9 masks 14 of 16 blocks,
i.e. 87.5%); GPU ``uvit-b`` 256x256, p=4, bf16 autocast, B=32 (0.9 masks 230 of 256 blocks; at B=64 the full
step's activations come near an H100's 80 GB). ``extra_info``
holds images/s, the measured speed-up over the full step and the FLOP ratio next to it.

    pytest benchmarks/test_bench_train_step.py --benchmark-only            # CPU case, < 2 minutes on 2 cores

NOTE: measured on this project's 2-core CPU box, one thread (OMP_NUM_THREADS=1), 2026-11-28, commit c1439f3:
full 19.7 img/s; block-4 0.9 (87.5%): maskdm_kernels 226.6 img/s = 11.5x the full step (FLOP ratio 9.8x),
maskdm_style 227.2, torch_best 224.7; at 0.5 / 0.75: 2.59x / 5.56x (FLOP 2.26x / 4.81x). At this size the three
masked steps differ by noise. With another process busy on one core, 2 OpenMP threads collapse: time it on a
quiet box. GPU (uvit-b, B=32, H100): benchmarks/results/2026-11-28-nvidia-h100-80gb-hbm3.md.
"""

from __future__ import annotations

import contextlib
import math
import time

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import maskdm_kernels as mk
from maskdm import GaussianDiffusion, create_model, masking
from maskdm.model import timestep_embedding

CASES = {
    "cpu": {"model": "uvit-tiny", "img": 32, "patch": 2, "batch": 64, "dtype": None, "rounds": 3, "warmup": 1,
            "device": "cpu"},
    "cuda": {"model": "uvit-b", "img": 256, "patch": 4, "batch": 32, "dtype": torch.bfloat16, "rounds": 10,
             "warmup": 3, "device": "cuda"},
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device: the GPU case needs one"))]
RATIOS = [0.5, 0.75, 0.9]
MASKED = ["maskdm_kernels", "maskdm_style", "torch_best"]
BLOCK = 4

_FULL_SECONDS: dict[str, float] = {}
_ROWS: list[str] = []


# ------------------------------------------------------------------------------------------------- providers
def _run_blocks(model, h, attn):
    """U-ViT blocks on a uniform ``(B, L, D)`` batch with ``attn(q, k, v)`` over ``(B, H, L, Dh)``."""
    def block(blk, x, skip=None):
        if blk.skip_linear is not None:
            x = blk.skip_linear(torch.cat([x, skip], dim=-1))
        B, L, D = x.shape
        a = blk.attn
        q, k, v = a.qkv(blk.norm1(x)).view(B, L, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        x = x + a.proj(attn(q, k, v).transpose(1, 2).reshape(B, L, D))
        return x + blk.mlp(blk.norm2(x))

    skips = []
    for blk in model.in_blocks:
        h = block(blk, h)
        skips.append(h)
    h = block(model.mid_block, h)
    for blk in model.out_blocks:
        h = block(blk, h, skips.pop())
    return h


def _extras(model, t, dtype):
    te = model.time_embed(timestep_embedding(t, model.embed_dim)).to(dtype)
    return (te[:, None] + model.pos_embed[:, :1]).to(dtype)  # (B, 1, D)


def _vanilla_attention(q, k, v):
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, L, L) materialised
    return scores.softmax(dim=-1) @ v


def maskdm_style_loss(model, diffusion, x0, t, noise, mask):
    """MaskDM's recipe: noise the full image, patchify everything, drop masked tokens by boolean indexing."""
    p, B = model.patch_size, x0.shape[0]
    xt = diffusion.q_sample(x0, t, noise)
    tokens = model.patch_embed(rearrange(xt, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p))
    tokens = tokens + model.pos_embed[:, 1:]
    tokens = tokens[~mask].reshape(B, -1, model.embed_dim)  # host sync: data-dependent shape
    h = torch.cat([_extras(model, t, tokens.dtype), tokens], dim=1)
    h = _run_blocks(model, h, _vanilla_attention)
    pred = model.head(model.norm(h[:, 1:]))
    target = rearrange(noise, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)[~mask]
    target = target.reshape(B, -1, pred.shape[-1])
    return ((pred.float() - target.float()) ** 2).mean()


def torch_best_loss(model, diffusion, x0, t, noise, vis):
    """The best plain PyTorch can do with a uniform layout: gather, noise only the visible patches, SDPA."""
    p, B, nv = model.patch_size, x0.shape[0], vis.max_seqlen
    idx = vis.ids.view(B, nv).long()
    P = model.patch_dim

    def take(img):
        return torch.gather(rearrange(img, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p), 1,
                            idx[..., None].expand(B, nv, P))

    a = diffusion._at("sqrt_alphas_cumprod", t).view(B, 1, 1)
    s = diffusion._at("sqrt_one_minus_alphas_cumprod", t).view(B, 1, 1)
    target = take(noise)
    tokens = model.patch_embed((a * take(x0) + s * target).to(x0.dtype)) + model.pos_embed[0, 1:][idx]
    h = torch.cat([_extras(model, t, tokens.dtype), tokens], dim=1)
    h = _run_blocks(model, h, F.scaled_dot_product_attention)
    pred = model.head(model.norm(h[:, 1:]))
    return F.mse_loss(pred.float(), target.float())


# ----------------------------------------------------------------------------------------------------- FLOPs
def step_flops(model, tokens_per_sample: int) -> float:
    """Matmul FLOPs of forward + backward (3x forward) for one sample with ``tokens_per_sample`` patches."""
    D, P, L = model.embed_dim, model.patch_dim, tokens_per_sample + model.extras
    hidden = model.in_blocks[0].mlp.fc1.out_features if len(model.in_blocks) else model.mid_block.mlp.fc1.out_features
    depth = 2 * len(model.in_blocks) + 1
    per_block = 2 * L * (4 * D * D + 2 * D * hidden) + 4 * L * L * D  # qkv + proj + mlp, then QK^T and AV
    skips = len(model.out_blocks) * 2 * L * 2 * D * D
    return 3.0 * (depth * per_block + skips + 2 * tokens_per_sample * P * D * 2)


# -------------------------------------------------------------------------------------------------- harness
def _setup(device: str):
    cfg = CASES[device]
    torch.manual_seed(0)
    model = create_model(cfg["model"], img_size=cfg["img"], patch_size=cfg["patch"]).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.99, 0.99), weight_decay=0.03)
    diffusion = GaussianDiffusion("cosine")
    g = torch.Generator().manual_seed(0)
    B = cfg["batch"]
    x0 = (torch.rand(B, 3, cfg["img"], cfg["img"], generator=g) * 2 - 1).to(device)
    noise = torch.randn(B, 3, cfg["img"], cfg["img"], generator=g).to(device)
    t = torch.randint(0, 1000, (B,), generator=g).to(device)
    return cfg, model, opt, diffusion, x0, noise, t


def _autocast(cfg):
    if cfg["dtype"] is None:
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(cfg["device"], dtype=cfg["dtype"])


def _timed(benchmark, cfg, step) -> float:
    calls = []

    def run():
        t0 = time.perf_counter()
        step()
        if cfg["device"] == "cuda":
            torch.cuda.synchronize()
        calls.append(time.perf_counter() - t0)

    try:
        benchmark.pedantic(run, rounds=cfg["rounds"], warmup_rounds=cfg["warmup"], iterations=1)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        pytest.skip(f"out of GPU memory at this batch: {str(e).splitlines()[0][:160]}")
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        return stats.stats.mean
    return calls[-1]  # --benchmark-disable: one call, no statistics


def _device_name(cfg) -> str:
    return torch.cuda.get_device_name() if cfg["device"] == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def _describe(cfg) -> str:
    return f"{cfg['model']} {cfg['img']}x{cfg['img']} p={cfg['patch']} B={cfg['batch']} on {_device_name(cfg)}"


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if tr is None or not _ROWS:
        return
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        tr.write_line("")
        tr.write_line("train step: images/s | speed-up over the full step (measured vs FLOP ratio)")
        for row in _ROWS:
            tr.write_line("  " + row)


@pytest.mark.parametrize("device", DEVICES)
def test_full_step(benchmark, device):
    cfg, model, opt, diffusion, x0, noise, t = _setup(device)

    def step():
        with _autocast(cfg):
            loss = diffusion.loss(model, x0, t=t, noise=noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = _timed(benchmark, cfg, step)
    _FULL_SECONDS[device] = seconds
    ips = cfg["batch"] / seconds
    benchmark.extra_info.update(case=_describe(cfg), device=_device_name(cfg), provider="full",
                                images_per_s=round(ips, 2), mask_ratio=0.0, tokens_per_sample=model.num_patches)
    _ROWS.append(f"{_describe(cfg)} full: {ips:.1f} img/s")


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("provider", MASKED)
@pytest.mark.parametrize("device", DEVICES)
def test_masked_step(benchmark, device, provider, ratio):
    cfg, model, opt, diffusion, x0, noise, t = _setup(device)
    B, grid = cfg["batch"], cfg["img"] // cfg["patch"]
    vis = masking.block_patches(B, grid, ratio, block_size=BLOCK, generator=torch.Generator().manual_seed(1),
                                device=device)
    if provider == "maskdm_style" and device == "cuda":
        # scores + probabilities of every layer stay alive for the backward: (B, H, L, L) twice per block
        L, H = vis.max_seqlen + 1, model.mid_block.attn.num_heads
        need = 2 * (2 * len(model.in_blocks) + 1) * B * H * L * L * 4
        have = torch.cuda.get_device_properties(0).total_memory
        if need > 0.7 * have:
            pytest.skip(f"MaskDM-style attention would keep {need / 2**30:.0f} GiB of score matrices "
                        f"(device has {have / 2**30:.0f} GiB)")
    keep = torch.zeros(B, model.num_patches, dtype=torch.bool, device=device)
    keep[vis.sample_index(), vis.ids.long()] = True
    mask = ~keep  # the paper's convention, prepared outside the step (MaskDM builds it in the data loader)

    def loss_fn():
        with _autocast(cfg):
            if provider == "maskdm_kernels":
                return diffusion.loss(model, x0, vis, t=t, noise=noise)
            if provider == "maskdm_style":
                return maskdm_style_loss(model, diffusion, x0, t, noise, mask)
            return torch_best_loss(model, diffusion, x0, t, noise, vis)

    if provider != "maskdm_kernels":  # same weights, same inputs: same loss as the kernel path
        with torch.no_grad(), _autocast(cfg):
            ref = diffusion.loss(model, x0, vis, t=t, noise=noise).item()
            got = loss_fn().item()
        tol = 2e-2 if cfg["dtype"] is not None else 1e-4
        assert math.isclose(got, ref, rel_tol=tol), f"{provider} loss {got} != maskdm_kernels loss {ref}"

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = _timed(benchmark, cfg, step)
    ips = B / seconds
    nv = vis.max_seqlen
    flop_ratio = step_flops(model, model.num_patches) / step_flops(model, nv)
    backends = {op: mk.dispatch.select(op, torch.device(device), torch.float32)[0]
                for op in ("gather_patches", "varlen_attention", "masked_noise_loss")}
    info = {"case": _describe(cfg), "device": _device_name(cfg), "provider": provider, "mask_ratio": ratio,
            "masked_fraction": 1 - nv / model.num_patches, "tokens_per_sample": nv, "images_per_s": round(ips, 2),
            "flop_ratio_vs_full": round(flop_ratio, 2), "backends": backends}
    row = (f"{_describe(cfg)} {provider} ratio {ratio} ({nv}/{model.num_patches} patches kept): {ips:.1f} img/s")
    if device in _FULL_SECONDS:
        measured = _FULL_SECONDS[device] / seconds
        info["speedup_vs_full"] = round(measured, 2)
        row += f" | {measured:.2f}x vs FLOP ratio {flop_ratio:.2f}x"
    benchmark.extra_info.update(info)
    _ROWS.append(row)
