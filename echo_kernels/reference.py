"""The literal dense PyTorch form of the contract: the golden every backend is tested against.

It materialises the full ``[B, H, Tq, Tk]`` score matrix and rotates with complex
``torch.polar``, exactly as the contract writes it, and is differentiated by
autograd. Run in float64 it is the golden; run in a low precision it is the
"same-precision reference" of the FlashAttention error rule. Use ``"chunked"`` or
a fused backend for anything long.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .features import PitchFeatures

BIAS_KINDS = {None: 0, "exp": 1, "l1": 2}


def check_bias_kind(bias: object) -> None:
    """Raise unless ``bias`` is ``"exp"``, ``"l1"`` or None."""
    if not (bias is None or isinstance(bias, str)) or bias not in BIAS_KINDS:
        raise ValueError(f"bias must be 'exp', 'l1' or None, got {bias!r}")


def rotation_angles(pos: Tensor, log_theta: Tensor, head_dim: int) -> Tensor:
    """phi[b, t, m] = pos * exp(-(2m / D) * log_theta), ``[B, T, D/2]`` in the features' dtype."""
    m = torch.arange(head_dim // 2, device=pos.device, dtype=pos.dtype)
    omega = torch.exp(-(2.0 * m / head_dim) * log_theta[..., None])
    return pos[..., None] * omega


def _rotate_complex(x: Tensor, feats: PitchFeatures) -> Tensor:
    """``view_as_complex(x) * polar(radius, phi)`` on ``[B, H, T, D]``, computed in the features' dtype."""
    batch, heads, length, dim = x.shape
    phi = rotation_angles(feats.pos, feats.log_theta, dim)
    turn = torch.polar(feats.radius[..., None].expand_as(phi), phi)  # [B, T, P] complex
    xc = torch.view_as_complex(x.to(feats.pos.dtype).reshape(batch, heads, length, dim // 2, 2).contiguous())
    return torch.view_as_real(xc * turn[:, None]).reshape(batch, heads, length, dim).to(x.dtype)


def pitch_bias(
    fq: PitchFeatures, fk: PitchFeatures, alpha: Tensor, beta: Tensor, bias: str | None
) -> Tensor | None:
    """The additive logit term ``[B, H, Tq, Tk]`` (None when ``bias`` is None)."""
    if bias is None:
        return None
    dist = (fq.pitch[:, None, :, None] - fk.pitch[:, None, None, :]).abs()
    both_voiced = fq.voiced[:, None, :, None] * fk.voiced[:, None, None, :]
    a = alpha[None, :, None, None]
    if bias == "exp":
        return a * torch.exp(-beta * dist) * both_voiced
    return -a * beta * dist * both_voiced


def allowed_mask(
    tq: int, tk: int, q_lengths: Tensor, k_lengths: Tensor, causal: bool, device
) -> Tensor:
    """Boolean ``[B, 1, Tq, Tk]``: which keys each query may attend to.

    Padding sits at the end; the causal diagonal is aligned bottom-right per batch entry
    (query ``Lq - 1`` sees key ``Lk - 1``), as in FlashAttention.
    """
    i = torch.arange(tq, device=device)[None, :, None]
    j = torch.arange(tk, device=device)[None, None, :]
    lq = q_lengths.to(device)[:, None, None]
    lk = k_lengths.to(device)[:, None, None]
    allowed = (i < lq) & (j < lk)
    if causal:
        allowed = allowed & (j <= i + lk - lq)
    return allowed[:, None]


def zero_padding(x: Tensor, lengths: Tensor) -> Tensor:
    """``x`` ``[B, H, T, D]`` with every token at or past its batch entry's length set to 0.

    Padding may hold anything, NaN included (``torch.empty``, a reused buffer). The contract
    ignores it, but 0 * NaN = NaN would carry it through a product with masked-out
    probabilities. ``masked_fill`` (not a multiply) also gives those tokens a gradient of
    exactly 0 and stops a NaN gradient arriving there.
    """
    valid = torch.arange(x.shape[2], device=x.device) < lengths.to(x.device)[:, None]
    return x.masked_fill(~valid[:, None, :, None], 0)


def neutral_padding(feats: PitchFeatures, lengths: Tensor) -> PitchFeatures:
    """``feats`` with every token at or past its length at position 0, base 1, radius 1, unvoiced.

    Like the padding of q, k and v (see ``zero_padding``), the padding's features may hold
    anything: a rotation by an inf or NaN angle of a zeroed token is still NaN, and would reach
    valid tokens' gradients through products with masked-out probabilities.
    """
    pad = torch.arange(feats.pos.shape[1], device=feats.pos.device) >= lengths.to(feats.pos.device)[:, None]
    return PitchFeatures(
        pos=feats.pos.masked_fill(pad, 0),
        log_theta=feats.log_theta.masked_fill(pad, 0),
        radius=feats.radius.masked_fill(pad, 1),
        pitch=feats.pitch.masked_fill(pad, 0),
        voiced=feats.voiced.masked_fill(pad, 0),
    )


def masked_softmax(scores: Tensor, allowed: Tensor) -> Tensor:
    """Softmax over the last dim of float scores; rows with no allowed key give exactly 0.

    A fully masked row would be ``softmax([-inf, ...]) = NaN`` and its backward
    would poison every gradient, so such rows see a finite dummy row instead.
    """
    any_allowed = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    scores = torch.where(any_allowed, scores, torch.zeros_like(scores))
    return torch.where(any_allowed, torch.softmax(scores, dim=-1), torch.zeros_like(scores))


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: PitchFeatures,
    fk: PitchFeatures,
    alpha: Tensor,
    beta: Tensor,
    bias: str | None,
    causal: bool,
    q_lengths: Tensor,
    k_lengths: Tensor,
    scale: float,
) -> Tensor:
    """Dense vRoPE + pitch-bias attention.

    Shapes: q ``[B, H, Tq, D]``, k/v ``[B, Hk, Tk, D]``, features ``[B, T]``, alpha ``[H]``,
    beta 0-d, lengths integer ``[B]`` (tokens past them are ignored, whatever they hold).
    Returns ``[B, H, Tq, D]`` in q's dtype. Scores, bias and softmax are float32 (float64 for
    float64 inputs); the two matmuls run in the input dtype, as a fused kernel's tensor-core
    matmuls do.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    stat_dtype = fq.pos.dtype
    q, k, v = zero_padding(q, q_lengths), zero_padding(k, k_lengths), zero_padding(v, k_lengths)
    fq, fk = neutral_padding(fq, q_lengths), neutral_padding(fk, k_lengths)
    qr = _rotate_complex(q, fq)
    kr = _rotate_complex(k, fk).repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = (qr @ kr.transpose(-1, -2)).to(stat_dtype) * scale
    bias_term = pitch_bias(fq, fk, alpha, beta, bias)
    if bias_term is not None:
        scores = scores + bias_term
    allowed = allowed_mask(q.shape[2], k.shape[2], q_lengths, k_lengths, causal, q.device)
    probs = masked_softmax(scores, allowed)
    # Rows past Lq are 0 already; the fill keeps a gradient arriving there (padding) out of dV.
    return zero_padding((probs.to(v.dtype) @ v).to(q.dtype), q_lengths)
