"""The ``torch`` backend of varlen_attention: PyTorch's fused attention kernels over views or a padded batch.

CPU: the flash CPU kernel on free ``(batch, H, L, Dh)`` views (one call for a uniform batch, one per sequence
otherwise; eager calls run all of it in C++, ``EAGER_CPU``, when the extension is built); ``cu_seqlens`` is on the
host there, so bad values raise a named error. CUDA: the memory-efficient SDPA
kernel over a zero-padded batch with a key-padding bias; the padding index is ``layout.sample_index``, safe for
any ``cu_seqlens`` values, and rows of an invalid layout come out NaN (no sync). Float64: explicit math.
Both return ``(out (T, H, Dh), lse (H, T) float32)`` like the Triton backend, so either backward takes either's
saved forward.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _cpp_lib
from ..dispatch import register
from ..layout import sample_index
from ._common import fail

OP = "varlen_attention"
OP_BWD = "varlen_attention_backward"


def check_cu_seqlens_host(bounds: list[int], total: int, max_seqlen: int) -> None:
    """Named errors for a host copy of ``cu_seqlens`` (O(B) Python, no tensor ops)."""
    if bounds[0] != 0:
        fail(OP, "cu_seqlens", f"must start at 0, got {bounds[0]}")
    longest = 0
    for s, e in itertools.pairwise(bounds):
        if e < s:
            fail(OP, "cu_seqlens", f"must be non-decreasing, got {s} then {e}")
        longest = max(longest, e - s)
    if bounds[-1] != total:
        fail(OP, "cu_seqlens", f"must end at total_tokens={total}, got {bounds[-1]}")
    if longest > max_seqlen:
        fail(OP, "max_seqlen", f"={max_seqlen} is smaller than the longest sequence ({longest})")


def _nan_outputs(q: Tensor):
    T, H, _ = q.shape
    return (torch.full(q.shape, math.nan, dtype=q.dtype, device=q.device),
            torch.full((H, T), math.nan, dtype=torch.float32, device=q.device))


def _propagate_nan_rows(q: Tensor, out: Tensor, lse: Tensor) -> None:
    """PyTorch's fused kernels return 0 for a query row holding a NaN (they treat it as fully masked); make that
    row NaN, as the scores it came from are. NaN keys or values already spread NaN to their rows. CPU tensors only
    (values on the host): one sum over q decides, the per-row fix runs only when it is not finite."""
    if math.isfinite(q.sum().item()):
        return
    bad = q.isnan().any(dim=-1)  # (T, H)
    out.masked_fill_(bad[..., None], math.nan)
    lse.masked_fill_(bad.t(), math.nan)


# ------------------------------------------------------------------------------------------------------ CPU
def _cpu_fused() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _cpu_calls(cu_seqlens: Tensor, total: int, max_seqlen: int):
    """The CPU kernel's calls, as ``(token slice, batch, length)``: one over the whole uniform batch, else one per
    non-empty sequence. Every operand is then a free ``(batch, H, length, D)`` view: nothing is padded."""
    bounds = cu_seqlens.tolist()  # CPU tensor: no device sync
    check_cu_seqlens_host(bounds, total, max_seqlen)
    batch = len(bounds) - 1
    if total == batch * max_seqlen:
        return [(slice(0, total), batch, max_seqlen)]
    return [(slice(s, e), 1, e - s) for s, e in itertools.pairwise(bounds) if e > s]


# The eager CPU path in C++ (csrc/attention_cpu.cpp), None when the extension is not built. ``EAGER_CPU(q, k, v,
# cu_seqlens, max_seqlen, softmax_scale)`` checks the usual case of a call (else returns None), runs the flash CPU
# kernel below on free views, makes NaN rows NaN and records one autograd node whose backward is the kernel's: the
# custom op's bits. Why: the plain chain (transposes + SDPA) is C++ from its Python call down, so a Python path that
# also does the op's host work (checks, NaN rows) costs more than that chain (issue 11).
EAGER_CPU = getattr(_cpp_lib._C, "attention_cpu", None)


def _unit_last_stride(*xs: Tensor) -> list[Tensor]:
    # torch 2.13's CPU flash kernel reads a head dim with stride != 1 wrongly (2.14 does not): copy those only.
    return [x if x.stride(-1) == 1 else x.contiguous() for x in xs]


def _cpu_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    calls = _cpu_calls(cu_seqlens, q.shape[0], max_seqlen)
    q, k, v = _unit_last_stride(q, k, v)
    T, H, D = q.shape
    if len(calls) == 1 and calls[0][1] * calls[0][2] == T:  # one call: one copy each into the packed layouts
        _, b, n = calls[0]
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *(x.view(b, n, H, D).transpose(1, 2) for x in (q, k, v)), scale=softmax_scale)[:2]
        out, lse = o.transpose(1, 2).reshape(T, H, D), l.transpose(0, 1).reshape(H, T)
        _propagate_nan_rows(q, out, lse)
        return out, lse
    out = torch.empty((T, H, D), dtype=q.dtype)
    lse = torch.empty((H, T), dtype=torch.float32)
    for sl, b, n in calls:
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *(x[sl].view(b, n, H, D).transpose(1, 2) for x in (q, k, v)), scale=softmax_scale)
        out[sl].view(b, n, H, D).copy_(o.transpose(1, 2))
        lse[:, sl].view(H, b, n).copy_(l.transpose(0, 1))
    _propagate_nan_rows(q, out, lse)
    return out, lse


def _cpu_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale):
    calls = _cpu_calls(cu_seqlens, q.shape[0], max_seqlen)
    dout, q, k, v, out = _unit_last_stride(dout, q, k, v, out)
    T, H, D = q.shape
    if len(calls) == 1 and calls[0][1] * calls[0][2] == T:  # one call: its grads, (B, L, H, D) in memory, are ours
        _, b, n = calls[0]
        ops = [x.view(b, n, H, D).transpose(1, 2) for x in (dout, q, k, v, out)]
        gs = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *ops, lse.view(H, b, n).transpose(0, 1).contiguous(), 0.0, False, scale=softmax_scale)
        return tuple(g.transpose(1, 2).reshape(T, H, D) for g in gs)
    grads = tuple(torch.empty((T, H, D), dtype=q.dtype) for _ in range(3))
    for sl, b, n in calls:
        ops = [x[sl].view(b, n, H, D).transpose(1, 2) for x in (dout, q, k, v, out)]
        l = lse[:, sl].view(H, b, n).transpose(0, 1).contiguous()
        for g, gs in zip(grads, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                *ops, l, 0.0, False, scale=softmax_scale)):
            g[sl].view(b, n, H, D).copy_(gs.transpose(1, 2))
    return grads


# ------------------------------------------------------------------------------------------- padded batch
class _Batched:
    """Packed ``(T, H, D)`` <-> batched ``(B, H, L, D)``. A uniform batch (``T == B * max_seqlen``: with valid
    ``cu_seqlens`` every length is then ``max_seqlen``, known without a sync) is a free view; a varlen batch is
    zero-padded by index arithmetic. ``row_ok (T,)`` is False for the tokens of an invalid layout (not owned by a
    sequence, or in a sequence longer than ``max_seqlen``): their rows come out NaN, never read or written out of
    bounds. On the host (CPU tensors) the layout is checked first and ``sample_index`` gives the index."""

    def __init__(self, cu_seqlens: Tensor, total: int, heads: int, max_seqlen: int, dtype: torch.dtype):
        self.T, self.H, self.L, self.B = total, heads, max_seqlen, cu_seqlens.shape[0] - 1
        dev = cu_seqlens.device
        cu = cu_seqlens.long()
        self.uniform = total == self.B * max_seqlen
        if self.uniform:  # still check the values on the device: a mismatch makes that sequence NaN
            expect = torch.arange(self.B + 1, device=dev) * max_seqlen
            seq_ok = (cu[:-1] == expect[:-1]) & (cu[1:] == expect[1:])
            self.row_ok = seq_ok.repeat_interleave(max_seqlen, output_size=total) if total else seq_ok[:0]
            self.bias = None
            return
        t = torch.arange(total, device=dev)
        lengths = cu[1:] - cu[:-1]
        if dev.type == "cpu":
            check_cu_seqlens_host(cu_seqlens.tolist(), total, max_seqlen)
        seg = sample_index(cu_seqlens, total)  # in [0, B) for any values; bad rows are flagged below
        pos = t - cu[seg]
        layout_ok = (cu[0] == 0) & (cu[-1] == total) & (lengths >= 0).all()
        self.row_ok = (pos >= 0) & (pos < lengths[seg]) & (lengths[seg] <= max_seqlen) & layout_ok
        self.seg, self.pos = seg, pos.clamp(0, max_seqlen - 1)
        # Padded slot of each token; invalid tokens all go to one spare slot that is dropped.
        self.dst = torch.where(self.row_ok, seg * max_seqlen + self.pos, self.B * max_seqlen)
        # Last dim padded to 16 then sliced: the alignment CUDA's memory-efficient kernel asks of a bias.
        lp = -(-max_seqlen // 16) * 16
        key_ok = torch.arange(lp, device=dev)[None, :] < lengths[:, None]  # (B, Lp)
        self.key_ok = key_ok[:, None, None, :max_seqlen]
        bias = torch.zeros((self.B, 1, 1, lp), dtype=dtype, device=dev)
        self.bias = bias.masked_fill(~key_ok[:, None, None, :], float("-inf"))[..., :max_seqlen]

    def pad(self, x: Tensor) -> Tensor:
        """``(T, H, D) -> (B, H, L, D)``."""
        if self.uniform:
            return x.view(self.B, self.L, self.H, x.shape[-1]).transpose(1, 2)
        out = x.new_zeros((self.B * self.L + 1, self.H, x.shape[-1])).index_put((self.dst,), x)
        return out[:-1].view(self.B, self.L, self.H, x.shape[-1]).transpose(1, 2)

    def unpad(self, x: Tensor) -> Tensor:
        """``(B, H, L, D) -> (T, H, D)`` contiguous; invalid rows NaN."""
        if self.uniform:
            y = x.transpose(1, 2).reshape(self.T, self.H, x.shape[-1])
        else:
            y = x.transpose(1, 2)[self.seg, self.pos]
        return torch.where(self.row_ok[:, None, None], y, math.nan).contiguous()

    def unpad_lse(self, lse: Tensor) -> Tensor:
        """``(B, H, L) -> (H, T)`` contiguous float32; invalid rows NaN."""
        if self.uniform:
            y = lse.transpose(0, 1).reshape(self.H, self.T)
        else:
            y = lse.permute(1, 0, 2)[:, self.seg, self.pos]
        return torch.where(self.row_ok[None, :], y.float(), math.nan).contiguous()


def _math(qp, kp, vp, bias, scale):
    """Explicit scores in fp32 (fp64 for fp64): ``(out, lse)`` over ``(B, H, L, D)``."""
    cdt = torch.float64 if qp.dtype == torch.float64 else torch.float32
    s = torch.matmul(qp.to(cdt), kp.to(cdt).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(cdt)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), vp.to(cdt)).to(qp.dtype), lse


def torch_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    """PyTorch's fused attention. CPU: the flash CPU kernel over views (4x the explicit-score math at 64 x 257
    tokens x 4 heads x Dh 64 fp32 on this project's 2-core CI box). CUDA: the memory-efficient SDPA kernel (takes
    a key-padding bias, returns lse). Else math."""
    T, H, _ = q.shape
    if T == 0:
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((H, 0), dtype=torch.float32)
    if math.isnan(softmax_scale):  # the fused kernels give 0 here; every score is NaN
        return _nan_outputs(q)
    if q.device.type == "cpu" and _cpu_fused():
        return _cpu_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    bt = _Batched(cu_seqlens, T, H, max_seqlen, q.dtype)
    qp, kp, vp = bt.pad(q), bt.pad(k), bt.pad(v)
    if q.device.type == "cuda" and q.dtype != torch.float64:
        bias = None if bt.bias is None else bt.bias.expand(bt.B, H, max_seqlen, max_seqlen)
        qp, kp, vp = (x if x.stride(-1) == 1 else x.contiguous() for x in (qp, kp, vp))
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qp, kp, vp, bias, True,
                                                                         scale=softmax_scale)[:2]
        lse = lse[..., :max_seqlen]  # older kernels pad the lse rows to a multiple of 32
    else:
        out, lse = _math(qp, kp, vp, bt.bias, softmax_scale)
    out, lse = bt.unpad(out), bt.unpad_lse(lse)
    if q.device.type == "cpu":  # CUDA's kernels: unmeasured here, left as they are (a sync to check is not free)
        _propagate_nan_rows(q, out, lse)
    return out, lse


def torch_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale):
    """CPU: the flash CPU backward kernel on the saved out and lse. Elsewhere (CUDA, float64): recompute the forward
    (SDPA on CUDA: one extra forward; explicit math for float64) and take its vector-Jacobian product."""
    T, H, _ = q.shape
    if T == 0:
        return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
    if math.isnan(softmax_scale):
        return tuple(torch.full_like(x, math.nan, memory_format=torch.contiguous_format) for x in (q, k, v))
    if q.device.type == "cpu" and q.dtype != torch.float64 and _cpu_fused():  # fp64 recomputes: lse is fp32
        return _cpu_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale)
    bt = _Batched(cu_seqlens, T, H, max_seqlen, q.dtype)

    def attend(qq, kk, vv):
        qp, kp, vp = bt.pad(qq), bt.pad(kk), bt.pad(vv)
        if q.device.type == "cuda" and q.dtype != torch.float64:
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=None if bt.uniform else bt.key_ok,
                                               scale=softmax_scale)
        else:
            o = _math(qp, kp, vp, bt.bias, softmax_scale)[0]
        return bt.unpad(o)

    # torch.func, not torch.autograd: a custom op's body runs below the autograd dispatch key.
    _, vjp = torch.func.vjp(attend, q, k, v)
    return tuple(g.contiguous() for g in vjp(dout))


register(OP, "torch")(torch_forward)
register(OP_BWD, "torch")(torch_backward)
