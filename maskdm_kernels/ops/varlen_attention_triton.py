"""Triton kernels of varlen_attention: schedule, forward, backward (fused short-sequence kernel, or preprocess +
dK/dV + dQ for long sequences) and their launchers.

Layout: q, k, v, out are ``(total_tokens, nheads, headdim)`` with any strides (``qkv.view(T, 3, H, Dh).unbind(1)``
is read in place); sequence ``b`` owns tokens ``cu_seqlens[b]:cu_seqlens[b + 1]``.

Grid: 1-D, program ``pid = v * H + h``, so all heads of one row block are launched together. A uniform batch
(``T == B * max_seqlen``, known from shapes, no sync) maps ``v`` to (sequence, block) arithmetically: exactly
``B * cdiv(L, BLOCK)`` blocks. A varlen batch first runs a one-program schedule kernel that sorts the sequences
longest first (on the device) and writes, per block size, the cumulative block count of each; block ``v`` then
finds its sequence by binary search. The grid is ``cdiv(T, BLOCK) + B`` blocks, an upper bound of
``sum_b cdiv(L_b, BLOCK)`` computed on the host from shapes alone; the few surplus programs exit at once.

Safety: no value of ``cu_seqlens`` or ``max_seqlen`` makes a kernel read or write out of bounds, and every output
row is written. A layout that does not start at 0, decreases or does not end at T makes every row NaN; a sequence
longer than ``max_seqlen`` makes that sequence's rows NaN; a uniform-shaped call whose ``cu_seqlens`` is not
``b * L`` makes the mismatched sequences NaN. No host sync.

Softmax is online and in base 2 (logits pre-multiplied by ``scale * log2(e)``), accumulation is fp32, and the
forward saves the natural-log log-sum-exp ``lse (H, T)`` float32 that the backward uses to rebuild P. The head dim
is padded to a power of two ``BLOCK_D`` inside the kernel and the tail masked: no copies for 40, 72 or 96. Every dot
is ``input_precision="ieee"``: fp32 inputs get IEEE fp32 products (no TF32); fp16 / bf16 inputs run on the tensor
cores with fp32 accumulation, P and dS rounded to the input dtype for the second product of each pair.

The backward is deterministic (no atomics; every output row written by one program in a fixed order). Sequences
up to ``FUSED_BWD_MAX_SEQLEN`` use one program per (sequence, head): 5 products per (key block, query block) pair,
dQ accumulated in an fp32 scratch only that program touches, rowsum(dO * O) computed in the same program. Longer
ones keep full parallelism with a dK/dV kernel (4 products) and a dQ kernel (3).

Configs: on a GPU the block sizes are autotuned from per-head-dim sets (separate for the forward, dK/dV, dQ and the
fused backward, and smaller ones for fp32), once per key, then launched straight from the pick; under
``TRITON_INTERPRET=1`` ``INTERPRET_CONFIG`` runs, and with ``MASKDM_TRITON_AUTOTUNE=0`` ``GPU_FIXED_CONFIG``. No
tensor-memory-accelerator descriptors: a varlen tile's bounds are per sequence (one descriptor per sequence or a 3-D
trick), the descriptor API changed across Triton 3.6-3.9 and needs an allocator, and the interpreter cannot check
it; the loads are plain masked loads that Triton pipelines with cp.async.
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
FUSED_BWD_MAX_SEQLEN = 1024
_TABLE_BLOCKS = (16, 32, 64, 128)  # block sizes the schedule tabulates (every config's BLOCK_M / BLOCK_N)


@triton.jit
def _table_index(BLOCK: tl.constexpr):
    if BLOCK == 16:
        t = 0
    elif BLOCK == 32:
        t = 1
    elif BLOCK == 64:
        t = 2
    else:
        t = 3
    return t


@triton.jit
def _schedule_kernel(cu_ptr, sched_ptr, B, T, BLOCK_B: tl.constexpr):
    """One program. sched (int32): [ok, order (B), then per block size 16/32/64/128 the cumulative block count
    (B + 1) of the sequences in order]. ok: cu starts at 0, never decreases and ends at T. Order: longest first,
    ties by index (a stable argsort through one int64 key sort)."""
    i = tl.arange(0, BLOCK_B)
    live = i < B
    start = tl.load(cu_ptr + i, mask=live, other=0)
    end = tl.load(cu_ptr + i + 1, mask=live, other=0)
    length = end - start
    n_bad = tl.sum(((length < 0) & live).to(tl.int32), 0)
    ok = (tl.load(cu_ptr) == 0) & (tl.load(cu_ptr + B) == T) & (n_bad == 0)
    length = tl.maximum(length, 0)
    key = tl.where(live, length.to(tl.int64) * BLOCK_B + (BLOCK_B - 1 - i), -1)
    key = tl.sort(key, descending=True)
    order = (BLOCK_B - 1 - key % BLOCK_B).to(tl.int32)
    slen = tl.where(live, key // BLOCK_B, 0)
    tl.store(sched_ptr, ok.to(tl.int32))
    tl.store(sched_ptr + 1 + i, order, mask=live)
    for t in tl.static_range(4):
        cum_ptr = sched_ptr + 1 + B + t * (B + 1)
        nblk = ((slen + (16 << t) - 1) >> (4 + t)).to(tl.int32)
        tl.store(cum_ptr, 0)
        tl.store(cum_ptr + 1 + i, tl.cumsum(nblk, 0), mask=live)


@triton.jit
def _locate(pid, cu_ptr, sched_ptr, nheads, B, T, max_seqlen, BLOCK: tl.constexpr, UNIFORM: tl.constexpr,
            PER_SEQUENCE: tl.constexpr):
    """(head, first token int64, rows in range, first row of this program, status) of program ``pid``.
    status 0: compute rows [row0, row0 + BLOCK) of the sequence; 1: write NaN to those rows (bad sequence);
    2: write NaN to rows [row0, row0 + span) of the whole packed tensor (bad layout: start 0, length T);
    3: nothing to do. PER_SEQUENCE: one program per sequence (row0 0, span the whole sequence)."""
    h = (pid % nheads).to(tl.int64)  # h * stride_h passes 2^31 for a head-major view of a long batch
    v = pid // nheads
    if UNIFORM:
        if PER_SEQUENCE:
            b = v
            row0 = v * 0
        else:
            nblk = tl.cdiv(max_seqlen, BLOCK)
            b = v // nblk
            row0 = (v % nblk) * BLOCK
        start = b.to(tl.int64) * max_seqlen
        good = tl.load(cu_ptr + b).to(tl.int64) == start
        good = good & (tl.load(cu_ptr + b + 1).to(tl.int64) == start + max_seqlen)
        seqlen = max_seqlen
        status = tl.where(good, 0, 1)
    else:
        ok = tl.load(sched_ptr)
        if PER_SEQUENCE:
            slot = tl.minimum(v, B - 1)
            row0 = v * 0
            present = v < B
            chunk = tl.cdiv(T, B)
        else:
            cum_ptr = sched_ptr + 1 + B + _table_index(BLOCK) * (B + 1)
            lo = v * 0
            hi = lo + B + 1
            while hi - lo > 1:  # the last slot whose cumulative block count is <= v
                mid = (lo + hi) // 2
                below = tl.load(cum_ptr + mid) <= v
                lo = tl.where(below, mid, lo)
                hi = tl.where(below, hi, mid)
            slot = tl.minimum(lo, B - 1)
            row0 = (v - tl.load(cum_ptr + slot)) * BLOCK
            present = v < tl.load(cum_ptr + B)
            chunk = BLOCK
        b = tl.load(sched_ptr + 1 + slot)
        start = tl.load(cu_ptr + b).to(tl.int64)
        seqlen = (tl.load(cu_ptr + b + 1) - tl.load(cu_ptr + b)).to(tl.int32)
        status = tl.where(seqlen > max_seqlen, 1, 0)
        status = tl.where(present, status, 3)
        bad_layout = ok == 0
        status = tl.where(bad_layout, tl.where(v * chunk < T, 2, 3), status)
        start = tl.where(bad_layout, 0, start)
        seqlen = tl.where(bad_layout, tl.minimum(T - v * chunk, chunk) + v * chunk, seqlen)
        row0 = tl.where(bad_layout, v * chunk, row0)
    return h, start, seqlen, row0, status


@triton.jit
def _fill_nan(ptr, start, h, row0, row1, stride_t, stride_h, stride_d, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    """NaN into rows [row0, row1) of head h of a (T, H, D) tensor starting at token ``start``."""
    offs_d = tl.arange(0, BLOCK_D)
    nan = tl.full((BLOCK, BLOCK_D), float("nan"), tl.float32)
    for r in range(row0, row1, BLOCK):
        rows = r + tl.arange(0, BLOCK)
        mask = (rows < row1)[:, None] & (offs_d < HEAD_DIM)[None, :]
        ptrs = ptr + (start + rows)[:, None] * stride_t + h * stride_h + offs_d[None, :] * stride_d
        tl.store(ptrs, nan.to(ptr.dtype.element_ty), mask=mask)


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
def _fwd_kernel(
    Q_ptr, K_ptr, V_ptr, Out_ptr, Lse_ptr, cu_ptr, sched_ptr,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od, stride_lh,
    nheads, B, T, max_seqlen, qk_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UNIFORM: tl.constexpr, EVEN: tl.constexpr,
):
    # Bytes per (sequence, head) of length L: reads L*Dh of q and cdiv(L, BLOCK_M)*L*Dh of k and v (L2-resident for
    # short sequences), writes L*Dh of out + 4L of lse. FLOPs: 4*L*L*Dh. seq_bucket only keys the autotuner.
    # EVEN (uniform and L % BLOCK_M == L % BLOCK_N == 0): no row or key masks at all.
    h, start, seqlen, start_m, status = _locate(tl.program_id(0), cu_ptr, sched_ptr, nheads, B, T, max_seqlen,
                                                BLOCK_M, UNIFORM, False)
    if status == 3:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if status != 0:
        row1 = tl.minimum(start_m + BLOCK_M, seqlen)
        _fill_nan(Out_ptr, start, h, start_m, row1, stride_ot, stride_oh, stride_od, HEAD_DIM, BLOCK_D, BLOCK_M)
        tl.store(Lse_ptr + h * stride_lh + start + offs_m, tl.full((BLOCK_M,), float("nan"), tl.float32),
                 mask=offs_m < row1)
        return
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    Q_ptr += start * stride_qt + h * stride_qh
    K_ptr += start * stride_kt + h * stride_kh
    V_ptr += start * stride_vt + h * stride_vh
    q = _load_rows(Q_ptr + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, offs_m, seqlen, offs_d,
                   HEAD_DIM, BLOCK_D, not EVEN)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):  # one pipelined loop; the ragged last block is masked in it
        rows = start_n + offs_n
        k = _load_rows(K_ptr + rows[:, None] * stride_kt + offs_d[None, :] * stride_kd, rows, seqlen, offs_d,
                       HEAD_DIM, BLOCK_D, not EVEN)
        v = _load_rows(V_ptr + rows[:, None] * stride_vt + offs_d[None, :] * stride_vd, rows, seqlen, offs_d,
                       HEAD_DIM, BLOCK_D, not EVEN)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N) base-2 logits
        if not EVEN:
            s = tl.where((rows < seqlen)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # every block holds >= 1 valid key: m_new is finite
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
    acc = acc / l_i[:, None]
    row_ok = offs_m < seqlen
    o_ptrs = Out_ptr + (start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural log
    tl.store(Lse_ptr + h * stride_lh + start + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_pair(k, v, q, do, lse2, delta, qk_scale):
    """dP^T, P^T of one (key block, query block) pair, rows = keys: S^T and dP^T are the pair's first 2 products."""
    sT = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale  # (BLOCK_N, BLOCK_M)
    pT = tl.math.exp2(sT - lse2[None, :])
    dpT = tl.dot(v, tl.trans(do), input_precision="ieee")
    dsT = pT * (dpT - delta[None, :])
    return pT, dsT


@triton.jit
def _load_q_side(Q_ptr, dO_ptr, Lse_ptr, Delta_ptr, rows, seqlen, offs_d, stride_qt, stride_qd, stride_dot,
                 stride_dod, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr):
    """q, dO tiles and lse (base 2), delta of query rows ``rows``; padded rows get lse = +inf (so P = 0)."""
    q = _load_rows(Q_ptr + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd, rows, seqlen, offs_d,
                   HEAD_DIM, BLOCK_D, MASK)
    do = _load_rows(dO_ptr + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod, rows, seqlen, offs_d,
                    HEAD_DIM, BLOCK_D, MASK)
    if MASK:
        lse2 = tl.load(Lse_ptr + rows, mask=rows < seqlen, other=float("inf")) * 1.4426950408889634
        delta = tl.load(Delta_ptr + rows, mask=rows < seqlen, other=0.0)
    else:
        lse2 = tl.load(Lse_ptr + rows) * 1.4426950408889634
        delta = tl.load(Delta_ptr + rows)
    return q, do, lse2, delta


@triton.jit
def _bwd_fused_kernel(
    Q_ptr, K_ptr, V_ptr, O_ptr, dO_ptr, Lse_ptr, Delta_ptr, dQacc_ptr, dQ_ptr, dK_ptr, dV_ptr, cu_ptr, sched_ptr,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od, stride_dot, stride_doh, stride_dod, stride_dqt, stride_dqh, stride_dqd,
    stride_dkt, stride_dkh, stride_dkd, stride_dvt, stride_dvh, stride_dvd, stride_lh,
    nheads, B, T, max_seqlen, qk_scale, sm_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UNIFORM: tl.constexpr, EVEN: tl.constexpr,
):
    # One program per (sequence, head), longest first. Pass 1: delta = rowsum(dO * O) of its rows (2*L*Dh reads).
    # Pass 2: per key block, dK and dV in registers over every query block, 5 products per pair (S, dP, dV, dK, dQ);
    # dQ summed in fp32 scratch dQacc (H, T, Dh) that only this program touches, scaled and written out by a last pass
    # over the rows (2*L*Dh more bytes, L2-hot). Every store of the key loop goes to dQacc: a branch choosing dQ at the
    # last key block made triton 3.6's software pipeliner fail on sm_90 for BLOCK_M 64 ("PassManager::run failed").
    # FLOPs: 10*L*L*Dh per (sequence, head), the flash-attention count.
    h, start, seqlen, row0, status = _locate(tl.program_id(0), cu_ptr, sched_ptr, nheads, B, T, max_seqlen,
                                             BLOCK_M, UNIFORM, True)
    if status == 3:
        return
    if status != 0:
        _fill_nan(dQ_ptr, start, h, row0, seqlen, stride_dqt, stride_dqh, stride_dqd, HEAD_DIM, BLOCK_D, BLOCK_M)
        _fill_nan(dK_ptr, start, h, row0, seqlen, stride_dkt, stride_dkh, stride_dkd, HEAD_DIM, BLOCK_D, BLOCK_M)
        _fill_nan(dV_ptr, start, h, row0, seqlen, stride_dvt, stride_dvh, stride_dvd, HEAD_DIM, BLOCK_D, BLOCK_M)
        return
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = (offs_d < HEAD_DIM)[None, :]
    Q_ptr += start * stride_qt + h * stride_qh
    K_ptr += start * stride_kt + h * stride_kh
    V_ptr += start * stride_vt + h * stride_vh
    O_ptr += start * stride_ot + h * stride_oh
    dO_ptr += start * stride_dot + h * stride_doh
    Lse_ptr += h * stride_lh + start
    Delta_ptr += h * stride_lh + start
    dQacc_ptr += (h * T + start) * BLOCK_D
    for start_m in range(0, seqlen, BLOCK_M):
        rows = start_m + offs_m
        o = _load_rows(O_ptr + rows[:, None] * stride_ot + offs_d[None, :] * stride_od, rows, seqlen, offs_d,
                       HEAD_DIM, BLOCK_D, True)
        do = _load_rows(dO_ptr + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod, rows, seqlen, offs_d,
                        HEAD_DIM, BLOCK_D, True)
        tl.store(Delta_ptr + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < seqlen)
    tl.debug_barrier()  # delta written by other threads of this program is read below
    for start_n in range(0, seqlen, BLOCK_N):
        rows_n = start_n + offs_n
        k = _load_rows(K_ptr + rows_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, rows_n, seqlen, offs_d,
                       HEAD_DIM, BLOCK_D, not EVEN)
        v = _load_rows(V_ptr + rows_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, rows_n, seqlen, offs_d,
                       HEAD_DIM, BLOCK_D, not EVEN)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for start_m in range(0, seqlen, BLOCK_M):
            rows = start_m + offs_m
            q, do, lse2, delta = _load_q_side(Q_ptr, dO_ptr, Lse_ptr, Delta_ptr, rows, seqlen, offs_d, stride_qt,
                                              stride_qd, stride_dot, stride_dod, HEAD_DIM, BLOCK_D, not EVEN)
            pT, dsT = _bwd_pair(k, v, q, do, lse2, delta, qk_scale)
            if not EVEN:  # padded keys are zeros, not -inf: drop their P and dS explicitly
                pT = tl.where((rows_n < seqlen)[:, None], pT, 0.0)
                dsT = tl.where((rows_n < seqlen)[:, None], dsT, 0.0)
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision="ieee")
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision="ieee")
            acc_ptrs = dQacc_ptr + rows[:, None] * BLOCK_D + offs_d[None, :]
            row_ok = (rows < seqlen)[:, None]
            if start_n == 0:
                dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
            else:
                dq = tl.load(acc_ptrs, mask=row_ok, other=0.0)
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, dq, input_precision="ieee")
            tl.store(acc_ptrs, dq, mask=row_ok)
            tl.debug_barrier()  # the next key block's threads read this scratch tile
        mask = (rows_n < seqlen)[:, None] & d_ok
        tl.store(dK_ptr + (start + rows_n)[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :] * stride_dkd,
                 (dk * sm_scale).to(dK_ptr.dtype.element_ty), mask=mask)
        tl.store(dV_ptr + (start + rows_n)[:, None] * stride_dvt + h * stride_dvh + offs_d[None, :] * stride_dvd,
                 dv.to(dV_ptr.dtype.element_ty), mask=mask)
    for start_m in range(0, seqlen, BLOCK_M):
        rows = start_m + offs_m
        row_ok = (rows < seqlen)[:, None]
        dq = tl.load(dQacc_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], mask=row_ok, other=0.0)
        tl.store(dQ_ptr + (start + rows)[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :] * stride_dqd,
                 (dq * sm_scale).to(dQ_ptr.dtype.element_ty), mask=row_ok & d_ok)


@triton.jit
def _bwd_preprocess_kernel(
    Out_ptr, dO_ptr, Delta_ptr, T,
    stride_ot, stride_oh, stride_od, stride_dot, stride_doh, stride_dod, stride_dh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # Delta[h, t] = sum_d dO[t, h, d] * O[t, h, d]. Bytes: reads 2*T*H*Dh elements, writes 4*T*H.
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (t < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out_ptr + t[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(dO_ptr + t[:, None] * stride_dot + h * stride_doh + offs_d[None, :] * stride_dod, mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta_ptr + h * stride_dh + t, delta, mask=t < T)


@triton.jit
def _bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr, dO_ptr, Lse_ptr, Delta_ptr, dK_ptr, dV_ptr, cu_ptr, sched_ptr,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod, stride_dkt, stride_dkh, stride_dkd, stride_dvt, stride_dvh, stride_dvd,
    stride_lh, nheads, B, T, max_seqlen, qk_scale, sm_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UNIFORM: tl.constexpr, EVEN: tl.constexpr,
):
    # One program per key block: reads its k, v once and every q, dO, lse, delta of its sequence; writes its dK, dV.
    # FLOPs: 8*L*L*Dh per (sequence, head) (4 products; dQ's kernel recomputes S and dP).
    h, start, seqlen, start_n, status = _locate(tl.program_id(0), cu_ptr, sched_ptr, nheads, B, T, max_seqlen,
                                                BLOCK_N, UNIFORM, False)
    if status == 3:
        return
    if status != 0:
        row1 = tl.minimum(start_n + BLOCK_N, seqlen)
        _fill_nan(dK_ptr, start, h, start_n, row1, stride_dkt, stride_dkh, stride_dkd, HEAD_DIM, BLOCK_D, BLOCK_N)
        _fill_nan(dV_ptr, start, h, start_n, row1, stride_dvt, stride_dvh, stride_dvd, HEAD_DIM, BLOCK_D, BLOCK_N)
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K_ptr + start * stride_kt + h * stride_kh + offs_n[:, None] * stride_kt
                   + offs_d[None, :] * stride_kd, offs_n, seqlen, offs_d, HEAD_DIM, BLOCK_D, not EVEN)
    v = _load_rows(V_ptr + start * stride_vt + h * stride_vh + offs_n[:, None] * stride_vt
                   + offs_d[None, :] * stride_vd, offs_n, seqlen, offs_d, HEAD_DIM, BLOCK_D, not EVEN)
    Q_ptr += start * stride_qt + h * stride_qh
    dO_ptr += start * stride_dot + h * stride_doh
    Lse_ptr += h * stride_lh + start
    Delta_ptr += h * stride_lh + start
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start_m in range(0, seqlen, BLOCK_M):
        q, do, lse2, delta = _load_q_side(Q_ptr, dO_ptr, Lse_ptr, Delta_ptr, start_m + offs_m, seqlen, offs_d,
                                          stride_qt, stride_qd, stride_dot, stride_dod, HEAD_DIM, BLOCK_D, not EVEN)
        pT, dsT = _bwd_pair(k, v, q, do, lse2, delta, qk_scale)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision="ieee")
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision="ieee")
    mask = (offs_n < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = (start + offs_n)[:, None]
    tl.store(dK_ptr + rows * stride_dkt + h * stride_dkh + offs_d[None, :] * stride_dkd,
             (dk * sm_scale).to(dK_ptr.dtype.element_ty), mask=mask)
    tl.store(dV_ptr + rows * stride_dvt + h * stride_dvh + offs_d[None, :] * stride_dvd,
             dv.to(dV_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, dO_ptr, Lse_ptr, Delta_ptr, dQ_ptr, cu_ptr, sched_ptr,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod, stride_dqt, stride_dqh, stride_dqd,
    stride_lh, nheads, B, T, max_seqlen, qk_scale, sm_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UNIFORM: tl.constexpr, EVEN: tl.constexpr,
):
    # One program per query block: reads its q, dO, lse, delta once and every k, v of its sequence; writes its dQ.
    # FLOPs: 6*L*L*Dh per (sequence, head).
    h, start, seqlen, start_m, status = _locate(tl.program_id(0), cu_ptr, sched_ptr, nheads, B, T, max_seqlen,
                                                BLOCK_M, UNIFORM, False)
    if status == 3:
        return
    if status != 0:
        row1 = tl.minimum(start_m + BLOCK_M, seqlen)
        _fill_nan(dQ_ptr, start, h, start_m, row1, stride_dqt, stride_dqh, stride_dqd, HEAD_DIM, BLOCK_D, BLOCK_M)
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q, do, lse2, delta = _load_q_side(Q_ptr + start * stride_qt + h * stride_qh,
                                      dO_ptr + start * stride_dot + h * stride_doh, Lse_ptr + h * stride_lh + start,
                                      Delta_ptr + h * stride_lh + start, offs_m, seqlen, offs_d, stride_qt,
                                      stride_qd, stride_dot, stride_dod, HEAD_DIM, BLOCK_D, True)
    K_ptr += start * stride_kt + h * stride_kh
    V_ptr += start * stride_vt + h * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        rows = start_n + offs_n
        k = _load_rows(K_ptr + rows[:, None] * stride_kt + offs_d[None, :] * stride_kd, rows, seqlen, offs_d,
                       HEAD_DIM, BLOCK_D, not EVEN)
        v = _load_rows(V_ptr + rows[:, None] * stride_vt + offs_d[None, :] * stride_vd, rows, seqlen, offs_d,
                       HEAD_DIM, BLOCK_D, not EVEN)
        _, dsT = _bwd_pair(k, v, q, do, lse2, delta, qk_scale)
        if not EVEN:  # padded keys are zeros, not -inf: drop them explicitly
            dsT = tl.where((rows < seqlen)[:, None], dsT, 0.0)
        dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, dq, input_precision="ieee")
    tl.store(dQ_ptr + (start + offs_m)[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(dQ_ptr.dtype.element_ty),
             mask=(offs_m < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :])


# ----------------------------------------------------------------------------------------------------- launchers
# Under the interpreter one fixed configuration runs (BLOCK_M != BLOCK_N on purpose: a swapped index shows up).
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64}
# MASKDM_TRITON_AUTOTUNE=0 runs one small configuration on a GPU instead of tuning: every (head dim, dtype, bucket)
# would otherwise compile every candidate per kernel, which dominates the GPU test suite's time. Fits fp32 Dh 128.
GPU_FIXED_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


def _configs(pairs) -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


# NOTE: candidate sets for Hopper (sm90: 228 KB shared memory, 64K registers per SM), from the shapes FlashAttention-2
# and the Triton tutorial use there; kernel time unmeasured (no GPU in the session that wrote them). Per kernel and
# head-dim class (Dh <= 64, Dh <= 128): (BLOCK_M, BLOCK_N, warps, stages). Every one compiles for sm_90a in bf16
# with tensor-core products and no ptxas spills with triton 3.6, 3.7, 3.8 and 3.9 (`make check-triton`); candidates
# that spilled with one of them were dropped (dK/dV 64x128x8w3s, 128x128, Dh 128 32x64x4w2s; dQ 128x64, 128x128,
# Dh 128 64x64x4w; fused 128x64, Dh 128 64x64 and 32x64x4w). The autotuner times each on the first call per
# (head dim, dtype, max_seqlen bucket, uniform) and drops those that exceed shared memory.
CONFIGS = {
    "fwd": {64: _configs([(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (64, 128, 4, 3),
                          (64, 32, 4, 3)]),
            128: _configs([(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4), (128, 128, 8, 2)])},
    "dkdv": {64: _configs([(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 2), (32, 128, 8, 3), (64, 64, 8, 3),
                           (32, 64, 4, 4)]),
             128: _configs([(32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 3), (16, 128, 8, 2)])},
    "dq": {64: _configs([(64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 8, 2), (64, 32, 4, 4)]),
           128: _configs([(128, 32, 8, 2), (64, 32, 4, 3)])},
    "fused": {64: _configs([(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2), (64, 64, 4, 3),
                            (64, 32, 4, 3)]),
              128: _configs([(32, 64, 8, 2), (64, 32, 4, 2), (32, 128, 8, 2)])},
}
# fp32 inputs run IEEE dots as FMAs out of registers (no tensor cores), where every tile above spills (ptxas, sm_90,
# triton 3.8, spill stores + loads per thread: 0.7 KB for the fused backward Dh 64 at 64x32x4w3s to 148 KB for the
# forward Dh 128 at 128x128x8w).
# These compile spill-free with triton 3.6, 3.7 and 3.8 (`make check-triton`; dropped: forward Dh 128 32x64x8w, which
# spills 1.3 KB on triton 3.6 for uniform batches). Triton 3.9's dQ kernel spills in fp32 at every tile tried, 16x16
# to 64x64. Kernel time unmeasured.
CONFIGS_FP32 = {
    "fwd": {64: _configs([(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2), (16, 64, 4, 2)]),
            128: _configs([(64, 32, 8, 2), (16, 64, 8, 2), (32, 16, 8, 2)])},
    "dkdv": {64: _configs([(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2), (16, 64, 4, 2)]),
             128: _configs([(16, 32, 4, 2), (32, 16, 4, 2)])},
    "dq": {64: _configs([(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)]),
           128: _configs([(64, 32, 8, 2), (32, 16, 4, 2)])},
    "fused": {64: _configs([(64, 32, 8, 2), (32, 64, 8, 2), (16, 64, 4, 2), (32, 16, 4, 2)]),
              128: _configs([(16, 32, 8, 2), (32, 16, 8, 2), (16, 64, 8, 2)])},
}


def _even(a) -> bool:
    return bool(a["UNIFORM"]) and a["max_seqlen"] % a["BLOCK_M"] == 0 and a["max_seqlen"] % a["BLOCK_N"] == 0


_KERNELS = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel, "fused": _bwd_fused_kernel}
_PLAIN = {name: triton.heuristics({"EVEN": _even})(fn) for name, fn in _KERNELS.items()}
_KEY = ["HEAD_DIM", "seq_bucket", "UNIFORM"]  # the autotuner adds every tensor argument's dtype to the key itself
_TUNED = {(name, d, fp32): triton.autotune(cfgs, key=_KEY)(_PLAIN[name])
          for fp32, sets in ((False, CONFIGS), (True, CONFIGS_FP32)) for name, by_d in sets.items()
          for d, cfgs in by_d.items()}


_BEST: dict[tuple, dict] = {}  # (kernel, head dim, bucket, uniform, dtype) -> the autotuner's pick, as launch kwargs


def _launch(name: str, grid, args: tuple, plan: _Plan, dtype: torch.dtype) -> None:
    """Launch kernel ``name``: the fixed interpreter / MASKDM_TRITON_AUTOTUNE=0 configuration, else the autotuner
    once per key and then its pick directly (the autotuner's own per-call key lookup skipped on the host path)."""
    kw = plan.meta
    if triton_interpret():
        _PLAIN[name][grid](*args, **kw, **INTERPRET_CONFIG)
        return
    if os.environ.get("MASKDM_TRITON_AUTOTUNE", "1") == "0":
        _PLAIN[name][grid](*args, **kw, **GPU_FIXED_CONFIG)
        return
    key = (name, kw["HEAD_DIM"], plan.bucket, plan.uniform, dtype)
    best = _BEST.get(key)
    if best is not None:
        _PLAIN[name][grid](*args, **kw, **best)
        return
    tuned = _TUNED[(name, 64 if kw["HEAD_DIM"] <= 64 else 128, dtype == torch.float32)]
    tuned[grid](*args, **kw)
    cfg = getattr(tuned, "best_config", None)
    if cfg is not None:
        _BEST[key] = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _on(device: torch.device):
    """Launch on the tensors' GPU, not on whichever is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _Plan:
    """Everything a launch needs that the shapes decide (no tensor values read): the uniform flag, the grid rule
    and, for varlen batches, the longest-first schedule (one tiny kernel)."""

    def __init__(self, q: Tensor, cu_seqlens: Tensor, max_seqlen: int, softmax_scale: float):
        self.T, self.H, D = q.shape
        self.B = cu_seqlens.shape[0] - 1
        self.L = max_seqlen
        self.cu = cu_seqlens.contiguous()
        self.uniform = self.T == self.B * max_seqlen
        self.meta = {"HEAD_DIM": D, "BLOCK_D": max(16, triton.next_power_of_2(D)), "UNIFORM": self.uniform}
        self.bucket = min(triton.next_power_of_2(max_seqlen), 16384)
        self.qk_scale = softmax_scale * LOG2E
        self.sched = self.cu  # unused by the uniform path, but a valid pointer
        if not self.uniform and self.T > 0:
            self.sched = torch.empty(1 + self.B + len(_TABLE_BLOCKS) * (self.B + 1), dtype=torch.int32, device=q.device)
            with _on(q.device):
                _schedule_kernel[(1,)](self.cu, self.sched, self.B, self.T,
                                       BLOCK_B=max(16, triton.next_power_of_2(self.B)))

    def grid(self, block: str):
        """1-D grid over (row block, head): exact for a uniform batch, ``cdiv(T, BLOCK) + B`` blocks otherwise."""
        if self.uniform:
            return lambda META: (self.B * triton.cdiv(self.L, META[block]) * self.H,)
        return lambda META: ((triton.cdiv(self.T, META[block]) + self.B) * self.H,)

    def scalars(self):
        return self.H, self.B, self.T, self.L


def varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                         softmax_scale: float) -> tuple[Tensor, Tensor]:
    """``out (T, H, Dh)`` contiguous in q's dtype and ``lse (H, T)`` float32 (natural log)."""
    T, H, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((H, T), dtype=torch.float32, device=q.device)
    if T == 0 or cu_seqlens.shape[0] < 2:
        return out, lse
    plan = _Plan(q, cu_seqlens, max_seqlen, softmax_scale)
    with _on(q.device):
        _launch("fwd", plan.grid("BLOCK_M"), (
            q, k, v, out, lse, plan.cu, plan.sched, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            lse.stride(0), *plan.scalars(), plan.qk_scale, plan.bucket), plan, q.dtype)
    return out, lse


def varlen_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         cu_seqlens: Tensor, max_seqlen: int, softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """``dq, dk, dv`` contiguous ``(T, H, Dh)`` in q's dtype; deterministic (no atomics)."""
    T, H, D = q.shape
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    if T == 0 or cu_seqlens.shape[0] < 2:
        return dq, dk, dv
    plan = _Plan(q, cu_seqlens, max_seqlen, softmax_scale)
    lse = lse.contiguous()
    delta = torch.empty((H, T), dtype=torch.float32, device=q.device)
    strides = (*q.stride(), *k.stride(), *v.stride())
    with _on(q.device):
        if max_seqlen <= FUSED_BWD_MAX_SEQLEN:
            dq_acc = torch.empty((H, T, plan.meta["BLOCK_D"]), dtype=torch.float32, device=q.device)
            _launch("fused", (plan.B * H,), (
                q, k, v, out, dout, lse, delta, dq_acc, dq, dk, dv, plan.cu, plan.sched, *strides, *out.stride(),
                *dout.stride(), *dq.stride(), *dk.stride(), *dv.stride(), lse.stride(0), *plan.scalars(),
                plan.qk_scale, softmax_scale, plan.bucket), plan, q.dtype)
            return dq, dk, dv
        block_t = max(1, min(128, 4096 // plan.meta["BLOCK_D"]))
        _bwd_preprocess_kernel[(triton.cdiv(T, block_t), H)](
            out, dout, delta, T, *out.stride(), *dout.stride(), delta.stride(0),
            HEAD_DIM=D, BLOCK_D=plan.meta["BLOCK_D"], BLOCK_T=block_t)
        _launch("dkdv", plan.grid("BLOCK_N"), (
            q, k, v, dout, lse, delta, dk, dv, plan.cu, plan.sched, *strides, *dout.stride(), *dk.stride(),
            *dv.stride(), lse.stride(0), *plan.scalars(), plan.qk_scale, softmax_scale, plan.bucket), plan, q.dtype)
        _launch("dq", plan.grid("BLOCK_M"), (
            q, k, v, dout, lse, delta, dq, plan.cu, plan.sched, *strides, *dout.stride(), *dq.stride(),
            lse.stride(0), *plan.scalars(), plan.qk_scale, softmax_scale, plan.bucket), plan, q.dtype)
    return dq, dk, dv
