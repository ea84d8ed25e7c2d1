"""Triton kernels of the patch ops: gather (with fused noising), scatter, and the masked noise loss.

Each program owns BLOCK_T tokens x BLOCK_J >= p*p*C pixels. A token's sample comes from a binary search of
``cu_seqlens`` (log2 B loads, no (T,) index tensor), its pixels from the patch id and the image strides, so
any layout (contiguous, channels_last, sliced) is read in place. Offsets are int64, math is fp32.

Memory safety for any values, with no host sync: a token whose patch id is outside ``[0, N)`` is never used as an
address (its loads and stores are masked off) and gives NaN: its gather row, its loss and gradient row, and its
sample's image in a scatter (it has nowhere else to go). A malformed ``cu_seqlens`` (not starting at 0, decreasing,
not ending at T) makes every token invalid, and a scatter's every image NaN. The check of ``cu_seqlens`` reads its
B + 1 values once per program (L2-resident; a few hundred bytes).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _token_sample(cu_ptr, t, batch, n_steps):
    """Largest b in [0, batch) with cu_seqlens[b] <= t, per token: the sample that owns token t."""
    lo = tl.zeros_like(t)
    hi = lo + (batch - 1)
    for _ in range(n_steps):
        mid = (lo + hi + 1) // 2
        start = tl.load(cu_ptr + mid).to(tl.int64)
        go_right = start <= t
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    return lo


@triton.jit
def _layout_ok(cu_ptr, batch, T, BLOCK_B: tl.constexpr):
    """True when cu_seqlens (B + 1,) starts at 0, never decreases and ends at T."""
    ok = (tl.load(cu_ptr) == 0) & (tl.load(cu_ptr + batch).to(tl.int64) == T)
    for start in range(0, batch, BLOCK_B):
        i = start + tl.arange(0, BLOCK_B)
        m = i < batch
        lo = tl.load(cu_ptr + i, mask=m, other=0)
        hi = tl.load(cu_ptr + i + 1, mask=m, other=0)
        ok = ok & (tl.sum((hi < lo).to(tl.int32), axis=0) == 0)
    return ok


@triton.jit
def _token_valid(ids_ptr, t, t_mask, num_patches, layout_ok):
    """Per token: inside the launch, a patch id in [0, N), and a well-formed cu_seqlens."""
    pid = tl.load(ids_ptr + t, mask=t_mask, other=0)
    # The scalar layout_ok enters through a comparison (no id is < 0): `tensor & scalar` hands triton 3.9's
    # interpreter an int32 mask, which its loads refuse. Compiled code is the same either way.
    return t_mask & (pid >= 0) & (pid < tl.where(layout_ok, num_patches, 0))


@triton.jit
def _pixel_offsets(ids_ptr, t, t_mask, j, b, p, C, Wp, stride_b, stride_c, stride_h, stride_w):
    """Element offsets ``(BLOCK_T, BLOCK_J)`` of token t's pixel j (order p1 p2 c) in an image tensor."""
    pid = tl.load(ids_ptr + t, mask=t_mask, other=0).to(tl.int64)
    row = pid // Wp
    col = pid - row * Wp
    j = j.to(tl.int64)  # c * stride_c passes 2^31 for a channel-major view of a large batch
    p1 = j // (p * C)
    p2 = (j // C) % p
    c = j % C
    h = row[:, None] * p + p1[None, :]
    w = col[:, None] * p + p2[None, :]
    return b[:, None] * stride_b + c[None, :] * stride_c + h * stride_h + w * stride_w


@triton.jit
def _gather_kernel(
    X_ptr, Noise_ptr, SS_ptr, NS_ptr, Out_ptr, ids_ptr, cu_ptr,
    T, batch, n_steps, p, C, Wp, PPC, num_patches,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_nb, stride_nc, stride_nh, stride_nw,
    HAS_NOISE: tl.constexpr, HAS_SS: tl.constexpr, HAS_NS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # Bytes: reads T*P pixels of X (and of noise), writes T*P tokens; masked pixels are never touched.
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, BLOCK_J)
    t_mask = t < T
    ok = _token_valid(ids_ptr, t, t_mask, num_patches, _layout_ok(cu_ptr, batch, T, BLOCK_B))
    store_mask = t_mask[:, None] & (j < PPC)[None, :]
    mask = ok[:, None] & store_mask
    b = _token_sample(cu_ptr, t, batch, n_steps)
    off_x = _pixel_offsets(ids_ptr, t, ok, j, b, p, C, Wp, stride_xb, stride_xc, stride_xh, stride_xw)
    val = tl.load(X_ptr + off_x, mask=mask, other=0.0).to(tl.float32)
    if HAS_SS:
        val = val * tl.load(SS_ptr + b, mask=ok, other=0.0).to(tl.float32)[:, None]
    if HAS_NOISE:
        off_n = _pixel_offsets(ids_ptr, t, ok, j, b, p, C, Wp, stride_nb, stride_nc, stride_nh, stride_nw)
        n = tl.load(Noise_ptr + off_n, mask=mask, other=0.0).to(tl.float32)
        if HAS_NS:
            n = n * tl.load(NS_ptr + b, mask=ok, other=0.0).to(tl.float32)[:, None]
        val = val + n
    val = tl.where(ok[:, None], val, float("nan"))
    tl.store(Out_ptr + t[:, None] * PPC + j[None, :], val.to(Out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _scatter_kernel(
    Tok_ptr, Out_ptr, ids_ptr, cu_ptr,
    T, batch, n_steps, p, C, Wp, PPC, num_patches,
    stride_tt, stride_tj, stride_ob, stride_oc, stride_oh, stride_ow,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # Bytes: reads T*P tokens, writes T*P pixels (the fill of masked pixels is done by the caller's allocation).
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, BLOCK_J)
    t_mask = t < T
    layout_ok = _layout_ok(cu_ptr, batch, T, BLOCK_B)
    ok = _token_valid(ids_ptr, t, t_mask, num_patches, layout_ok)
    mask = ok[:, None] & (j < PPC)[None, :]
    b = _token_sample(cu_ptr, t, batch, n_steps)
    val = tl.load(Tok_ptr + t[:, None] * stride_tt + j[None, :] * stride_tj, mask=mask, other=0.0)
    off = _pixel_offsets(ids_ptr, t, ok, j, b, p, C, Wp, stride_ob, stride_oc, stride_oh, stride_ow)
    tl.store(Out_ptr + off, val.to(Out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_poison_kernel(
    Out_ptr, ids_ptr, cu_ptr, T, batch, n_steps, num_patches, image_numel,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # Error path, launched after _scatter_kernel on the same stream: inside one launch another program (or another
    # warp of the same one) could still store a valid pixel into an image made NaN. A token with a bad id poisons
    # its sample's image; a bad layout, program 0 every image. Without one, a program reads its ids and exits.
    pid_t = tl.program_id(0)
    t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, BLOCK_J)
    layout_ok = _layout_ok(cu_ptr, batch, T, BLOCK_B)
    ok = _token_valid(ids_ptr, t, t < T, num_patches, layout_ok)
    bad = (t < tl.where(layout_ok, T, 0)) & ~ok  # t < T & ~ok & layout_ok, without `tensor & scalar` (see above)
    if tl.sum(bad.to(tl.int32), axis=0) > 0:
        b = _token_sample(cu_ptr, t, batch, n_steps)
        for k in range(0, image_numel, BLOCK_J):
            e = k + j
            tl.store(Out_ptr + b[:, None] * image_numel + e[None, :], float("nan"),
                     mask=bad[:, None] & (e < image_numel)[None, :])
    if (pid_t == 0) & ~layout_ok:
        total = tl.cast(batch, tl.int64) * image_numel  # B*C*H*W may pass 2^31
        for k in range(0, total, BLOCK_J):
            e = k + j
            tl.store(Out_ptr + e, float("nan"), mask=e < total)


@triton.jit
def _loss_kernel(
    Pred_ptr, Noise_ptr, W_ptr, Partial_ptr, Grad_ptr, GradOut_ptr, ids_ptr, cu_ptr,
    T, batch, n_steps, p, C, Wp, PPC, num_patches,
    stride_pt, stride_pj, stride_nb, stride_nc, stride_nh, stride_nw,
    HAS_WEIGHT: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Forward: Partial[pid] = sum over the block's tokens of scale_b * sum_j (pred - target)^2.
    Backward: Grad = grad_out * 2 * scale_b * (pred - target), with scale_b = w_b / (len_b * P * B).

    Bytes: reads T*P of pred and of noise (+ writes T*P of grad in the backward)."""
    pid = tl.program_id(0)
    t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, BLOCK_J)
    t_mask = t < T
    ok = _token_valid(ids_ptr, t, t_mask, num_patches, _layout_ok(cu_ptr, batch, T, BLOCK_B))
    store_mask = t_mask[:, None] & (j < PPC)[None, :]
    mask = ok[:, None] & store_mask
    b = _token_sample(cu_ptr, t, batch, n_steps)
    # Per-sample loads under ok: with B = 0 (cu_seqlens [0], never ok) b + 1 and the (0,) weight are out of bounds.
    length = tl.load(cu_ptr + b + 1, mask=ok, other=1) - tl.load(cu_ptr + b, mask=ok, other=0)
    scale = 1.0 / (tl.maximum(length, 1).to(tl.float32) * PPC * batch)
    if HAS_WEIGHT:
        scale = scale * tl.load(W_ptr + b, mask=ok, other=0.0).to(tl.float32)
    scale = tl.where(ok | ~t_mask, scale, float("nan"))  # an invalid token: NaN loss and NaN gradient row
    off_n = _pixel_offsets(ids_ptr, t, ok, j, b, p, C, Wp, stride_nb, stride_nc, stride_nh, stride_nw)
    target = tl.load(Noise_ptr + off_n, mask=mask, other=0.0).to(tl.float32)
    off_p = t[:, None] * stride_pt + j[None, :] * stride_pj
    diff = tl.load(Pred_ptr + off_p, mask=store_mask, other=0.0).to(tl.float32) - target
    if BACKWARD:
        g = tl.load(GradOut_ptr).to(tl.float32)
        grad = diff * (2.0 * g * scale)[:, None]
        tl.store(Grad_ptr + t[:, None] * PPC + j[None, :], grad.to(Grad_ptr.dtype.element_ty), mask=store_mask)
    else:
        per_token = tl.sum(diff * diff, axis=1) * scale
        tl.store(Partial_ptr + pid, tl.sum(tl.where(t_mask, per_token, 0.0), axis=0))


def _launch_geometry(ppc: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_J, warps) for ``ppc`` pixels per token: about 4096 elements per program and 16 per thread
    (at 4 warps, 32 each, the gather with noise spilled 144-176 bytes on sm_90)."""
    block_j = triton.next_power_of_2(ppc)
    block_t = max(1, min(64, 4096 // block_j))
    return block_t, block_j, min(16, max(4, block_t * block_j // 512))


def _search_steps(batch: int) -> int:
    return max(1, math.ceil(math.log2(max(batch, 2))))


def _block_b(batch: int) -> int:
    return min(1024, triton.next_power_of_2(max(batch, 1)))


def _meta(images_shape, ids: Tensor, cu_seqlens: Tensor, p: int):
    _, C, H, W = images_shape
    T = ids.shape[0]
    batch = cu_seqlens.shape[0] - 1
    ppc = p * p * C
    block_t, block_j, warps = _launch_geometry(ppc)
    launch = {"BLOCK_T": block_t, "BLOCK_J": block_j, "BLOCK_B": _block_b(batch), "num_warps": warps}
    return T, batch, C, W // p, ppc, (H // p) * (W // p), launch


def _empty_layout_nan(cu_seqlens: Tensor) -> Tensor:
    """0-dim bool, on the device: with no token, a well-formed cu_seqlens is all zeros (no host sync)."""
    return cu_seqlens.ne(0).any()


def gather_patches(images, ids, cu_seqlens, patch_size, noise=None, signal_scale=None, noise_scale=None):
    T, batch, C, Wp, ppc, n_patches, launch = _meta(images.shape, ids, cu_seqlens, patch_size)
    out = torch.empty((T, ppc), dtype=images.dtype, device=images.device)
    if T == 0:
        return out
    n = noise if noise is not None else images
    grid = (triton.cdiv(T, launch["BLOCK_T"]),)
    _gather_kernel[grid](
        images, n, signal_scale if signal_scale is not None else images,
        noise_scale if noise_scale is not None else images, out, ids, cu_seqlens,
        T, batch, _search_steps(batch), patch_size, C, Wp, ppc, n_patches,
        *images.stride(), *n.stride(),
        HAS_NOISE=noise is not None, HAS_SS=signal_scale is not None, HAS_NS=noise_scale is not None,
        **launch,
    )
    return out


def scatter_patches(tokens, ids, cu_seqlens, patch_size, image_size, fill=0.0):
    B, C, H, W = image_size
    out = torch.full((B, C, H, W), fill, dtype=tokens.dtype, device=tokens.device)
    T, batch, C, Wp, ppc, n_patches, launch = _meta(image_size, ids, cu_seqlens, patch_size)
    if T == 0:
        return out.masked_fill_(_empty_layout_nan(cu_seqlens), float("nan"))
    grid = (triton.cdiv(T, launch["BLOCK_T"]),)
    _scatter_kernel[grid](
        tokens, out, ids, cu_seqlens, T, batch, _search_steps(batch), patch_size, C, Wp, ppc, n_patches,
        *tokens.stride(), *out.stride(), **launch,
    )
    _scatter_poison_kernel[grid](out, ids, cu_seqlens, T, batch, _search_steps(batch), n_patches, C * H * W, **launch)
    return out


def masked_noise_loss(pred, noise, ids, cu_seqlens, patch_size, weight=None):
    T, batch, C, Wp, ppc, n_patches, launch = _meta(noise.shape, ids, cu_seqlens, patch_size)
    nblocks = triton.cdiv(T, launch["BLOCK_T"])
    if T == 0:
        zero = torch.zeros((), dtype=torch.float32, device=pred.device)
        return zero.masked_fill_(_empty_layout_nan(cu_seqlens), float("nan"))
    partial = torch.empty(nblocks, dtype=torch.float32, device=pred.device)
    _loss_kernel[(nblocks,)](
        pred, noise, weight if weight is not None else partial, partial, partial, partial, ids, cu_seqlens,
        T, batch, _search_steps(batch), patch_size, C, Wp, ppc, n_patches, *pred.stride(), *noise.stride(),
        HAS_WEIGHT=weight is not None, BACKWARD=False, **launch,
    )
    return partial.sum()  # deterministic: no atomics


def masked_noise_loss_backward(grad, pred, noise, ids, cu_seqlens, patch_size, weight=None):
    T, batch, C, Wp, ppc, n_patches, launch = _meta(noise.shape, ids, cu_seqlens, patch_size)
    out = torch.empty((T, ppc), dtype=pred.dtype, device=pred.device)
    if T == 0:
        return out
    _loss_kernel[(triton.cdiv(T, launch["BLOCK_T"]),)](
        pred, noise, weight if weight is not None else out, out, out, grad, ids, cu_seqlens,
        T, batch, _search_steps(batch), patch_size, C, Wp, ppc, n_patches, *pred.stride(), *noise.stride(),
        HAS_WEIGHT=weight is not None, BACKWARD=True, **launch,
    )
    return out
