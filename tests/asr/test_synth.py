"""Corpus builder: planning (no engines needed) and a ~10-utterance build.

The build test is deliberately tiny (10 utterances, fast engines only) to keep CI short;
the full 2400-utterance build is run by hand (``python -m echo.data.synth``).
"""

import json

import pytest
import soundfile as sf

from echo.data import synth
from echo.data.dataset import read_manifest


def test_plan_is_deterministic_and_holds_out_test_voices(tmp_path) -> None:
    counts = {"train": 40, "dev": 10, "test": 10}
    a = synth.plan_jobs(tmp_path, counts, list(synth.ALL_ENGINES), seed=5)
    assert a == synth.plan_jobs(tmp_path, counts, list(synth.ALL_ENGINES), seed=5)
    assert a != synth.plan_jobs(tmp_path, counts, list(synth.ALL_ENGINES), seed=6)
    held = {v.speaker for v in synth.VOICES if v.held_out}
    by = {s: [j for j in a if j.split == s] for s in synth.SPLITS}
    assert [len(by[s]) for s in synth.SPLITS] == [40, 10, 10]
    assert all(j.speaker in held for j in by["test"])
    assert not any(j.speaker in held for j in by["train"] + by["dev"])
    texts = {s: {j.text for j in by[s]} for s in synth.SPLITS}
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"]
    for j in a:
        lo, hi = synth.RATE_RANGE
        assert lo <= j.rate <= hi


def test_training_espeak_voices_share_no_accent_or_variant_with_held_out_ones() -> None:
    def parts(held_out: bool) -> tuple[set[str], set[str]]:
        names = [v.name.split("+") for v in synth.VOICES if v.engine == "espeak-ng" and v.held_out == held_out]
        return {accent for accent, _ in names}, {variant for _, variant in names}

    (train_accents, train_variants), (held_accents, held_variants) = parts(False), parts(True)
    assert held_accents and held_variants and len(train_variants) >= 12
    assert not train_accents & held_accents and not train_variants & held_variants


def test_engine_subset_without_held_out_voice_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="held-out"):
        synth.plan_jobs(tmp_path, {"train": 2, "dev": 0, "test": 2}, ["piper"], seed=0)


def test_missing_engine_names_the_package(monkeypatch) -> None:
    monkeypatch.setattr(synth.shutil, "which", lambda name: None)
    with pytest.raises(synth.MissingEngineError, match="apt-get install -y flite"):
        synth.check_engine("flite")
    with pytest.raises(synth.MissingEngineError, match="apt-get install -y espeak-ng"):
        synth.check_engine("espeak-ng")
    assert synth.main(["--out", "/nonexistent", "--engines", "flite"]) == 2


FAST = synth.available_engines(synth.FAST_ENGINES)


@pytest.mark.skipif(not FAST, reason="no fast TTS engine installed "
                    "(apt-get install -y flite espeak-ng festival festvox-kallpc16k festvox-kdlpc16k ...)")
def test_build_ten_utterances(tmp_path) -> None:
    engines = FAST
    # festival has no held-out voice, so with festival alone there is no test split.
    counts = {"train": 6, "dev": 2, "test": 0 if engines == ["festival"] else 2}
    out = synth.build_corpus(tmp_path, counts, seed=1, engines=engines, workers=2,
                             progress=False)
    for split, n in counts.items():
        if not n:
            continue
        recs = read_manifest(tmp_path / f"{split}.jsonl")
        assert len(recs) == n and out[split] == read_manifest(tmp_path / f"{split}.jsonl",
                                                              resolve=False)
        for r in recs:
            info = sf.info(r["audio"])
            assert info.samplerate == 16000 and info.channels == 1
            assert r["duration"] == pytest.approx(info.frames / 16000, abs=1e-3)
            assert 0.8 < r["duration"] < 8.0
            assert r["engine"] in engines and r["speaker"].startswith(r["engine"] + "/")
            data, _ = sf.read(r["audio"])
            assert 0.2 < abs(data).max() < 0.99  # levelled, not clipped
    meta = json.loads((tmp_path / "corpus.json").read_text())
    assert meta["seed"] == 1 and meta["engines"] == engines
    synth.cache_features(tmp_path, workers=1)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == sum(counts.values())
