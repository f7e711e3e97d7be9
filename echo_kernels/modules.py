"""``RopeAttention``: a drop-in multi-head attention layer with pitch-aware rotary attention."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .dispatch import BACKENDS
from .features import (
    PitchFeatures,
    check_f0,
    check_feature_options,
    check_lengths,
    feature_dtype,
    side_features,
    type_name,
)
from .interface import rope_attention
from .reference import check_bias_kind


@dataclass
class KVCache:
    """Keys and values ``[B, Hk, S, D]`` (unrotated: the kernels rotate them) and f0 ``[B, S]`` (None
    without f0) of the S tokens a self-attention layer has seen, from :meth:`RopeAttention.new_cache`.
    ``forward(..., cache=cache)`` appends to it; :meth:`reorder` follows a beam search."""

    k: Tensor | None = None
    v: Tensor | None = None
    f0: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index [B']`` (beam search: each hypothesis takes its parent's cache)."""
        if self.k is None:
            raise ValueError("an empty cache has no rows to reorder: run the prompt through the layer first")
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)
        if self.f0 is not None:
            self.f0 = self.f0.index_select(0, index)


class RopeAttention(nn.Module):
    """Multi-head attention whose rotary base, radius and logit bias follow the speech's f0.

    Args:
        dim: model width; ``dim % num_heads == 0`` and ``dim // num_heads`` even.
        num_heads: query heads H. num_kv_heads: key/value heads (GQA/MQA), default H.
        bias: ``"exp" | "l1" | None`` pitch-similarity bias.
        theta, theta_mode, radius_mode: how f0 becomes features (see ``pitch_features``).
        learnable_theta: learn a scalar offset added to every token's log-theta.
        cross: keys/values come from ``context`` (cross-attention) instead of ``x``.
        backend: passed to ``rope_attention``.
        rotary: False turns the rotation off (every position 0); radius and bias still apply.

    Parameters: ``alpha [H]`` (init 1), ``beta = softplus(beta_raw)`` (init 1),
    ``log_theta_offset`` (scalar, init 0).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        bias: str | None = "exp",
        theta: float = 10000.0,
        theta_mode: str = "f0",
        radius_mode: str = "f0",
        learnable_theta: bool = True,
        cross: bool = False,
        backend: str = "auto",
        rotary: bool = True,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("dim", dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type_name(value)}")
        dim, num_heads, num_kv_heads = int(dim), int(num_heads), int(num_kv_heads)
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        head_dim = dim // num_heads
        if head_dim % 2:
            raise ValueError(f"head dim dim // num_heads must be even for rotary pairs, got {head_dim}")
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        check_bias_kind(bias)
        check_feature_options(theta, theta_mode, radius_mode)
        if backend not in BACKENDS + ("auto",):
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.bias, self.theta, self.theta_mode, self.radius_mode = bias, theta, theta_mode, radius_mode
        self.cross, self.backend, self.rotary = cross, backend, rotary
        # Whisper's choice: no bias on the key projection (it would cancel in the softmax).
        self.q_proj = nn.Linear(dim, num_heads * head_dim)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim)
        self.out_proj = nn.Linear(num_heads * head_dim, dim)
        self.alpha = nn.Parameter(torch.ones(num_heads))
        self.beta_raw = nn.Parameter(torch.tensor(math.log(math.expm1(1.0))))
        if learnable_theta:
            self.log_theta_offset = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("log_theta_offset", torch.zeros(()), persistent=False)

    def extra_repr(self) -> str:
        kv = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        cross = ", cross=True" if self.cross else ""
        return (f"dim={self.dim}, num_heads={self.num_heads}{kv}, bias={self.bias!r}, theta={self.theta:g}, "
                f"theta_mode={self.theta_mode!r}, radius_mode={self.radius_mode!r}, rotary={self.rotary}{cross}, "
                f"backend={self.backend!r}")

    @property
    def beta(self) -> Tensor:
        """The positive bias sharpness, ``softplus(beta_raw)``."""
        return F.softplus(self.beta_raw)

    def features(
        self, f0: Tensor | None, batch: int, length: int, lengths: Tensor | None, dtype, device, name: str = "f0",
        values_checked: bool = False,
    ) -> PitchFeatures:
        """The per-token features this layer uses for one side (f0 named ``name`` in errors), offset applied."""
        feats = side_features(
            f0, batch, length, lengths=lengths, name=name, theta=self.theta, theta_mode=self.theta_mode,
            radius_mode=self.radius_mode, dtype=dtype, device=device, values_checked=values_checked,
        )
        if not self.rotary:
            feats = feats._replace(pos=torch.zeros_like(feats.pos))
        return feats._replace(log_theta=feats.log_theta + self.log_theta_offset.to(dtype))

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        f0: Tensor | None = None,
        *,
        context: Tensor | None = None,
        f0_context: Tensor | None = None,
        causal: bool = False,
        lengths: Tensor | None = None,
        context_lengths: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x ``[B, T, dim]``, f0 ``[B, T]`` Hz; context ``[B, S, dim]`` for cross. Returns ``[B, T, dim]``.

        ``cache`` (self-attention, from :meth:`new_cache`): x and f0 are the newest T tokens of
        sequences whose earlier tokens the cache holds; they attend to those and (causal) to each
        other, with the features of the whole sequence so far: each call gives the last T rows of
        a causal pass over the sequence so far (whose pitch statistics are those of its tokens).
        The cache is extended in place.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, T, {self.dim}], got {tuple(x.shape)}")
        if cache is not None:
            return self._forward_cached(x, f0, cache, causal, lengths)
        if self.cross and context is None:
            raise ValueError("context is required: this RopeAttention was built with cross=True")
        if not self.cross and (context is not None or f0_context is not None or context_lengths is not None):
            raise ValueError("context / f0_context / context_lengths are only for cross=True layers (use lengths)")
        source = context if self.cross else x
        if source.dim() != 3 or source.shape[-1] != self.dim or source.shape[0] != x.shape[0]:
            raise ValueError(f"context must have shape [{x.shape[0]}, S, {self.dim}], got {tuple(source.shape)}")
        batch, length, _ = x.shape
        if lengths is not None:
            check_lengths(lengths, batch, length, "lengths")
        if self.cross and context_lengths is not None:
            check_lengths(context_lengths, batch, source.shape[1], "context_lengths")
        q, k, v = self._project(x, source)
        stat = feature_dtype(q.dtype)
        fq = self.features(f0, batch, length, lengths, stat, x.device)
        if self.cross:
            fk = self.features(f0_context, batch, source.shape[1], context_lengths, stat, x.device, "f0_context")
            k_lengths = context_lengths
        else:
            fk, k_lengths = fq, lengths
        return self._attend(q, k, v, fq, fk, causal, lengths, k_lengths)

    def _project(self, x: Tensor, source: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q ``[B, H, T, Dh]`` of x, k and v ``[B, Hk, S, Dh]`` of source."""
        return (self._heads(self.q_proj(x), self.num_heads), self._heads(self.k_proj(source), self.num_kv_heads),
                self._heads(self.v_proj(source), self.num_kv_heads))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, fq: PitchFeatures, fk: PitchFeatures, causal: bool,
                q_lengths: Tensor | None = None, k_lengths: Tensor | None = None) -> Tensor:
        """The layer's attention of projected q over k, v, through out_proj: ``[B, T, dim]``."""
        batch, _, length, _ = q.shape
        out = rope_attention(
            q, k, v, features=fq, features_k=fk, bias=self.bias, alpha=self.alpha, beta=self.beta,
            causal=causal, q_lengths=q_lengths, k_lengths=k_lengths, backend=self.backend,
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))

    def new_cache(self) -> KVCache:
        """An empty key/value cache for decoding with ``forward(..., cache=...)``."""
        return KVCache()

    def _forward_cached(self, x: Tensor, f0: Tensor | None, cache: KVCache, causal: bool,
                        lengths: Tensor | None) -> Tensor:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must come from RopeAttention.new_cache(), got {type_name(cache)}")
        if self.cross:
            raise ValueError("cache is for self-attention; a cross-attention layer's keys do not grow")
        if lengths is not None:
            raise ValueError("lengths cannot be combined with cache: every sequence gains the same tokens")
        batch, length, _ = x.shape
        seen = len(cache)
        if seen and (cache.k.shape[0] != batch or (cache.f0 is None) != (f0 is None)):
            raise ValueError(
                f"this cache holds {cache.k.shape[0]} sequences {'with' if cache.f0 is not None else 'without'} "
                f"f0; got x for {batch} {'with' if f0 is not None else 'without'} f0"
            )
        q, k, v = self._project(x, x)
        if seen:
            k, v = torch.cat([cache.k, k], 2), torch.cat([cache.v, v], 2)
        if f0 is not None:
            if seen and isinstance(f0, Tensor) and f0.is_floating_point():
                f0 = f0.to(cache.f0)  # checked in the dtype it joins the cache in (float16 overflows sooner)
            check_f0(f0)
            if f0.shape != (batch, length):
                raise ValueError(f"f0 must have shape [{batch}, {length}] like x's tokens, got {tuple(f0.shape)}")
            f0 = f0 if not seen else torch.cat([cache.f0, f0], 1)
        # The cached f0 was checked when its tokens were new: only the new tokens' values are read.
        fk = self.features(f0, batch, seen + length, None, feature_dtype(q.dtype), x.device, values_checked=True)
        fq = PitchFeatures(*(f[:, seen:] for f in fk))
        out = self._attend(q, k, v, fq, fk, causal)
        cache.k, cache.v, cache.f0 = k, v, f0
        return out
