"""Backward kernels (FlashAttention-2 style, deterministic: no atomics).

Three launches after the rotation (``rotate_kernel`` writes q~ and k~ once), each program
owning disjoint outputs so no two programs ever add into the same address:

1. ``delta_kernel``: ``delta[b, h, i] = sum_d dO * O`` (float32).
2. ``dkdv_kernel``: one program per (key tile, batch, kv head), working on key-major
   ``[BLOCK_N, BLOCK_M]`` tiles. It loops over the query tiles that can see its keys
   (causal: from the diagonal on) and, inside, over the query heads of its GQA group, so
   the group's contributions to dK, dV are summed in a fixed order in registers. It
   then unrotates dK~ and writes per-(b, kv head) key-side partials ``[B, Hk, Tk]`` of
   radius, log-theta and pitch gradients.
3. ``dq_kernel``: one program per (query tile, batch, head), looping over key tiles; it
   writes dQ and per-(b, head) query-side partials ``[B, H, Tq]`` of radius, log-theta,
   pitch, and the per-row pieces of dalpha and dbeta (with a float32 delta correction,
   see the kernel).

The host then sums the partials with torch in a fixed order (see ``__init__.backward``).
Maths as ``chunked.backward``: with P = exp(s - lse), dP = dO V^T,
``dS = P * (dP - delta)``, ``dq~ = scale * dS k~``, ``dk~ = scale * dS^T q~``, ``dV = P^T dO``.
Rows with lse = -inf (nothing to attend) use lse = +inf so P = 0 and they pass nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    LOG2E,
    allowed_tile,
    bias_coefficient,
    load_pitch,
    load_rows,
    pair_weight,
    pitch_grad_scales,
    pitch_grad_tiles,
    row_offsets,
    score_tile,
    store_halves,
    store_rows,
    unrotate,
)
from .forward_kernel import key_loop_end


@triton.jit
def delta_kernel(Out, DOut, Delta, Tq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid ``(cdiv(Tq, BLOCK_M), B * H)``: ``Delta [B, H, Tq] = rowsum(dO * O)`` in float32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = pid_bh.to(tl.int64) * Tq + offs_m
    mask = offs_m < Tq
    ptrs = rows[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(Out + ptrs, mask=mask[:, None], other=0.0).to(tl.float32)
    do = tl.load(DOut + ptrs, mask=mask[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + rows, tl.sum(o * do, axis=1), mask=mask)


@triton.jit
def load_row_stats(Lse, Delta, rows, mask):
    """``lse * log2(e)`` (+inf on empty rows, so that P = exp2(s - lse) = 0) and delta, ``[BLOCK_M]``."""
    lse = tl.load(Lse + rows, mask=mask, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(Delta + rows, mask=mask, other=0.0)
    return lse, delta


@triton.jit
def dkdv_kernel(
    QR, K, KR, V, DOut, Lse, Delta,
    DK, DV, DLogThetaK, DRadiusK, DPitchK,
    PosQ, LogThetaQ, RadiusQ, PitchQ, VoicedQ,
    PosK, LogThetaK, RadiusK, PitchK, VoicedK,
    Alpha, Beta, QLengths, KLengths,
    sm_scale,
    H, GROUPS, Tq, Tk,
    HEAD_DIM: tl.constexpr, BIAS: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(cdiv(Tk, BLOCK_N), B * Hk)``.

    QR ``[B, H, Tq, D]`` and KR ``[B, Hk, Tk, D]`` are the rotated q~ and k~ (``rotate_kernel``);
    K the raw keys (for the pull-back through the rotation). Writes DK, DV ``[B, Hk, Tk, D]``
    (input dtype) and the key-side partials DLogThetaK, DRadiusK, DPitchK ``[B, Hk, Tk]``
    float32 (summed over the group's heads). Other arguments as ``attention_fwd_kernel``;
    Lse, Delta ``[B, H, Tq]`` float32.
    """
    HEAD_P: tl.constexpr = HEAD_DIM // 2
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    kv_heads = H // GROUPS
    b = pid_bh // kv_heads
    kv_head = pid_bh % kv_heads
    q_len = tl.minimum(tl.load(QLengths + b), Tq)  # a length past T must not read past the tensors
    k_len = tl.minimum(tl.load(KLengths + b), Tk)
    qk_scale = sm_scale * LOG2E

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < k_len
    k_rows = row_offsets(b, kv_head, kv_heads, Tk, offs_n)
    fk_offs = b.to(tl.int64) * Tk + offs_n

    # Everything below is key-major ([BLOCK_N, BLOCK_M] tiles, the transpose of the
    # forward's), so that dV and dK~ accumulate as plain dots without transposing P or dS.
    k = load_rows(KR, k_rows, n_valid, HEAD_DIM)
    v = load_rows(V, k_rows, n_valid, HEAD_DIM)
    if BIAS != 0:
        pitch_k, voiced_k = load_pitch(PitchK, VoicedK, fk_offs, n_valid)
        beta = tl.load(Beta)
        neg_beta_log2e = -beta * LOG2E

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dpitch_k = tl.zeros([BLOCK_N], tl.float32)

    # Query rows that can see this key tile: all of them, or under the causal mask those
    # with i >= j - (Lk - Lq) (start at the Q tile holding the first such row).
    start = 0
    if CAUSAL:
        start = tl.maximum(start_n - (k_len - q_len), 0) // BLOCK_M * BLOCK_M
    end = tl.where(start_n < k_len, q_len, 0)
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < q_len
        fq_offs = b.to(tl.int64) * Tq + offs_m
        allowed = allowed_tile(offs_m[None, :], offs_n[:, None], q_len, k_len, CAUSAL)
        if BIAS != 0:
            # Keys are the rows here: the query's voicing is the column factor.
            pitch_q, voiced_q = load_pitch(PitchQ, VoicedQ, fq_offs, m_valid)
            # The pair weights are shared by the group's heads: one exponential per pair.
            weight = pair_weight(pitch_k[:, None], pitch_q[None, :], voiced_q[None, :], neg_beta_log2e, BIAS)
        # The group's query heads in a fixed order: dK, dV of a shared kv head are summed
        # here, in registers, instead of with atomics.
        for g in range(GROUPS):
            h = kv_head * GROUPS + g
            q_rows = row_offsets(b, h, H, Tq, offs_m)
            q = load_rows(QR, q_rows, m_valid, HEAD_DIM)
            do = load_rows(DOut, q_rows, m_valid, HEAD_DIM)
            lse, delta = load_row_stats(Lse, Delta, q_rows, m_valid)

            bias_log2 = 0.0
            if BIAS != 0:
                alpha = tl.load(Alpha + h)
                bias_log2 = bias_coefficient(voiced_k, alpha, beta, BIAS)[:, None] * weight
            s_t = tl.where(allowed, score_tile(k, q, qk_scale, bias_log2, DOT_PRECISION, BIAS), float("-inf"))
            p_t = tl.exp2(s_t - lse[None, :])
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
            if BIAS != 0:
                _g_alpha, _g_beta, g_pitch = pitch_grad_tiles(
                    weight, pitch_k[:, None], pitch_q[None, :], voiced_q[None, :], BIAS
                )
                _s_alpha, _s_beta, s_pitch = pitch_grad_scales(voiced_k, alpha, beta, BIAS)
                dpitch_k += s_pitch * tl.sum(ds_t * g_pitch, axis=1)

    in_bounds = offs_n < Tk
    # dV first: its registers are free before the pull-back below needs its own.
    store_rows(DV, k_rows, in_bounds, dv, HEAD_DIM)
    # dL/dk~ = scale * dS^T q~; pull it back through the key rotation.
    dk_even, dk_odd, dlog_theta, dradius = unrotate(
        dk * sm_scale, K, k_rows, PosK, LogThetaK, RadiusK, fk_offs, n_valid, BLOCK_N, HEAD_P
    )
    store_halves(DK, k_rows, in_bounds, dk_even, dk_odd, HEAD_P)
    tl.store(DLogThetaK + k_rows, dlog_theta, mask=in_bounds)
    tl.store(DRadiusK + k_rows, dradius, mask=in_bounds)
    tl.store(DPitchK + k_rows, dpitch_k, mask=in_bounds)


@triton.jit
def dq_kernel(
    Q, QR, KR, V, DOut, Lse, Delta,
    DQ, DLogThetaQ, DRadiusQ, DPitchQ, DAlphaRows, DBetaRows,
    PosQ, LogThetaQ, RadiusQ, PitchQ, VoicedQ,
    PosK, LogThetaK, RadiusK, PitchK, VoicedK,
    Alpha, Beta, QLengths, KLengths,
    sm_scale,
    H, GROUPS, Tq, Tk,
    HEAD_DIM: tl.constexpr, BIAS: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(cdiv(Tq, BLOCK_M), B * H)``.

    Q the raw queries, QR / KR the rotated q~ / k~. Writes DQ ``[B, H, Tq, D]`` (input
    dtype) and float32 ``[B, H, Tq]`` partials: DLogThetaQ, DRadiusQ, DPitchQ (per head,
    summed over keys) and DAlphaRows, DBetaRows (each row's contribution to dalpha_h and dbeta).
    """
    HEAD_P: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kv_head = h // GROUPS
    q_len = tl.minimum(tl.load(QLengths + b), Tq)  # a length past T must not read past the tensors
    k_len = tl.minimum(tl.load(KLengths + b), Tk)
    qk_scale = sm_scale * LOG2E

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_valid = offs_m < q_len
    q_rows = row_offsets(b, h, H, Tq, offs_m)
    fq_offs = b.to(tl.int64) * Tq + offs_m

    q = load_rows(QR, q_rows, m_valid, HEAD_DIM)
    do = load_rows(DOut, q_rows, m_valid, HEAD_DIM)
    lse, delta = load_row_stats(Lse, Delta, q_rows, m_valid)
    if BIAS != 0:
        pitch_q, voiced_q = load_pitch(PitchQ, VoicedQ, fq_offs, m_valid)
        alpha = tl.load(Alpha + h)
        beta = tl.load(Beta)
        neg_beta_log2e = -beta * LOG2E
        bias_coef_q = bias_coefficient(voiced_q, alpha, beta, BIAS)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Bias row sums: sum_j ds * g for the three ``pitch_grad_tiles``, sum_j p * g for the
    # same tiles and sum_j p * dp (see the delta correction after the loop); the row's
    # ``pitch_grad_scales`` multiply them once at the end.
    dalpha = tl.zeros([BLOCK_M], tl.float32)
    dbeta = tl.zeros([BLOCK_M], tl.float32)
    dpitch_q = tl.zeros([BLOCK_M], tl.float32)
    if BIAS != 0:
        p_alpha = tl.zeros([BLOCK_M], tl.float32)
        p_beta = tl.zeros([BLOCK_M], tl.float32)
        p_pitch = tl.zeros([BLOCK_M], tl.float32)
        p_dp = tl.zeros([BLOCK_M], tl.float32)

    kv_base = row_offsets(b, kv_head, H // GROUPS, Tk, 0)
    end_n = key_loop_end(start_m, q_len, k_len, BLOCK_M, CAUSAL)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < k_len
        k_rows = kv_base + offs_n
        fk_offs = b.to(tl.int64) * Tk + offs_n
        k = load_rows(KR, k_rows, n_valid, HEAD_DIM)
        v = load_rows(V, k_rows, n_valid, HEAD_DIM)

        bias_log2 = 0.0
        if BIAS != 0:
            pitch_k, voiced_k = load_pitch(PitchK, VoicedK, fk_offs, n_valid)
            weight = pair_weight(pitch_q[:, None], pitch_k[None, :], voiced_k[None, :], neg_beta_log2e, BIAS)
            bias_log2 = bias_coef_q[:, None] * weight
        allowed = allowed_tile(offs_m[:, None], offs_n[None, :], q_len, k_len, CAUSAL)
        s = tl.where(allowed, score_tile(q, k, qk_scale, bias_log2, DOT_PRECISION, BIAS), float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        if BIAS != 0:
            g_alpha, g_beta, g_pitch = pitch_grad_tiles(weight, pitch_q[:, None], pitch_k[None, :], voiced_k[None, :], BIAS)
            dalpha += tl.sum(ds * g_alpha, axis=1)
            dbeta += tl.sum(ds * g_beta, axis=1)
            dpitch_q += tl.sum(ds * g_pitch, axis=1)
            p_alpha += tl.sum(p * g_alpha, axis=1)
            p_beta += tl.sum(p * g_beta, axis=1)
            p_pitch += tl.sum(p * g_pitch, axis=1)
            p_dp += tl.sum(p * dp, axis=1)

    if BIAS != 0:
        # sum_j ds_ij = 0 in exact arithmetic, so these row sums, which add up over every
        # row of the batch into dalpha and dbeta, amplify an error in delta. delta comes
        # from the stored output, rounded to fp16/bf16; sum_j p dp = dO . O in float32 is
        # the value autograd uses. ds with the better delta is ds + p * (delta - p_dp).
        correction = delta - p_dp
        s_alpha, s_beta, s_pitch = pitch_grad_scales(voiced_q, alpha, beta, BIAS)
        dalpha = s_alpha * (dalpha + correction * p_alpha)
        dbeta = s_beta * (dbeta + correction * p_beta)
        dpitch_q = s_pitch * (dpitch_q + correction * p_pitch)

    # dL/dq~ = scale * dS k~; pull it back through the query rotation.
    dq_even, dq_odd, dlog_theta, dradius = unrotate(
        dq * sm_scale, Q, q_rows, PosQ, LogThetaQ, RadiusQ, fq_offs, m_valid, BLOCK_M, HEAD_P
    )
    in_bounds = offs_m < Tq
    store_halves(DQ, q_rows, in_bounds, dq_even, dq_odd, HEAD_P)
    tl.store(DLogThetaQ + q_rows, dlog_theta, mask=in_bounds)
    tl.store(DRadiusQ + q_rows, dradius, mask=in_bounds)
    tl.store(DPitchQ + q_rows, dpitch_q, mask=in_bounds)
    tl.store(DAlphaRows + q_rows, dalpha, mask=in_bounds)
    tl.store(DBetaRows + q_rows, dbeta, mask=in_bounds)
