"""gather_patches: the visible patches of (optionally noised) images, as packed tokens, in one pass."""

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

OP = "gather_patches"


@torch.library.custom_op("maskdm::gather_patches", mutates_args=())
def _gather_patches(images: Tensor, ids: Tensor, cu_seqlens: Tensor, patch_size: int, noise: Tensor | None,
                    signal_scale: Tensor | None, noise_scale: Tensor | None) -> Tensor:
    _, fn = select(OP, images.device, images.dtype)
    return fn(images, ids, cu_seqlens, patch_size, noise, signal_scale, noise_scale)


@_gather_patches.register_fake
def _(images, ids, cu_seqlens, patch_size, noise, signal_scale, noise_scale):
    C = images.shape[1]
    return images.new_empty((ids.shape[0], patch_size * patch_size * C))


def _setup_context(ctx, inputs, output):
    images, ids, cu_seqlens, patch_size, noise, signal_scale, noise_scale = inputs
    _save_meta(ctx, images, patch_size, noise)
    ctx.save_for_backward(ids, cu_seqlens, signal_scale, noise_scale)


def _save_meta(ctx, images, patch_size, noise):
    ctx.patch_size = patch_size
    ctx.image_size = tuple(images.shape)
    ctx.dtypes = (images.dtype, noise.dtype if noise is not None else None)


def _backward(ctx, grad):
    return _grads(ctx, grad, ctx.saved_tensors, ctx.needs_input_grad[0], ctx.needs_input_grad[4])


def _grads(ctx, grad, saved, need_x: bool, need_n: bool):
    # d out / d images = scatter(grad) * signal_scale[b]; the same for noise with noise_scale. Scales get none.
    from .scatter_patches import scatter_tokens  # (scatter's backward is a gather: the two modules import each other)

    ids, cu_seqlens, signal_scale, noise_scale = saved
    B, C, H, W = ctx.image_size
    base = None
    if need_x or need_n:
        base = scatter_tokens(grad.contiguous(), ids, cu_seqlens, ctx.patch_size, B, C, H, W, 0.0)
    gx = gn = None
    if need_x:
        gx = base if signal_scale is None else base * signal_scale.to(base.dtype).view(B, 1, 1, 1)
        gx = gx.to(ctx.dtypes[0])
    if need_n:
        gn = base if noise_scale is None else base * noise_scale.to(base.dtype).view(B, 1, 1, 1)
        gn = gn.to(ctx.dtypes[1])
    return gx, None, None, None, gn, None, None


_gather_patches.register_autograd(_backward, setup_context=_setup_context)


class _Gather(torch.autograd.Function):
    """The eager path (``direct``): the custom op's forward and backward, the kernel called directly."""

    @staticmethod
    def forward(ctx, fn, images, ids, cu_seqlens, patch_size, noise, signal_scale, noise_scale):
        _save_meta(ctx, images, patch_size, noise)
        ctx.save_for_backward(ids, cu_seqlens, signal_scale, noise_scale)
        return fn(images, ids, cu_seqlens, patch_size, noise, signal_scale, noise_scale)

    @staticmethod
    def backward(ctx, grad):
        return (None, *_grads(ctx, grad, ctx.saved_tensors, ctx.needs_input_grad[1], ctx.needs_input_grad[5]))


def gather_tokens(images: Tensor, ids: Tensor, cu_seqlens: Tensor, patch_size: int, noise: Tensor | None = None,
                  signal_scale: Tensor | None = None, noise_scale: Tensor | None = None) -> Tensor:
    """``gather_patches`` on the raw layout, unchecked: the custom op, or its kernel directly in eager mode."""
    if not direct(images):
        return _gather_patches(images, ids, cu_seqlens, patch_size, noise, signal_scale, noise_scale)
    fn = select(OP, images.device, images.dtype)[1]
    if torch.is_grad_enabled() and (images.requires_grad or (noise is not None and noise.requires_grad)):
        return _Gather.apply(fn, images, ids, cu_seqlens, patch_size, noise, signal_scale, noise_scale)
    return fn(images, ids, cu_seqlens, patch_size, noise, signal_scale, noise_scale)


def gather_patches(images: Tensor, vis: Visible, patch_size: int, noise: Tensor | None = None,
                   signal_scale: Tensor | None = None, noise_scale: Tensor | None = None,
                   validate: bool = False) -> Tensor:
    """Visible patches of ``signal_scale[b] * images + noise_scale[b] * noise`` as packed tokens.

    Args:
        images: ``(B, C, H, W)`` float32 / float16 / bfloat16, any strides (channels_last and slices read in place).
        vis: the kept patches (``Visible`` over the ``(H // p) * (W // p)`` grid).
        patch_size: p, must divide H and W.
        noise: optional ``(B, C, H, W)``, same device; read only at the visible patches.
        signal_scale, noise_scale: optional ``(B,)`` per-sample scales (e.g. sqrt(abar_t), sqrt(1 - abar_t)).
        validate: check ``vis``'s values first (``Visible.validate``: one device sync) and raise a ValueError
            naming the bad field. Off: a patch id outside ``[0, N)`` gives a NaN row, a malformed ``cu_seqlens``
            NaN rows (see ``Visible``); the C++ CPU kernel raises instead (its values are on the host).
    Returns:
        ``(T, p*p*C)`` in ``images.dtype``, pixel order ``(p1 p2 c)``; fp32 math. The full noisy image is never
        materialised. Differentiable in ``images`` and ``noise`` (not in the scales).
    """
    _check(images, vis, patch_size, noise, signal_scale, noise_scale)  # compiled: runs at trace time only
    if validate:
        vis.validate()
    return gather_tokens(images, vis.ids, vis.cu_seqlens, patch_size, noise, signal_scale, noise_scale)


def _usual(images, vis, p, noise, signal_scale, noise_scale) -> bool:
    """Every check of ``_check`` in one expression, for a well-formed call; False sends the call to ``_check``,
    which names what is wrong. NOTE: 2-3x less host time than the step-by-step checks (~3 vs ~8 us for the loss's
    on this repo's loaded CI CPU), which is most of what the op's Python adds to its kernel's launch."""
    if not (isinstance(images, Tensor) and type(vis) is Visible and type(p) is int and p > 0
            and images.dtype in FLOAT_DTYPES and images.dim() == 4):
        return False
    B, C, H, W = images.shape
    dev = images.device
    if (C < 1 or H % p or W % p or vis.num_patches != (H // p) * (W // p) or vis.cu_seqlens.shape[0] != B + 1
            or vis.ids.device != dev):
        return False
    if noise is None:
        if noise_scale is not None:
            return False
    elif not (isinstance(noise, Tensor) and noise.dtype in FLOAT_DTYPES and noise.shape == images.shape
              and noise.device == dev):
        return False
    return all(s is None or (isinstance(s, Tensor) and s.dtype in FLOAT_DTYPES and s.dim() == 1 and s.shape[0] == B
                             and s.device == dev) for s in (signal_scale, noise_scale))


def _check(images, vis, patch_size, noise, signal_scale, noise_scale) -> None:
    if _usual(images, vis, patch_size, noise, signal_scale, noise_scale):
        return
    check_images(OP, "images", images)
    B, _C, H, W = images.shape
    check_patch_size(OP, patch_size, H, W)
    check_visible(OP, vis, images.device, B)
    check_num_patches(OP, vis, patch_size, H, W)
    if noise is not None:
        check_float(OP, "noise", noise, 4)
        if noise.shape != images.shape:
            fail(OP, "noise", f"must have the images' shape {tuple(images.shape)}, got {tuple(noise.shape)}")
        if noise.device != images.device:
            fail(OP, "noise", f"is on {noise.device} but images is on {images.device}")
    elif noise_scale is not None:
        fail(OP, "noise_scale", "was given without noise")
    check_per_sample(OP, "signal_scale", signal_scale, B, images.device)
    check_per_sample(OP, "noise_scale", noise_scale, B, images.device)


register(OP, "torch")(reference.gather_patches_ref)
register_compiled(OP, "gather_patches_kernel")


@register(OP, "triton")
def _gather_patches_triton(*args):
    from . import patches_triton

    return patches_triton.gather_patches(*args)
