"""attention: uniform-length self-attention, ``(B, N, nheads, headdim)`` in and out.

Backends: ``torch`` is ``F.scaled_dot_product_attention`` on the ``(B, H, N, Dh)`` view (PyTorch picks flash /
cuDNN / efficient; eager CPU calls run it in C++, ``varlen_attention_torch.EAGER_CPU``); ``triton`` and ``flash``
run varlen_attention's kernels on the packed ``(B * N, H, Dh)`` view.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import dispatch
from ..dispatch import register
from . import varlen_attention_torch
from .varlen_attention import _triton_reasons, check_qkv, cpu_fast_path, varlen_attention
from .varlen_attention_flash import flash_reasons

OP = "attention"


def attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float | None = None) -> Tensor:
    """Uniform convenience: ``(B, N, nheads, headdim)`` in and out (any strides, e.g. the unbind of a fused
    ``(B, N, 3, H, Dh)`` projection), same dtypes and head dims as ``varlen_attention``; differentiable in q, k, v.

    ``auto`` takes ``torch`` (SDPA) on CUDA: on an H100 it matched Triton on long sequences and was 2-4x faster on
    the short ones of masked training (numbers beside ``GPU_ORDER[OP]`` below). A NaN in a query row gives a NaN
    output row, on every backend."""
    if cpu_fast_path(q):  # this chain in one C++ call and one autograd node (varlen_attention_torch.EAGER_CPU)
        out = varlen_attention_torch.EAGER_CPU(q, k, v, None, None, softmax_scale)
        if out is not None:
            return out
    check_qkv(OP, q, k, v, 4, "(B, N, nheads, headdim)")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _IMPLS[_backend(q.device.type, q.dtype, int(q.shape[-1]))](q, k, v, scale)


@torch.compiler.assume_constant_result
def _backend(device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    """The backend name. A constant to torch.compile: resolved (forced backend included) when the graph is traced,
    since older Dynamo cannot trace the ContextVar behind ``backend()``. Cached per (device type, dtype, head dim,
    requested backend): a dict lookup on the host path."""
    key = (device_type, dtype, head_dim, dispatch.current_backend())
    name = _CHOICE.get(key)
    if name is None:
        name = _CHOICE[key] = dispatch.select(OP, torch.device(device_type), dtype, head_dim=head_dim)[0]
    return name


_CHOICE: dict[tuple, str] = {}


def _packed(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The varlen kernels on the packed view (backend taken from the requested one)."""
    B, N, H, D = q.shape
    cu = torch.arange(B + 1, device=q.device, dtype=torch.int32) * N
    out = varlen_attention(q.reshape(B * N, H, D), k.reshape(B * N, H, D), v.reshape(B * N, H, D), cu, N, scale)
    return out.view(B, N, H, D)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    out = out.transpose(1, 2)
    if math.isnan(scale):  # every score is NaN; SDPA's fused kernels return 0
        return out * math.nan
    # The CPU flash kernel gives 0, not NaN, for a query row holding a NaN. Eager: values are on the host, so one
    # sum decides and the fix runs only on a NaN; traced: always.
    if q.device.type == "cpu" and (torch.compiler.is_compiling() or not math.isfinite(q.detach().sum().item())):
        out = torch.where(q.isnan().any(dim=-1, keepdim=True), math.nan, out)
    return out

register(OP, "triton", _triton_reasons)(_packed)
register(OP, "flash", flash_reasons)(_packed)
register(OP, "torch")(_sdpa)
_IMPLS = {"triton": _packed, "flash": _packed, "torch": _sdpa}
# Uniform batches (every sequence the same length: the paper's masks, fine-tuning, sampling), H100 results file
# (benchmarks/results/2026-11-28-nvidia-h100-80gb-hbm3.md), fwd+bwd: SDPA (cuDNN / flash) 0.70 ms vs Triton 1.50 ms
# at B 64 x N 417 x H 12, 0.73 vs 1.58 ms at B 256 x N 105 x H 8, and within 7% at N 1025-4097 (Triton ahead by 3%
# on the N 4097 forward only); torch.nn.attention.varlen (flash) 1.02 ms at N 417. So torch first.
dispatch.GPU_ORDER[OP] = ("torch", "triton", "flash")
