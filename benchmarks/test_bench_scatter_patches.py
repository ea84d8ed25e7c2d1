"""scatter_patches (tokens back to images, masked patches filled) vs the PyTorch way (boolean-index assign).

Minimal bytes: the tokens read and the whole image written (masked patches get the fill)."""

import pytest
import torch
from einops import rearrange

import maskdm_kernels as mk

from .common import DEVICE, PATCH_DTYPE, PATCH_SHAPE, backend_providers, block_mask, record, timed, visible_from_mask


def torch_chain(tokens, mask, p, C, S):
    B, N = mask.shape
    grid = tokens.new_zeros(B, N, tokens.shape[1])
    grid[~mask] = tokens
    return rearrange(grid, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=S // p, p1=p, p2=p, c=C)


@pytest.mark.parametrize("ratio", [0.5, 0.9])
@pytest.mark.parametrize("provider", backend_providers("scatter_patches", PATCH_DTYPE) + ["torch_chain"])
def test_scatter(benchmark, provider, ratio):
    B, C, S, p = (PATCH_SHAPE[k] for k in ("batch", "channels", "size", "patch"))
    mask = block_mask(B, S // p, ratio)
    vis = visible_from_mask(mask)
    tokens = torch.randn(vis.total, p * p * C, device=DEVICE, dtype=PATCH_DTYPE)
    benchmark.group = f"scatter_patches ({B}, {C}, {S}, {S}) p={p} mask={ratio}"
    if provider == "torch_chain":
        fn = timed(lambda: torch_chain(tokens, mask, p, C, S).contiguous())
    else:
        def fn_():
            with mk.backend(provider):
                return mk.scatter_patches(tokens, vis, p, S)
        fn = timed(fn_)
    torch.testing.assert_close(fn(), torch_chain(tokens, mask, p, C, S))
    benchmark(fn)
    es = torch.finfo(PATCH_DTYPE).bits // 8
    record(benchmark, fn, graph=provider != "torch_chain", bytes_moved=(tokens.numel() + B * C * S * S) * es,
           visible_tokens=vis.total)
