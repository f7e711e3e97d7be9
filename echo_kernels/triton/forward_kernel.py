"""Forward kernel: flash-style vRoPE attention with the pitch bias computed on the fly.

One program owns ``BLOCK_M`` query rows of one (batch, head). It rotates its Q tile once,
then walks the key tiles that can matter (stopping at ``Lk`` and at the causal diagonal),
rotating each K tile as it is loaded, and keeps an exp2 online softmax. Nothing of size
``[Tq, Tk]`` ever exists outside registers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import LN2, LOG2E, allowed_tile, load_halves, pitch_bias, rotate, rotation_tables, row_offsets, score_tile
from .configs import FWD_KEYS, forward_configs, prune_configs


@triton.jit
def key_loop_end(start_m, q_len, k_len, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last key any row of the query tile ``start_m`` may see (<= 0: none)."""
    end = k_len
    if CAUSAL:
        # The tile's last row i = start_m + BLOCK_M - 1 sees keys j <= i + Lk - Lq.
        end = tl.minimum(end, start_m + BLOCK_M + k_len - q_len)
    # A tile made only of padded query rows sees nothing.
    return tl.where(start_m < q_len, end, 0)


@triton.autotune(configs=forward_configs(), key=FWD_KEYS, prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def attention_fwd_kernel(
    Q, K, V, Out, Lse,
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

    Q ``[B, H, Tq, D]``, K/V ``[B, Hk, Tk, D]`` (input dtype; head h reads kv head h // GROUPS);
    features float32 ``[B, T]``; Alpha ``[H]`` and Beta ``[]`` float32; lengths int32 ``[B]``.
    Writes Out ``[B, H, Tq, D]`` (input dtype, 0 on rows with no allowed key) and Lse
    ``[B, H, Tq]`` float32 natural-log units, -inf on such rows. ``qk_scale = scale * log2(e)``.
    TQ_BUCKET / TK_BUCKET only key the autotuner.
    """
    HEAD_P: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kv_head = h // GROUPS
    q_len = tl.load(QLengths + b)
    k_len = tl.load(KLengths + b)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_valid = offs_m < q_len
    q_rows = row_offsets(b, h, H, Tq, offs_m)
    fq_offs = b.to(tl.int64) * Tq + offs_m

    # Rotate the resident Q tile once; its tables are dead after this.
    cos_q, sin_q, _phi_q, radius_q = rotation_tables(PosQ, LogThetaQ, RadiusQ, fq_offs, m_valid, HEAD_P)
    q_even, q_odd = load_halves(Q, q_rows, m_valid, HEAD_P)
    qe, qo = rotate(q_even, q_odd, cos_q, sin_q, radius_q)
    if BIAS != 0:
        pitch_q = tl.load(PitchQ + fq_offs, mask=m_valid, other=0.0)
        voiced_q = tl.load(VoicedQ + fq_offs, mask=m_valid, other=0.0)
        alpha = tl.load(Alpha + h)
        beta = tl.load(Beta)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offs_d = tl.arange(0, HEAD_DIM)

    end_n = key_loop_end(start_m, q_len, k_len, BLOCK_M, CAUSAL)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < k_len
        k_rows = row_offsets(b, kv_head, H // GROUPS, Tk, offs_n)
        fk_offs = b.to(tl.int64) * Tk + offs_n
        cos_k, sin_k, _phi_k, radius_k = rotation_tables(PosK, LogThetaK, RadiusK, fk_offs, n_valid, HEAD_P)
        k_even, k_odd = load_halves(K, k_rows, n_valid, HEAD_P)
        ke, ko = rotate(k_even, k_odd, cos_k, sin_k, radius_k)

        bias_log2 = 0.0
        if BIAS != 0:
            pitch_k = tl.load(PitchK + fk_offs, mask=n_valid, other=0.0)
            voiced_k = tl.load(VoicedK + fk_offs, mask=n_valid, other=0.0)
            bias_log2 = pitch_bias(pitch_q[:, None], voiced_q[:, None], pitch_k[None, :], voiced_k[None, :], alpha, beta, BIAS) * LOG2E
        allowed = allowed_tile(offs_m[:, None], offs_n[None, :], q_len, k_len, CAUSAL)
        s = score_tile(qe, qo, ke, ko, qk_scale, bias_log2, allowed, DOT_PRECISION, BIAS)

        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        # Rows that have seen no allowed key yet keep max -inf: shift them by 0 so that
        # exp2(-inf - shift) is 0 rather than exp2(-inf + inf) = NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(s - shift[:, None])
        correction = tl.exp2(row_max - shift)
        row_sum = row_sum * correction + tl.sum(p, axis=1)
        v = tl.load(V + k_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        acc = acc * correction[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        row_max = new_max

    nonempty = row_sum > 0.0
    safe_sum = tl.where(nonempty, row_sum, 1.0)
    out = tl.where(nonempty[:, None], acc / safe_sum[:, None], 0.0)
    lse = tl.where(nonempty, (row_max + tl.log2(safe_sum)) * LN2, float("-inf"))
    in_bounds = offs_m < Tq
    tl.store(Out + q_rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=in_bounds[:, None])
    tl.store(Lse + q_rows, lse, mask=in_bounds)
