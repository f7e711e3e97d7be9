"""``@triton.jit`` building blocks shared by the forward and backward kernels.

One way to do each thing: the rotation tables, the split-layout rotation and its
inverse, the allowed-mask, the pitch bias and its gradient, and the score tile all
live here so the forward and both backward kernels cannot drift apart.

Conventions (every kernel):

* q/k/v/o and their gradients are contiguous ``[B, heads, T, D]``; a token's row starts
  at ``((b * heads + head) * T + t) * D``. Offsets are built in int64.
* A head-dim tile is handled as two ``[BLOCK, P]`` half tiles (P = D / 2): the even
  columns ``2m`` and the odd columns ``2m + 1`` of the interleaved layout, loaded with
  stride-2 pointers. The rotation then needs no shuffles and a score is
  ``dot(q_even, k_even^T) + dot(q_odd, k_odd^T)``.
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
def load_halves(ptr, rows, mask, HEAD_P: tl.constexpr, RELOAD: tl.constexpr = False):
    """Even and odd columns ``[BLOCK, P]`` (input dtype) of rows ``rows`` (int64 row indices, D = 2P).

    ``RELOAD``: volatile loads, which the compiler may not merge with an earlier identical load.
    """
    offs_p = tl.arange(0, HEAD_P)
    base = ptr + rows[:, None] * (2 * HEAD_P) + 2 * offs_p[None, :]
    even = tl.load(base, mask=mask[:, None], other=0.0, volatile=RELOAD)
    odd = tl.load(base + 1, mask=mask[:, None], other=0.0, volatile=RELOAD)
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
def rotation_tables(pos_ptr, log_theta_ptr, radius_ptr, feat_offs, mask, HEAD_P: tl.constexpr,
                    RELOAD: tl.constexpr = False):
    """Per-token rotation of a tile, all float32.

    ``phi[t, m] = pos_t * exp(-(2m / D) * log_theta_t)`` exactly as ``reference.rotation_angles``
    (2 / D is a power of two, so the factor rounds the same way). Returns
    ``(cos [BLOCK, P], sin [BLOCK, P], phi [BLOCK, P], radius [BLOCK])``; masked tokens get
    phi = 0 and radius = 0. ``RELOAD`` as in ``load_halves``.
    """
    pos = tl.load(pos_ptr + feat_offs, mask=mask, other=0.0, volatile=RELOAD)
    log_theta = tl.load(log_theta_ptr + feat_offs, mask=mask, other=0.0, volatile=RELOAD)
    radius = tl.load(radius_ptr + feat_offs, mask=mask, other=0.0, volatile=RELOAD)
    m = tl.arange(0, HEAD_P).to(tl.float32)
    omega = tl.exp(-(m * (1.0 / HEAD_P))[None, :] * log_theta[:, None])
    phi = pos[:, None] * omega
    return tl.cos(phi), tl.sin(phi), phi, radius


@triton.jit
def rotate_unit(even, odd, cos, sin):
    """Unit-radius rotation of each (even, odd) pair, float32 ``[BLOCK, P]`` halves."""
    e = even.to(tl.float32)
    o = odd.to(tl.float32)
    return e * cos - o * sin, e * sin + o * cos


@triton.jit
def rotate(even, odd, cos, sin, radius):
    """``radius * rotation`` of a half-tile pair, cast back to the input dtype for the tensor cores."""
    ue, uo = rotate_unit(even, odd, cos, sin)
    r = radius[:, None]
    return (r * ue).to(even.dtype), (r * uo).to(even.dtype)


@triton.jit
def unrotate(ge, go, even, odd, cos, sin, phi, radius, HEAD_P: tl.constexpr):
    """Pull ``g = dL/d(rotated x)`` (float32 split halves) back through the rotation.

    Mirrors ``chunked.unrotate`` for one tile: returns ``(dx_even, dx_odd [BLOCK, P],
    dlog_theta [BLOCK], dradius [BLOCK])``. ``dL/dr = <g, unit rotation>`` (no division
    by r); ``dL/dphi_m = r * (go * ue - ge * uo)`` (the pair turned by 90 degrees), and
    ``dphi_m / dlog_theta = -(2m / D) * phi_m``.
    """
    ue, uo = rotate_unit(even, odd, cos, sin)
    r = radius[:, None]
    dradius = tl.sum(ge * ue + go * uo, axis=1)
    dphi = r * (go * ue - ge * uo)
    m = tl.arange(0, HEAD_P).to(tl.float32)
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
def pitch_bias(pitch_q, voiced_q, pitch_k, voiced_k, alpha, beta, BIAS: tl.constexpr):
    """Float32 bias tile in natural units: 1 = exp, 2 = l1 (callers skip BIAS = 0).

    Query/key features are broadcastable 2-D (see ``allowed_tile``).
    """
    dist = tl.abs(pitch_q - pitch_k)
    both = voiced_q * voiced_k
    if BIAS == 1:
        bias = alpha * tl.exp(-beta * dist) * both
    else:
        bias = -alpha * beta * dist * both
    return bias


@triton.jit
def pitch_bias_grad_factors(pitch_q, voiced_q, pitch_k, voiced_k, alpha, beta, BIAS: tl.constexpr):
    """The bias gradient per unit of ``ds = dL/dscores`` (natural units), as ``chunked.bias_block_grads``.

    The bias gradients are linear in ds, so a caller forms ``ds * factor`` and sums.
    Returns float32 tiles ``(f_alpha, f_beta, f_pair)``: summed over keys, ``ds * f_alpha``
    / ``ds * f_beta`` / ``ds * f_pair`` are a query row's share of dalpha_h / dbeta /
    dpitch_q, and ``-ds * f_pair`` summed over queries is dpitch_k. d|x|/dx at 0 is 0
    (pitch ties pass nothing), as torch.abs does. Features broadcastable 2-D.
    """
    delta = pitch_q - pitch_k
    dist = tl.abs(delta)
    sign = tl.where(delta > 0, 1.0, tl.where(delta < 0, -1.0, 0.0))
    both = voiced_q * voiced_k
    if BIAS == 1:
        weight = tl.exp(-beta * dist) * both
        f_alpha = weight
    else:
        weight = both
        f_alpha = -beta * (weight * dist)
    f_beta = -alpha * (weight * dist)
    f_pair = -beta * alpha * weight * sign
    return f_alpha, f_beta, f_pair


@triton.jit
def score_tile(ae, ao, be, bo, qk_scale, bias_log2, allowed, DOT_PRECISION: tl.constexpr, BIAS: tl.constexpr):
    """Masked scores in log2 units, float32 ``[rows of a, rows of b]``, from rotated half tiles.

    ``dot(a_even, b_even^T) + dot(a_odd, b_odd^T)``: (a, b) = (q, k) gives the query-major
    tile, (k, q) its transpose. ``qk_scale`` is ``scale * log2(e)``; ``bias_log2`` the pitch
    bias times log2(e) (ignored when BIAS = 0). Disallowed entries are -inf.
    """
    s = tl.dot(ae, tl.trans(be), input_precision=DOT_PRECISION)
    s = tl.dot(ao, tl.trans(bo), s, input_precision=DOT_PRECISION)
    s = s * qk_scale
    if BIAS != 0:
        s = s + bias_log2
    return tl.where(allowed, s, float("-inf"))
