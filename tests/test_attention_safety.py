"""Bad cu_seqlens / max_seqlen values and NaN inputs, on every backend (issue 13 items 1-2).

Device kernels (Triton, run here under the interpreter) never read or write out of bounds and turn every row the
bad values affect into NaN, without a sync; the torch backend on CPU (values on the host) and ``validate=True`` on
any backend raise an error that names the argument. Every output row is written: NaN, never stale memory.
"""

import math

import pytest
import torch

import maskdm_kernels as mk
from maskdm_kernels import dispatch

NEEDS_TRITON = pytest.mark.skipif(dispatch._triton_error() is not None, reason="triton is not importable")
H, D = 2, 16


def _qkv(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, T, H, D, generator=g).unbind(0)


def _sentinel_outputs(monkeypatch):
    """Make every fresh torch.empty hold a finite sentinel (1234.5): a row the kernel leaves unwritten then shows
    up as that value, not as whatever the allocator had."""
    real = torch.empty

    def filled(*a, **k):
        t = real(*a, **k)
        return t.fill_(1234.5) if t.is_floating_point() else t

    from maskdm_kernels.ops import varlen_attention_triton

    monkeypatch.setattr(varlen_attention_triton.torch, "empty", filled)


def _triton_forward_backward(q, k, v, cu, max_seqlen):
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    with mk.backend("triton"):
        out = mk.varlen_attention(*leaves, cu, max_seqlen)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    return out.detach(), grads


# (cu_seqlens, max_seqlen, T, rows that must be NaN: "all" or a (start, end) range)
BAD_LAYOUTS = {
    "ends-past-T": ([0, 3, 12], 9, 7, "all"),
    "ends-before-T": ([0, 3, 6], 4, 7, "all"),
    "starts-at-1": ([1, 3, 7], 4, 7, "all"),
    "decreasing": ([0, 5, 3, 7], 5, 7, "all"),
    "negative": ([0, -5, 7], 12, 7, "all"),
    "huge": ([0, 3, 2**30], 2**30, 7, "all"),
    "max-seqlen-small": ([0, 2, 7, 9], 4, 9, (2, 7)),  # only sequence 1 (5 tokens) is longer than 4
    "uniform-mismatch": ([0, 2, 6], 3, 6, "all"),  # T == B * max_seqlen but lengths 2 and 4
}


@NEEDS_TRITON
@pytest.mark.parametrize("scheme", ["fused", "two-kernel"])
@pytest.mark.parametrize("name", list(BAD_LAYOUTS))
def test_triton_bad_layout_gives_nan_rows(monkeypatch, name, scheme):
    from maskdm_kernels.ops import varlen_attention_triton

    if scheme == "two-kernel":
        monkeypatch.setattr(varlen_attention_triton, "FUSED_BWD_MAX_SEQLEN", 0)
    _sentinel_outputs(monkeypatch)
    cu, max_seqlen, T, nan_rows = BAD_LAYOUTS[name]
    q, k, v = _qkv(T)
    out, grads = _triton_forward_backward(q, k, v, torch.tensor(cu, dtype=torch.int32), max_seqlen)
    bad = torch.zeros(T, dtype=torch.bool)
    if nan_rows == "all":
        bad[:] = True
    else:
        bad[nan_rows[0]:nan_rows[1]] = True
    for what, t in (("out", out), ("dq", grads[0]), ("dk", grads[1]), ("dv", grads[2])):
        assert torch.isnan(t[bad]).all(), f"{what}: rows {bad.nonzero().flatten().tolist()} must be NaN"
        assert torch.isfinite(t[~bad]).all() and not (t[~bad] == 1234.5).any(), f"{what}: good rows must be computed"


@pytest.mark.parametrize("name", list(BAD_LAYOUTS))
def test_torch_backend_on_cpu_names_the_argument(name):
    cu, max_seqlen, T, _ = BAD_LAYOUTS[name]
    q, k, v = _qkv(T)
    arg = "max_seqlen" if name in ("max-seqlen-small", "uniform-mismatch") else "cu_seqlens"
    with mk.backend("torch"), pytest.raises(ValueError, match=rf"varlen_attention: {arg}\b"):
        mk.varlen_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), max_seqlen)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=NEEDS_TRITON), "torch"])
@pytest.mark.parametrize("name", list(BAD_LAYOUTS))
def test_validate_names_the_argument(backend, name):
    cu, max_seqlen, T, _ = BAD_LAYOUTS[name]
    q, k, v = _qkv(T)
    arg = "max_seqlen" if name in ("max-seqlen-small", "uniform-mismatch") else "cu_seqlens"
    with mk.backend(backend), pytest.raises(ValueError, match=rf"varlen_attention: {arg}\b"):
        mk.varlen_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), max_seqlen, validate=True)


def test_padded_torch_path_gives_nan_rows(monkeypatch):
    """The torch backend's padded path (CUDA's; forced here on CPU) builds its index with searchsorted: safe for
    any values, bad rows NaN. The host check is bypassed to reach it."""
    from maskdm_kernels.ops import varlen_attention_torch as op
    from maskdm_kernels.ops.varlen_attention import _varlen_attention

    monkeypatch.setattr(op, "_cpu_fused", lambda: False)
    monkeypatch.setattr(op, "check_cu_seqlens_host", lambda *a: None)
    monkeypatch.setattr(op, "sample_index", lambda cu, total: torch.searchsorted(
        cu[1:].contiguous(), torch.arange(total, dtype=cu.dtype), right=True).clamp_(max=cu.shape[0] - 2))
    for name, (cu, max_seqlen, T, nan_rows) in BAD_LAYOUTS.items():
        if max_seqlen > 64:  # the padded batch is B x max_seqlen: "huge" is a failed allocation there, not OOB
            continue
        q, k, v = _qkv(T)
        with mk.backend("torch"):  # the custom op: the eager CPU path is SDPA on views, checked on the host
            out = _varlen_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), max_seqlen, 0.25)[0]
        if nan_rows == "all":
            assert torch.isnan(out).all(), name
        else:
            assert torch.isnan(out[nan_rows[0]:nan_rows[1]]).all(), name
            assert torch.isfinite(out[:nan_rows[0]]).all() and torch.isfinite(out[nan_rows[1]:]).all(), name


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=NEEDS_TRITON), "torch"])
def test_nan_inputs_propagate(backend):
    """A NaN in a query row: that row NaN (out and dq), other rows finite. A NaN in a key: its whole sequence NaN,
    the other sequences untouched. A NaN scale: everything NaN. Same on every backend (the fused CPU kernel
    returns 0 for a NaN query row, which the torch backend corrects)."""
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q, k, v = _qkv(12)
    q = q.clone()
    q[2, 1, 0] = math.nan
    with mk.backend(backend):
        out = mk.varlen_attention(q, k, v, cu, 7)
        assert torch.isnan(out[2, 1]).all() and torch.isfinite(out[2, 0]).all()
        assert torch.isfinite(out[:2]).all() and torch.isfinite(out[3:]).all()
        k2 = k.clone()
        k2[8, 0, 5] = math.nan
        out = mk.varlen_attention(q.nan_to_num(), k2, v, cu, 7)
        assert torch.isnan(out[5:, 0]).all() and torch.isfinite(out[:5]).all() and torch.isfinite(out[5:, 1]).all()
        assert torch.isnan(mk.varlen_attention(k, k, v, cu, 7, softmax_scale=math.nan)).all()


@pytest.mark.parametrize("name", list(BAD_LAYOUTS))
def test_flash_guard(name):
    """The flash backend's guard (plain tensor ops, so it runs here; the flash kernels need CUDA): the cu_seqlens
    handed to the kernels stays monotone inside [0, T], and row_ok is False on exactly the rows that must be NaN."""
    from maskdm_kernels.ops.varlen_attention_flash import _guard

    cu, max_seqlen, T, nan_rows = BAD_LAYOUTS[name]
    if name == "uniform-mismatch":  # flash has no uniform path: the layout itself is valid, only max_seqlen is not
        nan_rows = (2, 6)
    safe, row_ok = _guard(torch.tensor(cu, dtype=torch.int32), T, max_seqlen)
    assert (safe >= 0).all() and (safe <= T).all() and (safe.diff() >= 0).all()
    expect = torch.ones(T, dtype=torch.bool)
    expect[slice(None) if nan_rows == "all" else slice(*nan_rows)] = False
    assert torch.equal(row_ok, expect)
    _, ok = _guard(torch.tensor([0, 2, 2, 7], dtype=torch.int32), 7, 5)
    assert ok.all()


@NEEDS_TRITON
def test_schedule_longest_first():
    """The varlen schedule: sequences sorted longest first on the device (ties by index), cumulative block counts
    per block size 16 / 32 / 64 / 128, and the layout flag (0 for a cu_seqlens that does not end at T)."""
    from maskdm_kernels.ops import varlen_attention_triton as vt

    lengths = [3, 0, 70, 17, 17]
    cu = torch.tensor([0, 3, 3, 73, 90, 107], dtype=torch.int32)
    B = len(lengths)
    sched = torch.full((1 + B + 4 * (B + 1),), -7, dtype=torch.int32)
    vt._schedule_kernel[(1,)](cu, sched, B, 107, BLOCK_B=16)
    assert sched[0] == 1
    assert sched[1:1 + B].tolist() == [2, 3, 4, 0, 1]
    for t, block in enumerate((16, 32, 64, 128)):
        table = sched[1 + B + t * (B + 1):1 + B + (t + 1) * (B + 1)].tolist()
        blocks = [-(-n // block) for n in (70, 17, 17, 3, 0)]
        assert table == [sum(blocks[:i]) for i in range(B + 1)], block
    vt._schedule_kernel[(1,)](cu, sched, B, 106, BLOCK_B=16)
    assert sched[0] == 0


@NEEDS_TRITON
def test_triton_declines_a_varlen_batch_past_its_schedule():
    # One more sequence than the one-program schedule sorts: the triton backend says why (auto goes on to flash or
    # torch), before any launch.
    from maskdm_kernels.ops import varlen_attention as va

    n = va.TRITON_MAX_VARLEN_BATCH + 1
    lengths = torch.full((n,), 2, dtype=torch.int32)
    lengths[-1] = 1
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0, dtype=torch.int32)])
    q, k, v = _qkv(int(lengths.sum()))
    assert va.shape_class(q.shape[0], n, 2) == "varlen-many"
    assert va.shape_class(q.shape[0] - n, n - 1, 2) == "varlen"
    with mk.backend("triton"), pytest.raises(RuntimeError, match=f"more than {n - 1} sequences"):
        mk.varlen_attention(q, k, v, cu, 2)
