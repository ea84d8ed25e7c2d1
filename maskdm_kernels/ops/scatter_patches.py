"""scatter_patches: packed tokens back to images, masked patches filled with a constant."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..dispatch import register, select
from ..layout import Visible
from ._common import (
    FLOAT_DTYPES,
    check_float,
    check_num_patches,
    check_patch_size,
    check_visible,
    direct,
    fail,
    register_compiled,
)

OP = "scatter_patches"


@torch.library.custom_op("maskdm::scatter_patches", mutates_args=())
def _scatter_patches(tokens: Tensor, ids: Tensor, cu_seqlens: Tensor, patch_size: int, batch: int, channels: int,
                     height: int, width: int, fill: float) -> Tensor:
    _, fn = select(OP, tokens.device, tokens.dtype)
    return fn(tokens, ids, cu_seqlens, patch_size, batch, channels, height, width, fill)


@_scatter_patches.register_fake
def _(tokens, ids, cu_seqlens, patch_size, batch, channels, height, width, fill):
    return tokens.new_empty((batch, channels, height, width))


def _setup_context(ctx, inputs, output):
    _tokens, ids, cu_seqlens, patch_size = inputs[:4]
    ctx.patch_size = patch_size
    ctx.save_for_backward(ids, cu_seqlens)


def _backward(ctx, grad):
    from .gather_patches import gather_tokens  # (gather's backward is a scatter: the two modules import each other)

    ids, cu_seqlens = ctx.saved_tensors
    return gather_tokens(grad, ids, cu_seqlens, ctx.patch_size), None, None, None, None, None, None, None, None


_scatter_patches.register_autograd(_backward, setup_context=_setup_context)


class _Scatter(torch.autograd.Function):
    """The eager path (``direct``): the custom op's forward and backward, the kernel called directly."""

    @staticmethod
    def forward(ctx, fn, tokens, ids, cu_seqlens, patch_size, batch, channels, height, width, fill):
        ctx.patch_size = patch_size
        ctx.save_for_backward(ids, cu_seqlens)
        return fn(tokens, ids, cu_seqlens, patch_size, batch, channels, height, width, fill)

    @staticmethod
    def backward(ctx, grad):
        return None, *_backward(ctx, grad)


def scatter_tokens(tokens: Tensor, ids: Tensor, cu_seqlens: Tensor, patch_size: int, batch: int, channels: int,
                   height: int, width: int, fill: float) -> Tensor:
    """``scatter_patches`` on the raw layout, unchecked: the custom op, or its kernel directly in eager mode."""
    if not direct(tokens):
        return _scatter_patches(tokens, ids, cu_seqlens, patch_size, batch, channels, height, width, fill)
    fn = select(OP, tokens.device, tokens.dtype)[1]
    if tokens.requires_grad and torch.is_grad_enabled():
        return _Scatter.apply(fn, tokens, ids, cu_seqlens, patch_size, batch, channels, height, width, fill)
    return fn(tokens, ids, cu_seqlens, patch_size, batch, channels, height, width, fill)


def scatter_patches(tokens: Tensor, vis: Visible, patch_size: int, image_size, fill: float = 0.0,
                    validate: bool = False) -> Tensor:
    """Inverse of ``gather_patches``: tokens ``(T, p*p*C)`` to images ``(B, C, H, W)``.

    ``image_size`` is ``H`` (square) or ``(H, W)``; C is ``p*p*C // p**2``; masked patches hold ``fill``.
    Returns a contiguous tensor in ``tokens.dtype``; differentiable in ``tokens`` (the gradient is a gather).
    ``validate``: check ``vis``'s values first (one device sync; a ValueError names the field). Off: a token
    whose patch id is outside ``[0, N)`` makes its sample's image NaN (it has nowhere to go), a malformed
    ``cu_seqlens`` every image; the C++ CPU kernel raises instead (its values are on the host).
    """
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if not _usual(tokens, vis, patch_size, image_size):
        _check(tokens, vis, patch_size, image_size)
    H, W = image_size
    P = tokens.shape[1]
    if validate:
        vis.validate()
    return scatter_tokens(tokens, vis.ids, vis.cu_seqlens, patch_size, vis.batch_size, P // patch_size ** 2,
                          H, W, float(fill))


def _usual(tokens, vis, p, image_size) -> bool:
    """Every check of ``_check`` in one expression, for a well-formed call (see gather_patches._usual)."""
    if not (isinstance(tokens, Tensor) and type(vis) is Visible and type(p) is int and p > 0
            and type(image_size) is tuple and len(image_size) == 2 and tokens.dtype in FLOAT_DTYPES
            and tokens.dim() == 2):
        return False
    H, W = image_size
    return (type(H) is int and type(W) is int and H > 0 and W > 0 and not (H % p or W % p)
            and vis.num_patches == (H // p) * (W // p) and vis.ids.device == tokens.device
            and tokens.shape[1] > 0 and not tokens.shape[1] % (p * p) and tokens.shape[0] == vis.ids.shape[0])


def _check(tokens, vis, patch_size, image_size) -> None:
    check_float(OP, "tokens", tokens, 2)
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(isinstance(s, int) and s > 0 for s in image_size)):
        fail(OP, "image_size", f"must be an int or an (H, W) pair of positive ints, got {image_size!r}", TypeError)
    H, W = image_size
    check_patch_size(OP, patch_size, H, W)
    check_visible(OP, vis, tokens.device)
    check_num_patches(OP, vis, patch_size, H, W)
    P = tokens.shape[1]
    if P % (patch_size * patch_size) or P == 0:
        fail(OP, "tokens", f"last dim {P} is not a positive multiple of patch_size**2={patch_size ** 2} "
             "(p*p*C, C >= 1)")
    if tokens.shape[0] != vis.total:
        fail(OP, "tokens", f"has {tokens.shape[0]} rows but vis keeps {vis.total} tokens")


def _scatter_ref(tokens, ids, cu_seqlens, patch_size, batch, channels, height, width, fill):
    return reference.scatter_patches_ref(tokens, ids, cu_seqlens, patch_size, (batch, channels, height, width), fill)


register(OP, "torch")(_scatter_ref)
register_compiled(OP, "scatter_patches_kernel")


@register(OP, "triton")
def _scatter_patches_triton(tokens, ids, cu_seqlens, patch_size, batch, channels, height, width, fill):
    from . import patches_triton

    return patches_triton.scatter_patches(tokens, ids, cu_seqlens, patch_size, (batch, channels, height, width), fill)
