"""varlen_attention / attention: packed, padding-free, non-causal self-attention over each sequence.

Backends: ``triton`` (varlen_attention_triton.py: flash-style forward, deterministic backward) and ``torch``
(PyTorch's fused attention over a padded / viewed batch). The custom op ``maskdm::varlen_attention`` returns
``(out (T, H, Dh), lse (H, T) float32)`` on every backend, ``lse`` being the natural-log log-sum-exp of each query
row's scaled scores; ``maskdm::varlen_attention_backward`` takes both back and returns ``dq, dk, dv``.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dispatch import GPU_ORDER, register, select
from ._common import fail

OP = "varlen_attention"
OP_BWD = "varlen_attention_backward"
ATTN_OP = "attention"


@torch.library.custom_op("maskdm::varlen_attention", mutates_args=())
def _varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                      softmax_scale: float) -> tuple[Tensor, Tensor]:
    _, fn = select(OP, q.device, q.dtype, **_caps(q, cu_seqlens))
    return fn(q, k, v, cu_seqlens, max_seqlen, softmax_scale)


@_varlen_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    T, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((H, T), dtype=torch.float32)


@torch.library.custom_op("maskdm::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                               cu_seqlens: Tensor, max_seqlen: int,
                               softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    _, fn = select(OP_BWD, q.device, q.dtype, **_caps(q, cu_seqlens))
    return fn(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale)


@_varlen_attention_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _caps(q: Tensor, cu_seqlens: Tensor) -> dict:
    return {"head_dim": q.shape[-1], "batch_heads": (cu_seqlens.shape[0] - 1) * q.shape[1]}


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, softmax_scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # an internal statistic: the public API never returns it
    ctx.max_seqlen, ctx.softmax_scale = max_seqlen, softmax_scale
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _varlen_attention_backward(dout.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen,
                                            ctx.softmax_scale)
    return dq, dk, dv, None, None, None


_varlen_attention.register_autograd(_backward, setup_context=_setup_context)


def _check_qkv(op: str, q, k, v, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            fail(op, name, f"must be a tensor, got {type(t).__name__}", TypeError)
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            fail(op, name, f"must be float32, float16 or bfloat16, got {t.dtype}", TypeError)
    if q.dim() != len(layout.split(",")):
        fail(op, "q", f"must be {layout}, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            fail(op, name, f"must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            fail(op, name, f"must have q's dtype {q.dtype}, got {t.dtype}", TypeError)
        if t.device != q.device:
            fail(op, name, f"must be on q's device {q.device}, got {t.device}")
    D = q.shape[-1]
    if D % 8 or D > 128 or D < 8:
        fail(op, "q", f"head dim must be a multiple of 8 in [8, 128], got {D}")


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                     softmax_scale: float | None = None, validate: bool = False) -> Tensor:
    """Packed self-attention: each sequence attends only within itself, non-causal (flash-attn's varlen layout).

    Args:
        q, k, v: ``(total_tokens, nheads, headdim)``, float32 / float16 / bfloat16 (float64: torch backend only).
            Any strides: views such as ``qkv.view(T, 3, H, Dh).unbind(1)`` are read in place, never copied.
            headdim: any multiple of 8 up to 128 (non-powers of two are masked inside the kernel, not padded).
        cu_seqlens: int32 ``(B + 1,)`` on q's device, ``cu_seqlens[0] == 0``, non-decreasing,
            ``cu_seqlens[-1] == total_tokens``; zero-length sequences are allowed.
        max_seqlen: python int >= the longest sequence (sizes the launch grid; known on the host, so no sync).
        softmax_scale: default ``1 / sqrt(headdim)``.
        validate: check ``cu_seqlens`` against the tensors (starts at 0, monotone, last == T, max_seqlen big
            enough) at the cost of one device sync. Off by default: then shapes, dtypes and devices are checked but
            the values of ``cu_seqlens`` are trusted, and wrong values give undefined results.
    Returns:
        ``(total_tokens, nheads, headdim)`` contiguous, in q's dtype; differentiable in q, k, v.

    Backends (``maskdm_kernels.backend``): ``triton`` is a flash-attention forward (online base-2 softmax, fp32
    accumulation, lse saved) and a backward with separate dK/dV and dQ kernels, deterministic (no atomics: two runs
    give bit-identical gradients). fp32 inputs run IEEE fp32 dots (``input_precision="ieee"``, no TF32); fp16 /
    bf16 run tensor-core dots with fp32 accumulation. bf16 is not run under the Triton interpreter. ``torch`` is
    PyTorch's fused attention: on CPU the flash CPU kernel on views (one call per sequence, or one per uniform
    batch), on CUDA the memory-efficient SDPA kernel over a padded batch with a key-padding bias. ``auto`` takes
    ``torch`` on CPU and ``triton`` first on CUDA (measured on an H100: see the GPU_ORDER note below). For a uniform
    batch, ``attention`` is faster on CUDA (PyTorch's flash / cuDNN kernels); ``MaskedViT`` uses it for those.
    """
    _check_qkv(OP, q, k, v, "(total_tokens, nheads, headdim)")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32:
        fail(OP, "cu_seqlens", f"must be an int32 tensor, got {getattr(cu_seqlens, 'dtype', type(cu_seqlens))}",
             TypeError)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        fail(OP, "cu_seqlens", f"must be 1-D with B + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        fail(OP, "cu_seqlens", f"is on {cu_seqlens.device} but q is on {q.device}")
    if not isinstance(max_seqlen, (int, torch.SymInt)) or isinstance(max_seqlen, bool) or max_seqlen < 1:
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
    """Uniform convenience: ``(B, N, nheads, headdim)`` in and out (any strides, e.g. the unbind of a fused
    ``(B, N, 3, H, Dh)`` projection), same dtypes and head dims as ``varlen_attention``.

    Backends: ``triton`` runs the varlen kernels on the packed view; ``torch`` is
    ``F.scaled_dot_product_attention`` on the ``(B, H, N, Dh)`` view (PyTorch picks flash / cuDNN / efficient).
    ``auto`` takes ``torch`` on CUDA: on an H100 it matched Triton on long sequences and was 2-4x faster on the
    short ones of masked training (numbers beside ``GPU_ORDER[ATTN_OP]`` below)."""
    _check_qkv(ATTN_OP, q, k, v, "(B, N, nheads, headdim)")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _ATTN_IMPLS[_attention_backend(q.device.type, q.dtype, int(q.shape[-1]))](q, k, v, scale)


@torch.compiler.assume_constant_result
def _attention_backend(device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    """The backend name for ``attention``. A constant to torch.compile: it is resolved (forced backend included)
    when the graph is traced, since older Dynamo cannot trace the ContextVar behind ``backend()``. The Triton
    path's grid limit is checked by ``varlen_attention`` itself."""
    return select(ATTN_OP, torch.device(device_type), dtype, head_dim=head_dim)[0]


def _attention_varlen(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    B, N, H, D = q.shape
    cu = torch.arange(B + 1, device=q.device, dtype=torch.int32) * N
    out = varlen_attention(q.reshape(B * N, H, D), k.reshape(B * N, H, D), v.reshape(B * N, H, D), cu, N, scale)
    return out.view(B, N, H, D)


def _attention_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------- triton backend
def _triton_reasons(head_dim: int | None = None, batch_heads: int | None = None, **_) -> list[str]:
    reasons = []
    if head_dim is not None and (head_dim % 8 or not 8 <= head_dim <= 128):
        reasons.append(f"head dim {head_dim} is not a multiple of 8 in [8, 128]")
    if batch_heads is not None and batch_heads > 65535:
        reasons.append(f"batch * nheads = {batch_heads} exceeds the 65535 programs of the kernel grid's second axis")
    return reasons


@register(OP, "triton", _triton_reasons)
def _triton_forward(*args):
    from . import varlen_attention_triton

    return varlen_attention_triton.varlen_attention_fwd(*args)


@register(OP_BWD, "triton", _triton_reasons)
def _triton_backward(*args):
    from . import varlen_attention_triton

    return varlen_attention_triton.varlen_attention_bwd(*args)


# `auto` on CUDA tensors, varlen (H100, bf16, Dh 64, B 16, visible ratios 10-50% of 4096; results in
# benchmarks/results/2026-11-28-nvidia-h100-80gb-hbm3.md): Triton fwd 0.21 ms vs torch.nn.attention.varlen 0.28,
# FlexAttention 0.68, padded SDPA 1.70; fwd+bwd Triton 1.59 ms vs varlen_attn 1.15, FlexAttention 1.89, padded SDPA
# 4.0. The torch backend here is the padded memory-efficient kernel (3.4 ms fwd+bwd), so Triton stays first; a
# varlen_attn-based torch backend is the open improvement for training.
GPU_ORDER[OP] = ("triton", "torch")
GPU_ORDER[OP_BWD] = ("triton", "torch")
register(ATTN_OP, "triton", _triton_reasons)(_attention_varlen)
register(ATTN_OP, "torch")(_attention_sdpa)
_ATTN_IMPLS = {"triton": _attention_varlen, "torch": _attention_sdpa}
# Uniform batches (every sequence the same length: the paper's masks, fine-tuning, sampling), same results file,
# fwd+bwd: SDPA (cuDNN / flash) 0.70 ms vs Triton 1.50 ms at B 64 x N 417 x H 12, 0.73 vs 1.58 ms at B 256 x N 105
# x H 8, and within 7% at N 1025-4097 (Triton ahead by 3% on the N 4097 forward only). So torch first.
GPU_ORDER[ATTN_OP] = ("torch", "triton")


# ------------------------------------------------------------------------------------------------ torch backend
# Packed (T, H, D) <-> batched (B, H, L, D). Uniform batches (T == B * max_seqlen, which with sum(lengths) == T and
# every length <= max_seqlen means every length == max_seqlen: no sync needed to know it) are a free view; varlen
# batches are zero-padded by index arithmetic (no sync) and attend under an additive key-padding bias.
class _Batched:
    def __init__(self, cu_seqlens: Tensor, total: int, heads: int, max_seqlen: int, dtype: torch.dtype):
        self.T, self.H, self.L, self.B = total, heads, max_seqlen, cu_seqlens.shape[0] - 1
        self.uniform = total == self.B * max_seqlen
        self.bias = None
        if not self.uniform:
            dev = cu_seqlens.device
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            self.seg = torch.repeat_interleave(torch.arange(self.B, device=dev), lengths, output_size=total)
            self.pos = torch.arange(total, device=dev) - cu_seqlens.long()[self.seg]
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
        out = x.new_zeros((self.B, self.L, self.H, x.shape[-1]))
        return out.index_put((self.seg, self.pos), x).transpose(1, 2)

    def unpad(self, x: Tensor) -> Tensor:
        """``(B, H, L, D) -> (T, H, D)`` contiguous."""
        if self.uniform:
            return x.transpose(1, 2).reshape(self.T, self.H, x.shape[-1]).contiguous()
        return x.transpose(1, 2)[self.seg, self.pos].contiguous()

    def pad_lse(self, lse: Tensor) -> Tensor:
        """``(H, T) -> (B, H, L)``."""
        if self.uniform:
            return lse.view(self.H, self.B, self.L).transpose(0, 1)
        out = lse.new_zeros((self.B, self.L, self.H))
        return out.index_put((self.seg, self.pos), lse.t()).transpose(1, 2)

    def unpad_lse(self, lse: Tensor) -> Tensor:
        """``(B, H, L) -> (H, T)`` contiguous float32."""
        if self.uniform:
            return lse.transpose(0, 1).reshape(self.H, self.T).float().contiguous()
        return lse.permute(1, 0, 2)[:, self.seg, self.pos].float().contiguous()


def _cpu_fused() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _math(qp, kp, vp, bias, scale):
    """Explicit scores in fp32 (fp64 for fp64): ``(out, lse)`` over ``(B, H, L, D)``."""
    cdt = torch.float64 if qp.dtype == torch.float64 else torch.float32
    s = torch.matmul(qp.to(cdt), kp.to(cdt).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(cdt)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), vp.to(cdt)).to(qp.dtype), lse


def _cpu_calls(cu_seqlens: Tensor, total: int, max_seqlen: int):
    """The CPU kernel's calls, as ``(token slice, batch, length)``: one over the whole uniform batch, else one per
    non-empty sequence. Every operand is then a free ``(batch, H, length, D)`` view: nothing is padded."""
    batch = cu_seqlens.shape[0] - 1
    if total == batch * max_seqlen:
        return [(slice(0, total), batch, max_seqlen)]
    bounds = cu_seqlens.tolist()  # CPU tensor: no device sync
    return [(slice(s, e), 1, e - s) for s, e in itertools.pairwise(bounds) if e > s]


def _unit_last_stride(*xs: Tensor) -> list[Tensor]:
    # torch 2.13's CPU flash kernel reads a head dim with stride != 1 wrongly (2.14 does not): copy those only.
    return [x if x.stride(-1) == 1 else x.contiguous() for x in xs]


def _cpu_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    q, k, v = _unit_last_stride(q, k, v)
    T, H, D = q.shape
    out = torch.empty((T, H, D), dtype=q.dtype)
    lse = torch.empty((H, T), dtype=torch.float32)
    for sl, b, n in _cpu_calls(cu_seqlens, T, max_seqlen):
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *(x[sl].view(b, n, H, D).transpose(1, 2) for x in (q, k, v)), scale=softmax_scale)
        out[sl].view(b, n, H, D).copy_(o.transpose(1, 2))
        lse[:, sl].view(H, b, n).copy_(l.transpose(0, 1))
    return out, lse


def _cpu_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale):
    dout, q, k, v, out = _unit_last_stride(dout, q, k, v, out)
    T, H, D = q.shape
    grads = tuple(torch.empty((T, H, D), dtype=q.dtype) for _ in range(3))
    for sl, b, n in _cpu_calls(cu_seqlens, T, max_seqlen):
        ops = [x[sl].view(b, n, H, D).transpose(1, 2) for x in (dout, q, k, v, out)]
        l = lse[:, sl].view(H, b, n).transpose(0, 1).contiguous()
        for g, gs in zip(grads, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                *ops, l, 0.0, False, scale=softmax_scale)):
            g[sl].view(b, n, H, D).copy_(gs.transpose(1, 2))
    return grads


def _torch_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    """PyTorch's fused attention. CPU: the flash CPU kernel over views (one call for a uniform batch, one per
    sequence otherwise; 4x the explicit-score math at 64 x 257 tokens x 4 heads x Dh 64 fp32 on this project's
    2-core CI box). CUDA: the memory-efficient SDPA kernel (takes a key-padding bias, returns lse). Else math."""
    T, H, _ = q.shape
    if T == 0:
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((H, 0), dtype=torch.float32)
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
    return bt.unpad(out), bt.unpad_lse(lse)


def _torch_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale):
    """CPU: the flash CPU backward kernel on the saved out and lse. Elsewhere (CUDA, float64): recompute the forward
    (SDPA on CUDA: one extra forward; explicit math for float64) and take its vector-Jacobian product."""
    T, H, _ = q.shape
    if T == 0:
        return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
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


register(OP, "torch")(_torch_forward)
register(OP_BWD, "torch")(_torch_backward)
