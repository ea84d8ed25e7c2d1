"""masked_noise_loss: the epsilon-prediction L2 loss over the visible patches, reduced in one pass.

NOTE: the gradient w.r.t. ``pred`` is recomputed in the backward from (pred, noise) rather than written by
the forward as Liger-Kernel's fused losses do. Both move the same bytes over forward + backward (5 * T * P:
read pred + noise, write grad; then read + write it again to apply grad_output, which cannot be skipped
without a host sync on grad_output == 1), but recomputing keeps no (T, P) buffer alive between the passes
and makes a forward alone (evaluation) cost 2 * T * P instead of 3 * T * P. Chosen by that byte count: no
write-in-forward variant exists here, so the two were not timed against each other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..dispatch import register, select
from ..layout import Visible
from ._common import (
    FLOAT_DTYPES,
    check_float,
    check_images,
    check_num_patches,
    check_patch_size,
    check_per_sample,
    check_visible,
    direct,
    fail,
    register_compiled,
)

OP = "masked_noise_loss"
OP_BWD = "masked_noise_loss_backward"


@torch.library.custom_op("maskdm::masked_noise_loss", mutates_args=())
def _masked_noise_loss(pred: Tensor, noise: Tensor, ids: Tensor, cu_seqlens: Tensor, patch_size: int,
                       weight: Tensor | None) -> Tensor:
    _, fn = select(OP, pred.device, pred.dtype)
    return fn(pred, noise, ids, cu_seqlens, patch_size, weight)


@_masked_noise_loss.register_fake
def _(pred, noise, ids, cu_seqlens, patch_size, weight):
    return pred.new_empty((), dtype=torch.float64 if pred.dtype == torch.float64 else torch.float32)


@torch.library.custom_op("maskdm::masked_noise_loss_backward", mutates_args=())
def _masked_noise_loss_backward(grad: Tensor, pred: Tensor, noise: Tensor, ids: Tensor, cu_seqlens: Tensor,
                                patch_size: int, weight: Tensor | None) -> Tensor:
    _, fn = select(OP_BWD, pred.device, pred.dtype)
    return fn(grad, pred, noise, ids, cu_seqlens, patch_size, weight)


@_masked_noise_loss_backward.register_fake
def _(grad, pred, noise, ids, cu_seqlens, patch_size, weight):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    pred, noise, ids, cu_seqlens, patch_size, weight = inputs
    ctx.patch_size = patch_size
    ctx.save_for_backward(pred, noise, ids, cu_seqlens, weight)


def _backward(ctx, grad):
    pred, noise, ids, cu_seqlens, weight = ctx.saved_tensors
    gp = None
    if ctx.needs_input_grad[0]:
        gp = _masked_noise_loss_backward(grad, pred, noise, ids, cu_seqlens, ctx.patch_size, weight)
    return gp, None, None, None, None, None


_masked_noise_loss.register_autograd(_backward, setup_context=_setup_context)


class _Loss(torch.autograd.Function):
    """The eager path (``direct``): the custom op's forward and backward, the kernels called directly."""

    @staticmethod
    def forward(ctx, fn, pred, noise, ids, cu_seqlens, patch_size, weight):
        ctx.patch_size = patch_size
        ctx.save_for_backward(pred, noise, ids, cu_seqlens, weight)
        return fn(pred, noise, ids, cu_seqlens, patch_size, weight)

    @staticmethod
    def backward(ctx, grad):
        pred, noise, ids, cu_seqlens, weight = ctx.saved_tensors
        fn = select(OP_BWD, pred.device, pred.dtype)[1]
        return None, fn(grad, pred, noise, ids, cu_seqlens, ctx.patch_size, weight), None, None, None, None, None


def loss_tokens(pred: Tensor, noise: Tensor, ids: Tensor, cu_seqlens: Tensor, patch_size: int,
                weight: Tensor | None = None) -> Tensor:
    """``masked_noise_loss`` on the raw layout, unchecked: the custom op, or its kernels directly in eager mode."""
    if not direct(pred):
        return _masked_noise_loss(pred, noise, ids, cu_seqlens, patch_size, weight)
    fn = select(OP, pred.device, pred.dtype)[1]
    if pred.requires_grad and torch.is_grad_enabled():
        return _Loss.apply(fn, pred, noise, ids, cu_seqlens, patch_size, weight)
    return fn(pred, noise, ids, cu_seqlens, patch_size, weight)


def masked_noise_loss(pred: Tensor, noise: Tensor, vis: Visible, patch_size: int,
                      weight: Tensor | None = None, validate: bool = False) -> Tensor:
    """Mean over samples of ``weight[b] *`` mean over b's visible elements of ``(pred - target)^2``.

    Args:
        pred: ``(T, p*p*C)`` predicted noise of the visible tokens (any float dtype, any strides).
        noise: ``(B, C, H, W)`` the noise that was added; the target is read from it at the visible patches
            and never gathered into a tensor.
        vis: the kept patches.
        weight: optional ``(B,)`` per-sample loss weights (e.g. min-SNR); not differentiated.
        validate: check ``vis``'s values first (one device sync; a ValueError names the field). Off: a patch
            id outside ``[0, N)`` or a malformed ``cu_seqlens`` gives a NaN loss (and NaN gradient rows); the C++
            CPU kernels raise instead (their values are on the host).
    Returns:
        0-dim float32 loss, differentiable in ``pred``. A sample with no visible token contributes 0.
    """
    if not _usual(pred, noise, vis, patch_size, weight):
        _check(pred, noise, vis, patch_size, weight)
    if validate:
        vis.validate()
    return loss_tokens(pred, noise, vis.ids, vis.cu_seqlens, patch_size, weight)


def _usual(pred, noise, vis, p, weight) -> bool:
    """Every check of ``_check`` in one expression, for a well-formed call (see gather_patches._usual)."""
    if not (isinstance(pred, Tensor) and isinstance(noise, Tensor) and type(vis) is Visible and type(p) is int
            and p > 0 and pred.dtype in FLOAT_DTYPES and noise.dtype in FLOAT_DTYPES and noise.dim() == 4):
        return False
    B, C, H, W = noise.shape
    dev = noise.device
    return (C > 0 and not (H % p or W % p) and vis.num_patches == (H // p) * (W // p)
            and vis.cu_seqlens.shape[0] == B + 1 and vis.ids.device == dev and pred.device == dev
            and pred.shape == (vis.ids.shape[0], p * p * C)
            and (weight is None or (isinstance(weight, Tensor) and weight.dtype in FLOAT_DTYPES and weight.dim() == 1
                                    and weight.shape[0] == B and weight.device == dev)))


def _check(pred, noise, vis, patch_size, weight) -> None:
    check_float(OP, "pred", pred, 2)
    check_images(OP, "noise", noise)
    B, C, H, W = noise.shape
    check_patch_size(OP, patch_size, H, W)
    check_visible(OP, vis, noise.device, B)
    check_num_patches(OP, vis, patch_size, H, W)
    if pred.device != noise.device:
        fail(OP, "pred", f"is on {pred.device} but noise is on {noise.device}")
    if pred.shape != (vis.total, patch_size * patch_size * C):
        fail(OP, "pred", f"must have shape (T, p*p*C) = ({vis.total}, {patch_size * patch_size * C}), "
             f"got {tuple(pred.shape)}")
    check_per_sample(OP, "weight", weight, B, noise.device)


register(OP, "torch")(reference.masked_noise_loss_ref)
register(OP_BWD, "torch")(reference.masked_noise_loss_grad_ref)
register_compiled(OP, "masked_noise_loss_kernel")
register_compiled(OP_BWD, "masked_noise_loss_backward_kernel")


@register(OP, "triton")
def _loss_triton(*args):
    from . import patches_triton

    return patches_triton.masked_noise_loss(*args)


@register(OP_BWD, "triton")
def _loss_backward_triton(*args):
    from . import patches_triton

    return patches_triton.masked_noise_loss_backward(*args)
