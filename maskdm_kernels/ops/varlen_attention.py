"""varlen_attention: packed, padding-free, non-causal self-attention over each sequence.

Backends: ``triton`` (varlen_attention_triton.py: flash-style forward, deterministic backward), ``torch``
(varlen_attention_torch.py: PyTorch's fused attention over views or a padded batch) and ``flash``
(varlen_attention_flash.py: PyTorch's FlashAttention-2 varlen kernels, CUDA only, backward not deterministic).
The op ``maskdm::varlen_attention`` returns ``(out (T, H, Dh), lse (H, T) float32)`` on every backend, ``lse``
being the natural-log log-sum-exp of each query row's scaled scores; ``maskdm::varlen_attention_backward`` takes
both back and returns ``dq, dk, dv``. Every backend saves the same pair, so the backward may run on another backend
than the forward (``auto`` uses that: see ``choose``). Eager calls bypass the custom-op layer for host time
(``_run``): the same backends, bit-identical results; compile, export and fake tensors see the custom op.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_mode

from .. import dispatch
from ..dispatch import register
from . import varlen_attention_flash, varlen_attention_torch  # noqa: F401  (register the flash and torch backends)
from ._common import fail

OP = "varlen_attention"
OP_BWD = "varlen_attention_backward"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_HEAD_DIMS = frozenset(range(8, 129, 8))


# ------------------------------------------------------------------------------------------- backend choice
# `auto` on CUDA tensors, per (op, shape class). Evidence: benchmarks/results/2026-11-28-nvidia-h100-80gb-hbm3.md
# (H100, bf16, Dh 64, device time), `torch-varlen` (FlashAttention-2, or cuDNN where its version allows; the flash
# backend calls FlashAttention-2 itself, `maskdm-flash` in the benchmark), against the Triton kernels of
# that date: uniform N <= 417 (maskdm-b-90, uvit-s-90) fwd 0.21 / 0.08 ms vs Triton 0.44 / 0.29, fwd+bwd 1.02 /
# 1.12 vs 1.50 / 1.64; uniform N >= 1025 Triton ahead (fwd+bwd 4.15 vs 5.59 at N 4097, 2.32 vs 3.22 at N 2049);
# varlen 10-50% of 4096: fwd Triton 0.21 vs 0.28, fwd+bwd 1.59 vs 1.15 (so flash's backward is the faster half).
# The flash backward is not deterministic: `auto` skips it while torch.are_deterministic_algorithms_enabled().
# The Triton kernels have changed since (5-product backward, one-loop forward, longest-first grid): unmeasured;
# the GPU suite re-decides these rows.
SHORT_UNIFORM = 512
# The Triton schedule sorts a varlen batch's sequences in one program: at 32768 its sort needs more shared memory
# than an sm_90 block has (131 KB at 16384, 42 KB of spills; ptxas, triton 3.6). Larger batches: the
# `varlen-many` class, which the Triton backend declines.
TRITON_MAX_VARLEN_BATCH = 16384
# The order those numbers call for. The flash backend's own code (argument plumbing, lse layout shared with the
# Triton forward) has not yet run on a GPU, and DESIGN lets no unverified kernel lead `auto`: until the GPU tests
# of the flash backend pass, AUTO_ORDER below keeps Triton first and flash second in every class.
MEASURED_ORDER = {
    (OP, "uniform-short"): ("flash", "triton", "torch"),
    (OP, "uniform-long"): ("triton", "flash", "torch"),
    (OP, "varlen"): ("triton", "flash", "torch"),
    (OP_BWD, "uniform-short"): ("flash", "triton", "torch"),
    (OP_BWD, "uniform-long"): ("triton", "flash", "torch"),
    (OP_BWD, "varlen"): ("flash", "triton", "torch"),
    (OP, "varlen-many"): ("flash", "torch"),
    (OP_BWD, "varlen-many"): ("flash", "torch"),
}
FLASH_VERIFIED_ON_GPU = False
AUTO_ORDER = MEASURED_ORDER if FLASH_VERIFIED_ON_GPU else {
    k: ("triton", "flash", "torch") if "triton" in order else ("torch", "flash") for k, order in MEASURED_ORDER.items()}
dispatch.GPU_ORDER[OP] = AUTO_ORDER[(OP, "varlen")]  # what `info` lists; `choose` refines it per shape class
dispatch.GPU_ORDER[OP_BWD] = AUTO_ORDER[(OP_BWD, "varlen")]


def shape_class(total: int, batch: int, max_seqlen: int) -> str:
    if total == batch * max_seqlen:  # with valid cu_seqlens every length is then max_seqlen: no sync needed
        return "uniform-short" if max_seqlen <= SHORT_UNIFORM else "uniform-long"
    return "varlen-many" if batch > TRITON_MAX_VARLEN_BATCH else "varlen"


_CHOICE: dict[tuple, tuple[str, object]] = {}


def choose(op: str, device: torch.device, dtype: torch.dtype, head_dim: int, cls: str) -> tuple[str, object]:
    """(backend name, impl) for this call, cached per (op, device, dtype, head dim, shape class, requested backend,
    determinism flag): a dict lookup after the first call of each class. A requested backend that cannot run raises
    with its reasons (``dispatch.select``'s rule)."""
    forced = dispatch.current_backend()
    deterministic = torch.are_deterministic_algorithms_enabled()
    key = (op, device, dtype, head_dim, cls, forced, deterministic)
    hit = _CHOICE.get(key)
    if hit is not None:
        return hit
    caps = {"head_dim": head_dim, "backward": op == OP_BWD, "many_sequences": cls == "varlen-many"}
    if forced != "auto" or device.type != "cuda":
        hit = dispatch.select(op, device, dtype, **caps)
    else:
        tried = []
        for name in AUTO_ORDER[(op, cls)]:
            reasons = dispatch.not_supported_reasons(op, name, device, dtype, **caps)
            if name == "flash" and op == OP_BWD and deterministic:
                reasons.append("torch.are_deterministic_algorithms_enabled(): the flash backward is not deterministic")
            if not reasons:
                hit = (name, dispatch._REGISTRY[op][name][0])
                break
            tried.append(f"{name}: " + "; ".join(reasons))
        else:
            raise RuntimeError(f"maskdm_kernels: no backend can run {op} on {device} {dtype}: " + " | ".join(tried))
    _CHOICE[key] = hit
    return hit


# ---------------------------------------------------------------------------------------------- custom ops
def _impl(op: str, q: Tensor, cu_seqlens: Tensor, max_seqlen: int):
    cls = shape_class(q.shape[0], cu_seqlens.shape[0] - 1, max_seqlen)
    return choose(op, q.device, q.dtype, q.shape[-1], cls)[1]


@torch.library.custom_op("maskdm::varlen_attention", mutates_args=())
def _varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                      softmax_scale: float) -> tuple[Tensor, Tensor]:
    return _impl(OP, q, cu_seqlens, max_seqlen)(q, k, v, cu_seqlens, max_seqlen, softmax_scale)


@_varlen_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    T, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((H, T), dtype=torch.float32)


@torch.library.custom_op("maskdm::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                               cu_seqlens: Tensor, max_seqlen: int,
                               softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    fn = _impl(OP_BWD, q, cu_seqlens, max_seqlen)
    return fn(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale)


@_varlen_attention_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


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


class _Eager(torch.autograd.Function):
    """The eager path: the same backends and the same saved (out, lse) as the custom op, without the dispatcher and
    custom-op wrappers around them (they cost the host more than the kernels at the paper's 90% shapes). The custom
    op stays what torch.compile, export, opcheck, fake tensors and functorch see."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, softmax_scale):
        out, lse = _impl(OP, q, cu_seqlens, max_seqlen)(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
        ctx.max_seqlen, ctx.softmax_scale = max_seqlen, softmax_scale
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        fn = _impl(OP_BWD, q, cu_seqlens, ctx.max_seqlen)
        dq, dk, dv = fn(dout.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.softmax_scale)
        return dq, dk, dv, None, None, None


def _eager_ok(q: Tensor) -> bool:
    """Plain tensors, no compile / export trace, no dispatch mode (fake tensors, functionalization) and no functorch
    transform: then the backends can be called directly."""
    return (type(q) is Tensor and not torch.compiler.is_compiling() and _current_mode() is None
            and not torch._C._are_functorch_transforms_active())


def cpu_fast_path(q) -> bool:
    """True when an eager CPU call may first try ``varlen_attention_torch.EAGER_CPU`` (the torch backend's kernels
    in one C++ call): an eager call (``_eager_ok``, first: under a Dynamo trace it short-circuits before the
    ContextVar behind ``current_backend``) with the torch backend requested or ``auto`` (which takes it on CPU)."""
    return (_eager_ok(q) and varlen_attention_torch.EAGER_CPU is not None and q.is_cpu
            and dispatch.current_backend() in _CPU_FAST_BACKENDS)


_CPU_FAST_BACKENDS = ("auto", "torch")


def _run(q, k, v, cu_seqlens, max_seqlen, scale) -> Tensor:
    if _eager_ok(q) and q.shape[0] > 0:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _Eager.apply(q, k, v, cu_seqlens, max_seqlen, scale)
        return _impl(OP, q, cu_seqlens, max_seqlen)(q, k, v, cu_seqlens, max_seqlen, scale)[0]
    return _varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)[0]


# -------------------------------------------------------------------------------------------------- checks
def _same_shape(a: torch.Size, b: torch.Size) -> bool:
    """Eager: a plain tuple compare (torch.Size's own goes through sym_eq, slow). Traced: ``==``, since torch
    2.11's Dynamo cannot trace ``tuple.__eq__`` on sizes (2.13 can; ``is_compiling()`` is a constant there)."""
    if torch.compiler.is_compiling():
        return a == b
    return tuple.__eq__(a, b)


def check_qkv(op: str, q, k, v, ndim: int, layout: str) -> None:
    """Shapes, dtypes and devices only: O(1) Python, no tensor ops, no sync. One combined test for the usual case;
    the per-argument messages only when it fails."""
    if (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor) and q.dtype in _FLOATS
            and k.dtype == q.dtype and v.dtype == q.dtype and q.dim() == ndim
            and _same_shape(k.shape, q.shape) and _same_shape(v.shape, q.shape)
            and k.device == q.device and v.device == q.device and q.shape[-1] in _HEAD_DIMS):
        return
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            fail(op, name, f"must be a tensor, got {type(t).__name__}", TypeError)
        if t.dtype not in _FLOATS:
            fail(op, name, f"must be float32, float16 or bfloat16, got {t.dtype}", TypeError)
    if q.dim() != ndim:
        fail(op, "q", f"must be {layout}, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if not _same_shape(t.shape, q.shape):
            fail(op, name, f"must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            fail(op, name, f"must have q's dtype {q.dtype}, got {t.dtype}", TypeError)
        if t.device != q.device:
            fail(op, name, f"must be on q's device {q.device}, got {t.device}")
    D = q.shape[-1]
    if D % 8 or D > 128 or D < 8:
        fail(op, "q", f"head dim must be a multiple of 8 in [8, 128], got {D}")


def _check_layout(q: Tensor, cu_seqlens, max_seqlen) -> None:
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32:
        fail(OP, "cu_seqlens", f"must be an int32 tensor, got {getattr(cu_seqlens, 'dtype', type(cu_seqlens))}",
             TypeError)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        fail(OP, "cu_seqlens", f"must be 1-D with B + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        fail(OP, "cu_seqlens", f"is on {cu_seqlens.device} but q is on {q.device}")
    if not isinstance(max_seqlen, (int, torch.SymInt)) or isinstance(max_seqlen, bool) or max_seqlen < 1:
        fail(OP, "max_seqlen", f"must be a positive int, got {max_seqlen!r}", TypeError)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                     softmax_scale: float | None = None, validate: bool = False) -> Tensor:
    """Packed self-attention: each sequence attends only within itself, non-causal (flash-attn's varlen layout).

    Args:
        q, k, v: ``(total_tokens, nheads, headdim)``, float32 / float16 / bfloat16 (float64: torch backend only).
            Any strides: views such as ``qkv.view(T, 3, H, Dh).unbind(1)`` are read in place, never copied.
            headdim: any multiple of 8 up to 128 (non-powers of two are masked inside the kernel, not padded).
        cu_seqlens: int32 ``(B + 1,)`` on q's device, ``cu_seqlens[0] == 0``, non-decreasing,
            ``cu_seqlens[-1] == total_tokens``; zero-length sequences are allowed.
        max_seqlen: python int >= the longest sequence (known on the host, so no sync).
        softmax_scale: default ``1 / sqrt(headdim)``.
        validate: check ``cu_seqlens`` against the tensors (starts at 0, monotone, last == T, max_seqlen big
            enough) at the cost of one device sync, raising an error that names the argument. Off by default:
            then bad values never read or write out of bounds; the rows they affect come out NaN (on CUDA, with no
            sync), and CPU tensors (whose values are on the host) raise the named error anyway.
    Returns:
        ``(total_tokens, nheads, headdim)`` contiguous, in q's dtype; differentiable in q, k, v. A NaN in a query
        row gives a NaN output row; a NaN in a key or value gives NaN rows over its sequence.

    Backends (``maskdm_kernels.backend``): ``triton`` is a flash-attention forward (online base-2 softmax, fp32
    accumulation, lse saved) and a deterministic backward (no atomics: two runs give bit-identical gradients).
    fp32 inputs run IEEE fp32 dots (no TF32); fp16 / bf16 run tensor-core dots with fp32 accumulation. ``torch``
    is PyTorch's fused attention (CPU: the flash CPU kernel on views; CUDA: the memory-efficient kernel over a
    padded batch). ``flash`` is PyTorch's varlen FlashAttention (CUDA, fp16 / bf16; its backward is not
    deterministic). ``auto`` takes ``torch`` on CPU; on CUDA see ``AUTO_ORDER`` and ``python -m
    maskdm_kernels.info``.
    """
    if cpu_fast_path(q):
        out = varlen_attention_torch.EAGER_CPU(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
        if out is not None:
            return out
    check_qkv(OP, q, k, v, 3, "(total_tokens, nheads, headdim)")
    _check_layout(q, cu_seqlens, max_seqlen)
    if validate and not torch.compiler.is_compiling():
        validate_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _run(q, k, v, cu_seqlens, max_seqlen, scale)


def validate_cu_seqlens(cu_seqlens: Tensor, total: int, max_seqlen: int) -> None:
    """Named errors for bad ``cu_seqlens`` / ``max_seqlen`` values; one device sync for CUDA tensors."""
    varlen_attention_torch.check_cu_seqlens_host(cu_seqlens.tolist(), total, max_seqlen)


# ----------------------------------------------------------------------------------------------- triton backend
def _triton_reasons(head_dim: int | None = None, many_sequences: bool = False, **_) -> list[str]:
    reasons = []
    if head_dim is not None and (head_dim % 8 or not 8 <= head_dim <= 128):
        reasons.append(f"head dim {head_dim} is not a multiple of 8 in [8, 128]")
    if many_sequences:
        reasons.append(f"a varlen batch of more than {TRITON_MAX_VARLEN_BATCH} sequences (its one-program schedule "
                       "would outgrow a block's shared memory)")
    return reasons


@register(OP, "triton", _triton_reasons)
def _triton_forward(*args):
    from . import varlen_attention_triton

    return varlen_attention_triton.varlen_attention_fwd(*args)


@register(OP_BWD, "triton", _triton_reasons)
def _triton_backward(*args):
    from . import varlen_attention_triton

    return varlen_attention_triton.varlen_attention_bwd(*args)
