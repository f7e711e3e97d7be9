"""What a user would run instead of echo_kernels, for the same pitch-aware attention or less.

* ``sdpa``: ``scaled_dot_product_attention`` with no rotation and no bias, the speed
  of light for our work (PyTorch's flash kernel on GPU, its flash CPU kernel on CPU).
* ``sdpa_rope_bias``: the same maths as ours written the usual way: a separate
  rotation op, then SDPA with a materialised float ``[B, H, Tq, Tk]`` bias mask.
* ``flex``: ``flex_attention`` compiled, the bias as a ``score_mod`` reading pitch
  vectors, the rotation by a separate op.
* ``upstream``: the research code's eager style: ``torch.polar`` tables rebuilt per
  call, complex rotation, a dense bias and a plain softmax.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from echo_kernels.chunked import rotate
from echo_kernels.reference import allowed_mask, pitch_bias, reference_attention


def _split_to_interleaved(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.stack((x[..., :half], x[..., half:]), dim=-1).flatten(-2)


def rotate_op(x, feats):
    """The rotation as a separate op (what a user would write before calling SDPA)."""
    return _split_to_interleaved(rotate(x, feats).split).to(x.dtype)


def sdpa(inp):
    return F.scaled_dot_product_attention(inp.q, inp.k, inp.v, is_causal=inp.causal, enable_gqa=True)


def sdpa_rope_bias(inp):
    q, k = rotate_op(inp.q, inp.fq), rotate_op(inp.k, inp.fk)
    bias = pitch_bias(inp.fq, inp.fk, inp.alpha, inp.beta, "exp")
    allowed = allowed_mask(q.shape[2], k.shape[2], inp.q_lengths, inp.k_lengths, inp.causal, q.device)
    mask = bias.masked_fill(~allowed, float("-inf")).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, inp.v, attn_mask=mask, enable_gqa=True)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex(inp):
    from torch.nn.attention.flex_attention import create_block_mask

    pq, pk = inp.fq.pitch, inp.fk.pitch
    vq, vk = inp.fq.voiced, inp.fk.voiced
    alpha, beta = inp.alpha, inp.beta

    def pitch_score(score, b, h, i, j):
        return score + alpha[h] * torch.exp(-beta * (pq[b, i] - pk[b, j]).abs()) * vq[b, i] * vk[b, j]

    block_mask = None
    if inp.causal:
        block_mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, inp.q.shape[2], inp.k.shape[2],
                                       device=inp.q.device)
    q, k = rotate_op(inp.q, inp.fq), rotate_op(inp.k, inp.fk)
    return _compiled_flex()(q, k, inp.v, score_mod=pitch_score, block_mask=block_mask, enable_gqa=True)


def upstream(inp):
    return reference_attention(inp.q, inp.k, inp.v, inp.fq, inp.fk, inp.alpha, inp.beta, "exp", inp.causal,
                               inp.q_lengths, inp.k_lengths, inp.q.shape[-1] ** -0.5)


BASELINES = {"sdpa": sdpa, "sdpa_rope_bias": sdpa_rope_bias, "flex": flex, "upstream": upstream}
