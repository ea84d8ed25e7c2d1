"""attention: uniform ``(B, N, H, Dh)`` attention on every backend against float64, compiled, and NaN behaviour."""

import math

import pytest
import torch

import maskdm_kernels as mk
from maskdm_kernels import dispatch
from maskdm_kernels.reference import attention_ref

NEEDS_TRITON = pytest.mark.skipif(dispatch._triton_error() is not None, reason="triton is not importable")
BACKENDS = [pytest.param("triton", marks=NEEDS_TRITON), "torch"]


def _check(name, got, ref, bound):
    err = (got.double() - ref).abs()
    worst = err.max().item()
    idx = tuple(i.item() for i in torch.unravel_index(err.argmax(), err.shape))
    assert worst <= bound, f"{name}: max abs error {worst:.3g} > bound {bound:.3g} at {idx}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend):
    """(B, N, H, Dh) in and out, including strided views of a fused (B, N, 3, H, Dh) projection. fp32 bounds: the
    sum of ~37 products of O(1) terms, ~1e-6; gradients of squares reach ~10, so 1e-4 (16 ulps at that scale)."""
    qkv = torch.randn(3, 37, 3, 2, 24, dtype=torch.float32, requires_grad=True)
    q, k, v = qkv.unbind(2)
    with mk.backend(backend):
        out = mk.attention(q, k, v, softmax_scale=0.2)
        (grad,) = torch.autograd.grad(out.square().sum(), qkv)
    leaf = qkv.detach().double().requires_grad_(True)
    ref = attention_ref(*leaf.unbind(2), softmax_scale=0.2)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), leaf)
    assert out.shape == (3, 37, 2, 24)
    _check("out", out, ref, 1e-5)
    _check("grad", grad, ref_grad, 1e-4)


def test_auto_order():
    assert dispatch.select("attention", torch.device("cpu"), torch.float32, head_dim=64)[0] == "torch"
    assert dispatch.candidates("attention", torch.device("cuda"))[0] == "torch"  # SDPA: faster on uniform batches


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_rows_and_nan_scale(backend):
    """A NaN in one query row gives NaN in that output row only; a NaN scale gives NaN everywhere (SDPA's fused
    CPU kernel returns 0 for both, so the torch backend patches it)."""
    q, k, v = torch.randn(3, 2, 9, 2, 16).unbind(0)
    q[1, 4, 0, 3] = math.nan
    with mk.backend(backend):
        out = mk.attention(q, k, v)
        assert torch.isnan(out[1, 4, 0]).all()
        assert not torch.isnan(out[1, 4, 1]).any() and not torch.isnan(out[0]).any()
        assert not torch.isnan(out[1, :4]).any() and not torch.isnan(out[1, 5:]).any()
        assert torch.isnan(mk.attention(k, k, v, softmax_scale=math.nan)).all()


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
def test_compiles_fullgraph(backend):
    """``attention`` (SDPA on the torch backend, the varlen kernels on Triton) traces in one graph."""
    torch.manual_seed(0)
    qkv = torch.randn(3, 7, 3, 2, 24, requires_grad=True)  # (B, N, 3, H, Dh): N and Dh not powers of two

    def fn(t):
        return mk.attention(*t.unbind(2)).square().sum()

    with mk.backend(backend):
        (g_eager,) = torch.autograd.grad(fn(qkv), qkv)
        (g,) = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(qkv), qkv)
    torch.testing.assert_close(g, g_eager)
    leaf = qkv.detach().double().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(attention_ref(*leaf.unbind(2)).square().sum(), leaf)
    torch.testing.assert_close(g.double(), g_ref, atol=1e-4, rtol=1e-4)
