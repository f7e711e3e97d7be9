"""Memory-efficient PyTorch backend: flash-style forward and backward over key blocks.

Nothing here allocates ``[Tq, Tk]``: each step sees one block of keys, so the extra
memory is ``O(B * H * Tq * KEY_BLOCK)``. The backward is written out by hand (not
left to autograd, which would keep every block alive) and is the readable
statement of the maths the fused kernels implement:

* rotation in the "split" layout: even columns then odd columns, so a score is
  ``dot(q_even, k_even) + dot(q_odd, k_odd)`` with no interleaving shuffles;
* ``dS = P * (dP - rowsum(dO * O))``, then ``dq~ = scale * dS @ k~``, ``dk~ = scale * dS^T @ q~``;
* per-token gradients of radius and log-theta from ``dq~`` (see ``unrotate``), and
  of pitch, alpha and beta from ``dS`` (see ``bias_block_grads``).

Works on any device; it is what ``backend="auto"`` uses when no compiled kernel serves.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .features import PitchFeatures
from .reference import neutral_padding, rotation_angles, zero_padding

NAME = "chunked"
KEY_BLOCK = 128


class Grads(NamedTuple):
    """Everything a backend's backward returns (feature grads are ``[B, T]`` summed over heads)."""

    dq: Tensor
    dk: Tensor
    dv: Tensor
    dlog_theta_q: Tensor
    dradius_q: Tensor
    dpitch_q: Tensor
    dlog_theta_k: Tensor
    dradius_k: Tensor
    dpitch_k: Tensor
    dalpha: Tensor
    dbeta: Tensor


def unavailable_reason() -> str | None:
    return None


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor, bias: int, causal: bool) -> str | None:
    return None


class Rotated(NamedTuple):
    """A rotated tensor in split layout plus what its backward needs (all in stat dtype)."""

    split: Tensor  # [B, H, T, D]: r * rotated even columns, then odd columns
    cos: Tensor  # [B, 1, T, P]
    sin: Tensor
    phi: Tensor
    radius: Tensor  # [B, 1, T, 1]


def rotate(x: Tensor, feats: PitchFeatures) -> Rotated:
    """Rotate ``x [B, H, T, D]`` by ``polar(radius, phi)`` per pair; returns split layout."""
    stat = feats.pos.dtype
    phi = rotation_angles(feats.pos, feats.log_theta, x.shape[-1])[:, None]
    cos, sin = phi.cos(), phi.sin()
    radius = feats.radius[:, None, :, None]
    even, odd = x[..., 0::2].to(stat), x[..., 1::2].to(stat)
    split = torch.cat((radius * (even * cos - odd * sin), radius * (even * sin + odd * cos)), dim=-1)
    return Rotated(split, cos, sin, phi, radius)


def unrotate(grad_split: Tensor, x: Tensor, rot: Rotated, kv_groups: int = 1):
    """Pull ``dL/d(rotated x)`` (split layout) back to x and to the token's radius and log-theta.

    ``kv_groups > 1`` means ``grad_split`` has one head per query head and x is a
    shared key/value head: the group's gradients are summed in a fixed order.

    Returns ``(dx [B, Hx, T, D] in stat dtype, dlog_theta [B, T], dradius [B, T])``.
    """
    batch, heads, length, dim = grad_split.shape
    half = dim // 2
    ge, go = grad_split[..., :half], grad_split[..., half:]
    even, odd = x[..., 0::2].to(ge.dtype), x[..., 1::2].to(ge.dtype)
    if kv_groups > 1:
        even = even.repeat_interleave(kv_groups, dim=1)
        odd = odd.repeat_interleave(kv_groups, dim=1)
    unit_e = even * rot.cos - odd * rot.sin
    unit_o = even * rot.sin + odd * rot.cos
    dradius = (ge * unit_e + go * unit_o).sum(dim=(1, 3))
    # d(rotated)/d(phi) turns each pair by 90 degrees: (-odd, even) of the rotated pair.
    dphi = (rot.radius * (go * unit_e - ge * unit_o)).sum(dim=1)
    m = torch.arange(half, device=x.device, dtype=ge.dtype)
    dlog_theta = (dphi * rot.phi[:, 0] * (-2.0 * m / dim)).sum(dim=-1)
    dx = torch.empty(batch, heads, length, dim, device=x.device, dtype=ge.dtype)
    dx[..., 0::2] = rot.radius * (ge * rot.cos + go * rot.sin)
    dx[..., 1::2] = rot.radius * (go * rot.cos - ge * rot.sin)
    if kv_groups > 1:
        dx = dx.view(batch, heads // kv_groups, kv_groups, length, dim).sum(dim=2)
    return dx, dlog_theta, dradius


def bias_block(
    fq: PitchFeatures, fk: PitchFeatures, sl: slice, alpha: Tensor, beta: Tensor, bias: int
) -> Tensor | None:
    """Pitch bias for all queries against keys ``sl``: ``[B, H, Tq, block]`` (None for no bias)."""
    if bias == 0:
        return None
    dist = (fq.pitch[:, None, :, None] - fk.pitch[:, None, None, sl]).abs()
    both = fq.voiced[:, None, :, None] * fk.voiced[:, None, None, sl]
    a = alpha[None, :, None, None]
    if bias == 1:
        return a * torch.exp(-beta * dist) * both
    return -a * beta * dist * both


def bias_block_grads(ds: Tensor, fq: PitchFeatures, fk: PitchFeatures, sl: slice, alpha, beta, bias: int):
    """Gradients of the bias on one key block, from ``ds = dL/dscores [B, H, Tq, block]``.

    Returns ``(dalpha [H], dbeta [], dpitch_q [B, Tq], dpitch_k [B, block])``. The
    derivative of ``|x|`` at 0 is taken as 0, as torch.abs does (ties pass nothing).
    """
    delta = fq.pitch[:, None, :, None] - fk.pitch[:, None, None, sl]
    dist, sign = delta.abs(), delta.sign()
    both = fq.voiced[:, None, :, None] * fk.voiced[:, None, None, sl]
    a = alpha[None, :, None, None]
    if bias == 1:
        weighted = ds * torch.exp(-beta * dist) * both
        dalpha = weighted.sum(dim=(0, 2, 3))
        dbeta = -(a * weighted * dist).sum()
        dpair = -beta * a * weighted * sign
    else:
        weighted = ds * both
        dalpha = -beta * (weighted * dist).sum(dim=(0, 2, 3))
        dbeta = -(a * weighted * dist).sum()
        dpair = -beta * a * weighted * sign
    return dalpha, dbeta, dpair.sum(dim=(1, 3)), -dpair.sum(dim=(1, 2))


def block_allowed(tq: int, sl: slice, q_lengths: Tensor, k_lengths: Tensor, causal: bool, device) -> Tensor:
    """Boolean ``[B, 1, Tq, block]`` mask of the contract's ``allowed_ij`` for keys ``sl``."""
    i = torch.arange(tq, device=device)[None, :, None]
    j = torch.arange(sl.start, sl.stop, device=device)[None, None, :]
    lq, lk = q_lengths[:, None, None], k_lengths[:, None, None]
    allowed = (i < lq) & (j < lk)
    if causal:
        allowed = allowed & (j <= i + lk - lq)
    return allowed[:, None]


def _scores(qs, ks, fq, fk, sl, alpha, beta, bias, causal, q_lengths, k_lengths, scale):
    """Float scores of all queries against key block ``sl``, masked with -inf."""
    s = (qs @ ks[:, :, sl].transpose(-1, -2)).to(fq.pos.dtype) * scale
    b = bias_block(fq, fk, sl, alpha, beta, bias)
    if b is not None:
        s = s + b
    allowed = block_allowed(qs.shape[2], sl, q_lengths, k_lengths, causal, qs.device)
    return s.masked_fill(~allowed, float("-inf"))


def _key_blocks(tk: int):
    for start in range(0, tk, KEY_BLOCK):
        yield slice(start, min(start + KEY_BLOCK, tk))


def forward(q, k, v, fq, fk, alpha, beta, bias, causal, q_lengths, k_lengths, scale):
    """Returns ``(out [B, H, Tq, D] q.dtype, lse [B, H, Tq] stat dtype, -inf on empty rows)``."""
    q, k, v = zero_padding(q, q_lengths), zero_padding(k, k_lengths), zero_padding(v, k_lengths)
    fq, fk = neutral_padding(fq, q_lengths), neutral_padding(fk, k_lengths)
    groups = q.shape[1] // k.shape[1]
    stat = fq.pos.dtype
    qs = rotate(q, fq).split.to(q.dtype)
    ks = rotate(k, fk).split.to(k.dtype).repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    batch, heads, tq, _ = q.shape
    row_max = torch.full((batch, heads, tq), float("-inf"), device=q.device, dtype=stat)
    row_sum = torch.zeros(batch, heads, tq, device=q.device, dtype=stat)
    acc = torch.zeros(batch, heads, tq, v.shape[-1], device=q.device, dtype=stat)
    for sl in _key_blocks(k.shape[2]):
        s = _scores(qs, ks, fq, fk, sl, alpha, beta, bias, causal, q_lengths, k_lengths, scale)
        new_max = torch.maximum(row_max, s.amax(dim=-1))
        # Rows that have seen no allowed key yet keep max -inf; shift them by 0 instead.
        shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        p = torch.exp(s - shift[..., None])
        correction = torch.exp(row_max - shift)
        row_sum = row_sum * correction + p.sum(dim=-1)
        acc = acc * correction[..., None] + (p.to(v.dtype) @ v[:, :, sl]).to(stat)
        row_max = new_max
    nonempty = row_sum > 0
    out = torch.where(nonempty[..., None], acc / row_sum.clamp(min=1e-30)[..., None], torch.zeros_like(acc))
    lse = torch.where(nonempty, row_max + row_sum.clamp(min=1e-30).log(), torch.full_like(row_max, float("-inf")))
    return out.to(q.dtype), lse


def _delta_from_probabilities(score_args, mask_args, lse_safe, do, vx) -> Tensor:
    """``delta_i = sum_j P_ij dP_ij`` in the stat dtype, one extra pass over the key blocks.

    ``rowsum(dO * O)`` equals it in exact arithmetic, but O is stored rounded to
    fp16/bf16. Every row of dS sums to 0, so the gradients that sum dS over all pairs
    (alpha, beta, pitch) would add up that rounding over every row of the batch.
    """
    delta = torch.zeros_like(lse_safe)
    for sl in _key_blocks(vx.shape[2]):
        p = torch.exp(_scores(*score_args, sl, *mask_args) - lse_safe[..., None])
        delta += (p * (do @ vx[:, :, sl].transpose(-1, -2))).sum(dim=-1)
    return delta


def backward(dout, q, k, v, out, lse, fq, fk, alpha, beta, bias, causal, q_lengths, k_lengths, scale) -> Grads:
    """Gradients of every differentiable input (see ``Grads``), in stat dtype except dq/dk/dv."""
    q, k, v = zero_padding(q, q_lengths), zero_padding(k, k_lengths), zero_padding(v, k_lengths)
    fq, fk = neutral_padding(fq, q_lengths), neutral_padding(fk, k_lengths)
    dout = zero_padding(dout, q_lengths)
    groups = q.shape[1] // k.shape[1]
    stat = fq.pos.dtype
    rq, rk = rotate(q, fq), rotate(k, fk)
    qs = rq.split
    ks = rk.split.repeat_interleave(groups, dim=1)
    vx = v.to(stat).repeat_interleave(groups, dim=1)
    do = dout.to(stat)
    # exp(s - (+inf)) = 0 keeps empty rows (lse = -inf) out of every gradient.
    lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)
    score_args = (qs, ks, fq, fk)
    mask_args = (alpha, beta, bias, causal, q_lengths, k_lengths, scale)
    if out.dtype.itemsize < stat.itemsize:
        delta = _delta_from_probabilities(score_args, mask_args, lse_safe, do, vx)
    else:
        delta = (do * out.to(stat)).sum(dim=-1)
    dqs = torch.zeros_like(qs)
    dks = torch.zeros_like(ks)
    dvx = torch.zeros_like(vx)
    dalpha = torch.zeros_like(alpha)
    dbeta = torch.zeros((), device=q.device, dtype=stat)
    dpitch_q = torch.zeros_like(fq.pitch)
    dpitch_k = torch.zeros_like(fk.pitch)
    for sl in _key_blocks(k.shape[2]):
        s = _scores(*score_args, sl, *mask_args)
        p = torch.exp(s - lse_safe[..., None])
        dvx[:, :, sl] = p.transpose(-1, -2) @ do
        ds = p * (do @ vx[:, :, sl].transpose(-1, -2) - delta[..., None])
        dqs += scale * (ds @ ks[:, :, sl])
        dks[:, :, sl] = scale * (ds.transpose(-1, -2) @ qs)
        if bias:
            da, db, dpq, dpk = bias_block_grads(ds, fq, fk, sl, alpha, beta, bias)
            dalpha += da
            dbeta += db
            dpitch_q += dpq
            dpitch_k[:, sl] += dpk
    dq, dlt_q, dr_q = unrotate(dqs, q, rq)
    dk, dlt_k, dr_k = unrotate(dks, k, rk, groups)
    dv = dvx.view(v.shape[0], v.shape[1], groups, *v.shape[2:]).sum(dim=2)
    return Grads(
        dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
        dlt_q, dr_q, dpitch_q, dlt_k, dr_k, dpitch_k, dalpha, dbeta,
    )
