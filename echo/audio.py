"""Audio loading and frame-level features: Whisper-style log-mel and f0.

Frame convention (shared by every feature here): with hop ``H`` = 160 samples (10 ms at
16 kHz), a waveform of ``N`` samples has ``T = N // H + 1`` frames and frame ``n`` is
*centred* on sample ``n * H`` (time ``n * 10 ms``). The mel transform gets this from
``center=True`` (reflect padding of ``n_fft // 2`` on both sides); WORLD's DIO places its
analysis points at ``n * frame_period`` with the same count; the torchaudio pitch
detector is interpolated onto these centres. So ``mel[n]`` and ``f0[n]`` describe the
same instant, and ``len(mel) == len(f0)`` always.

f0 is in Hz, float32, ``0.0`` where the frame is unvoiced (or silent).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop
N_MELS = 80


F0_METHODS = ("pyworld", "harvest", "torchaudio")


@dataclass(frozen=True)
class FeatureConfig:
    """Every setting that changes the features; its fingerprint keys the feature cache.

    ``f0_method``: ``"pyworld"`` (WORLD DIO + StoneMask: fast, < 0.2 Hz error on tones),
    ``"harvest"`` (WORLD Harvest: ~25x slower, but robust where DIO fails: on the piper
    "joe" voice DIO reads ~1.5x too high on about half the voiced frames, measured
    against Harvest and torchaudio; Harvest does not voice a pure sine), or ``"torchaudio"`` (``detect_pitch_frequency`` +
    energy gate: coarse, no extra dependency).
    ``f0_floor`` / ``f0_ceil`` bound the f0 search in Hz for both methods.
    ``gate_db``: the torchaudio method calls frames quieter than (loudest frame - gate_db)
    unvoiced, because its detector returns a frequency for every frame, silence included.
    ``ta_freq_low``: lowest f0 the torchaudio detector searches. Its lag picker prefers
    lags in the first half of the search range, so a lower floor lets it lock onto twice
    the period (measured: floor 70 Hz turns a 300 Hz tone into 150 Hz); 85 Hz, the
    torchaudio default, is the safe value, at the price of missing f0 below 85 Hz.
    """

    sample_rate: int = SAMPLE_RATE
    n_fft: int = N_FFT
    hop_length: int = HOP_LENGTH
    n_mels: int = N_MELS
    f0_method: str = "pyworld"
    f0_floor: float = 50.0
    f0_ceil: float = 600.0
    gate_db: float = 30.0
    ta_freq_low: float = 85.0
    version: int = 1  # bump when the feature code changes meaning

    def __post_init__(self) -> None:
        if self.f0_method not in F0_METHODS:
            raise ValueError(f"f0_method must be one of {F0_METHODS}, got {self.f0_method!r}")

    def fingerprint(self) -> str:
        """Short stable hash of the settings (hex string)."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


DEFAULT_CONFIG = FeatureConfig()


def num_frames(num_samples: int, hop_length: int = HOP_LENGTH) -> int:
    """Frame count for ``num_samples`` samples under the centred convention."""
    return num_samples // hop_length + 1


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Band-limited resampling (``torchaudio.functional.resample``); ``[..., N]`` float32."""
    if orig_sr == new_sr:
        return wave
    g = math.gcd(int(orig_sr), int(new_sr))
    return torchaudio.functional.resample(wave, int(orig_sr) // g, int(new_sr) // g)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Read any soundfile-supported file as mono float32 ``[N]`` at ``sample_rate``.

    Channels are averaged. ``torchaudio.load`` is avoided on purpose: in torchaudio 2.11
    it needs torchcodec + FFmpeg.
    """
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wave = torch.from_numpy(data.mean(axis=1))
    return resample(wave, sr, sample_rate).contiguous()


@functools.lru_cache(maxsize=4)
def _mel_transform(sample_rate: int, n_fft: int, hop_length: int, n_mels: int):
    # Built once per setting: constructing the filterbank costs more than a short STFT.
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
        power=2.0, center=True, pad_mode="reflect", norm="slaney", mel_scale="slaney",
    )


def _pad_short(wave: torch.Tensor, n_fft: int) -> torch.Tensor:
    # Reflect padding needs more than n_fft // 2 samples; tiny clips are zero-extended
    # (the frame count then follows the padded length).
    if wave.shape[-1] <= n_fft // 2:
        wave = torch.nn.functional.pad(wave, (0, n_fft // 2 + 1 - wave.shape[-1]))
    return wave


def log_mel(wave: torch.Tensor, config: FeatureConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """Whisper-style log-mel of a mono waveform ``[N]`` -> ``[T, n_mels]`` float32.

    ``log10(clamp(mel, 1e-10))``, floored at (utterance max - 8), then ``(x + 4) / 4``;
    values end up roughly in [-1, 1.5]. ``T = N // hop + 1``.
    """
    wave = _pad_short(wave.to(torch.float32), config.n_fft)
    mel = _mel_transform(config.sample_rate, config.n_fft, config.hop_length, config.n_mels)(wave)
    x = torch.clamp(mel, min=1e-10).log10()
    x = torch.maximum(x, x.max() - 8.0)
    return ((x + 4.0) / 4.0).transpose(0, 1).contiguous()


def _fit_length(x: torch.Tensor, n: int) -> torch.Tensor:
    # Guard against off-by-one from float rounding in an extractor: pad with 0 (unvoiced)
    # or cut, so the contract len(f0) == len(mel) always holds.
    if x.shape[0] >= n:
        return x[:n]
    return torch.nn.functional.pad(x, (0, n - x.shape[0]))


def _import_pyworld():
    with warnings.catch_warnings():
        # pyworld 0.3.x imports pkg_resources, which warns on recent setuptools.
        warnings.simplefilter("ignore")
        try:
            import pyworld
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "f0_method='pyworld' needs the PyPI package 'pyworld' "
                "(pip install pyworld; it builds from source on Python 3.11)"
            ) from e
    return pyworld


def f0_pyworld(wave: torch.Tensor, config: FeatureConfig = DEFAULT_CONFIG,
               algorithm: str = "dio") -> torch.Tensor:
    """f0 per frame with WORLD: ``[N]`` -> ``[T]`` float32 Hz, 0 = unvoiced.

    ``algorithm``: ``"dio"`` (DIO refined by StoneMask) or ``"harvest"``.
    """
    pw = _import_pyworld()
    wave = _pad_short(wave.to(torch.float32), config.n_fft)
    x = wave.double().numpy().copy(order="C")
    frame_ms = 1000.0 * config.hop_length / config.sample_rate
    # DIO's analysis instants are k * frame_period, k = 0 .. N // hop: the mel frame centres.
    if algorithm == "harvest":
        f0, _ = pw.harvest(x, config.sample_rate, f0_floor=config.f0_floor,
                           f0_ceil=config.f0_ceil, frame_period=frame_ms)
    elif algorithm == "dio":
        f0, t = pw.dio(x, config.sample_rate, f0_floor=config.f0_floor,
                       f0_ceil=config.f0_ceil, frame_period=frame_ms)
        f0 = pw.stonemask(x, f0, t, config.sample_rate)
    else:
        raise ValueError(f"algorithm must be 'dio' or 'harvest', got {algorithm!r}")
    out = torch.from_numpy(np.asarray(f0, dtype=np.float32))
    return _fit_length(out, num_frames(wave.shape[-1], config.hop_length))


def frame_energy_db(wave: torch.Tensor, config: FeatureConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """RMS level in dB of the ``n_fft`` window centred on each frame: ``[N]`` -> ``[T]``."""
    wave = _pad_short(wave.to(torch.float32), config.n_fft)
    half = config.n_fft // 2
    padded = torch.nn.functional.pad(wave, (half, half))
    frames = padded.unfold(0, config.n_fft, config.hop_length)
    rms = frames.pow(2).mean(dim=1).sqrt()
    return 20.0 * torch.log10(rms.clamp(min=1e-8))


# A pause: at least PAUSE_SECONDS of frames QUIET_DB or more under the recording's speech level,
# the LEVEL_QUANTILE of its frame levels (not the loudest frame: one click would make the
# speech a pause); longer than a stop closure, shorter than the gap between two sentences.
PAUSE_SECONDS = 0.25
QUIET_DB = 35.0
LEVEL_QUANTILE = 0.95


def split_at_pauses(wave: torch.Tensor, max_seconds: float, config: FeatureConfig = DEFAULT_CONFIG
                    ) -> list[torch.Tensor]:
    """A long recording ``[N]`` as utterance-sized pieces of speech, in order.

    A wave of at most ``max_seconds`` is returned whole. A longer one is cut in the middle of
    every pause (see ``PAUSE_SECONDS``, ``QUIET_DB``), the pauses' quiet frames are left out,
    and a piece still longer than ``max_seconds`` is cut again at quiet frames into pieces of at
    least half of ``max_seconds`` (no slivers).
    """
    limit = int(max_seconds * config.sample_rate)
    hop = config.hop_length
    if limit < 2 * hop:
        raise ValueError(f"max_seconds must allow two frames ({2 * hop / config.sample_rate} s), got {max_seconds}")
    if wave.numel() <= limit:
        return [wave]
    energy = frame_energy_db(wave, config)  # frame f is centred on sample f * hop
    loud = (energy > torch.quantile(energy, LEVEL_QUANTILE) - QUIET_DB).tolist()
    min_pause = max(1, round(PAUSE_SECONDS * config.sample_rate / hop))
    spans, start, quiet_run = [], None, 0
    for f, is_loud in enumerate(loud + [False] * min_pause):  # the padding closes the last span
        if is_loud:
            start, quiet_run = (f if start is None else start), 0
        elif start is not None:
            quiet_run += 1
            if quiet_run == min_pause:
                end = f - min_pause + 1  # first quiet frame
                spans.append((start, end))
                start = None
    pieces = []
    for first, end in spans:
        # Speech frames [first, end) plus half a pause on each side, within the wave.
        lo = max(0, (first - min_pause // 2) * hop)
        hi = min(wave.numel(), (end + min_pause // 2) * hop)
        pieces.extend(_split_long(wave[lo:hi], energy[lo // hop:], limit, hop))
    return pieces or [wave]


def _split_long(wave: torch.Tensor, energy: torch.Tensor, limit: int, hop: int) -> list[torch.Tensor]:
    """``wave`` in pieces of ``limit / 2`` to ``limit`` samples (the last one too), each cut at the
    quietest frame (``energy``, frame 0 at the wave's start) that leaves both sides that long."""
    pieces, start, n = [], 0, wave.numel()
    while n - start > limit:
        lo, hi = start + limit // 2, min(start + limit, n - limit // 2)  # where the cut may go
        first, last = -(-lo // hop), hi // hop  # the frames centred there (maybe none)
        cut = (first + int(energy[first:last + 1].argmin())) * hop if first <= last else lo
        pieces.append(wave[start:cut])
        start = cut
    pieces.append(wave[start:])
    return pieces


def f0_torchaudio(wave: torch.Tensor, config: FeatureConfig = DEFAULT_CONFIG,
                  smooth_frames: int = 5) -> torch.Tensor:
    """f0 per frame with ``torchaudio.functional.detect_pitch_frequency`` -> ``[T]`` float32.

    The detector uses non-overlapping windows of ``hop`` samples starting at sample
    ``k * hop``, then a median filter over ``smooth_frames`` windows; each output's
    centre time is worked out below and the values are linearly interpolated onto the
    mel frame centres ``n * hop`` (edges held). The detector answers for every frame, so
    silence is removed by an energy gate (``config.gate_db`` below the loudest frame) and
    values outside [f0_floor, f0_ceil] are zeroed. Lags are whole samples, so the answer
    is quantised (about 2 Hz at 300 Hz, 16 kHz).
    """
    wave = _pad_short(wave.to(torch.float32), config.n_fft)
    sr, hop = config.sample_rate, config.hop_length
    n_out = num_frames(wave.shape[-1], hop)
    # The median filter needs more windows than its length: pad very short clips with
    # silence (the energy gate below zeroes whatever the padding produces).
    min_len = (smooth_frames + 2) * hop
    padded = torch.nn.functional.pad(wave, (0, max(0, min_len - wave.shape[-1])))
    raw = torchaudio.functional.detect_pitch_frequency(
        padded.unsqueeze(0), sr, frame_time=hop / sr, win_length=smooth_frames,
        freq_low=int(config.ta_freq_low), freq_high=int(config.f0_ceil),
    )[0]
    # Detector window k spans [k*hop, (k+1)*hop): centre (k + 0.5) * hop. The median
    # filter pads (w - 1) // 2 on the left only and takes windows of w, so output k is
    # the median of windows k - (w-1)//2 .. k + w//2, centred on window k + (w odd: 0,
    # even: 0.5). Express that in mel-frame units (centre of mel frame n is n * hop).
    shift = 0.5 * ((smooth_frames // 2) - (smooth_frames - 1) // 2)
    src_t = torch.arange(raw.numel(), dtype=torch.float32) + 0.5 + shift
    dst_t = torch.arange(n_out, dtype=torch.float32)
    f0 = _interp(dst_t, src_t, raw.float())
    loud = frame_energy_db(wave, config)
    voiced = (loud > loud.max() - config.gate_db) & (f0 >= config.f0_floor) & (f0 <= config.f0_ceil)
    return torch.where(voiced, f0, torch.zeros_like(f0))


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x, holding the end values (1-D)."""
    if fp.numel() == 1:
        return fp.expand_as(x).clone()
    idx = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    w = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return fp[idx - 1] * (1 - w) + fp[idx] * w


def extract_f0(wave: torch.Tensor, config: FeatureConfig = DEFAULT_CONFIG,
               method: str | None = None) -> torch.Tensor:
    """f0 ``[T]`` float32 Hz with ``method`` (default ``config.f0_method``)."""
    method = method or config.f0_method
    if method == "pyworld":
        return f0_pyworld(wave, config, "dio")
    if method == "harvest":
        return f0_pyworld(wave, config, "harvest")
    if method == "torchaudio":
        return f0_torchaudio(wave, config)
    raise ValueError(f"f0 method must be one of {F0_METHODS}, got {method!r}")


def compute_features(wave: torch.Tensor, config: FeatureConfig = DEFAULT_CONFIG
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_mel [T, n_mels], f0 [T])``, both float32, frame-aligned, for a ``[N]`` wave."""
    mel = log_mel(wave, config)
    f0 = extract_f0(wave, config)
    if f0.shape[0] != mel.shape[0]:  # pragma: no cover - guarded by _fit_length
        raise RuntimeError(f"f0 has {f0.shape[0]} frames but mel has {mel.shape[0]}")
    return mel, f0
