"""Readable PyTorch references of every op: the test oracle and the ``torch`` backend.

They work on the raw layout (``ids``, ``cu_seqlens``) like the kernels, compute in float32 (float64 in,
float64 math), use only sync-free tensor ops, and return the dtype the kernels return.

Invalid values give NaN as on the device, never a wrapped index: a patch id outside ``[0, N)`` its token's
rows (its sample's image in a scatter), a malformed ``cu_seqlens`` every row (see ``valid_tokens``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .layout import sample_index


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``(B, C, H, W) -> (B, N, p*p*C)`` with pixel order ``(p1 p2 c)``."""
    return rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(tokens: Tensor, patch_size: int, channels: int, height: int, width: int) -> Tensor:
    """``(B, N, p*p*C) -> (B, C, H, W)``."""
    return rearrange(tokens, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=height // patch_size,
                     p1=patch_size, p2=patch_size, c=channels)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def layout_ok(cu_seqlens: Tensor, total: int) -> Tensor:
    """0-dim bool: ``cu_seqlens`` starts at 0, never decreases and ends at ``total`` (no host sync)."""
    return (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()


def valid_tokens(ids: Tensor, cu_seqlens: Tensor, num_patches: int) -> Tensor:
    """bool ``(T,)``: the token's patch id is in ``[0, N)`` and the layout is well-formed."""
    return (ids >= 0) & (ids < num_patches) & layout_ok(cu_seqlens, ids.shape[0])


def _safe_index(images: Tensor, ids: Tensor, cu_seqlens: Tensor, patch_size: int):
    """(sample, patch id, valid) per token; an invalid token's indices point at patch 0 of a real sample."""
    n = (images.shape[2] // patch_size) * (images.shape[3] // patch_size)
    ok = valid_tokens(ids, cu_seqlens, n)
    return sample_index(cu_seqlens, ids.shape[0]), torch.where(ok, ids.long(), 0), ok


def gather_patches_ref(images: Tensor, ids: Tensor, cu_seqlens: Tensor, patch_size: int,
                       noise: Tensor | None = None, signal_scale: Tensor | None = None,
                       noise_scale: Tensor | None = None) -> Tensor:
    """``(T, p*p*C)``: the visible patches of ``signal_scale[b] * images + noise_scale[b] * noise``."""
    cdt = _compute_dtype(images.dtype)
    bidx, pid, ok = _safe_index(images, ids, cu_seqlens, patch_size)
    out = patchify(images.to(cdt), patch_size)[bidx, pid]  # (T, P)
    if signal_scale is not None:
        out = out * signal_scale.to(cdt)[bidx, None]
    if noise is not None:
        n = patchify(noise.to(cdt), patch_size)[bidx, pid]
        out = out + (n * noise_scale.to(cdt)[bidx, None] if noise_scale is not None else n)
    return torch.where(ok[:, None], out, float("nan")).to(images.dtype)


def scatter_patches_ref(tokens: Tensor, ids: Tensor, cu_seqlens: Tensor, patch_size: int,
                        image_size: tuple[int, int, int, int], fill: float = 0.0) -> Tensor:
    """``(T, p*p*C) -> (B, C, H, W)``; masked patches hold ``fill``."""
    B, C, H, W = image_size
    N = (H // patch_size) * (W // patch_size)
    ok = valid_tokens(ids, cu_seqlens, N)
    bidx = sample_index(cu_seqlens, ids.shape[0])
    # An invalid token goes to a spare patch slot N, dropped after, and makes its sample's image NaN.
    grid = torch.full((B, N + 1, tokens.shape[1]), fill, dtype=tokens.dtype, device=tokens.device)
    grid = grid.index_put((bidx, torch.where(ok, ids.long(), N)), tokens)[:, :N]
    bad = torch.zeros(B, dtype=torch.int32, device=tokens.device).index_add(0, bidx, (~ok).int()) > 0
    bad = bad | ~layout_ok(cu_seqlens, ids.shape[0])
    grid = torch.where(bad[:, None, None], float("nan"), grid)
    return unpatchify(grid, patch_size, C, H, W).contiguous()


def masked_noise_loss_ref(pred: Tensor, noise: Tensor, ids: Tensor, cu_seqlens: Tensor, patch_size: int,
                          weight: Tensor | None = None) -> Tensor:
    """0-dim float32: mean over samples of ``weight[b] * mean((pred - target)^2)`` over b's visible elements.

    A sample with no visible token contributes 0 (not NaN)."""
    cdt = _compute_dtype(pred.dtype)
    B = cu_seqlens.shape[0] - 1
    target = gather_patches_ref(noise.to(cdt), ids, cu_seqlens, patch_size)  # NaN rows where invalid
    per_token = (pred.to(cdt) - target).square().sum(dim=1)  # (T,)
    bidx = sample_index(cu_seqlens, ids.shape[0])
    per_sample = torch.zeros(B, dtype=cdt, device=pred.device).index_add(0, bidx, per_token)
    count = (cu_seqlens[1:] - cu_seqlens[:-1]).to(cdt) * pred.shape[1]
    per_sample = per_sample / count.clamp_min(1)
    if weight is not None:
        per_sample = per_sample * weight.to(cdt)
    loss = per_sample.sum() / max(B, 1)
    loss = torch.where(layout_ok(cu_seqlens, ids.shape[0]), loss, float("nan"))  # also with no token at all
    return loss if cdt == torch.float64 else loss.float()


def masked_noise_loss_grad_ref(grad: Tensor, pred: Tensor, noise: Tensor, ids: Tensor, cu_seqlens: Tensor,
                               patch_size: int, weight: Tensor | None = None) -> Tensor:
    """d loss / d pred, ``(T, p*p*C)`` in ``pred.dtype``: ``grad * 2 w_b (pred - target) / (len_b * P * B)``."""
    cdt = _compute_dtype(pred.dtype)
    B = cu_seqlens.shape[0] - 1
    target = gather_patches_ref(noise.to(cdt), ids, cu_seqlens, patch_size)  # NaN rows where invalid
    bidx = sample_index(cu_seqlens, ids.shape[0])
    count = (cu_seqlens[1:] - cu_seqlens[:-1]).to(cdt).clamp_min(1) * pred.shape[1] * max(B, 1)
    scale = 2.0 / count
    if weight is not None:
        scale = scale * weight.to(cdt)
    g = grad.to(cdt) * scale[bidx, None] * (pred.to(cdt) - target)
    return g.to(pred.dtype)


def varlen_attention_ref(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                         softmax_scale: float | None = None) -> Tensor:
    """Packed non-causal attention ``(T, H, Dh)``; each sequence attends only within itself.

    Block-diagonal mask over the packed tokens: readable and sync-free, O(T^2) memory (an oracle, not a
    production path for long batches)."""
    T, _H, D = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    cdt = _compute_dtype(q.dtype)
    seg = sample_index(cu_seqlens, T)
    same = seg[:, None] == seg[None, :]  # (T, T)
    qf, kf, vf = (x.to(cdt).transpose(0, 1) for x in (q, k, v))  # (H, T, D)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale
    scores = scores.masked_fill(~same, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), vf)
    return out.transpose(0, 1).to(q.dtype)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float | None = None) -> Tensor:
    """Uniform ``(B, N, H, Dh)`` attention through SDPA in float32 (float64 for float64 inputs)."""
    cdt = _compute_dtype(q.dtype)
    qf, kf, vf = (x.to(cdt).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(qf, kf, vf, scale=softmax_scale)
    return out.transpose(1, 2).to(q.dtype)
