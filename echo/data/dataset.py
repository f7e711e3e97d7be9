"""Manifest I/O, a cached feature dataset, and the padding collator.

Manifest: JSON Lines, one utterance per line with at least ``audio`` (path, relative to
the manifest's folder or absolute), ``text``, ``duration`` (s), ``speaker``, ``engine``.

Cache: one ``.pt`` file per utterance holding ``{"key", "mel", "f0"}``. The key hashes
the audio file's size and mtime together with the :class:`~echo.audio.FeatureConfig`
fingerprint, so an edited audio file or a changed setting invalidates the entry. An entry
that cannot be read, has the wrong key, or fails a shape/finiteness check is recomputed
and rewritten (atomically), never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch.utils.data import Dataset

from echo.align import token_f0
from echo.audio import DEFAULT_CONFIG, FeatureConfig, compute_features, load_audio
from echo.files import atomic_save
from echo.text import CharTokenizer, normalize_text

REQUIRED_FIELDS = ("audio", "text", "duration", "speaker", "engine")


# --- manifests ------------------------------------------------------------------------


def write_manifest(path: str | Path, records: Sequence[dict]) -> None:
    """Write records as JSON Lines (UTF-8, one object per line, keys as given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            missing = [k for k in REQUIRED_FIELDS if k not in r]
            if missing:
                raise ValueError(f"manifest record lacks {missing}: {r}")
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _json_object(line: str) -> dict | None:
    """The JSON object on one manifest line, None when the line is not one."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def read_manifest(path: str | Path, *, resolve: bool = True) -> list[dict]:
    """Read a JSONL manifest. With ``resolve``, ``audio`` becomes an absolute path
    (relative paths are taken relative to the manifest's folder)."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = _json_object(line)
            if r is None:
                raise ValueError(f"{path}:{n}: not a JSON object: {line.strip()[:80]!r}")
            missing = [k for k in REQUIRED_FIELDS if k not in r]
            if missing:
                raise ValueError(f"{path}:{n}: missing fields {missing}")
            if resolve:
                r["audio"] = str((path.parent / r["audio"]).resolve())
            records.append(r)
    return records


# --- feature cache --------------------------------------------------------------------


def cache_key(audio_path: str | Path, config: FeatureConfig) -> str:
    """Hash of (absolute path, size, mtime_ns, feature settings) for one audio file."""
    st = os.stat(audio_path)
    blob = f"{Path(audio_path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{config.fingerprint()}"
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_file(cache_dir: Path, audio_path: str | Path) -> Path:
    name = hashlib.sha1(str(Path(audio_path).resolve()).encode()).hexdigest()[:20]
    return cache_dir / f"{name}.pt"


def _valid_entry(entry: object, key: str, config: FeatureConfig) -> bool:
    if not isinstance(entry, dict) or entry.get("key") != key:
        return False
    mel, f0 = entry.get("mel"), entry.get("f0")
    return (isinstance(mel, torch.Tensor) and isinstance(f0, torch.Tensor)
            and mel.dtype == torch.float32 and f0.dtype == torch.float32
            and mel.ndim == 2 and mel.shape[1] == config.n_mels and f0.ndim == 1
            and f0.shape[0] == mel.shape[0] > 0
            and bool(torch.isfinite(mel).all()) and bool(torch.isfinite(f0).all()))


def load_features(audio_path: str | Path, config: FeatureConfig = DEFAULT_CONFIG,
                  cache_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_mel [T, n_mels], f0 [T])`` float32 for one file, through the cache if given.

    Returns cached features only when the entry's key matches the file's current
    size/mtime and ``config``; otherwise recomputes and rewrites the entry.
    """
    if cache_dir is None:
        return compute_features(load_audio(audio_path, config.sample_rate), config)
    cache_dir = Path(cache_dir)
    key = cache_key(audio_path, config)
    file = _cache_file(cache_dir, audio_path)
    if file.exists():
        try:
            entry = torch.load(file, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
            # An unreadable file (truncated, garbage) is a cache miss.
            entry = None
        if _valid_entry(entry, key, config):
            return entry["mel"], entry["f0"]
    mel, f0 = compute_features(load_audio(audio_path, config.sample_rate), config)
    # Atomic: DataLoader workers may race on the same entry, and a reader must never see a
    # half-written file. A lost entry is only a cache miss, so no fsync.
    atomic_save({"key": key, "mel": mel, "f0": f0}, file, durable=False)
    return mel, f0


# --- dataset --------------------------------------------------------------------------


@dataclass
class Example:
    """One utterance.

    mel ``[T, n_mels]`` float32 log-mel; f0 ``[T]`` float32 Hz (0 = unvoiced);
    tokens ``[U]`` int64 ``<bos> chars <eos>``; token_f0 ``[U]`` float32 (see
    :func:`echo.align.token_f0`); text is the normalised transcript.
    """

    mel: torch.Tensor
    f0: torch.Tensor
    tokens: torch.Tensor
    token_f0: torch.Tensor
    text: str


class SpeechDataset(Dataset):
    """Features and targets for the utterances of a manifest.

    Args:
        manifest: path of a JSONL manifest, or already-read records.
        tokenizer: text -> ids (default :class:`~echo.text.CharTokenizer`).
        cache_dir: folder for cached features (None: compute every time).
        config: feature settings.
        max_duration: drop utterances longer than this many seconds (None: keep all).
        keep_in_memory: keep every example this process has loaded, so each file is read once
            per process, not once per epoch (a 4000-utterance corpus takes ~0.5 GB; with
            DataLoader workers each worker keeps its own, for as long as it lives).
    """

    def __init__(self, manifest: str | Path | Sequence[dict],
                 tokenizer: CharTokenizer | None = None, cache_dir: str | Path | None = None,
                 config: FeatureConfig = DEFAULT_CONFIG,
                 max_duration: float | None = None, keep_in_memory: bool = False) -> None:
        records = read_manifest(manifest) if isinstance(manifest, (str, Path)) else list(manifest)
        if max_duration is not None:
            records = [r for r in records if r["duration"] <= max_duration]
        self.records = records
        self.tokenizer = tokenizer or CharTokenizer()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.config = config
        self._memory: dict[int, Example] | None = {} if keep_in_memory else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Example:
        if self._memory is not None:
            if i not in self._memory:
                self._memory[i] = self._load(i)
            return self._memory[i]
        return self._load(i)

    def _load(self, i: int) -> Example:
        rec = self.records[i]
        mel, f0 = load_features(rec["audio"], self.config, self.cache_dir)
        text = normalize_text(rec["text"])
        tokens = torch.tensor(self.tokenizer.encode(text, normalize=False), dtype=torch.long)
        tf0 = token_f0(f0[None], torch.tensor([f0.shape[0]]), tokens[None],
                       torch.tensor([tokens.shape[0]]))[0]
        return Example(mel, f0, tokens, tf0, text)

    def durations(self) -> list[float]:
        """Manifest durations in seconds (for length-bucketed batching)."""
        return [float(r["duration"]) for r in self.records]

    def build_cache(self, num_workers: int = 0) -> None:
        """Compute every missing/stale cache entry up front, with a progress bar."""
        from tqdm import tqdm

        if self.cache_dir is None:
            raise ValueError("build_cache needs a cache_dir")
        loader = torch.utils.data.DataLoader(self, batch_size=None, num_workers=num_workers,
                                             collate_fn=lambda x: None)
        for _ in tqdm(loader, total=len(self), desc="features", unit="utt"):
            pass


# --- batching -------------------------------------------------------------------------


@dataclass
class Batch:
    """A padded batch (padding at the end of every sequence).

    mel ``[B, T, n_mels]`` float32 (pad 0); mel_lengths ``[B]`` int64;
    f0 ``[B, T]`` float32 (pad 0); tokens ``[B, U]`` int64 (pad = tokenizer pad id, 0);
    token_lengths ``[B]`` int64; token_f0 ``[B, U]`` float32 (pad 0); texts: list of str.
    """

    mel: torch.Tensor
    mel_lengths: torch.Tensor
    f0: torch.Tensor
    tokens: torch.Tensor
    token_lengths: torch.Tensor
    token_f0: torch.Tensor
    texts: list[str]

    def to(self, device: torch.device | str) -> Batch:
        """Copy of the batch with every tensor moved to ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return Batch(**moved)


def pad_features(mels: Sequence[torch.Tensor], f0s: Sequence[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Utterances' ``[T_i, n_mels]`` log-mels and ``[T_i]`` f0 as a zero-padded batch:
    ``(mel [B, T, n_mels], mel_lengths [B] int64, f0 [B, T])``."""
    mel = torch.nn.utils.rnn.pad_sequence(list(mels), batch_first=True)
    f0 = torch.nn.utils.rnn.pad_sequence(list(f0s), batch_first=True)
    return mel, torch.tensor([m.shape[0] for m in mels], dtype=torch.long), f0


class Collator:
    """Pads a list of :class:`Example` into a :class:`Batch`; ``pad_id`` fills tokens."""

    def __init__(self, pad_id: int = 0) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[Example]) -> Batch:
        def pad(seqs: list[torch.Tensor], value: float) -> torch.Tensor:
            return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)

        mel, mel_lengths, f0 = pad_features([e.mel for e in examples], [e.f0 for e in examples])
        return Batch(
            mel=mel,
            mel_lengths=mel_lengths,
            f0=f0,
            tokens=pad([e.tokens for e in examples], self.pad_id),
            token_lengths=torch.tensor([e.tokens.shape[0] for e in examples], dtype=torch.long),
            token_f0=pad([e.token_f0 for e in examples], 0.0),
            texts=[e.text for e in examples],
        )


collate = Collator()
