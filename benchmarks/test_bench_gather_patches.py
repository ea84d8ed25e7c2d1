"""gather_patches with fused noising vs the MaskDM chain (noise the full image, patchify, boolean-index).

Minimal bytes: the visible pixels of images and noise read, the tokens written."""

import pytest
import torch
from einops import rearrange

import maskdm_kernels as mk

from .common import DEVICE, PATCH_DTYPE, PATCH_SHAPE, backend_providers, block_mask, record, timed, visible_from_mask

RATIOS = [0.5, 0.9]


def _inputs(ratio):
    B, C, S, p = (PATCH_SHAPE[k] for k in ("batch", "channels", "size", "patch"))
    x = torch.randn(B, C, S, S, device=DEVICE, dtype=PATCH_DTYPE)
    noise = torch.randn_like(x)
    abar = torch.rand(B, device=DEVICE)
    mask = block_mask(B, S // p, ratio)
    return x, noise, abar.sqrt(), (1 - abar).sqrt(), mask, p


def _minimal_bytes(vis, p, C, dtype):
    es = torch.finfo(dtype).bits // 8
    return 3 * vis.total * p * p * C * es  # read images + noise at visible pixels, write tokens


def maskdm_chain(x, noise, ss, ns, mask, p):
    """What the MaskDM code does per step: full-image noising, einops patchify, boolean-index gather (syncs)."""
    x_t = ss.view(-1, 1, 1, 1) * x + ns.view(-1, 1, 1, 1) * noise
    tokens = rearrange(x_t, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
    return tokens[~mask]


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("provider", backend_providers("gather_patches", PATCH_DTYPE) + ["maskdm_chain"])
def test_gather_noised(benchmark, provider, ratio):
    x, noise, ss, ns, mask, p = _inputs(ratio)
    vis = visible_from_mask(mask)
    benchmark.group = f"gather_patches+noise {tuple(x.shape)} p={p} mask={ratio}"
    if provider == "maskdm_chain":
        fn = timed(lambda: maskdm_chain(x, noise, ss, ns, mask, p))
    else:
        def fn_():
            with mk.backend(provider):
                return mk.gather_patches(x, vis, p, noise=noise, signal_scale=ss, noise_scale=ns)
        fn = timed(fn_)
    expected = maskdm_chain(x.float(), noise.float(), ss, ns, mask, p)
    torch.testing.assert_close(fn().float(), expected, atol=2e-2, rtol=2e-2)
    benchmark(fn)
    record(benchmark, fn, graph=provider != "maskdm_chain", bytes_moved=_minimal_bytes(vis, p, x.shape[1], x.dtype),
           visible_tokens=vis.total)
