"""The rotation kernel (q~, k~ for the forward and the backward) and the flash-style forward.

``rotate_kernel`` writes ``radius * R(phi) x`` once per token (O(T D) work and memory), so
the attention kernels load rotated tiles as plain rows: no sines or cosines in any
attention loop, and the forward and the backward see the very same q~ and k~ bits.

``attention_fwd_kernel``: one program owns ``BLOCK_M`` query rows of one (batch, head).
It loads its q~ tile once, then walks the key tiles that can matter (stopping at ``Lk``
and at the causal diagonal) with an exp2 online softmax. Key tiles wholly inside every
row's allowed range skip the mask; only the tiles at the length or the diagonal pay for
it. Nothing of size ``[Tq, Tk]`` ever exists outside registers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    LN2,
    LOG2E,
    allowed_tile,
    bias_coefficient,
    load_pitch,
    load_rotated,
    load_rows,
    pair_weight,
    row_offsets,
    score_tile,
    store_rows,
)
from .configs import FWD_KEYS, forward_configs, prune_configs


@triton.jit
def rotate_kernel(X, XR, Pos, LogTheta, Radius, Lengths, heads, T,
                  HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Grid ``(cdiv(T, BLOCK), B * heads)``: XR = rotated X (both ``[B, heads, T, D]``, X's dtype).

    Tokens at or past their batch's length are written as 0.
    """
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    head = pid_bh % heads
    offs_t = pid_t * BLOCK + tl.arange(0, BLOCK)
    length = tl.load(Lengths + b)
    rows = row_offsets(b, head, heads, T, offs_t)
    feat_offs = b.to(tl.int64) * T + offs_t
    # min(length, T): a length past T (unchecked under torch.compile) must not read past X.
    valid = offs_t < tl.minimum(length, T)
    rotated = load_rotated(X, rows, Pos, LogTheta, Radius, feat_offs, valid, BLOCK, HEAD_DIM)
    store_rows(XR, rows, offs_t < T, rotated, HEAD_DIM)


@triton.jit
def key_loop_end(start_m, q_len, k_len, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last key any row of the query tile ``start_m`` may see (<= 0: none)."""
    end = k_len
    if CAUSAL:
        # The tile's last row i = start_m + BLOCK_M - 1 sees keys j <= i + Lk - Lq.
        end = tl.minimum(end, start_m + BLOCK_M + k_len - q_len)
    # A tile made only of padded query rows sees nothing.
    return tl.where(start_m < q_len, end, 0)


@triton.jit
def unmasked_key_end(start_m, q_len, k_len, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key tiles ``[0, end)`` are allowed for every query row ``i >= start_m`` (a multiple of BLOCK_N).

    Rows past ``Lq`` in such tiles compute finite scores the caller discards at the end.
    """
    end = k_len
    if CAUSAL:
        # The tile's first row i = start_m sees keys j <= start_m + Lk - Lq.
        end = tl.minimum(end, start_m + 1 + k_len - q_len)
    return tl.maximum(end, 0) // BLOCK_N * BLOCK_N


@triton.jit
def attend_key_tiles(
    acc, row_max, row_sum, q, offs_m, start, end,
    KR, V, PitchK, VoicedK, kv_base, fk_base,
    pitch_q, bias_coef_q, neg_beta_log2e, qk_scale, q_len, k_len,
    HEAD_DIM: tl.constexpr, BIAS: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):
    """Online softmax over key tiles ``[start, end)``; returns the updated ``(acc, row_max, row_sum)``.

    ``kv_base`` / ``fk_base``: int64 row offset of key 0 of this (b, kv head) / feature
    offset of key 0 of batch b. ``bias_coef_q``: ``bias_coefficient`` of the query rows.
    ``MASKED``: apply the length and causal mask (the tiles at the edges); otherwise
    every pair in the range is known to be allowed and every key in bounds, so neither
    the loads nor the scores carry a mask.
    """
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_rows = kv_base + offs_n
        n_valid = None  # interior tiles: every key in bounds, no predicates
        if MASKED:
            n_valid = offs_n < k_len
        k = load_rows(KR, k_rows, n_valid, HEAD_DIM)
        bias_log2 = 0.0
        if BIAS != 0:
            pitch_k, voiced_k = load_pitch(PitchK + fk_base, VoicedK + fk_base, offs_n, n_valid)
            weight = pair_weight(pitch_q[:, None], pitch_k[None, :], voiced_k[None, :], neg_beta_log2e, BIAS)
            bias_log2 = bias_coef_q[:, None] * weight
        s = score_tile(q, k, qk_scale, bias_log2, DOT_PRECISION, BIAS)
        if MASKED:
            s = tl.where(allowed_tile(offs_m[:, None], offs_n[None, :], q_len, k_len, CAUSAL), s, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        if MASKED:
            # Rows that have seen no allowed key yet keep max -inf: shift them by 0 so that
            # exp2(-inf - shift) is 0 rather than exp2(-inf + inf) = NaN.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        else:
            shift = new_max
        p = tl.exp2(s - shift[:, None])
        correction = tl.exp2(row_max - shift)
        row_sum = row_sum * correction + tl.sum(p, axis=1)
        v = load_rows(V, k_rows, n_valid, HEAD_DIM)
        acc = acc * correction[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc, row_max, row_sum


@triton.autotune(configs=forward_configs(), key=FWD_KEYS, prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def attention_fwd_kernel(
    QR, KR, V, Out, Lse,
    PosQ, LogThetaQ, RadiusQ, PitchQ, VoicedQ,
    PosK, LogThetaK, RadiusK, PitchK, VoicedK,
    Alpha, Beta, QLengths, KLengths,
    qk_scale,
    H, GROUPS, Tq, Tk,
    TQ_BUCKET, TK_BUCKET,
    HEAD_DIM: tl.constexpr, BIAS: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(cdiv(Tq, BLOCK_M), B * H)``.

    QR ``[B, H, Tq, D]``, KR ``[B, Hk, Tk, D]`` (q~ and k~ from ``rotate_kernel``) and V
    ``[B, Hk, Tk, D]`` (input dtype; head h reads kv head h // GROUPS); features float32
    ``[B, T]`` (the rotation features are unused here); Alpha ``[H]`` and Beta ``[]`` float32;
    lengths int32 ``[B]``. Writes Out ``[B, H, Tq, D]`` (input dtype, 0 on rows with no
    allowed key) and Lse ``[B, H, Tq]`` float32 natural-log units, -inf on such rows.
    ``qk_scale = scale * log2(e)``. TQ_BUCKET / TK_BUCKET only key the autotuner.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kv_head = h // GROUPS
    # min(length, T): a length past T (unchecked under torch.compile) must not read past the tensors.
    q_len = tl.minimum(tl.load(QLengths + b), Tq)
    k_len = tl.minimum(tl.load(KLengths + b), Tk)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_valid = offs_m < q_len
    q_rows = row_offsets(b, h, H, Tq, offs_m)
    fq_offs = b.to(tl.int64) * Tq + offs_m

    q = load_rows(QR, q_rows, m_valid, HEAD_DIM)
    pitch_q = tl.zeros([BLOCK_M], tl.float32)
    bias_coef_q = tl.zeros([BLOCK_M], tl.float32)
    neg_beta_log2e = 0.0
    if BIAS != 0:
        pitch_q, voiced_q = load_pitch(PitchQ, VoicedQ, fq_offs, m_valid)
        beta = tl.load(Beta)
        bias_coef_q = bias_coefficient(voiced_q, tl.load(Alpha + h), beta, BIAS)
        neg_beta_log2e = -beta * LOG2E

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    kv_base = row_offsets(b, kv_head, H // GROUPS, Tk, 0)
    fk_base = b.to(tl.int64) * Tk

    end_n = key_loop_end(start_m, q_len, k_len, BLOCK_M, CAUSAL)
    full_end = tl.minimum(unmasked_key_end(start_m, q_len, k_len, BLOCK_N, CAUSAL), end_n)
    acc, row_max, row_sum = attend_key_tiles(
        acc, row_max, row_sum, q, offs_m, 0, full_end, KR, V, PitchK, VoicedK, kv_base, fk_base,
        pitch_q, bias_coef_q, neg_beta_log2e, qk_scale, q_len, k_len,
        HEAD_DIM, BIAS, CAUSAL, DOT_PRECISION, BLOCK_N, False,
    )
    acc, row_max, row_sum = attend_key_tiles(
        acc, row_max, row_sum, q, offs_m, full_end, end_n, KR, V, PitchK, VoicedK, kv_base, fk_base,
        pitch_q, bias_coef_q, neg_beta_log2e, qk_scale, q_len, k_len,
        HEAD_DIM, BIAS, CAUSAL, DOT_PRECISION, BLOCK_N, True,
    )

    # Padded query rows (i >= Lq) may have summed unmasked tiles: they are empty all the same.
    nonempty = (row_sum > 0.0) & m_valid
    safe_sum = tl.where(nonempty, row_sum, 1.0)
    out = tl.where(nonempty[:, None], acc / safe_sum[:, None], 0.0)
    lse = tl.where(nonempty, (row_max + tl.log2(safe_sum)) * LN2, float("-inf"))
    in_bounds = offs_m < Tq
    store_rows(Out, q_rows, in_bounds, out, HEAD_DIM)
    tl.store(Lse + q_rows, lse, mask=in_bounds)
