"""The ``flash`` backend of varlen_attention: PyTorch's own varlen FlashAttention-2 kernels.

Calls aten ``_flash_attention_forward`` / ``_flash_attention_backward`` (what ``torch.nn.attention.varlen`` calls
off Hopper), whose varlen ``lse`` is ``(H, T)`` float32 in the natural log (torch's meta registration says so), as
the other backends save: so the forward and backward may run on different backends. Not the ops behind
``varlen_attn`` themselves: on Hopper with cuDNN >= 9.18 those switch to cuDNN, whose statistics layout is not
documented. Falls back to those ops on a torch without the aten ones. CUDA, fp16 and bf16, sm80+ only; the backward
accumulates dQ with atomics, so it is not deterministic. Bad ``cu_seqlens`` / ``max_seqlen`` values are made safe on
the device (``_guard``: ~8 small ops per call, no sync).
"""

from __future__ import annotations

import functools

import torch

from ..dispatch import register
from ..layout import sample_index

OP = "varlen_attention"
OP_BWD = "varlen_attention_backward"


def _varlen_ops():
    """``(forward, backward)`` of torch.nn.attention.varlen, or None on a torch without them."""
    try:
        import torch.nn.attention.varlen

        return torch.ops.torch_attn._varlen_attn, torch.ops.torch_attn._varlen_attn_backward
    except (ImportError, AttributeError, RuntimeError):
        return None


def _has_aten_flash() -> bool:
    return hasattr(torch.ops.aten, "_flash_attention_forward") and hasattr(torch.ops.aten, "_flash_attention_backward")


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def flash_reasons(device: torch.device | None = None, dtype: torch.dtype | None = None, head_dim: int | None = None,
                  **_) -> list[str]:
    reasons = []
    if not _has_aten_flash() and _varlen_ops() is None:
        reasons.append(f"torch {torch.__version__} has neither torch.nn.attention.varlen nor aten flash ops")
    if not torch.backends.cuda.is_flash_attention_available():
        reasons.append("this torch build has no FlashAttention kernels")
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"FlashAttention runs float16 / bfloat16 only, got {dtype}")
    if head_dim is not None and (head_dim % 8 or head_dim > 256):
        reasons.append(f"head dim {head_dim} is not a multiple of 8 up to 256")
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
        if major < 8:
            reasons.append(f"FlashAttention-2 needs sm80 or newer, this GPU is sm{major}{minor}")
    return reasons


def _guard(cu_seqlens, total: int, max_seqlen: int):
    """(cu_seqlens the kernels can read safely, row_ok (T,) bool), with no sync. The kernels trust cu_seqlens (a
    value past T reads out of bounds) and leave the rows of a sequence longer than max_seqlen unwritten, so they get
    ``cummax(clamp(cu, 0, T))`` (monotone, within [0, T]) and every row of a bad layout is set to NaN after."""
    cu = cu_seqlens.clamp(0, total).cummax(0).values
    lengths = cu[1:] - cu[:-1]
    seg = sample_index(cu, total)
    layout_ok = (cu == cu_seqlens).all() & (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total)
    return cu, (lengths <= max_seqlen)[seg] & layout_ok


def _nan_rows(x, row_ok):
    return torch.where(row_ok[:, None, None], x, float("nan")).contiguous()


def _rng_state(q):
    return torch.zeros((2,), dtype=torch.uint64, device=q.device)  # dropout is 0: never read


def flash_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    """``out (T, H, Dh)``, ``lse (H, T)`` float32. The kernels need a unit head-dim stride (qkv views have it)."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cu, row_ok = _guard(cu_seqlens, q.shape[0], max_seqlen)
    if _has_aten_flash():
        out, lse = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0, False, False, scale=softmax_scale)[:2]
    else:
        out, lse, _ = _varlen_ops()[0](q, k, v, cu, cu, max_seqlen, max_seqlen, False, softmax_scale)
    return _nan_rows(out, row_ok), torch.where(row_ok[None, :], lse.float(), float("nan")).contiguous()


def flash_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale):
    dout, q, k, v, out = (x if x.stride(-1) == 1 else x.contiguous() for x in (dout, q, k, v, out))
    cu, row_ok = _guard(cu_seqlens, q.shape[0], max_seqlen)
    if _has_aten_flash():
        grads = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, cu, cu, max_seqlen, max_seqlen, 0.0, False, _rng_state(q),
            torch.empty(0, device=q.device), scale=softmax_scale)
    else:
        grads = _varlen_ops()[1](dout, q, k, v, out, lse, cu, cu, max_seqlen, max_seqlen, False, _rng_state(q),
                                 softmax_scale)
    return tuple(_nan_rows(g, row_ok) for g in grads)


register(OP, "flash", flash_reasons)(flash_forward)
register(OP_BWD, "flash", flash_reasons)(flash_backward)
