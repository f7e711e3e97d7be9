"""Manifest round trip, the feature cache (hit, corrupt, stale) and the collator."""

import math
import os

import numpy as np
import pytest
import soundfile as sf
import torch

import echo.data.dataset as ds
from echo.audio import FeatureConfig
from echo.data.dataset import Collator, SpeechDataset, read_manifest, write_manifest
from echo.text import CharTokenizer

SR = 16000


def _write_tone(path, hz: float, seconds: float) -> None:
    t = np.arange(int(SR * seconds)) / SR
    sf.write(path, 0.4 * np.sin(2 * math.pi * hz * t), SR, subtype="PCM_16")


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "wavs").mkdir()
    recs = []
    for i, (hz, sec, text) in enumerate([(120.0, 0.5, "Hello, world!"),
                                         (200.0, 0.8, "it's 2 o'clock"),
                                         (160.0, 0.3, "ok")]):
        _write_tone(tmp_path / "wavs" / f"u{i}.wav", hz, sec)
        recs.append({"audio": f"wavs/u{i}.wav", "text": text, "duration": sec,
                     "speaker": "tone/a", "engine": "tone"})
    write_manifest(tmp_path / "m.jsonl", recs)
    return tmp_path, recs


@pytest.fixture
def count_computes(monkeypatch):
    calls = []
    real = ds.compute_features

    def counting(wave, config):
        calls.append(1)
        return real(wave, config)

    monkeypatch.setattr(ds, "compute_features", counting)
    return calls


def test_manifest_round_trip(corpus) -> None:
    root, recs = corpus
    back = read_manifest(root / "m.jsonl", resolve=False)
    assert back == recs
    resolved = read_manifest(root / "m.jsonl")
    assert resolved[1]["audio"] == str((root / "wavs" / "u1.wav").resolve())
    with pytest.raises(ValueError, match="lacks"):
        write_manifest(root / "bad.jsonl", [{"audio": "x.wav", "text": "t"}])


def test_example_contents(corpus) -> None:
    root, _ = corpus
    ex = SpeechDataset(root / "m.jsonl")[1]
    assert ex.mel.shape == (int(0.8 * SR) // 160 + 1, 80) and ex.mel.dtype == torch.float32
    assert ex.f0.shape == (ex.mel.shape[0],)
    assert ex.text == "it's 2 o'clock"
    assert CharTokenizer().decode(ex.tokens) == ex.text
    assert ex.tokens.dtype == torch.long and ex.tokens.shape == (len(ex.text) + 2,)
    assert ex.token_f0.shape == ex.tokens.shape
    # a steady 200 Hz tone: every token's f0 is ~200 Hz (the last span holds the abrupt
    # end of the tone, where WORLD reads a few Hz low)
    assert torch.all((ex.token_f0[:-1] - 200.0).abs() < 1.0)
    assert abs(float(ex.token_f0[-1]) - 200.0) < 6.0


def test_cache_hit_corrupt_and_stale(corpus, count_computes) -> None:
    root, _ = corpus
    cache = root / "cache"
    data = SpeechDataset(root / "m.jsonl", cache_dir=cache)
    first = data[0]
    assert len(count_computes) == 1 and len(list(cache.glob("*.pt"))) == 1
    again = data[0]
    assert len(count_computes) == 1  # served from the cache
    assert torch.equal(first.mel, again.mel) and torch.equal(first.f0, again.f0)

    # corrupt entry: garbage bytes -> recomputed, rewritten, then readable again
    entry = next(cache.glob("*.pt"))
    entry.write_bytes(b"not a torch file")
    assert torch.equal(data[0].mel, first.mel) and len(count_computes) == 2
    data[0]
    assert len(count_computes) == 2

    # truncated entry
    entry.write_bytes(entry.read_bytes()[:100])
    data[0]
    assert len(count_computes) == 3

    # stale entry: the audio changed (different tone, new mtime) -> recomputed
    wav = root / "wavs" / "u0.wav"
    _write_tone(wav, 300.0, 0.5)
    st = os.stat(wav)
    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    changed = data[0]
    assert len(count_computes) == 4
    assert float(changed.f0[changed.f0 > 0].median()) == pytest.approx(300.0, abs=2.0)

    # different feature settings must not reuse the entry either
    SpeechDataset(root / "m.jsonl", cache_dir=cache, config=FeatureConfig(f0_floor=60.0))[0]
    assert len(count_computes) == 5


def test_keep_in_memory_reads_each_file_once(corpus, monkeypatch) -> None:
    root, recs = corpus
    plain = SpeechDataset(root / "m.jsonl", cache_dir=root / "cache")
    kept = SpeechDataset(root / "m.jsonl", cache_dir=root / "cache", keep_in_memory=True)
    loads = []
    real = ds.load_features
    monkeypatch.setattr(ds, "load_features", lambda *a, **k: loads.append(1) or real(*a, **k))
    first = [kept[i] for i in range(len(recs))]
    assert len(loads) == len(recs)
    for _ in range(2):  # two more epochs
        for i in reversed(range(len(recs))):
            again, fresh = kept[i], plain[i]
            for field in ("mel", "f0", "tokens", "token_f0"):
                assert torch.equal(getattr(again, field), getattr(fresh, field)), field
            assert again.text == fresh.text and again is first[i]
    assert len(loads) == len(recs) + 2 * len(recs)  # the kept dataset read nothing more; the plain one every time


def test_cache_entry_with_wrong_shapes_is_rebuilt(corpus, count_computes) -> None:
    root, _ = corpus
    cache = root / "cache"
    data = SpeechDataset(root / "m.jsonl", cache_dir=cache)
    data[2]
    entry = next(cache.glob("*.pt"))
    bad = torch.load(entry, weights_only=True)
    bad["f0"] = bad["f0"][:-1]  # right key, inconsistent content
    torch.save(bad, entry)
    assert data[2].f0.shape[0] == data[2].mel.shape[0]
    assert len(count_computes) == 2


def test_collator_shapes(corpus) -> None:
    root, _ = corpus
    data = SpeechDataset(root / "m.jsonl")
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=Collator())
    batch = next(iter(loader))
    lengths = [int(SR * s) // 160 + 1 for s in (0.5, 0.8, 0.3)]
    assert batch.mel.shape == (3, max(lengths), 80)
    assert batch.mel_lengths.tolist() == lengths
    assert batch.f0.shape == (3, max(lengths))
    assert batch.texts == ["hello world", "it's 2 o'clock", "ok"]
    tl = [len(t) + 2 for t in batch.texts]
    assert batch.token_lengths.tolist() == tl
    assert batch.tokens.shape == batch.token_f0.shape == (3, max(tl))
    assert batch.tokens.dtype == torch.long and batch.mel.dtype == torch.float32
    # padding regions hold the pad values
    assert torch.all(batch.tokens[2, tl[2]:] == 0) and torch.all(batch.token_f0[2, tl[2]:] == 0)
    assert torch.all(batch.mel[2, lengths[2]:] == 0) and torch.all(batch.f0[0, lengths[0]:] == 0)
    assert torch.equal(batch.mel[1, : lengths[1]], data[1].mel)
    assert batch.to("cpu").mel.shape == batch.mel.shape
