"""varlen_attention vs PyTorch's attention: forward and forward+backward time and TFLOP/s.

FLOPs use the true per-sequence lengths: forward = 4 * sum_i(L_i^2) * Dh * H; forward+backward = 3.5x that (the
backward's 5 products, S recomputed, are 2.5x the forward's 2: the flash-attention convention). Padded providers
are charged the same useful FLOPs, so padding shows up as a lower TFLOP/s, and their time includes the pad / unpad
copies a packed layout needs. Inputs are strided views of a fused ``(T, 3, H, Dh)`` qkv, as a ViT block makes them.

On a GPU each provider gets ``device_median_ms`` (CUDA events, L2 flushed) and ``graph_median_ms`` (CUDA-graph
replay: kernel time alone, host overhead excluded).

GPU (bf16, Dh 64): MaskDM-B at 90% / 50% / full (N 417 / 2049 / 4097, H 12, B 64 / 16 / 8), U-ViT-S CelebA-64 p=2
(N 1025 full, 104 at 90%, H 8, B 256), and varlen with visible ratios drawn uniformly from 10%-50% of 4096 (B 16).
CPU: a small uniform and a small varlen shape in fp32, torch providers only (interpreted Triton is skipped).
"""

from __future__ import annotations

import contextlib
import functools
import time

import pytest
import torch
import torch.nn.functional as F

import maskdm_kernels as mk
from maskdm_kernels.dispatch import not_supported_reasons

from .common import DEVICE, ON_GPU, record, sync, timed

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
HEAD_DIM = 64
# name -> (lengths spec, heads): ("uniform", B, N) or ("varlen", B, total patches, low ratio, high ratio)
CASES = {
    "maskdm-b-90": (("uniform", 64, 417), 12),
    "maskdm-b-50": (("uniform", 16, 2049), 12),
    "maskdm-b-full": (("uniform", 8, 4097), 12),
    "uvit-s-full": (("uniform", 256, 1025), 8),
    "uvit-s-90": (("uniform", 256, 104), 8),
    "varlen-10-50": (("varlen", 16, 4096, 0.1, 0.5), 12),
} if ON_GPU else {
    "cpu-uniform": (("uniform", 8, 257), 4),
    "cpu-varlen": (("varlen", 8, 1024, 0.1, 0.5), 4),
}
FLEX_CASES = ("maskdm-b-90", "varlen-10-50")
# maskdm: our dispatch (auto); maskdm-<backend>: one of our backends forced; maskdm-triton-2kernel: the Triton
# backward's dK/dV + dQ scheme at every length (beside maskdm-triton's fused one up to FUSED_BWD_MAX_SEQLEN, so a GPU
# run decides the threshold); flash: the flash-attn package's flash_attn_varlen_func; torch-varlen:
# torch.nn.attention.varlen (FlashAttention-2 or cuDNN; maskdm-flash calls FlashAttention-2 through aten).
PROVIDERS = ["maskdm", "maskdm-triton", "maskdm-triton-2kernel", "maskdm-torch", "maskdm-flash", "sdpa",
             "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "sdpa-padded", "flex", "flash", "xformers",
             "torch-varlen"]
_SDPA_FORCED = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}


@functools.lru_cache(maxsize=1)
def _inputs(case: str):
    spec, heads = CASES[case]
    g = torch.Generator().manual_seed(0)
    if spec[0] == "uniform":
        lengths = [spec[2]] * spec[1]
    else:
        _, batch, n, lo, hi = spec
        lengths = [1 + int(n * (lo + (hi - lo) * r)) for r in torch.rand(batch, generator=g).tolist()]  # + time token
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    T = int(cu[-1])
    qkv = torch.randn(T, 3, heads, HEAD_DIM, generator=g).to(DEVICE, DTYPE).requires_grad_(True)
    dout = torch.randn(T, heads, HEAD_DIM, generator=g).to(DEVICE, DTYPE)
    return spec[0] == "uniform", lengths, cu, qkv, dout


def _sdpa_fn(uniform, lengths, cu, forced=None):
    """SDPA over ``(B, H, L, D)``: a view of a uniform batch, or a zero-padded copy under a key-padding mask."""
    B, L = len(lengths), max(lengths)
    lens = torch.tensor(lengths, device=DEVICE)
    mask = (torch.arange(L, device=DEVICE)[None, :] < lens[:, None])[:, None, None, :]
    seg = torch.repeat_interleave(torch.arange(B, device=DEVICE), lens)
    pos = torch.arange(int(cu[-1]), device=DEVICE) - cu.long()[seg]

    def pad(x):
        return x.new_zeros((B, L, *x.shape[1:])).index_put((seg, pos), x).transpose(1, 2)

    def fn(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, forced)) if forced else contextlib.nullcontext():
            if uniform:
                qb, kb, vb = (x.view(B, L, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
                return F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(q.shape)
            out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask)
            return out.transpose(1, 2)[seg, pos]

    return fn


_FLEX = {}


def _flex_fn(uniform, lengths, cu, benchmark):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["fn"]
    B, L, T = len(lengths), max(lengths), int(cu[-1])
    if uniform:
        return lambda q, k, v: flex(*(x.view(B, L, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))).transpose(
            1, 2).reshape(q.shape)
    seg = torch.repeat_interleave(torch.arange(B, device=DEVICE), torch.tensor(lengths, device=DEVICE))

    def document(b, h, q_idx, kv_idx):
        return seg[q_idx] == seg[kv_idx]

    def build():
        return create_block_mask(document, None, None, T, T, device=DEVICE)

    block_mask = build()
    sync()
    t0 = time.perf_counter()
    for _ in range(3):
        block_mask = build()
    sync()
    benchmark.extra_info["block_mask_build_ms"] = round((time.perf_counter() - t0) / 3 * 1e3, 3)
    return lambda q, k, v: flex(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=block_mask)[0].transpose(
        0, 1)


def _provider_fn(provider, case, uniform, lengths, cu, benchmark):
    """(callable (q, k, v) -> (T, H, D), or None and the reason it does not run here)."""
    L = max(lengths)
    if provider.startswith("maskdm"):
        name = provider.split("-")[1] if "-" in provider else "auto"
        if name != "auto":
            reasons = not_supported_reasons("varlen_attention", name, torch.device(DEVICE), DTYPE, head_dim=HEAD_DIM)
            if name == "triton" and not ON_GPU:
                reasons = ["an interpreted Triton time is not a performance number"]
            if reasons:
                return None, "; ".join(reasons)

        def fn(q, k, v):
            with mk.backend(name):
                return mk.varlen_attention(q, k, v, cu, L)

        return fn, None
    if provider in ("sdpa", *_SDPA_FORCED):
        if uniform is False and provider == "sdpa":
            return None, "SDPA has no varlen path: see sdpa-padded (and the forced sdpa-* backends, padded + masked)"
        if provider in _SDPA_FORCED and provider != "sdpa-math" and not ON_GPU:
            return None, "a CUDA SDPA backend"
        if provider == "sdpa-math" and ON_GPU:
            return None, "the math backend materialises every score matrix: not a GPU contender"
        return _sdpa_fn(uniform, lengths, cu, _SDPA_FORCED.get(provider)), None
    if provider == "sdpa-padded":
        if uniform:
            return None, "uniform batch: nothing to pad (see sdpa)"
        return _sdpa_fn(uniform, lengths, cu), None
    if provider == "flex":
        if not ON_GPU:
            return None, "FlexAttention on CPU compiles C++ for minutes: GPU only here"
        if case not in FLEX_CASES:
            return None, f"FlexAttention compiles per shape (~30 s each): run on {', '.join(FLEX_CASES)} only"
        return _flex_fn(uniform, lengths, cu, benchmark), None
    if provider == "flash":
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            return None, "the flash-attn package is not installed"
        if not ON_GPU:
            return None, "flash-attn runs on CUDA only"
        return lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, L, L), None
    if provider == "xformers":
        try:
            import xformers.ops as xops
            from xformers.ops.fmha.attn_bias import BlockDiagonalMask
        except ImportError:
            return None, "xformers is not installed"
        if not ON_GPU:
            return None, "xformers memory_efficient_attention is benchmarked on CUDA only"
        bias = BlockDiagonalMask.from_seqlens(list(lengths))
        return lambda q, k, v: xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0], None
    if provider == "torch-varlen":
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            return None, "this torch has no torch.nn.attention.varlen"
        if not ON_GPU:
            return None, "torch.nn.attention.varlen runs on CUDA only"
        return lambda q, k, v: varlen_attn(q, k, v, cu, cu, L, L), None
    raise AssertionError(provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention(benchmark, monkeypatch, case, mode, provider):
    uniform, lengths, cu, qkv, dout = _inputs(case)
    if provider == "maskdm-triton-2kernel":
        from maskdm_kernels.ops import varlen_attention_triton

        monkeypatch.setattr(varlen_attention_triton, "FUSED_BWD_MAX_SEQLEN", 0)
    fn, why = _provider_fn(provider, case, uniform, lengths, cu, benchmark)
    if fn is None:
        pytest.skip(why)
    q, k, v = qkv.unbind(1)
    try:
        with torch.no_grad():
            out = fn(q, k, v)
            sync()
    except RuntimeError as e:  # a forced SDPA backend that refuses this shape / device
        pytest.skip(f"{provider} does not run here: {str(e).splitlines()[0][:200]}")
    with torch.no_grad():
        expected = _sdpa_fn(uniform, lengths, cu)(*(x.float() for x in (q, k, v)))
    tol = 2e-2 if DTYPE != torch.float32 else 1e-4
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(q, k, v)
    else:
        def step():
            return torch.autograd.grad(fn(*qkv.unbind(1)), qkv, dout)
    benchmark.group = f"attention {case} {mode}"
    timed_step = timed(step)
    benchmark(timed_step)
    flops = 4 * sum(n * n for n in lengths) * HEAD_DIM * q.shape[1] * (1.0 if mode == "fwd" else 3.5)
    # Every provider is also timed from a CUDA-graph replay (graph_median_ms: kernel time without the host); one
    # that cannot be captured (a sync, a recompile) records None there.
    record(benchmark, timed_step, graph=True, flops=flops, provider=provider,
           dtype=str(DTYPE).replace("torch.", ""), head_dim=HEAD_DIM, heads=q.shape[1], batch=len(lengths),
           max_seqlen=max(lengths), tokens=int(cu[-1]), uniform=uniform,
           padded_flops_ratio=round(len(lengths) * max(lengths) ** 2 / sum(n * n for n in lengths), 3))
