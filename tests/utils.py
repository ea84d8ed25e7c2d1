"""Helpers shared by the op tests."""

from __future__ import annotations

import pytest
import torch

import maskdm_kernels as mk
from maskdm_kernels import _cpp_lib

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device on this machine"))]

# (dtype, atol, rtol) of an op output against a float64 reference computed from the same (rounded) inputs.
TOLS = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = "") -> None:
    """Two-sided check that names the worst element on failure."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = err > bound
    if bad.any() or not torch.isfinite(actual).all():
        excess = torch.nan_to_num(err - bound, nan=float("inf"))
        i = int(excess.argmax())
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), actual.shape)) if actual.dim() else ()
        raise AssertionError(f"{what}: {int(bad.sum())} of {actual.numel()} elements off; worst at {idx}: "
                             f"got {actual.flatten()[i].item():.6g}, expected {expected.flatten()[i].item():.6g} "
                             f"(atol={atol}, rtol={rtol})")


_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
# The patch ops' dtypes: bf16 on a GPU machine only (the Triton interpreter computes bf16 wrongly, so CI cannot).
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, id="bfloat16", marks=pytest.mark.skipif(
              not torch.cuda.is_available(), reason="bf16 is tested on a GPU only (no CUDA device on this machine)"))]
# (device, backend) pairs every op test runs: each backend on the device it serves.
BACKENDS = [
    pytest.param("cpu", "torch", id="cpu-torch"),
    pytest.param("cpu", "triton", id="cpu-triton"),
    pytest.param("cpu", "cpu", id="cpu-cpp"),
    pytest.param("cuda", "torch", id="cuda-torch", marks=_NO_CUDA),
    pytest.param("cuda", "triton", id="cuda-triton", marks=_NO_CUDA),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=_NO_CUDA),
]


def skip_unless_available(op: str, name: str, device: str, dtype: torch.dtype) -> None:
    from maskdm_kernels.dispatch import not_supported_reasons

    reasons = not_supported_reasons(op, name, torch.device(device), dtype)
    if reasons and name in ("cpu", "cuda") and _cpp_lib.build_info().get("built") and _cpp_lib.LOAD_ERROR:
        pytest.fail(f"the extension was built but does not load: {_cpp_lib.LOAD_ERROR}")
    if reasons:
        pytest.skip(f"{name} cannot run {op}: " + "; ".join(reasons))


def make_visible(layout: str, batch: int, num_patches: int, device: str, generator=None) -> mk.Visible:
    """``uniform``: every sample keeps the same random count; ``varlen``: lengths mix 1, N and in-between
    (and 0 when there are enough samples); ``full``: every patch; ``one``: a single patch per sample."""
    g = generator if generator is not None else torch.Generator().manual_seed(1)
    if layout == "full":
        return mk.Visible.full(batch, num_patches, device)
    if layout in ("uniform", "one"):
        nv = 1 if layout == "one" else max(1, num_patches // 3)
        idx = torch.stack([torch.randperm(num_patches, generator=g)[:nv] for _ in range(batch)])
        return mk.Visible.from_index(idx.to(device), num_patches)
    choices = [1, num_patches, max(1, num_patches // 2), 0, max(1, num_patches - 1)]
    lengths = [choices[i % len(choices)] for i in range(batch)]
    ids = [torch.randperm(num_patches, generator=g)[:n].sort().values for n in lengths]
    cu = torch.tensor([0] + lengths).cumsum(0).int()
    return mk.Visible.from_packed(torch.cat(ids).int().to(device), cu.to(device), num_patches, max(lengths))


def make_images(shape, dtype, device, fmt: str, generator=None) -> torch.Tensor:
    """``contiguous``, ``channels_last`` or ``strided`` (a slice of a larger tensor: no unit stride)."""
    B, C, H, W = shape
    if fmt == "strided":
        big = torch.randn(B, C + 1, H, 2 * W, generator=generator).to(device=device, dtype=dtype)
        x = big[:, 1:, :, ::2]
        assert not x.is_contiguous()
        return x
    x = torch.randn(B, C, H, W, generator=generator).to(device=device, dtype=dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x
