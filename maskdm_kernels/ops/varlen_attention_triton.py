"""Triton kernels of varlen_attention: forward, backward preprocess, dK/dV and dQ, and their launchers.

Layout: q, k, v, out are ``(total_tokens, nheads, headdim)`` with any strides (``qkv.view(T, 3, H, Dh).unbind(1)``
is read in place); sequence ``b`` owns tokens ``cu_seqlens[b]:cu_seqlens[b + 1]``. Every kernel runs one program
per (block of rows, sequence x head): grid ``(cdiv(max_seqlen, BLOCK), B * H)``; a program whose block starts past
its sequence's end exits at once, so a batch of short sequences costs what its tokens cost, not B * max_seqlen.

Softmax is online and in base 2 (logits pre-multiplied by ``scale * log2(e)``), accumulation is fp32, and the
forward saves the natural-log log-sum-exp ``lse (H, T)`` float32 that the backward uses to rebuild P without a
second pass. The head dim is padded to a power of two ``BLOCK_D`` inside the kernel and the tail is masked on every
load and store: no copies for 40, 72 or 96. Every dot is ``input_precision="ieee"``: fp32 inputs get IEEE fp32
products (no TF32); the option does not apply to fp16 / bf16 inputs, which run on the tensor cores with fp32
accumulation, P and dS rounded to the input dtype for the second product of each pair (as flash-attention does).

The backward is deterministic: dK/dV programs own a key block and loop over the query blocks of their own sequence,
dQ programs own a query block and loop over its key blocks; every output row is written by exactly one program
and no atomics are used, so two runs give bit-identical gradients.

On a GPU the block sizes are autotuned per (head dim, dtype, max_seqlen bucket); under ``TRITON_INTERPRET=1`` a
fixed configuration runs (``INTERPRET_CONFIG``), and on a GPU with ``MASKDM_TRITON_AUTOTUNE=0`` another
(``GPU_FIXED_CONFIG``). Only APIs present since Triton 3.0 are used.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..dispatch import triton_interpret

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Load a ``(R, BLOCK_D)`` tile; rows >= n_rows (if MASK_ROWS) and the padded head-dim tail read as 0."""
    if MASK_ROWS:
        mask = (rows < n_rows)[:, None]
        if BLOCK_D != HEAD_DIM:
            mask = mask & (offs_d < HEAD_DIM)[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _fwd_step(acc, l_i, m_i, q, K_ptr, V_ptr, start_n, seqlen, offs_n, offs_d, stride_kt, stride_kd, stride_vt,
              stride_vd, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_N: tl.constexpr):
    """One key block of the online softmax: acc, l_i, m_i updated with keys start_n .. start_n + BLOCK_N."""
    rows = start_n + offs_n
    k = _load_rows(K_ptr + rows[:, None] * stride_kt + offs_d[None, :] * stride_kd, rows, seqlen, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_N)
    v = _load_rows(V_ptr + rows[:, None] * stride_vt + offs_d[None, :] * stride_vd, rows, seqlen, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_N)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N) base-2 logits
    if MASK_N:
        s = tl.where((rows < seqlen)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return acc, l_i, m_new


@triton.jit
def _program_sequence(cu_ptr, nheads):
    """(head, first token as int64, length) of this program's (sequence, head): grid axis 1 is b * nheads + h."""
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads
    start = tl.load(cu_ptr + b)
    seqlen = (tl.load(cu_ptr + b + 1) - start).to(tl.int32)
    return pid_bh % nheads, start.to(tl.int64), seqlen


@triton.jit
def _fwd_kernel(
    Q_ptr, K_ptr, V_ptr, Out_ptr, Lse_ptr, cu_ptr,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od, stride_lh,
    nheads, qk_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Bytes per (sequence, head) of length L: reads L*Dh of q and cdiv(L, BLOCK_M)*L*Dh of k and v (L2-resident for
    # short sequences), writes L*Dh of out + 4L of lse. FLOPs: 4*L*L*Dh. seq_bucket only keys the autotuner.
    pid_m = tl.program_id(0)
    h, start, seqlen = _program_sequence(cu_ptr, nheads)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    Q_ptr += start * stride_qt + h * stride_qh
    K_ptr += start * stride_kt + h * stride_kh
    V_ptr += start * stride_vt + h * stride_vh
    q = _load_rows(Q_ptr + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, offs_m, seqlen, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    n_full = (seqlen // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):  # whole key blocks: no key mask
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K_ptr, V_ptr, start_n, seqlen, offs_n, offs_d, stride_kt,
                                  stride_kd, stride_vt, stride_vd, qk_scale, HEAD_DIM, BLOCK_D, False)
    if n_full < seqlen:  # the ragged tail block (holds >= 1 valid key, so m_i stays finite)
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K_ptr, V_ptr, n_full, seqlen, offs_n, offs_d, stride_kt,
                                  stride_kd, stride_vt, stride_vd, qk_scale, HEAD_DIM, BLOCK_D, True)
    acc = acc / l_i[:, None]
    row_ok = offs_m < seqlen
    o_ptrs = Out_ptr + (start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural log
    tl.store(Lse_ptr + h * stride_lh + start + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_preprocess_kernel(
    Out_ptr, dO_ptr, Delta_ptr, T,
    stride_ot, stride_oh, stride_od, stride_dot, stride_doh, stride_dod, stride_dh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # Delta[h, t] = sum_d dO[t, h, d] * O[t, h, d]. Bytes: reads 2*T*H*Dh elements, writes 4*T*H.
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (t < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out_ptr + t[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(dO_ptr + t[:, None] * stride_dot + h * stride_doh + offs_d[None, :] * stride_dod, mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta_ptr + h * stride_dh + t, delta, mask=t < T)


@triton.jit
def _dkdv_step(dk, dv, k, v, Q_ptr, dO_ptr, Lse_ptr, Delta_ptr, start_m, seqlen, offs_m, offs_d,
               stride_qt, stride_qd, stride_dot, stride_dod, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_M: tl.constexpr):
    """One query block's contribution to this program's dK, dV (transposed form: rows are keys)."""
    rows = start_m + offs_m
    q = _load_rows(Q_ptr + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd, rows, seqlen, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_M)
    do = _load_rows(dO_ptr + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod, rows, seqlen, offs_d,
                    HEAD_DIM, BLOCK_D, MASK_M)
    if MASK_M:  # lse = +inf on padded query rows makes their P exactly 0
        lse2 = tl.load(Lse_ptr + rows, mask=rows < seqlen, other=float("inf")) * 1.4426950408889634
        delta = tl.load(Delta_ptr + rows, mask=rows < seqlen, other=0.0)
    else:
        lse2 = tl.load(Lse_ptr + rows) * 1.4426950408889634
        delta = tl.load(Delta_ptr + rows)
    sT = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale  # (BLOCK_N, BLOCK_M)
    pT = tl.math.exp2(sT - lse2[None, :])
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision="ieee")
    dpT = tl.dot(v, tl.trans(do), input_precision="ieee")
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision="ieee")
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr, dO_ptr, Lse_ptr, Delta_ptr, dK_ptr, dV_ptr, cu_ptr,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod, stride_dkt, stride_dkh, stride_dkd, stride_dvt, stride_dvh, stride_dvd,
    stride_lh, nheads, qk_scale, sm_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per key block: reads its k, v once and every q, dO, lse, delta of its sequence; writes its dK, dV.
    # FLOPs: 8*L*L*Dh per (sequence, head) (4 of the 5 backward products; dQ's kernel recomputes S and dP).
    pid_n = tl.program_id(0)
    h, start, seqlen = _program_sequence(cu_ptr, nheads)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K_ptr + start * stride_kt + h * stride_kh + offs_n[:, None] * stride_kt
                   + offs_d[None, :] * stride_kd, offs_n, seqlen, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V_ptr + start * stride_vt + h * stride_vh + offs_n[:, None] * stride_vt
                   + offs_d[None, :] * stride_vd, offs_n, seqlen, offs_d, HEAD_DIM, BLOCK_D, True)
    Q_ptr += start * stride_qt + h * stride_qh
    dO_ptr += start * stride_dot + h * stride_doh
    Lse_ptr += h * stride_lh + start
    Delta_ptr += h * stride_lh + start
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    m_full = (seqlen // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, Q_ptr, dO_ptr, Lse_ptr, Delta_ptr, start_m, seqlen, offs_m, offs_d,
                            stride_qt, stride_qd, stride_dot, stride_dod, qk_scale, HEAD_DIM, BLOCK_D, False)
    if m_full < seqlen:
        dk, dv = _dkdv_step(dk, dv, k, v, Q_ptr, dO_ptr, Lse_ptr, Delta_ptr, m_full, seqlen, offs_m, offs_d,
                            stride_qt, stride_qd, stride_dot, stride_dod, qk_scale, HEAD_DIM, BLOCK_D, True)
    mask = (offs_n < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = (start + offs_n)[:, None]
    tl.store(dK_ptr + rows * stride_dkt + h * stride_dkh + offs_d[None, :] * stride_dkd,
             (dk * sm_scale).to(dK_ptr.dtype.element_ty), mask=mask)
    tl.store(dV_ptr + rows * stride_dvt + h * stride_dvh + offs_d[None, :] * stride_dvd,
             dv.to(dV_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, K_ptr, V_ptr, start_n, seqlen, offs_n, offs_d, stride_kt, stride_kd,
             stride_vt, stride_vd, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_N: tl.constexpr):
    """One key block's contribution to this program's dQ."""
    rows = start_n + offs_n
    k = _load_rows(K_ptr + rows[:, None] * stride_kt + offs_d[None, :] * stride_kd, rows, seqlen, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_N)
    v = _load_rows(V_ptr + rows[:, None] * stride_vt + offs_d[None, :] * stride_vd, rows, seqlen, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_N)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    if MASK_N:  # padded keys are zeros, not -inf: drop them explicitly
        p = tl.where((rows < seqlen)[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee")


@triton.jit
def _bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, dO_ptr, Lse_ptr, Delta_ptr, dQ_ptr, cu_ptr,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod, stride_dqt, stride_dqh, stride_dqd,
    stride_lh, nheads, qk_scale, sm_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per query block: reads its q, dO, lse, delta once and every k, v of its sequence; writes its dQ.
    # FLOPs: 6*L*L*Dh per (sequence, head).
    pid_m = tl.program_id(0)
    h, start, seqlen = _program_sequence(cu_ptr, nheads)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q_ptr + start * stride_qt + h * stride_qh + offs_m[:, None] * stride_qt
                   + offs_d[None, :] * stride_qd, offs_m, seqlen, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(dO_ptr + start * stride_dot + h * stride_doh + offs_m[:, None] * stride_dot
                    + offs_d[None, :] * stride_dod, offs_m, seqlen, offs_d, HEAD_DIM, BLOCK_D, True)
    row_ok = offs_m < seqlen
    lse2 = tl.load(Lse_ptr + h * stride_lh + start + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta_ptr + h * stride_lh + start + offs_m, mask=row_ok, other=0.0)
    K_ptr += start * stride_kt + h * stride_kh
    V_ptr += start * stride_vt + h * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    n_full = (seqlen // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, K_ptr, V_ptr, start_n, seqlen, offs_n, offs_d, stride_kt, stride_kd,
                      stride_vt, stride_vd, qk_scale, HEAD_DIM, BLOCK_D, False)
    if n_full < seqlen:
        dq = _dq_step(dq, q, do, lse2, delta, K_ptr, V_ptr, n_full, seqlen, offs_n, offs_d, stride_kt, stride_kd,
                      stride_vt, stride_vd, qk_scale, HEAD_DIM, BLOCK_D, True)
    tl.store(dQ_ptr + (start + offs_m)[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(dQ_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


# ----------------------------------------------------------------------------------------------------- launchers
# Under the interpreter one fixed configuration runs (BLOCK_M != BLOCK_N on purpose: a swapped index shows up).
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64}


def _configs(pairs) -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


# NOTE: candidate sets, unmeasured: no GPU was available when they were written. The autotuner times each on the
# first call per (head dim, dtype, max_seqlen bucket) and skips configs that exceed shared memory.
_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3),
                         (64, 32, 4, 4), (64, 128, 4, 2), (32, 32, 4, 3)])
_BWD_CONFIGS = _configs([(64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (32, 128, 4, 2), (128, 32, 4, 2),
                         (32, 64, 4, 3), (32, 32, 4, 3), (64, 32, 4, 3)])
_KEY = ["HEAD_DIM", "seq_bucket"]  # the autotuner adds every tensor argument's dtype to the key itself
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY)(_fwd_kernel)
_dkdv_tuned = triton.autotune(_BWD_CONFIGS, key=_KEY)(_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(_BWD_CONFIGS, key=_KEY)(_bwd_dq_kernel)


# MASKDM_TRITON_AUTOTUNE=0 runs one small configuration on a GPU instead of tuning: every (head dim, dtype, bucket)
# would otherwise compile 8 candidates per kernel, which dominates the GPU test suite's time. Fits fp32 at Dh 128.
GPU_FIXED_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


def _pick(kernel, tuned):
    """(kernel, fixed meta-parameters): the fixed interpreter configuration, or the autotuner on a GPU."""
    if triton_interpret():
        return kernel, dict(INTERPRET_CONFIG)
    if os.environ.get("MASKDM_TRITON_AUTOTUNE", "1") == "0":
        return kernel, dict(GPU_FIXED_CONFIG)
    return tuned, {}


def _common(q: Tensor, cu_seqlens: Tensor, max_seqlen: int, softmax_scale: float):
    T, H, D = q.shape
    B = cu_seqlens.shape[0] - 1
    block_d = max(16, triton.next_power_of_2(D))
    bucket = min(triton.next_power_of_2(max_seqlen), 16384)
    meta = {"HEAD_DIM": D, "BLOCK_D": block_d}
    return T, H, B, bucket, meta, softmax_scale * LOG2E


def _on(device: torch.device):
    """Launch on the tensors' GPU, not on whichever is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _grid(max_seqlen: int, bh: int, block: str):
    return lambda META: (triton.cdiv(max_seqlen, META[block]), bh)


def varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                         softmax_scale: float) -> tuple[Tensor, Tensor]:
    """``out (T, H, Dh)`` contiguous in q's dtype and ``lse (H, T)`` float32 (natural log)."""
    T, H, B, bucket, meta, qk_scale = _common(q, cu_seqlens, max_seqlen, softmax_scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((H, T), dtype=torch.float32, device=q.device)
    if T == 0 or B == 0:
        return out, lse
    cu = cu_seqlens.contiguous()
    kernel, fixed = _pick(_fwd_kernel, _fwd_tuned)
    with _on(q.device):
        kernel[_grid(max_seqlen, B * H, "BLOCK_M")](
            q, k, v, out, lse, cu, *q.stride(), *k.stride(), *v.stride(), *out.stride(), lse.stride(0),
            H, qk_scale, bucket, **meta, **fixed)
    return out, lse


def varlen_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         cu_seqlens: Tensor, max_seqlen: int, softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """``dq, dk, dv`` contiguous ``(T, H, Dh)`` in q's dtype; deterministic (no atomics)."""
    T, H, B, bucket, meta, qk_scale = _common(q, cu_seqlens, max_seqlen, softmax_scale)
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    if T == 0 or B == 0:
        return dq, dk, dv
    cu = cu_seqlens.contiguous()
    lse = lse.contiguous()
    delta = torch.empty((H, T), dtype=torch.float32, device=q.device)
    block_t = max(1, min(128, 4096 // meta["BLOCK_D"]))
    with _on(q.device):
        _bwd_preprocess_kernel[(triton.cdiv(T, block_t), H)](
            out, dout, delta, T, *out.stride(), *dout.stride(), delta.stride(0),
            HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"], BLOCK_T=block_t)
        kernel, fixed = _pick(_bwd_dkdv_kernel, _dkdv_tuned)
        kernel[_grid(max_seqlen, B * H, "BLOCK_N")](
            q, k, v, dout, lse, delta, dk, dv, cu, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
            *dk.stride(), *dv.stride(), lse.stride(0), H, qk_scale, softmax_scale, bucket, **meta, **fixed)
        kernel, fixed = _pick(_bwd_dq_kernel, _dq_tuned)
        kernel[_grid(max_seqlen, B * H, "BLOCK_M")](
            q, k, v, dout, lse, delta, dq, cu, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
            *dq.stride(), lse.stride(0), H, qk_scale, softmax_scale, bucket, **meta, **fixed)
    return dq, dk, dv
