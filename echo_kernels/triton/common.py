"""``@triton.jit`` building blocks shared by the rotation, forward and backward kernels.

One way to do each thing: the rotation angles, the rotation and its inverse, the
allowed-mask, the pitch bias and its gradient, and the score tile all live here so the
kernels cannot drift apart.

Conventions (every kernel):

* q/k/v/o and their gradients are contiguous ``[B, heads, T, D]``; a token's row starts
  at ``((b * heads + head) * T + t) * D``. Offsets are built in int64.
* Rotated rows ("q~", "k~": ``radius * R(phi) x``) keep the interleaved layout of the
  inputs (pair m in columns 2m, 2m + 1), in the input dtype. Queries and keys are
  rotated once per call by ``rotate_kernel`` into buffers, so the attention loops load
  plain tiles and a score is one ``tl.dot(q~, k~^T)`` over the full head dim.
* Gradients through the rotation are taken once per program, on two ``[BLOCK, P]`` half
  tiles (P = D / 2): the even and the odd columns.
* Feature vectors are contiguous float32 ``[B, T]``.
* Scores are kept in log2 units (``s * log2(e)``) so the softmax can use ``exp2``.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Globals read inside @triton.jit code must be tl.constexpr (the GPU compiler refuses plain
# floats; the interpreter would not notice). Host code uses ``LOG2E.value``.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): natural-log scores -> exp2 domain
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log2-sum-exp -> natural log-sum-exp


@triton.jit
def row_offsets(b, head, heads, length, offs_t):
    """int64 ``[BLOCK]`` offsets of rows ``offs_t`` of ``(b, head)`` in a ``[B, heads, T, D]`` tensor, in rows."""
    return (b * heads + head).to(tl.int64) * length + offs_t


@triton.jit
def load_rows(ptr, rows, mask, HEAD_DIM: tl.constexpr):
    """``[BLOCK, D]`` rows ``rows`` (int64 row indices) in the stored dtype; masked rows read 0.

    ``mask=None``: every row is known to be in bounds (saves the predicate on each copy).
    """
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = ptr + rows[:, None] * HEAD_DIM + offs_d[None, :]
    if mask is None:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=mask[:, None], other=0.0)
    return x


@triton.jit
def load_pitch(pitch_ptr, voiced_ptr, feat_offs, mask):
    """``(pitch, voiced)`` float32 ``[BLOCK]`` at ``feat_offs``; masked tokens read 0 (unvoiced).

    ``mask=None``: every token is known to be in bounds.
    """
    if mask is None:
        pitch = tl.load(pitch_ptr + feat_offs)
        voiced = tl.load(voiced_ptr + feat_offs)
    else:
        pitch = tl.load(pitch_ptr + feat_offs, mask=mask, other=0.0)
        voiced = tl.load(voiced_ptr + feat_offs, mask=mask, other=0.0)
    return pitch, voiced


@triton.jit
def store_rows(ptr, rows, mask, x, HEAD_DIM: tl.constexpr):
    """Write a ``[BLOCK, D]`` tile to rows ``rows``, cast to the buffer's dtype."""
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], x.to(ptr.dtype.element_ty), mask=mask[:, None])


@triton.jit
def load_halves(ptr, rows, mask, HEAD_P: tl.constexpr):
    """Even and odd columns ``[BLOCK, P]`` (stored dtype) of rows ``rows`` (D = 2P)."""
    offs_p = tl.arange(0, HEAD_P)
    base = ptr + rows[:, None] * (2 * HEAD_P) + 2 * offs_p[None, :]
    even = tl.load(base, mask=mask[:, None], other=0.0)
    odd = tl.load(base + 1, mask=mask[:, None], other=0.0)
    return even, odd


@triton.jit
def store_halves(ptr, rows, mask, even, odd, HEAD_P: tl.constexpr):
    """Write two ``[BLOCK, P]`` half tiles back to the interleaved columns of rows ``rows``."""
    offs_p = tl.arange(0, HEAD_P)
    base = ptr + rows[:, None] * (2 * HEAD_P) + 2 * offs_p[None, :]
    dtype = ptr.dtype.element_ty
    tl.store(base, even.to(dtype), mask=mask[:, None])
    tl.store(base + 1, odd.to(dtype), mask=mask[:, None])


@triton.jit
def load_features(pos_ptr, log_theta_ptr, radius_ptr, feat_offs, mask):
    """``(pos, log_theta, radius)`` float32 ``[BLOCK]``; masked tokens read 0 (so radius 0)."""
    pos = tl.load(pos_ptr + feat_offs, mask=mask, other=0.0)
    log_theta = tl.load(log_theta_ptr + feat_offs, mask=mask, other=0.0)
    radius = tl.load(radius_ptr + feat_offs, mask=mask, other=0.0)
    return pos, log_theta, radius


@triton.jit
def rotation_angles(pos, log_theta, pair, HEAD_P: tl.constexpr):
    """``phi[t, c] = pos_t * exp(-(2 m_c / D) * log_theta_t)``, float32 ``[BLOCK, len(pair)]``.

    ``pair`` holds each column's pair index m (float32). Exactly as
    ``reference.rotation_angles``: 2 / D is a power of two, so the factor rounds the same way.
    """
    omega = tl.exp(-(pair * (1.0 / HEAD_P))[None, :] * log_theta[:, None])
    return pos[:, None] * omega


@triton.jit
def load_rotated(ptr, rows, pos_ptr, log_theta_ptr, radius_ptr, feat_offs, mask,
                 BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """``radius * R(phi) x`` of rows ``rows``: ``[BLOCK, D]`` in x's dtype, interleaved layout.

    Column c pairs with c ^ 1, so a second load with the partner columns gives the
    rotation without any shuffle: ``x~_c = r (x_c cos - x_{c^1} sin)`` on even c and
    ``r (x_c cos + x_{c^1} sin)`` on odd c. The sines and cosines are computed once per
    pair and duplicated across its two columns. Masked rows come out 0.
    """
    HEAD_P: tl.constexpr = HEAD_DIM // 2
    offs_d = tl.arange(0, HEAD_DIM)
    x = tl.load(ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask[:, None], other=0.0)
    partner = tl.load(ptr + rows[:, None] * HEAD_DIM + (offs_d ^ 1)[None, :], mask=mask[:, None], other=0.0)
    pos, log_theta, radius = load_features(pos_ptr, log_theta_ptr, radius_ptr, feat_offs, mask)
    phi = rotation_angles(pos, log_theta, tl.arange(0, HEAD_P).to(tl.float32), HEAD_P)
    cos = tl.cos(phi)
    sin = tl.sin(phi)
    cos_cols = tl.reshape(tl.join(cos, cos), [BLOCK, HEAD_DIM])
    signed_sin_cols = tl.reshape(tl.join(-sin, sin), [BLOCK, HEAD_DIM])
    unit = x.to(tl.float32) * cos_cols + partner.to(tl.float32) * signed_sin_cols
    return (radius[:, None] * unit).to(x.dtype)


@triton.jit
def split_pairs(x, BLOCK: tl.constexpr, HEAD_P: tl.constexpr):
    """A ``[BLOCK, D]`` tile in the interleaved layout as its (even, odd) ``[BLOCK, P]`` halves."""
    return tl.split(tl.reshape(x, [BLOCK, HEAD_P, 2]))


@triton.jit
def unrotate(g, x_ptr, rows, pos_ptr, log_theta_ptr, radius_ptr, feat_offs, mask,
             BLOCK: tl.constexpr, HEAD_P: tl.constexpr):
    """Pull ``g = dL/dx~`` (float32 ``[BLOCK, D]``, interleaved) back through the rotation of x.

    Mirrors ``chunked.unrotate`` for one tile: returns ``(dx_even, dx_odd [BLOCK, P],
    dlog_theta [BLOCK], dradius [BLOCK])``. ``dL/dr = <g, unit rotation>`` (no division
    by r); ``dL/dphi_m = r * (go * ue - ge * uo)`` (the pair turned by 90 degrees), and
    ``dphi_m / dlog_theta = -(2m / D) * phi_m``.
    """
    ge, go = split_pairs(g, BLOCK, HEAD_P)
    even, odd = load_halves(x_ptr, rows, mask, HEAD_P)
    pos, log_theta, radius = load_features(pos_ptr, log_theta_ptr, radius_ptr, feat_offs, mask)
    m = tl.arange(0, HEAD_P).to(tl.float32)
    phi = rotation_angles(pos, log_theta, m, HEAD_P)
    cos = tl.cos(phi)
    sin = tl.sin(phi)
    e = even.to(tl.float32)
    o = odd.to(tl.float32)
    ue = e * cos - o * sin
    uo = e * sin + o * cos
    r = radius[:, None]
    dradius = tl.sum(ge * ue + go * uo, axis=1)
    dphi = r * (go * ue - ge * uo)
    dlog_theta = tl.sum(dphi * phi * (-(m * (1.0 / HEAD_P)))[None, :], axis=1)
    dx_even = r * (ge * cos + go * sin)
    dx_odd = r * (go * cos - ge * sin)
    return dx_even, dx_odd, dlog_theta, dradius


@triton.jit
def allowed_tile(i, j, q_len, k_len, CAUSAL: tl.constexpr):
    """The contract's ``allowed_ij`` (bottom-right causal per batch) on a 2-D tile.

    ``i`` (query indices) and ``j`` (key indices) are broadcastable 2-D index tensors:
    ``[BLOCK_M, 1]`` and ``[1, BLOCK_N]`` give a query-major tile, ``[1, BLOCK_M]`` and
    ``[BLOCK_N, 1]`` its transpose (the dK/dV kernel works key-major). The same holds for
    every pairwise helper below.
    """
    allowed = (i < q_len) & (j < k_len)
    if CAUSAL:
        allowed = allowed & (j <= i + (k_len - q_len))
    return allowed


@triton.jit
def pair_weight(pitch_row, pitch_col, voiced_col, neg_beta_log2e, BIAS: tl.constexpr):
    """The pair weight ``w`` (float32) without the row token's voicing.

    The bias is ``bias_coefficient(row) * w`` and the pitch-bias gradients are row sums
    of ``pitch_grad_tiles`` times ``pitch_grad_scales(row)``: every factor that belongs to
    the row token (its voicing, alpha, beta, log2 e) is applied once per row, not per pair.
    exp: ``w = exp2(-beta log2(e) |dp|) v_col`` (``exp2``: no denormal fix-up, unlike
    ``exp``); l1: ``w = |dp| v_col``. ``neg_beta_log2e = -beta * log2(e)``. Shared by
    the bias and its gradient: one exponential per pair. (Folding the voicing into the
    exponent as ``+ log2 v_col`` saves the multiply but costs a software log2 per column
    and thread, more than it saves.)

    (Tried and measured slower on an H100: factoring the exp weight per token as
    ``min(2^-e_i 2^e_j, 2^e_i 2^-e_j)``, which needs a per-tile range check and branch;
    the forward went from 0.88 to 1.43 ms at T = 2048, see
    benchmarks/results/gpu-h100-20261126/README.md.)
    """
    dist = tl.abs(pitch_row - pitch_col)
    if BIAS == 1:
        weight = tl.exp2(neg_beta_log2e * dist) * voiced_col
    else:
        weight = dist * voiced_col
    return weight


@triton.jit
def bias_coefficient(voiced_row, alpha, beta, BIAS: tl.constexpr):
    """Per-row factor (float32, shaped like ``voiced_row``) taking ``pair_weight`` to the bias in log2 units.

    exp: ``alpha v_row log2(e)``; l1: ``-alpha beta v_row log2(e)``.
    """
    if BIAS == 1:
        coefficient = (alpha * LOG2E) * voiced_row
    else:
        coefficient = (-alpha * beta * LOG2E) * voiced_row
    return coefficient


@triton.jit
def pitch_grad_tiles(weight, pitch_row, pitch_col, voiced_col, BIAS: tl.constexpr):
    """Per-pair tiles ``(g_alpha, g_beta, g_pitch)`` of the bias gradient, without the row's factors.

    With ``ds = dL/dscores`` (natural units), the row token's share of dalpha_h, dbeta and
    dpitch_row is ``sum over columns (ds * g) * pitch_grad_scales(row)``: the gradients
    are linear in ds, so a caller sums ``ds * g`` and scales once per row. Symmetric in
    the roles: with queries as rows it gives dpitch_q, with keys as rows dpitch_k.
    d|x|/dx at 0 is 0 (pitch ties pass nothing), as torch.abs does. ``weight`` from
    ``pair_weight`` with the same rows and columns.
    """
    delta = pitch_row - pitch_col
    sign = tl.where(delta > 0, 1.0, tl.where(delta < 0, -1.0, 0.0))
    if BIAS == 1:
        # bias = alpha v_row w, w = v_col exp(-beta |dp|): d/dbeta brings -alpha |dp|,
        # d/dpitch_row brings -alpha beta sign(dp).
        g_beta = weight * tl.abs(delta)
        g_pitch = weight * sign
    else:
        # bias = -alpha beta v_row w, w = |dp| v_col.
        g_beta = weight
        g_pitch = voiced_col * sign
    return weight, g_beta, g_pitch


@triton.jit
def pitch_grad_scales(voiced_row, alpha, beta, BIAS: tl.constexpr):
    """Per-row factors ``(s_alpha, s_beta, s_pitch)`` of ``pitch_grad_tiles``' row sums."""
    s_pitch = (-alpha * beta) * voiced_row
    if BIAS == 1:
        s_alpha = voiced_row
    else:
        s_alpha = -beta * voiced_row
    s_beta = -alpha * voiced_row
    return s_alpha, s_beta, s_pitch


@triton.jit
def score_tile(a, b, qk_scale, bias_log2, DOT_PRECISION: tl.constexpr, BIAS: tl.constexpr):
    """Unmasked scores in log2 units, float32 ``[rows of a, rows of b]``, from rotated tiles.

    ``dot(a, b^T)``: (a, b) = (q~, k~) gives the query-major tile, (k~, q~) its transpose.
    ``qk_scale`` is ``scale * log2(e)``; ``bias_log2`` the pitch bias in log2 units
    (ignored when BIAS = 0). Callers set disallowed entries to -inf (``allowed_tile``).
    """
    s = tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION) * qk_scale
    if BIAS != 0:
        s = s + bias_log2
    return s
