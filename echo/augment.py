"""Training-time augmentation of a batch: SpecAugment masks, a vocal-tract-like mel warp, a random
spectral envelope, f0 scaling, tempo changes.

The corpus's test split holds voices the model never hears in training, so the augmentations
target what differs between voices: formant positions (the mel warp, as VTLP stretches the
frequency axis), timbre and recording colour (a smooth random gain across the mel bands, as an
equaliser would apply), pitch range (f0 scaling), speaking rate (tempo: the time axis resampled, as
Kaldi-style speed perturbation does without its pitch shift) and, as SpecAugment, missing bands
and stretches.
Every draw comes from a generator seeded by (run seed, step, process rank), so a resumed run
sees the very same augmented batches as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class AugmentConfig:
    """Per-utterance augmentation; all off by default.

    ``freq_masks`` masks of up to ``freq_width`` mel bins and ``time_masks`` masks of up to
    ``time_width`` x the utterance's length, filled with the utterance's mean; ``mel_warp``:
    the mel axis stretched by a factor drawn from ``[1 - w, 1 + w]``; ``f0_scale``: frame and
    token f0 multiplied by a factor from ``[1 - s, 1 + s]``; ``tempo``: every utterance's duration
    multiplied by a factor from ``[1 - t, 1 + t]`` (its frames resampled); ``timbre_db``: a smooth
    gain of at most that many dB added across the mel bands (see :func:`colour_mel`).
    """

    freq_masks: int = 0
    freq_width: int = 15
    time_masks: int = 0
    time_width: float = 0.05
    mel_warp: float = 0.0
    f0_scale: float = 0.0
    tempo: float = 0.0
    timbre_db: float = 0.0

    def __post_init__(self) -> None:
        for name in ("freq_masks", "freq_width", "time_masks"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("time_width", "mel_warp", "f0_scale", "tempo"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.timbre_db <= 20.0:
            raise ValueError(f"augment.timbre_db must be in [0, 20] dB, got {self.timbre_db}")

    @property
    def enabled(self) -> bool:
        return bool(self.freq_masks or self.time_masks or self.mel_warp or self.f0_scale or self.tempo
                    or self.timbre_db)


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The generator of one training step's draws on one process: a function of (seed, step, rank)
    alone, so resuming reproduces the draws and DDP ranks draw differently."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + rank)


def _uniform(n: int, half_width: float, gen: torch.Generator) -> Tensor:
    """``n`` factors drawn from ``[1 - w, 1 + w]``."""
    return 1.0 + half_width * (2.0 * torch.rand(n, generator=gen) - 1.0)


def warp_mel(mel: Tensor, factors: Tensor) -> Tensor:
    """Stretch each utterance's mel axis: output bin m reads input bin m / factor (linear interpolation).

    mel ``[B, T, M]``, factors ``[B]`` (> 1 moves energy up, as a shorter vocal tract does).
    """
    bins = mel.shape[-1]
    factors = factors.to(mel.device)
    src = (torch.arange(bins, dtype=torch.float32, device=mel.device)[None] / factors[:, None]).clamp(max=bins - 1)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=bins - 1)
    frac = (src - lo).to(mel.dtype)[:, None, :]
    lo, hi = (i[:, None, :].expand(-1, mel.shape[1], -1) for i in (lo, hi))
    return mel.gather(2, lo) * (1 - frac) + mel.gather(2, hi) * frac


# Feature units per dB: ``echo.audio.log_mel`` gives log10 of power over 4, and 10 dB is one decade.
FEATURE_PER_DB = 1.0 / 40.0
ENVELOPE_COSINES = 3


def colour_mel(mel: Tensor, lengths: Tensor, amplitudes_db: Tensor) -> Tensor:
    """Add a smooth gain curve across the mel bands of each utterance's valid frames.

    mel ``[B, T, M]`` (``echo.audio.log_mel`` features), lengths ``[B]``, amplitudes_db
    ``[B, K]``: the curve is ``sum_k a_k cos(pi k m / (M - 1))`` dB over bins m = 0..M-1,
    so its largest gain is at most ``sum_k |a_k|``. Padding frames stay as they are.
    """
    _, frames, bins = mel.shape
    k = torch.arange(1, amplitudes_db.shape[1] + 1, dtype=torch.float32)
    m = torch.arange(bins, dtype=torch.float32) / max(bins - 1, 1)
    curve = (amplitudes_db @ torch.cos(torch.pi * k[:, None] * m[None])) * FEATURE_PER_DB  # [B, M]
    valid = torch.arange(frames, device=mel.device)[None] < lengths.to(mel.device)[:, None]
    return mel + curve.to(mel.device, mel.dtype)[:, None, :] * valid[..., None].to(mel.dtype)


def stretch_time(mel: Tensor, f0: Tensor, lengths: Tensor, factors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Resample each utterance's valid frames to ``round(L * factor)`` frames (at least 1).

    mel ``[B, T, M]`` (linear interpolation), f0 ``[B, T]`` (nearest frame, so unvoiced frames stay
    exactly 0), lengths ``[B]``, factors ``[B]`` (> 1 slows the speech down). Returns the new mel,
    f0 and lengths, zero-padded to the longest new length. Frame centres map onto frame centres:
    output frame j reads input position ``(j + 0.5) * L / L' - 0.5``.
    """
    device = mel.device
    lengths = lengths.to(device)
    new_lengths = (lengths.double() * factors.to(device).double()).round().long().clamp(min=1)
    t_out = int(new_lengths.max())
    j = torch.arange(t_out, device=device, dtype=torch.float64)[None]
    last = (lengths - 1).clamp(min=0)[:, None]
    src = ((j + 0.5) * lengths[:, None] / new_lengths[:, None] - 0.5).clamp(min=0.0)
    src = torch.minimum(src, last.double())
    lo = src.floor().long()
    hi = torch.minimum(lo + 1, last)
    frac = (src - lo).to(mel.dtype)[..., None]
    lo_rows, hi_rows = (i[..., None].expand(-1, -1, mel.shape[-1]) for i in (lo, hi))
    valid = torch.arange(t_out, device=device)[None] < new_lengths[:, None]
    out_mel = (mel.gather(1, lo_rows) * (1 - frac) + mel.gather(1, hi_rows) * frac) * valid[..., None].to(mel.dtype)
    out_f0 = f0.gather(1, torch.minimum(src.round().long(), last)) * valid.to(f0.dtype)
    return out_mel, out_f0, new_lengths.to(lengths.dtype)


def _mask_spans(count: int, max_width: Tensor, limit: Tensor, gen: torch.Generator) -> list[list[tuple[int, int]]]:
    """Per utterance, ``count`` spans ``[start, start + width)`` with width <= max_width inside ``[0, limit)``."""
    spans = []
    for b in range(limit.shape[0]):
        mine = []
        for _ in range(count):
            width = int(torch.randint(0, int(max_width[b]) + 1, (1,), generator=gen))
            start = int(torch.randint(0, max(int(limit[b]) - width, 0) + 1, (1,), generator=gen))
            mine.append((start, min(start + width, int(limit[b]))))
        spans.append(mine)
    return spans


def augment_batch(inputs: dict[str, Tensor], cfg: AugmentConfig, gen: torch.Generator) -> dict[str, Tensor]:
    """Augmented copy of :func:`echo.train.batch_inputs`'s dict (mel ``[B, T, M]``, f0, token_f0, lengths).

    Padding stays as it was (frames past ``mel_lengths`` are never unmasked or filled).
    """
    if not cfg.enabled:
        return inputs
    out = dict(inputs)
    mel = inputs["mel"]
    batch, _, bins = mel.shape
    if cfg.tempo:
        mel, out["f0"], out["mel_lengths"] = stretch_time(mel, inputs["f0"], inputs["mel_lengths"],
                                                         _uniform(batch, cfg.tempo, gen))
    if cfg.mel_warp:
        mel = warp_mel(mel, _uniform(batch, cfg.mel_warp, gen))
    if cfg.timbre_db:
        # Each cosine gets a third of the budget: the curve never exceeds timbre_db.
        amplitudes = (2.0 * torch.rand(batch, ENVELOPE_COSINES, generator=gen) - 1.0) * (cfg.timbre_db / ENVELOPE_COSINES)
        mel = colour_mel(mel, out["mel_lengths"], amplitudes)
    if cfg.f0_scale:
        scale = _uniform(batch, cfg.f0_scale, gen).to(mel.device)
        out["f0"] = out["f0"] * scale[:, None]
        out["token_f0"] = inputs["token_f0"] * scale[:, None]
    if cfg.freq_masks or cfg.time_masks:
        lengths = out["mel_lengths"].cpu()
        if mel is inputs["mel"]:  # tempo, the warp or the colour already made a new tensor
            mel = mel.clone()
        freq = _mask_spans(cfg.freq_masks, torch.full((batch,), cfg.freq_width), torch.full((batch,), bins), gen)
        time = _mask_spans(cfg.time_masks, (lengths.float() * cfg.time_width).long(), lengths, gen)
        for b in range(batch):
            valid = mel[b, : int(lengths[b])]
            fill = valid.mean() if valid.numel() else 0.0
            for lo, hi in freq[b]:
                valid[:, lo:hi] = fill
            for lo, hi in time[b]:
                valid[lo:hi] = fill
    out["mel"] = mel
    return out
