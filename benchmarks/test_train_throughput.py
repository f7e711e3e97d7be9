"""Smoke test of the training-throughput script on a tiny synthetic config (the real
measurement is ``python -m benchmarks.train_throughput``)."""

import echo.model

from .train_throughput import main, measure

TINY = ["data.synthetic=true", "data.synthetic_size=16", "model.d_model=32", "model.n_heads=2", "model.enc_layers=1",
        "model.dec_layers=1", "model.ffn_dim=64", "train.batch_size=4", "train.threads=1"]


def test_every_backend_gets_a_rate_per_round():
    real_attention = echo.model.rope_attention
    rates = measure("configs/tiny.yaml", TINY, ["reference", "cpu", "free"], steps=2, rounds=2)
    assert list(rates) == ["reference", "cpu", "free"]
    assert all(len(v) == 2 and all(r > 0 for r in v) for v in rates.values())
    assert echo.model.rope_attention is real_attention  # the "free" stand-in is scoped to its own steps


def test_cli_prints_the_ratio_table(capsys):
    assert main(["--backends", "chunked", "--steps", "1", "--rounds", "1", *(f"--set={s}" for s in TINY)]) == 0
    out = capsys.readouterr().out
    assert "| chunked |" in out and "1.00x" in out
