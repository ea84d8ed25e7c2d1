"""varlen_attention / attention: packed, padding-free, non-causal self-attention over each sequence."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..dispatch import register, select
from ._common import fail

OP = "varlen_attention"
OP_BWD = "varlen_attention_backward"


@torch.library.custom_op("maskdm::varlen_attention", mutates_args=())
def _varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                      softmax_scale: float) -> tuple[Tensor, Tensor]:
    _, fn = select(OP, q.device, q.dtype, head_dim=q.shape[-1])
    return fn(q, k, v, cu_seqlens, max_seqlen, softmax_scale)


@_varlen_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    T, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((H, T), dtype=torch.float32)


@torch.library.custom_op("maskdm::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                               cu_seqlens: Tensor, max_seqlen: int,
                               softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    _, fn = select(OP_BWD, q.device, q.dtype, head_dim=q.shape[-1])
    return fn(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale)


@_varlen_attention_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, softmax_scale = inputs
    out, lse = output
    ctx.max_seqlen, ctx.softmax_scale = max_seqlen, softmax_scale
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _varlen_attention_backward(dout.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen,
                                            ctx.softmax_scale)
    return dq, dk, dv, None, None, None


_varlen_attention.register_autograd(_backward, setup_context=_setup_context)


def _check_qkv(op: str, q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            fail(op, name, f"must be a tensor, got {type(t).__name__}", TypeError)
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            fail(op, name, f"must be float32, float16 or bfloat16, got {t.dtype}", TypeError)
    if k.shape != q.shape:
        fail(op, "k", f"must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != q.shape:
        fail(op, "v", f"must have q's shape {tuple(q.shape)}, got {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        fail(op, "k", f"and v must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}", TypeError)
    if k.device != q.device or v.device != q.device:
        fail(op, "k", f"and v must be on q's device {q.device}, got {k.device} and {v.device}")
    D = q.shape[-1]
    if D % 8 or D > 128 or D < 8:
        fail(op, "q", f"head dim must be a multiple of 8 in [8, 128], got {D}")


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                     softmax_scale: float | None = None, validate: bool = False) -> Tensor:
    """Packed self-attention: each sequence attends only within itself, non-causal.

    Args:
        q, k, v: ``(total_tokens, nheads, headdim)``; strided views such as ``qkv.view(T, 3, H, Dh).unbind(1)``
            are read in place. headdim: any multiple of 8 up to 128.
        cu_seqlens: int32 ``(B + 1,)``, ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == total_tokens``.
        max_seqlen: python int >= the longest sequence.
        softmax_scale: default ``1 / sqrt(headdim)``.
        validate: check ``cu_seqlens`` against the tensors (monotone, last == T, max_seqlen big enough);
            costs one device sync, so it is off by default.
    Returns:
        ``(total_tokens, nheads, headdim)`` in q's dtype; differentiable in q, k, v.
    """
    _check_qkv(OP, q, k, v)
    if q.dim() != 3:
        fail(OP, "q", f"must be (total_tokens, nheads, headdim), got shape {tuple(q.shape)}")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32:
        fail(OP, "cu_seqlens", f"must be an int32 tensor, got {getattr(cu_seqlens, 'dtype', type(cu_seqlens))}",
             TypeError)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        fail(OP, "cu_seqlens", f"must be 1-D with B + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        fail(OP, "cu_seqlens", f"is on {cu_seqlens.device} but q is on {q.device}")
    if not isinstance(max_seqlen, int) or max_seqlen < 1:
        fail(OP, "max_seqlen", f"must be a positive int, got {max_seqlen!r}", TypeError)
    if validate:
        _validate_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)[0]


def _validate_cu_seqlens(cu_seqlens: Tensor, total: int, max_seqlen: int) -> None:
    cu = cu_seqlens.cpu()  # the sync validate=True pays for
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0:
        fail(OP, "cu_seqlens", f"must start at 0, got {int(cu[0])}")
    if bool((lengths < 0).any()):
        fail(OP, "cu_seqlens", "must be non-decreasing")
    if int(cu[-1]) != total:
        fail(OP, "cu_seqlens", f"must end at total_tokens={total}, got {int(cu[-1])}")
    if int(lengths.max()) > max_seqlen:
        fail(OP, "max_seqlen", f"={max_seqlen} is smaller than the longest sequence ({int(lengths.max())})")


def attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float | None = None) -> Tensor:
    """Uniform convenience: ``(B, N, H, Dh)`` in and out, same kernels as ``varlen_attention``."""
    _check_qkv("attention", q, k, v)
    if q.dim() != 4:
        fail("attention", "q", f"must be (B, N, nheads, headdim), got shape {tuple(q.shape)}")
    B, N, H, D = q.shape
    cu = torch.arange(B + 1, device=q.device, dtype=torch.int32) * N
    out = varlen_attention(q.reshape(B * N, H, D), k.reshape(B * N, H, D), v.reshape(B * N, H, D), cu, N,
                           softmax_scale)
    return out.view(B, N, H, D)


# ------------------------------------------------------------------------------------------- torch backend
def _padded(x: Tensor, seg: Tensor, pos: Tensor, batch: int, max_seqlen: int) -> Tensor:
    """``(T, H, D) -> (B, H, L, D)`` zero-padded, by index arithmetic (no sync)."""
    T, H, D = x.shape
    out = x.new_zeros((batch, max_seqlen, H, D))
    return out.index_put((seg, pos), x).transpose(1, 2)


def _segments(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths,
                                  output_size=total)
    pos = torch.arange(total, device=cu_seqlens.device) - cu_seqlens.long()[seg]
    return seg, pos


def _torch_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    """Padded attention math in fp32 (fp64 for fp64): scores over ``(B, H, L, L)`` with a key-padding mask."""
    T, H, D = q.shape
    B = cu_seqlens.shape[0] - 1
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    seg, pos = _segments(cu_seqlens, T)
    qp, kp, vp = (_padded(x.to(cdt), seg, pos, B, max_seqlen) for x in (q, k, v))
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    key_ok = torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None]  # (B, L)
    scores = torch.matmul(qp, kp.transpose(-1, -2)) * softmax_scale
    scores = scores.masked_fill(~key_ok[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, L)
    out = torch.matmul(torch.exp(scores - lse[..., None]), vp)  # (B, H, L, D)
    out_packed = out.transpose(1, 2)[seg, pos].to(q.dtype)  # (T, H, D)
    lse_packed = lse.permute(1, 0, 2)[:, seg, pos].float()  # (H, T)
    return out_packed, lse_packed


def _torch_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale):
    # Recompute through autograd: the reference backward needs no saved statistics.
    with torch.enable_grad():
        qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
        o, _ = _torch_forward(qq, kk, vv, cu_seqlens, max_seqlen, softmax_scale)
        dq, dk, dv = torch.autograd.grad(o, (qq, kk, vv), dout)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


register(OP, "torch")(_torch_forward)
register(OP_BWD, "torch")(_torch_backward)
