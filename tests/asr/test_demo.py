"""``python -m echo demo`` end to end on a ten-utterance corpus: train a few steps, score the test
split with the demo's decoder (joint beam search + n-gram), print one transcription."""

import pytest

from echo.data import synth
from echo.demo import run_demo

# Fast engines with a held-out voice (festival has none, so alone it gives no test split).
ENGINES = synth.available_engines(synth.FAST_ENGINES)
TINY_MODEL = ["model.d_model=32", "model.n_heads=2", "model.enc_layers=1", "model.dec_layers=1", "model.ffn_dim=64"]


@pytest.mark.skipif(ENGINES in ([], ["festival"]), reason="needs flite or espeak-ng (apt-get install -y flite espeak-ng)")
def test_demo_trains_scores_and_transcribes(tmp_path, capsys) -> None:
    corpus = tmp_path / "corpus"
    synth.build_corpus(corpus, {"train": 6, "dev": 2, "test": 2}, seed=2, engines=ENGINES, workers=2, progress=False)
    synth.cache_features(corpus, workers=1)
    result = run_demo(tmp_path / "demo", corpus=corpus, minutes=5, max_steps=3,
                      extra=[*TINY_MODEL, "train.batch_size=2", "train.warmup_steps=1", "train.eval_max_utts=2",
                             "train.threads=1"])
    printed = capsys.readouterr().out
    assert "trained 3 steps" in printed and "test WER" in printed
    assert result["reference"] and isinstance(result["hypothesis"], str)
    assert result["wer"] >= 0 and 0 <= result["cer"]
    assert (tmp_path / "demo" / "run" / "best.pt").exists() and (tmp_path / "demo" / "test_errors.tsv").exists()
