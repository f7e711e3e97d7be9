"""The Echo model: a pitch-aware encoder-decoder ASR transformer on ``echo_kernels.RopeAttention``.

Shapes: B batch, T mel frames (10 ms), T' = ceil(T / subsample) encoder frames, U tokens, d model width,
H heads, V vocabulary. f0 is in Hz with 0 meaning unvoiced, padding at the end of every sequence.

Design notes (why, not what):

* The encoder's self-attention gets the frame f0 downsampled to the encoder rate
  (:func:`echo.align.downsample_f0`), so its rotary base, radius and pitch bias follow the speech.
* The decoder's causal self-attention gets a *token-aligned* f0. Its pitch normalisation uses the
  utterance statistics of the encoder f0 (mean / std of voiced frames), not the token sequence,
  so a token's features never depend on later tokens: no look-ahead during training, and the
  features of cached keys stay valid while decoding. At inference a token's f0 is unknown, so it
  is estimated from where the last decoder layer's cross-attention looked when it predicted that
  token (the voiced-weighted mean encoder f0 under those weights); ``<bos>`` gets the utterance
  mean in training and decoding alike.
* Cross-attention is plain attention (no rotation, unit radius, no bias): encoder frames and
  tokens live on different time axes, so a relative rotation between them has no meaning.
* ``pitch=False`` feeds no f0 anywhere: every attention is plain RoPE with unit radius and no bias,
  the baseline for ablations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from echo.align import downsample_f0, lengths_to_mask
from echo.config import section_from_dict
from echo_kernels import PitchFeatures, RopeAttention, rope_attention

THETA_MODES = ("fixed", "f0", "mean_f0", "f0_offset")
RADIUS_MODES = ("unit", "f0")
BIAS_KINDS = ("exp", "l1", None)
DECODER_F0 = ("aligned", "attended", "mean", "none")
SUBSAMPLES = (2, 3, 4)


def _is_int(value: Any) -> bool:
    """A real int: bool is an int subclass, but ``True`` is no layer count or kernel width."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class EchoConfig:
    """Hyper-parameters of :class:`Echo` (all plain values, so it round-trips through YAML/JSON).

    ``pitch=False`` switches every pitch feature off (plain RoPE, unit radius, no bias), whatever
    ``theta_mode`` / ``radius_mode`` / ``bias`` say. ``decoder_f0``: a token's f0 in the decoder's
    self-attention. Decoding can only estimate it from the cross-attention that predicted the token
    (:meth:`Echo.estimate_token_f0`); training takes it from ``"aligned"``: equal spans of the
    utterance per token (:func:`echo.align.token_f0`), or ``"attended"``: the decoding estimate
    itself, from a first teacher-forced pass without gradients, so training and decoding see the
    same kind of value. ``"mean"``: the utterance mean for every token; ``"none"``: plain RoPE.
    ``ctc_weight`` in [0, 1): weight of the CTC loss on the encoder (0 builds no CTC head).
    ``subsample``: stride of the front end's second convolution, so an encoder frame is
    ``10 * subsample`` ms (2: Whisper's 20 ms; 3 and 4 make the encoder cheaper).
    ``conv_kernel``: odd width of a depthwise convolution over time inside each encoder block's
    MLP (0 = none): local context for little extra work.
    ``inter_ctc`` in [0, 1): intermediate CTC (Lee & Watanabe, 2021): the output of the middle
    encoder block, through the same final norm and CTC head, gets this share of the CTC loss,
    a deep-supervision signal that costs one extra head (needs ``ctc_weight`` > 0 and >= 2 layers).
    """

    n_mels: int = 80
    vocab_size: int = 42
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None
    enc_layers: int = 4
    dec_layers: int = 2
    ffn_dim: int = 1024
    conv_kernel: int = 0
    dropout: float = 0.1
    theta: float = 10000.0
    theta_mode: str = "f0"
    radius_mode: str = "f0"
    bias: str | None = "exp"
    learnable_theta: bool = True
    pitch: bool = True
    subsample: int = 2
    decoder_f0: str = "aligned"
    cross_rotary: bool = False
    ctc_weight: float = 0.3
    inter_ctc: float = 0.0
    label_smoothing: float = 0.1
    backend: str = "auto"
    max_decode_len: int = 300
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3

    def __post_init__(self) -> None:
        ints = ("n_mels", "vocab_size", "d_model", "n_heads", "enc_layers", "dec_layers", "ffn_dim", "max_decode_len")
        for name in ints:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"EchoConfig.{name} must be a positive int, got {value!r}")
        kernel = self.conv_kernel
        if not _is_int(kernel) or kernel < 0 or (kernel and kernel % 2 == 0):
            raise ValueError(f"conv_kernel must be 0 (none) or an odd positive int, got {self.conv_kernel!r}")
        if self.subsample not in SUBSAMPLES:
            raise ValueError(f"subsample must be one of {SUBSAMPLES}, got {self.subsample!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model ({self.d_model}) must be n_heads ({self.n_heads}) x an even head dim")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.theta_mode not in THETA_MODES:
            raise ValueError(f"theta_mode must be one of {THETA_MODES}, got {self.theta_mode!r}")
        if self.radius_mode not in RADIUS_MODES:
            raise ValueError(f"radius_mode must be one of {RADIUS_MODES}, got {self.radius_mode!r}")
        if self.bias not in BIAS_KINDS:
            raise ValueError(f"bias must be 'exp', 'l1' or null, got {self.bias!r}")
        if self.decoder_f0 not in DECODER_F0:
            raise ValueError(f"decoder_f0 must be one of {DECODER_F0}, got {self.decoder_f0!r}")
        if not 0.0 <= self.ctc_weight < 1.0:
            raise ValueError(f"ctc_weight must be in [0, 1), got {self.ctc_weight}")
        if not 0.0 <= self.inter_ctc < 1.0:
            raise ValueError(f"inter_ctc must be in [0, 1), got {self.inter_ctc}")
        if self.inter_ctc and (self.ctc_weight == 0 or self.enc_layers < 2):
            raise ValueError("inter_ctc > 0 needs a CTC head (ctc_weight > 0) and enc_layers >= 2")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("dropout and label_smoothing must be in [0, 1)")
        if self.theta <= 0:
            raise ValueError(f"theta must be positive, got {self.theta}")
        specials = (self.pad_id, self.bos_id, self.eos_id, self.unk_id)
        if len(set(specials)) != 4 or min(specials) < 0 or max(specials) >= self.vocab_size:
            raise ValueError("pad_id, bos_id, eos_id and unk_id must be distinct ids in [0, vocab_size)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EchoConfig:
        """Build from a mapping, refusing unknown keys (a typo must not silently fall back) and
        values of the wrong type (:func:`echo.config.section_from_dict`)."""
        return section_from_dict(cls, data, "model")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (YAML/JSON/checkpoint friendly)."""
        return asdict(self)


class F0Stats(NamedTuple):
    """Per-utterance statistics of the voiced encoder f0: mean, population std (1 with < 2 voiced
    frames) and whether any frame is voiced, each ``[B]``."""

    mean: Tensor
    std: Tensor
    has_voiced: Tensor


class EncoderOutput(NamedTuple):
    """Encoder states ``[B, T', d]``, their lengths ``[B]``, the encoder-rate f0 ``[B, T']`` (None when
    pitch is off), its :class:`F0Stats` (None when pitch is off) and, with ``inter_ctc``, the
    normalised output of the middle block ``[B, T', d]`` (else None)."""

    states: Tensor
    lengths: Tensor
    f0: Tensor | None
    stats: F0Stats | None
    middle: Tensor | None = None


def f0_stats(f0: Tensor, lengths: Tensor) -> F0Stats:
    """Voiced mean / std of ``f0 [B, T]`` over valid frames, the same statistics ``pitch_features`` uses."""
    voiced = lengths_to_mask(lengths, f0.shape[1]) & (f0 > 0)
    w = voiced.to(f0.dtype)
    n = w.sum(1)
    mean = (f0 * w).sum(1) / n.clamp(min=1.0)
    var = (((f0 - mean[:, None]) * w) ** 2).sum(1) / n.clamp(min=1.0)
    std = torch.where(n >= 2, var.sqrt(), torch.ones_like(var))
    return F0Stats(mean, std, n > 0)


def token_features(
    f0: Tensor, stats: F0Stats, cfg: EchoConfig, *, start: int = 0, lengths: Tensor | None = None
) -> PitchFeatures:
    """Decoder features for tokens ``start .. start + U - 1`` from their f0 ``[B, U]``.

    The same formulas as ``echo_kernels.pitch_features`` but normalised with the encoder's
    utterance statistics, and elementwise per token: computing a prefix token by token gives
    exactly the slice of the full computation (which is what makes the decoder cache exact).
    """
    batch, length = f0.shape
    f0 = f0.float()
    valid = torch.ones_like(f0, dtype=torch.bool) if lengths is None else lengths_to_mask(lengths, length)
    voiced = valid & (f0 > 0)
    mean, std = stats.mean[:, None], stats.std[:, None]
    pitch = torch.where(voiced, (f0 - mean) / (std + 1e-6), torch.zeros_like(f0))
    log_fixed = torch.full_like(f0, math.log(cfg.theta))
    fallback = torch.where(stats.has_voiced[:, None], mean.clamp(min=1e-6).log().expand_as(f0), log_fixed)
    if cfg.theta_mode == "fixed":
        log_theta = log_fixed
    elif cfg.theta_mode == "f0":
        log_theta = torch.where(voiced, f0.clamp(min=1e-6).log(), fallback)
    elif cfg.theta_mode == "mean_f0":
        log_theta = fallback
    else:  # f0_offset
        log_theta = (torch.where(voiced, f0, torch.zeros_like(f0)) + cfg.theta).log()
    radius = torch.ones_like(f0) if cfg.radius_mode == "unit" else f0.clamp(40.0, 600.0) / 600.0
    pos = (torch.arange(length, device=f0.device, dtype=f0.dtype) + start).expand(batch, length)
    return PitchFeatures(pos.contiguous(), log_theta, radius, pitch, voiced.to(f0.dtype))


def plain_features(batch: int, length: int, theta: float, device: torch.device, *, start: int = 0) -> PitchFeatures:
    """Features without f0 (plain RoPE): positions ``start..``, fixed base, unit radius, unvoiced."""
    pos = (torch.arange(length, device=device, dtype=torch.float32) + start).expand(batch, length).contiguous()
    zeros = torch.zeros(batch, length, device=device)
    return PitchFeatures(pos, torch.full_like(zeros, math.log(theta)), torch.ones_like(zeros), zeros, zeros.clone())


def layer_features(attn: RopeAttention, feats: PitchFeatures, dtype: torch.dtype) -> PitchFeatures:
    """Apply one layer's own settings to shared base features: its learnable log-theta offset and
    its rotary switch (mirrors ``RopeAttention.features``)."""
    feats = PitchFeatures(*(t.to(dtype) for t in feats))
    if not attn.rotary:
        feats = feats._replace(pos=torch.zeros_like(feats.pos))
    return feats._replace(log_theta=feats.log_theta + attn.log_theta_offset.to(dtype))


def _heads(x: Tensor, heads: int) -> Tensor:
    """``[B, T, heads * D] -> [B, heads, T, D]``."""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def project_kv(attn: RopeAttention, source: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values ``[B, Hk, S, D]`` of ``source [B, S, d]`` with ``attn``'s projections."""
    return _heads(attn.k_proj(source), attn.num_kv_heads), _heads(attn.v_proj(source), attn.num_kv_heads)


def project_q(attn: RopeAttention, x: Tensor) -> Tensor:
    """Queries ``[B, H, T, D]`` of ``x [B, T, d]`` with ``attn``'s projection."""
    return _heads(attn.q_proj(x), attn.num_heads)


def attend(
    attn: RopeAttention, q: Tensor, k: Tensor, v: Tensor, fq: PitchFeatures, fk: PitchFeatures, *,
    causal: bool, q_lengths: Tensor | None = None, k_lengths: Tensor | None = None,
) -> Tensor:
    """``attn``'s attention of queries ``q`` (:func:`project_q`) over given keys/values, through its
    output projection: ``[B, Tq, d]``.

    Same computation as ``RopeAttention.forward`` but with caller-supplied q/k/v and features, which
    the decoder needs for its key/value cache, its prefix-consistent token features and the queries
    it also reads the cross-attention weights with.
    """
    batch, _, length, _ = q.shape
    if _is_plain(attn, fq, fk):
        return attn.out_proj(_plain_attention(q, k, v, q_lengths, k_lengths).reshape(batch, length, -1))
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = rope_attention(
        q, k, v, features=layer_features(attn, fq, stat), features_k=layer_features(attn, fk, stat),
        bias=attn.bias, alpha=attn.alpha, beta=attn.beta, causal=causal, q_lengths=q_lengths,
        k_lengths=k_lengths, backend=attn.backend,
    )
    return attn.out_proj(out.transpose(1, 2).reshape(batch, length, attn.num_heads * attn.head_dim))


def _is_plain(attn: RopeAttention, fq: PitchFeatures, fk: PitchFeatures) -> bool:
    """True when the layer computes ordinary attention: no rotation, no bias, unit radius (our
    cross-attention). Then SDPA gives the same result as the pitch kernel, several times faster on CPU."""
    return (not attn.rotary and attn.bias is None and attn.radius_mode == "unit"
            and bool((fq.radius == 1).all()) and bool((fk.radius == 1).all()))


def _plain_attention(q: Tensor, k: Tensor, v: Tensor, q_lengths: Tensor | None, k_lengths: Tensor | None) -> Tensor:
    """SDPA over valid keys, ``[B, H, Tq, D] -> [B, Tq, H, D]``; padded query rows are 0 as in the contract."""
    _, heads, tq, _ = q.shape
    tk = k.shape[2]
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    mask = None
    if k_lengths is not None:
        mask = lengths_to_mask(k_lengths.to(q.device), tk)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    if q_lengths is not None:
        rows = lengths_to_mask(q_lengths.to(q.device), tq)
        out = out * rows[..., None, None].to(out.dtype)
    return out


def _rotate_pairs(x: Tensor, feats: PitchFeatures) -> Tensor:
    """Rotated and scaled ``x [B, H, T, D]`` as ``[B, H, T, D]`` with the even parts first, then
    the odd parts (dot products are unchanged by that permutation)."""
    half = x.shape[-1] // 2
    m = torch.arange(half, device=x.device, dtype=feats.pos.dtype)
    omega = torch.exp(-(2.0 * m / x.shape[-1]) * feats.log_theta[..., None])  # [B, T, P]
    phi = feats.pos[..., None] * omega
    cos, sin, r = phi.cos()[:, None], phi.sin()[:, None], feats.radius[:, None, :, None]
    xe, xo = x[..., 0::2].to(phi.dtype), x[..., 1::2].to(phi.dtype)
    return torch.cat([r * (xe * cos - xo * sin), r * (xe * sin + xo * cos)], dim=-1)


def rotated_keys(k: Tensor, fk: PitchFeatures, heads: int) -> Tensor:
    """Keys ``k [B, Hk, Tk, D]`` repeated to the queries' ``heads`` and rotated as
    :func:`dense_attention_weights` multiplies them: ``[B, heads, Tk, D]``."""
    return _rotate_pairs(k.repeat_interleave(heads // k.shape[1], dim=1), fk)


def dense_attention_weights(
    attn: RopeAttention, q: Tensor, k: Tensor, fq: PitchFeatures, fk: PitchFeatures, *,
    causal: bool = False, q_lengths: Tensor | None = None, k_lengths: Tensor | None = None,
    k_rotated: Tensor | None = None,
) -> Tensor:
    """Softmax weights ``[B, H, Tq, Tk]`` by the dense contract formula (for display and for the
    decoder's f0 estimate; never under autograd in training). q ``[B, H, Tq, D]``, k ``[B, Hk, Tk, D]``;
    ``fq``/``fk`` must already carry the layer's settings (see :func:`layer_features`).
    ``k_rotated``: :func:`rotated_keys` of ``k``, when the caller keeps it across calls (decoding's
    cross-attention keys stay the same at every step). Disallowed entries and padded query rows are 0."""
    batch, heads, tq, dim = q.shape
    tk = k.shape[2]
    if k_rotated is None:
        k_rotated = rotated_keys(k, fk, heads)
    scores = (_rotate_pairs(q, fq) @ k_rotated.transpose(-1, -2)) / math.sqrt(dim)
    if attn.bias is not None:
        dist = (fq.pitch[:, None, :, None] - fk.pitch[:, None, None, :]).abs()
        both = fq.voiced[:, None, :, None] * fk.voiced[:, None, None, :]
        alpha = attn.alpha.to(scores.dtype)[None, :, None, None]
        beta = attn.beta.to(scores.dtype)
        term = alpha * torch.exp(-beta * dist) if attn.bias == "exp" else -alpha * beta * dist
        scores = scores + term * both
    device = q.device
    lq = torch.full((batch,), tq, device=device) if q_lengths is None else q_lengths.to(device)
    lk = torch.full((batch,), tk, device=device) if k_lengths is None else k_lengths.to(device)
    i = torch.arange(tq, device=device)[None, :, None]
    j = torch.arange(tk, device=device)[None, None, :]
    allowed = (j < lk[:, None, None]) & (i < lq[:, None, None])
    if causal:
        allowed = allowed & (j <= i + (lk - lq)[:, None, None])
    allowed = allowed[:, None]
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.nan_to_num(weights, nan=0.0) * allowed


class Dropout(nn.Dropout):
    """Inverted dropout that draws its CPU mask 8 bytes per 64-bit random word.

    ``nn.Dropout`` on CPU draws one Bernoulli sample per element: at Echo tiny's sizes that was
    18% of a training step (2 cores). Here each element keeps with probability ``1 - k / 256``,
    ``k = round(256 p)`` (p = 0.1 drops 10.16%), rescaled by ``256 / (256 - k)`` so the expectation
    is exact. The mask comes from the global CPU generator (a checkpointed RNG state resumes it
    exactly). Other devices use ``F.dropout``.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Any shape and float dtype; the identity in eval mode."""
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training, self.inplace)
        drop = round(self.p * 256)
        if drop == 0:
            return x
        words = torch.empty((x.numel() + 7) // 8, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        keep = words.view(torch.uint8)[: x.numel()].view(x.shape) >= drop
        return x * (keep.to(x.dtype) * (256 / (256 - drop)))


def conv_over_time(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """``conv`` applied along the time axis of ``x [B, T, c_in]``: ``[B, T', c_out]`` contiguous
    (T' = T for stride 1 and "same" padding). Other padding modes and string paddings take the
    plain ``conv`` call.

    Both fast paths read the ``[B, T, c]`` storage as it is, with no transposed copy. A full
    convolution (``groups == 1``) runs as one matrix product over windows of frames
    (:func:`_conv_as_matmul`); a grouped one (the encoder's depthwise convolution) as a
    channels-last ``conv2d``, for which oneDNN's depthwise kernel makes forward + backward of the
    width-15 convolution 2.4x faster than ``nn.Conv1d`` on ``[B, d, T]`` (2.9 against 6.8 ms at
    B = 8, T = 100, d = 192; +3.5% training frames/s).
    """
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return _conv_on_channels_first(conv, x)
    if conv.groups == 1 and conv.dilation[0] == 1:
        return _conv_as_matmul(conv, x)
    x = x.transpose(1, 2).unsqueeze(2).contiguous(memory_format=torch.channels_last)
    y = F.conv2d(x, conv.weight.unsqueeze(2), conv.bias, stride=(1, conv.stride[0]),
                 padding=(0, conv.padding[0]), dilation=(1, conv.dilation[0]), groups=conv.groups)
    return y.squeeze(2).transpose(1, 2).contiguous()


def _conv_on_channels_first(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """``conv`` itself on ``x [B, T, c_in]`` transposed to ``[B, c_in, T]``: ``[B, T', c_out]`` contiguous."""
    return conv(x.transpose(1, 2)).transpose(1, 2).contiguous()


def _conv_as_matmul(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """Undilated full ``conv`` on ``x [B, T, c_in]`` as ``[B, T', k c_in] @ [k c_in, c_out]``.

    The products then run at the BLAS rate in both directions: oneDNN's backward of the front
    end's convolutions was the slow part of a training step's convolutions (front end forward +
    backward at B = 8, T = 600: 33-39 against 50-61 ms, 2-core Zen 3). When the stride equals the
    kernel (the front end's subsampling convolution at ``subsample=3``) the windows tile the
    padded frames, and ``[B, T', k c_in]`` is a view of them, not a copy.
    """
    width, stride, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    batch, length, channels = x.shape
    out_length = (length + 2 * pad - width) // stride + 1
    if out_length < 1 or length == 0 or batch == 0:
        return _conv_on_channels_first(conv, x)  # conv's own error or empty output
    # Padded up to the last window's end; frames the stride skips at the end are cut off.
    right = (out_length - 1) * stride + width - length - pad
    x = F.pad(x, (0, 0, pad, max(right, 0)))[:, : (out_length - 1) * stride + width]
    weight = conv.weight  # [c_out, c_in, k]
    if width == stride:
        windows = x.reshape(batch, out_length, width * channels)  # (tap, channel) order; a view if x is contiguous
        weight = weight.permute(0, 2, 1)
    else:
        windows = x.unfold(1, width, stride).reshape(batch, out_length, channels * width)  # (channel, tap) order
    return F.linear(windows, weight.reshape(weight.shape[0], -1), conv.bias)


class MLP(nn.Module):
    """Position-wise feed-forward: [depthwise Conv1d over time], Linear, GELU, dropout, Linear.

    With ``conv_kernel > 0`` each frame's input first mixes with its ``conv_kernel`` neighbours,
    one weight per channel and tap (on the ``dim`` input channels, not the wider hidden ones: a
    depthwise convolution is memory-bound on CPU), initialised to the identity so the block
    starts as the plain MLP. Padding frames are zeroed first, so padding never reaches a real frame.
    """

    def __init__(self, dim: int, hidden: int, dropout: float, conv_kernel: int = 0) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(dim, hidden), nn.Linear(hidden, dim), Dropout(dropout)
        self.conv = None
        if conv_kernel:
            self.conv = nn.Conv1d(dim, dim, conv_kernel, padding=conv_kernel // 2, groups=dim)
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[:, 0, conv_kernel // 2] = 1.0
                self.conv.bias.zero_()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B, T, d] -> [B, T, d]``; ``mask [B, T, 1]`` (1 = real frame) is required with a convolution."""
        if self.conv is not None:
            if mask is None:
                raise ValueError("MLP with a convolution needs mask [B, T, 1] of the real frames")
            x = conv_over_time(self.conv, x * mask)
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


def _self_attention(cfg: EchoConfig, *, bias: str | None, theta_mode: str, radius_mode: str) -> RopeAttention:
    return RopeAttention(
        cfg.d_model, cfg.n_heads, num_kv_heads=cfg.n_kv_heads, bias=bias, theta=cfg.theta,
        theta_mode=theta_mode, radius_mode=radius_mode, learnable_theta=cfg.learnable_theta, backend=cfg.backend,
    )


class EncoderBlock(nn.Module):
    """Pre-RMSNorm block: pitch-aware self-attention, then MLP (with the optional convolution)."""

    def __init__(self, cfg: EchoConfig) -> None:
        super().__init__()
        pitch = cfg.pitch
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d_model, eps=1e-6), nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.attn = _self_attention(
            cfg, bias=cfg.bias if pitch else None, theta_mode=cfg.theta_mode if pitch else "fixed",
            radius_mode=cfg.radius_mode if pitch else "unit",
        )
        self.mlp = MLP(cfg.d_model, cfg.ffn_dim, cfg.dropout, cfg.conv_kernel)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: Tensor, f0: Tensor | None, lengths: Tensor) -> Tensor:
        """x ``[B, T', d]``, f0 ``[B, T']`` or None, lengths ``[B]`` -> ``[B, T', d]``."""
        x = x + self.drop(self.attn(self.norm1(x), f0, lengths=lengths))
        mask = None
        if self.mlp.conv is not None:
            mask = lengths_to_mask(lengths, x.shape[1])[..., None].to(x.dtype)
        return x + self.drop(self.mlp(self.norm2(x), mask))


class DecoderBlock(nn.Module):
    """Pre-RMSNorm block: causal pitch-aware self-attention, plain cross-attention, MLP."""

    def __init__(self, cfg: EchoConfig) -> None:
        super().__init__()
        pitch = cfg.pitch and cfg.decoder_f0 != "none"
        self.norm1, self.norm2, self.norm3 = (nn.RMSNorm(cfg.d_model, eps=1e-6) for _ in range(3))
        self.self_attn = _self_attention(
            cfg, bias=cfg.bias if pitch else None, theta_mode=cfg.theta_mode if pitch else "fixed",
            radius_mode=cfg.radius_mode if pitch else "unit",
        )
        self.cross_attn = RopeAttention(
            cfg.d_model, cfg.n_heads, num_kv_heads=cfg.n_kv_heads, bias=None, theta=cfg.theta,
            theta_mode="fixed", radius_mode="unit", learnable_theta=cfg.learnable_theta and cfg.cross_rotary,
            cross=True, backend=cfg.backend, rotary=cfg.cross_rotary,
        )
        self.mlp = MLP(cfg.d_model, cfg.ffn_dim, cfg.dropout)
        self.drop = Dropout(cfg.dropout)


class Echo(nn.Module):
    """Pitch-aware encoder-decoder ASR model (see the module docstring for the design)."""

    def __init__(self, cfg: EchoConfig) -> None:
        super().__init__()
        if not isinstance(cfg, EchoConfig):
            raise TypeError(f"cfg must be an EchoConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.n_mels, d, kernel_size=3, padding=1)
        # Kernel 3, padding 1, stride s: ceil(T / s) outputs, the last one reading only real or
        # zeroed frames, so padding never changes an utterance's encoding.
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=cfg.subsample, padding=1)
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.enc_layers))
        self.enc_norm = nn.RMSNorm(d, eps=1e-6)
        self.embed = nn.Embedding(cfg.vocab_size, d)
        nn.init.normal_(self.embed.weight, std=d**-0.5)
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.dec_layers))
        self.dec_norm = nn.RMSNorm(d, eps=1e-6)
        self.ctc_head = nn.Linear(d, cfg.vocab_size) if cfg.ctc_weight > 0 else None
        self.drop = Dropout(cfg.dropout)

    # --- encoder ---------------------------------------------------------------------------------

    def encode(self, mel: Tensor, mel_lengths: Tensor, f0: Tensor | None = None) -> EncoderOutput:
        """mel ``[B, T, n_mels]``, mel_lengths ``[B]``, f0 ``[B, T]`` Hz -> :class:`EncoderOutput`.

        Padding frames are zeroed after per-utterance normalisation and after the first conv, so an
        utterance's output is the same alone or padded in a batch.
        """
        if mel.dim() != 3 or mel.shape[-1] != self.cfg.n_mels:
            raise ValueError(f"mel must be [B, T, {self.cfg.n_mels}], got {tuple(mel.shape)}")
        mel_lengths = mel_lengths.to(mel.device).long()
        mask = lengths_to_mask(mel_lengths, mel.shape[1])[..., None].to(mel.dtype)
        # Per-utterance mean/variance normalisation: the TTS engines differ a lot in level.
        n = mel_lengths.clamp(min=1)[:, None, None].to(mel.dtype)
        mean = (mel * mask).sum(1, keepdim=True) / n
        std = ((((mel - mean) * mask) ** 2).sum(1, keepdim=True) / n).clamp(min=1e-5).sqrt()
        x = (mel - mean) / std * mask
        x = F.gelu(conv_over_time(self.conv1, x)) * mask
        x = F.gelu(conv_over_time(self.conv2, x))
        enc_lengths = (mel_lengths + self.cfg.subsample - 1) // self.cfg.subsample
        x = self.drop(x)
        enc_f0 = stats = None
        if self.cfg.pitch:
            if f0 is None:
                raise ValueError("this model uses pitch (cfg.pitch=True): f0 [B, T] is required")
            enc_f0, _ = downsample_f0(f0, mel_lengths, self.cfg.subsample)
            enc_f0 = enc_f0[:, : x.shape[1]]
            stats = f0_stats(enc_f0, enc_lengths)
        middle = None
        for n, block in enumerate(self.encoder):
            x = block(x, enc_f0, enc_lengths)
            if self.cfg.inter_ctc and n + 1 == len(self.encoder) // 2:
                middle = self.enc_norm(x)
        return EncoderOutput(self.enc_norm(x), enc_lengths, enc_f0, stats, middle)

    # --- decoder ---------------------------------------------------------------------------------

    def _decoder_base_features(
        self, token_f0: Tensor | None, enc: EncoderOutput, batch: int, length: int, start: int,
        lengths: Tensor | None = None,
    ) -> PitchFeatures:
        """Shared (pre-layer) decoder self-attention features for tokens ``start..start+length-1``."""
        mode = self.cfg.decoder_f0 if self.cfg.pitch else "none"
        device = enc.states.device
        if mode == "none" or enc.stats is None:
            return plain_features(batch, length, self.cfg.theta, device, start=start)
        if mode == "mean" or token_f0 is None:
            token_f0 = torch.where(enc.stats.has_voiced, enc.stats.mean, torch.zeros_like(enc.stats.mean))
            token_f0 = token_f0[:, None].expand(batch, length)
        elif start == 0:
            # <bos> has no audio: give it the utterance mean (the same in training and decoding).
            token_f0 = torch.cat([enc.stats.mean[:, None] * enc.stats.has_voiced[:, None], token_f0[:, 1:]], 1)
        return token_features(token_f0, enc.stats, self.cfg, start=start, lengths=lengths)

    def _cross_features(self, batch: int, tq: int, tk: int, device: torch.device, *, start: int = 0
                        ) -> tuple[PitchFeatures, PitchFeatures]:
        """Cross-attention features: queries at token positions ``start..`` (they matter with
        ``cross_rotary``), keys at encoder frames ``0..tk - 1``."""
        return (plain_features(batch, tq, self.cfg.theta, device, start=start),
                plain_features(batch, tk, self.cfg.theta, device))

    def decode(
        self, tokens: Tensor, token_lengths: Tensor | None, enc: EncoderOutput, token_f0: Tensor | None = None,
        *, return_cross: bool = False, cross_kv: list[tuple[Tensor, Tensor]] | None = None,
        weights_only: bool = False,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Teacher-forced decoder: tokens ``[B, U]`` (starting with ``<bos>``) -> logits ``[B, U, V]``.

        With ``return_cross`` also the last layer's head-mean cross-attention weights ``[B, U, T']``
        (used to estimate the f0 of the next token while decoding); ``weights_only`` returns
        ``(None, weights)`` and skips what comes after them (the last layer's cross-attention
        output, its MLP and the logits; in training mode with dropout, their masks are not drawn).
        ``cross_kv``: :meth:`cross_kv` of ``enc`` when the caller already has it.
        """
        batch, length = tokens.shape
        x = self.drop(self.embed(tokens))
        base = self._decoder_base_features(token_f0, enc, batch, length, 0, token_lengths)
        cq, ck = self._cross_features(batch, length, enc.states.shape[1], x.device)
        cross_kv = self.cross_kv(enc) if cross_kv is None else cross_kv
        cross = None
        for n, block in enumerate(self.decoder):
            h = block.norm1(x)
            k, v = project_kv(block.self_attn, h)
            x = x + block.drop(attend(block.self_attn, project_q(block.self_attn, h), k, v, base, base, causal=True,
                                      q_lengths=token_lengths, k_lengths=token_lengths))
            q = project_q(block.cross_attn, block.norm2(x))
            k, v = cross_kv[n]
            if (return_cross or weights_only) and n == len(self.decoder) - 1:
                cross = self._cross_weights(block, q, k, cq, ck, enc.lengths)
                if weights_only:
                    return None, cross
            x = x + block.drop(attend(block.cross_attn, q, k, v, cq, ck, causal=False,
                                      q_lengths=token_lengths, k_lengths=enc.lengths))
            x = x + block.drop(block.mlp(block.norm3(x)))
        return self.dec_norm(x) @ self.embed.weight.t(), cross

    def cross_kv(self, enc: EncoderOutput) -> list[tuple[Tensor, Tensor]]:
        """Each decoder layer's cross-attention keys and values ``[B, Hk, T', D]`` of ``enc.states``."""
        return [project_kv(block.cross_attn, enc.states) for block in self.decoder]

    def _cross_weights(self, block: DecoderBlock, q: Tensor, k: Tensor, cq: PitchFeatures, ck: PitchFeatures,
                       enc_lengths: Tensor, k_rotated: Tensor | None = None) -> Tensor:
        """Head-mean cross-attention weights ``[B, U, T']`` of the last decoder ``block`` for its
        cross-attention queries ``q`` (:func:`project_q`); ``k_rotated``: :meth:`_cross_weight_keys`
        when decoding keeps it."""
        attn = block.cross_attn
        w = dense_attention_weights(attn, q.float(), k.float(), layer_features(attn, cq, torch.float32),
                                    layer_features(attn, ck, torch.float32), k_lengths=enc_lengths,
                                    k_rotated=k_rotated)
        return w.mean(1)

    def _cross_weight_keys(self, k: Tensor) -> Tensor:
        """The last decoder layer's cross-attention keys ``k [B, Hk, T', D]`` as :meth:`_cross_weights`
        multiplies them (float32, every query head, rotated): the same at every decoding step."""
        attn = self.decoder[-1].cross_attn
        _, ck = self._cross_features(k.shape[0], 1, k.shape[2], k.device)
        return rotated_keys(k.float(), layer_features(attn, ck, torch.float32), attn.num_heads)

    def init_cache(self, enc: EncoderOutput) -> dict[str, Any]:
        """Decoding state: per-layer cross-attention keys/values and the last layer's keys for the
        cross-attention weights (computed once), and empty self-attention key/value caches plus the
        cached keys' features."""
        cross = self.cross_kv(enc)
        return {"t": 0, "self_k": [None] * len(self.decoder), "self_v": [None] * len(self.decoder),
                "feats": None, "cross": cross, "cross_weight_keys": self._cross_weight_keys(cross[-1][0])}

    def step(self, token: Tensor, token_f0: Tensor | None, enc: EncoderOutput, cache: dict[str, Any]
             ) -> tuple[Tensor, Tensor]:
        """One decoding step with the key/value cache: token ``[B]`` at position ``cache["t"]`` with its f0
        ``[B]`` (ignored for ``<bos>`` at t = 0) -> (logits ``[B, V]``, cross weights ``[B, T']``).

        Only the new token's queries/keys/values are computed; its keys/values and features are
        appended to the cache, so a step costs O(t) instead of re-running the prefix.
        """
        t = cache["t"]
        batch = token.shape[0]
        x = self.embed(token[:, None])
        f0_col = None if token_f0 is None else token_f0[:, None]
        if t == 0 and f0_col is not None:
            f0_col = torch.zeros_like(f0_col)  # replaced by the utterance mean in _decoder_base_features
        new = self._decoder_base_features(f0_col, enc, batch, 1, t)
        feats = new if cache["feats"] is None else PitchFeatures(*(torch.cat(p, 1) for p in zip(cache["feats"], new)))
        cq, ck = self._cross_features(batch, 1, enc.states.shape[1], x.device, start=t)
        cross_w = None
        for n, block in enumerate(self.decoder):
            h = block.norm1(x)
            k, v = project_kv(block.self_attn, h)
            if cache["self_k"][n] is not None:
                k = torch.cat([cache["self_k"][n], k], 2)
                v = torch.cat([cache["self_v"][n], v], 2)
            cache["self_k"][n], cache["self_v"][n] = k, v
            # Tq = 1 against Tk = t + 1 keys: the bottom-right causal alignment allows every cached key.
            x = x + attend(block.self_attn, project_q(block.self_attn, h), k, v, new, feats, causal=True)
            q = project_q(block.cross_attn, block.norm2(x))
            ck_, cv_ = cache["cross"][n]
            x = x + attend(block.cross_attn, q, ck_, cv_, cq, ck, causal=False, k_lengths=enc.lengths)
            if n == len(self.decoder) - 1:
                cross_w = self._cross_weights(block, q, ck_, cq, ck, enc.lengths, cache["cross_weight_keys"])[:, 0]
            x = x + block.mlp(block.norm3(x))
        cache["feats"], cache["t"] = feats, t + 1
        return (self.dec_norm(x) @ self.embed.weight.t())[:, 0], cross_w

    @staticmethod
    def reorder_cache(cache: dict[str, Any], index: Tensor, cross_index: Tensor | None = None) -> dict[str, Any]:
        """Select batch rows ``index [B']`` of the hypotheses' own cached tensors (beam search), and rows
        ``cross_index [B']`` of the encoder's (cross-attention keys and values, which a beam search
        only needs to select when utterances leave the batch: every hypothesis of an utterance has
        the same); ``cross_index=None`` keeps those as they are."""
        if cross_index is None and index.numel() != cache["cross"][0][0].shape[0]:
            raise ValueError(f"reorder_cache: {index.numel()} rows from {cache['cross'][0][0].shape[0]} change the "
                             "batch, so the cross-attention keys need their cross_index")
        cache["self_k"] = [None if k is None else k.index_select(0, index) for k in cache["self_k"]]
        cache["self_v"] = [None if v is None else v.index_select(0, index) for v in cache["self_v"]]
        if cache["feats"] is not None:
            cache["feats"] = PitchFeatures(*(f.index_select(0, index) for f in cache["feats"]))
        if cross_index is not None:
            cache["cross"] = [(k.index_select(0, cross_index), v.index_select(0, cross_index))
                              for k, v in cache["cross"]]
            cache["cross_weight_keys"] = cache["cross_weight_keys"].index_select(0, cross_index)
        return cache

    @staticmethod
    def estimate_token_f0(cross_weights: Tensor, enc: EncoderOutput) -> Tensor | None:
        """f0 of the token just predicted: the voiced-weighted mean encoder f0 under the
        cross-attention weights ``[B, T']`` (or ``[B, U, T']``: one estimate per position) ->
        ``[B]`` (or ``[B, U]``); 0 (unvoiced) when under half of the mass is voiced, mirroring the
        training alignment where a span without voiced frames gets 0."""
        if enc.f0 is None:
            return None
        f0 = enc.f0.view(enc.f0.shape[0], *[1] * (cross_weights.dim() - 2), enc.f0.shape[1])
        voiced = (f0 > 0).to(cross_weights.dtype)
        mass = (cross_weights * voiced).sum(-1)
        value = (cross_weights * f0).sum(-1) / mass.clamp(min=1e-9)
        return torch.where(mass >= 0.5, value, torch.zeros_like(value))

    @torch.no_grad()
    def attended_token_f0(self, tokens: Tensor, token_lengths: Tensor, enc: EncoderOutput,
                          token_f0: Tensor | None, cross_kv: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """Teacher-forced twin of decoding's token f0: tokens ``[B, U]`` (from ``<bos>``) -> ``[B, U]``.

        Token ``u >= 1`` gets :meth:`estimate_token_f0` of the cross-attention at position
        ``u - 1``, the query that predicted it, as in decoding; ``<bos>`` keeps its utterance mean.
        The pass that yields those weights uses ``token_f0`` (or the mean when None) for the
        earlier tokens, where decoding used its own estimates: one step of that fixed point.
        ``cross_kv``: :meth:`cross_kv` of ``enc`` when the caller already has it.
        """
        _, cross = self.decode(tokens, token_lengths, enc, token_f0, cross_kv=cross_kv, weights_only=True)
        est = self.estimate_token_f0(cross, enc)
        valid = lengths_to_mask(token_lengths, tokens.shape[1])
        return torch.cat([torch.zeros_like(est[:, :1]), est[:, :-1]], 1) * valid

    # --- training --------------------------------------------------------------------------------

    def forward(
        self, mel: Tensor, mel_lengths: Tensor, f0: Tensor | None, tokens: Tensor, token_lengths: Tensor,
        token_f0: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Joint CTC/attention loss for a padded batch.

        mel ``[B, T, n_mels]``, mel_lengths ``[B]``, f0 ``[B, T]``, tokens ``[B, U]`` = ``<bos> ... <eos>``
        padded with ``pad_id``, token_lengths ``[B]`` (with bos/eos), token_f0 ``[B, U]``.
        Returns ``loss``, ``att_loss``, ``ctc_loss`` (0-d) and ``tokens`` (number of predicted tokens).
        """
        cfg = self.cfg
        enc = self.encode(mel, mel_lengths, f0)
        token_lengths = token_lengths.to(tokens.device).long()
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        in_f0 = None if token_f0 is None else token_f0[:, :-1]
        cross_kv = self.cross_kv(enc)
        if cfg.pitch and cfg.decoder_f0 == "attended" and enc.f0 is not None:
            # The no-grad pass reads the same keys/values as the loss's pass, not a second projection.
            detached = [(k.detach(), v.detach()) for k, v in cross_kv]
            in_f0 = self.attended_token_f0(inputs, token_lengths - 1, enc, in_f0, detached)
        logits, _ = self.decode(inputs, token_lengths - 1, enc, in_f0, cross_kv=cross_kv)
        att = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), targets.reshape(-1),
                              ignore_index=cfg.pad_id, label_smoothing=cfg.label_smoothing)
        out = {"att_loss": att, "tokens": (targets != cfg.pad_id).sum()}
        if self.ctc_head is not None:
            ctc = self._ctc_loss(enc.states, enc.lengths, targets, token_lengths)
            if enc.middle is not None:
                inter = self._ctc_loss(enc.middle, enc.lengths, targets, token_lengths)
                out["inter_ctc_loss"] = inter
                ctc = (1 - cfg.inter_ctc) * ctc + cfg.inter_ctc * inter
            out["ctc_loss"] = ctc
            out["loss"] = (1 - cfg.ctc_weight) * att + cfg.ctc_weight * ctc
        else:
            out["ctc_loss"] = torch.zeros((), device=att.device)
            out["loss"] = att
        return out

    def _ctc_loss(self, states: Tensor, lengths: Tensor, targets: Tensor, token_lengths: Tensor) -> Tensor:
        """CTC loss (batch mean) of encoder ``states [B, T', d]`` against ``targets [B, U - 1]``."""
        log_probs = self.ctc_head(states).float().log_softmax(-1).transpose(0, 1)
        # Targets are the characters without <bos>/<eos>; the pad id doubles as the CTC blank.
        return F.ctc_loss(log_probs, targets, lengths, (token_lengths - 2).clamp(min=0),
                          blank=self.cfg.pad_id, zero_infinity=True)

    # --- inspection ------------------------------------------------------------------------------

    @torch.no_grad()
    def encoder_attention_maps(self, mel: Tensor, f0: Tensor | None) -> list[np.ndarray]:
        """Per-layer encoder self-attention weights ``[H, T', T']`` for one utterance (mel ``[T, n_mels]``,
        f0 ``[T]``), by the dense reference formula."""
        mel_lengths = torch.tensor([mel.shape[0]], device=mel.device)
        maps: list[np.ndarray] = []

        def hook(module: RopeAttention, args: tuple, kwargs: dict) -> None:
            x = args[0]
            f0_in = args[1] if len(args) > 1 else kwargs.get("f0")
            lengths = kwargs.get("lengths")
            q = _heads(module.q_proj(x), module.num_heads).float()
            k = _heads(module.k_proj(x), module.num_kv_heads).float()
            feats = module.features(f0_in, x.shape[0], x.shape[1], lengths, torch.float32, x.device)
            w = dense_attention_weights(module, q, k, feats, feats, q_lengths=lengths, k_lengths=lengths)
            maps.append(w[0].cpu().numpy())

        handles = [b.attn.register_forward_pre_hook(hook, with_kwargs=True) for b in self.encoder]
        try:
            was_training = self.training
            self.eval()
            self.encode(mel[None], mel_lengths, None if f0 is None else f0[None])
            self.train(was_training)
        finally:
            for h in handles:
                h.remove()
        return maps


def load_model(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> tuple[Echo, Any]:
    """Model (eval mode) and tokenizer from a training checkpoint written by ``echo.train``
    (:func:`model_from_checkpoint` of the file)."""
    from echo.files import read_checkpoint

    return model_from_checkpoint(read_checkpoint(checkpoint_path, device), device)


def model_from_checkpoint(ckpt: dict[str, Any], device: str | torch.device = "cpu") -> tuple[Echo, Any]:
    """Model (eval mode) and tokenizer from a read checkpoint (:func:`echo.files.read_checkpoint`).

    The weights are the ones dev evaluation scores: the weight average when the checkpoint
    holds one (``last.pt`` of a run with ``train.ema_decay`` > 0; ``best.pt`` stores it as its
    model), else the trained weights.
    """
    from echo.text import tokenizer_from_state

    cfg = EchoConfig.from_dict(ckpt["config"]["model"])
    model = Echo(cfg).to(device)
    model.load_state_dict(ckpt["ema"]["model"] if "ema" in ckpt else ckpt["model"])
    model.eval()
    return model, tokenizer_from_state(ckpt["tokenizer"])


def attention_maps(checkpoint_path: str | Path, wav_path: str | Path) -> list[np.ndarray]:
    """Encoder self-attention maps of a trained model on one file: one ``[H, T', T']`` array per layer."""
    from echo.audio import compute_features, load_audio

    model, _ = load_model(checkpoint_path)
    mel, f0 = compute_features(load_audio(wav_path))
    return model.encoder_attention_maps(mel, f0 if model.cfg.pitch else None)
