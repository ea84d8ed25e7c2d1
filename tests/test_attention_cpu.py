"""The eager CPU path of attention / varlen_attention in C++ (``varlen_attention_torch.EAGER_CPU``,
csrc/attention_cpu.cpp): it runs the torch backend's kernels, so outputs and gradients are bit-identical to the
custom op (what compile and export use) and to the Python path taken without the extension; one autograd node;
anything unusual is declined to the Python path, which names the error or serves the call."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import maskdm_kernels as mk
from maskdm_kernels.ops import varlen_attention_torch as vt
from maskdm_kernels.ops.varlen_attention import _varlen_attention, cpu_fast_path

pytestmark = pytest.mark.skipif(vt.EAGER_CPU is None, reason="the C++ extension is not built (no EAGER_CPU)")
H = 2
# (lengths, max_seqlen): uniform; varlen with an empty and a one-token sequence; a single sequence shorter than
# max_seqlen (one kernel call that is not a uniform batch); odd lengths.
LAYOUTS = [((33, 33, 33), 33), ((17, 0, 1, 64), 64), ((5,), 9), ((3, 7, 2), 8)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]  # bf16: PyTorch's CPU kernel, not Triton


def _packed(lengths, head_dim=24, dtype=torch.float32, seed=0):
    """q, k, v as strided views of one (T, 3, H, Dh) leaf (a fused projection), and cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    qkv = torch.randn(int(cu[-1]), 3, H, head_dim, generator=g).to(dtype).requires_grad_(True)
    return qkv, cu


def _fwd_bwd(fn, leaf, *args):
    out = fn(*leaf.unbind(-3), *args)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    (grad,) = torch.autograd.grad(out, leaf, dout)
    return out, grad


def _custom_op(q, k, v, cu, max_seqlen):
    return _varlen_attention(q, k, v, cu, max_seqlen, q.shape[-1] ** -0.5)[0]


def _equal(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths,max_seqlen", LAYOUTS)
def test_varlen_matches_custom_op_and_python_path(monkeypatch, lengths, max_seqlen, dtype):
    qkv, cu = _packed(lengths, dtype=dtype)
    fast = _fwd_bwd(mk.varlen_attention, qkv, cu, max_seqlen)
    assert "FlashCpu" in fast[0].grad_fn.name()
    if dtype != torch.float64:  # the custom op's float64 backward recomputes (it saves lse as float32)
        for a, b in zip(fast, _fwd_bwd(_custom_op, qkv, cu, max_seqlen)):
            _equal(a, b)
    monkeypatch.setattr(vt, "EAGER_CPU", None)  # the path without the extension
    slow = _fwd_bwd(mk.varlen_attention, qkv, cu, max_seqlen)
    assert "FlashCpu" not in slow[0].grad_fn.name()
    _equal(fast[0], slow[0])
    if dtype != torch.float64:
        _equal(fast[1], slow[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_matches_sdpa(monkeypatch, dtype):
    """The (B, N, H, Dh) op against the plain chain it replaces, on views of a fused (B, N, 3, H, Dh) leaf; with
    the extension and without it."""
    leaf = torch.randn(3, 37, 3, H, 40).to(dtype).requires_grad_(True)

    def chain(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    expect = _fwd_bwd(chain, leaf)
    fast = _fwd_bwd(mk.attention, leaf)
    assert "FlashCpu" in fast[0].grad_fn.name()
    monkeypatch.setattr(vt, "EAGER_CPU", None)
    slow = _fwd_bwd(mk.attention, leaf)
    assert "FlashCpu" not in slow[0].grad_fn.name()
    for got in (fast, slow):
        for a, b in zip(got, expect):
            _equal(a, b)


def test_one_autograd_node():
    """The chain's four transposes and its SDPA node are one node here: its edges lead straight to the leaves."""
    q, k, v = (torch.randn(2, 9, H, 16, requires_grad=True) for _ in range(3))
    node = mk.attention(q, k, v).grad_fn
    assert [type(f).__name__ for f, _ in node.next_functions] == ["AccumulateGrad"] * 3
    assert [f.variable for f, _ in node.next_functions] == [q, k, v]
    with torch.no_grad():
        assert mk.attention(q, k, v).grad_fn is None


def test_last_stride_not_one():
    """A head dim with stride != 1 is copied first (torch 2.13's CPU kernel misreads it), then the same bits."""
    base = torch.randn(20, H, 16, 3)
    q, k, v = (base[..., i] for i in range(3))  # stride(-1) == 3
    cu = torch.tensor([0, 9, 20], dtype=torch.int32)
    _equal(mk.varlen_attention(q, k, v, cu, 11), _custom_op(q.contiguous(), k.contiguous(), v.contiguous(), cu, 11))


def test_strided_cu_seqlens():
    qkv, cu = _packed((4, 6))
    strided = torch.stack([cu, torch.full_like(cu, -7)], dim=1)[:, 0]  # stride 2, the gaps hold junk
    q, k, v = qkv.detach().unbind(1)
    _equal(mk.varlen_attention(q, k, v, strided, 6), mk.varlen_attention(q, k, v, cu, 6))


@pytest.mark.parametrize("op", ["attention", "varlen_attention"])
def test_nan_rows_and_nan_scale(op):
    """A NaN in a query row: that output row NaN, the rest untouched; a NaN scale: all NaN, gradients too. Same
    NaNs as the custom op (varlen), which makes the rows NaN the same way."""
    q, k, v = (torch.randn(2, 9, H, 16) for _ in range(3))
    q[1, 4, 0, 3] = math.nan
    if op == "attention":
        call = mk.attention
    else:
        q, k, v = (x.reshape(18, H, 16) for x in (q, k, v))
        cu = torch.tensor([0, 9, 18], dtype=torch.int32)

        def call(q, k, v, softmax_scale=None):
            return mk.varlen_attention(q, k, v, cu, 9, softmax_scale)

    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = call(*leaves)
    bad = out.isnan().any(-1)
    assert bad.sum() == 1 and bad.reshape(2, 9, H)[1, 4, 0]
    if op == "varlen_attention":
        g = torch.autograd.grad(out, leaves, torch.ones_like(out))
        ref_out = _custom_op(*leaves, cu, 9)
        _equal(out, ref_out)
        for a, b in zip(g, torch.autograd.grad(ref_out, leaves, torch.ones_like(out))):
            _equal(a, b)
    out = call(*leaves, softmax_scale=math.nan)
    assert out.isnan().all()
    assert all(x.isnan().all() for x in torch.autograd.grad(out, leaves, torch.ones_like(out)))


def test_declined_calls_take_the_python_path():
    """Unusual arguments are served by the Python path (same result); bad ones get its named errors."""
    qkv, cu = _packed((3, 4), head_dim=16)
    q, k, v = qkv.detach().unbind(1)
    expect = mk.varlen_attention(q, k, v, cu, 4)
    _equal(mk.varlen_attention(q, k, v, cu, 4, softmax_scale=np.float32(0.25)), expect)  # not a Python float
    _equal(mk.varlen_attention(torch.nn.Parameter(q), k, v, cu, 4), expect)  # a subclass
    assert mk.varlen_attention(q[:0], k[:0], v[:0], torch.zeros(2, dtype=torch.int32), 1).shape == (0, H, 16)
    for cu_bad, max_seqlen, arg in [([0, 5, 3, 7], 5, "cu_seqlens"), ([0, 3, 6], 4, "cu_seqlens"),
                                    ([1, 3, 7], 4, "cu_seqlens"), ([0, 3, 7], 3, "max_seqlen")]:
        with pytest.raises(ValueError, match=rf"varlen_attention: {arg}\b"):
            mk.varlen_attention(q, k, v, torch.tensor(cu_bad, dtype=torch.int32), max_seqlen)
    with pytest.raises(TypeError, match=r"varlen_attention: k\b"):
        mk.varlen_attention(q, "k", v, cu, 4)
    with pytest.raises(ValueError, match=r"attention: q\b"):
        mk.attention(*(torch.randn(2, 3, H, 12) for _ in range(3)))  # head dim not a multiple of 8


def test_saved_inputs_are_version_checked():
    """The node saves q, k, v and the output: changing one in place before backward is an error, not a silent
    wrong gradient."""
    q, k, v = (torch.randn(2, 9, H, 16, requires_grad=True) for _ in range(3))
    qq = q * 1
    out = mk.attention(qq, k, v)
    qq.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_fast_path_only_when_torch_runs():
    q = torch.randn(4, H, 16)
    assert cpu_fast_path(q)
    with mk.backend("torch"):
        assert cpu_fast_path(q)
    with mk.backend("triton"):
        assert not cpu_fast_path(q)
    assert not cpu_fast_path(torch.nn.Parameter(q))


def test_saved_tensors_are_freed_after_backward():
    """The node releases what it saved after a backward without retain_graph: a second one raises, as PyTorch's
    own nodes do; with retain_graph=True it gives the same gradients again."""
    q, k, v = (torch.randn(2, 9, H, 16, requires_grad=True) for _ in range(3))
    out = mk.attention(q, k, v)
    (g1,) = torch.autograd.grad(out.sum(), q, retain_graph=True)
    (g2,) = torch.autograd.grad(out.sum(), q)
    _equal(g1, g2)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.sum().backward()


def test_double_backward_is_an_error_not_zeros():
    """create_graph=True: the gradient is itself differentiable only as far as PyTorch's kernel is, so a second
    derivative raises (as through F.scaled_dot_product_attention) instead of silently giving zeros."""
    q, k, v = (torch.randn(2, 9, H, 16, requires_grad=True) for _ in range(3))
    (g,) = torch.autograd.grad(mk.attention(q, k, v).sum(), q, create_graph=True)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match="not implemented"):
        g.sum().backward()


def test_forward_mode_ad_is_not_silently_dropped():
    """A dual input (forward-mode AD) is declined to the Python path: the output carries a tangent or the call
    raises; it never returns a plain output as if the tangent were zero."""
    import torch.autograd.forward_ad as fwad

    q, k, v = (torch.randn(2, 9, H, 16) for _ in range(3))
    with fwad.dual_level():
        try:
            out = mk.attention(fwad.make_dual(q, torch.ones_like(q)), k, v)
        except (RuntimeError, NotImplementedError):
            return
        assert fwad.unpack_dual(out).tangent is not None


def test_saved_tensor_hooks_and_checkpoint():
    """What the node saves goes through torch.autograd.graph.saved_tensors_hooks (q, k, v and the output), so
    offloading and non-reentrant activation checkpointing work and give the same gradients."""
    from torch.utils.checkpoint import checkpoint

    q, k, v = (torch.randn(2, 9, H, 16, requires_grad=True) for _ in range(3))
    (expect,) = torch.autograd.grad(mk.attention(q, k, v).sum(), q)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t.clone(), lambda t: t):
        out = mk.attention(q, k, v)
    assert len(packed) == 4
    _equal(torch.autograd.grad(out.sum(), q)[0], expect)
    _equal(torch.autograd.grad(checkpoint(mk.attention, q, k, v, use_reentrant=False).sum(), q)[0], expect)


@pytest.mark.parametrize("where", [(0, 0, 0), (-1, -1, -1), (13, 1, 7)])
def test_nan_scan_reaches_every_element_of_a_strided_q(where):
    """The NaN scan walks q's own strides (here a view of a fused (T, 3, H, Dh) projection): a NaN at the first,
    the last or any element of q is found and only its row comes out NaN."""
    qkv, cu = _packed((9, 20), head_dim=8)
    q, k, v = qkv.detach().clone().unbind(1)
    q[where] = math.nan
    out = mk.varlen_attention(q, k, v, cu, 20)
    bad = out.isnan().any(-1)
    assert bad.sum() == 1 and bad[where[:2]] and out[where[:2]].isnan().all()


def test_huge_max_seqlen_is_not_taken_for_a_uniform_batch():
    """4 * (2**62 + 1) wraps to 4 in int64: the C++ plan must not call a batch of four one-token sequences uniform
    with length 2**62 + 1 (that would read far out of bounds). It is varlen, and gives the exact layout's result."""
    qkv, cu = _packed((1, 1, 1, 1), head_dim=8)
    q, k, v = qkv.detach().unbind(1)
    _equal(mk.varlen_attention(q, k, v, cu, 2**62 + 1), mk.varlen_attention(q, k, v, cu, 1))
