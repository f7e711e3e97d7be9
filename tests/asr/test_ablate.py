"""The ablation's variants are the configurations they claim to be."""

from pathlib import Path

import pytest

from echo.ablate import VARIANTS, run_ablation
from echo.train import load_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


@pytest.mark.parametrize(
    "variant, pitch, theta, radius, bias",
    [("a", False, None, None, None), ("b", True, "f0", "unit", None), ("c", True, "f0", "f0", None),
     ("d", True, "f0", "f0", "exp"), ("e", True, "f0", "unit", "exp"), ("f", True, "fixed", "unit", "exp")],
)
def test_variant_overrides(variant, pitch, theta, radius, bias):
    model = load_config(TINY, VARIANTS[variant][1]).model
    assert model.pitch is pitch
    if pitch:
        assert (model.theta_mode, model.radius_mode, model.bias) == (theta, radius, bias)


def test_unknown_variant_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown variants"):
        run_ablation(TINY, variants="az", out_dir=tmp_path)


def test_table_reports_mean_and_spread_of_every_column(tmp_path):
    from echo.ablate import COLUMNS, _write_table

    base = load_config(TINY)
    rows = []
    for seed, value in enumerate((0.10, 0.20)):
        row = {key: value for key, _ in COLUMNS}
        rows.append({**row, "seed": seed, "steps": 2000, "minutes": 5.0 + seed})
    out = tmp_path / "ablation.md"
    _write_table({"a": rows}, base, out, TINY, 2, {"dev": 200, "test": 200})
    lines = out.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| variant"))
    assert header.count("|") == len(COLUMNS) + 4
    row = next(line for line in lines if line.startswith("| (a)"))
    # mean 15% and sample std 7.07% of 10% and 20%, in every score column
    assert row.count("15.00 ± 7.07") == len(COLUMNS)
    assert row.endswith("| 2000 | 5.5 |")
    # A re-run rewrites the table and keeps the notes written under it.
    out.write_text(out.read_text() + "\n## Reading\n\nhand-written\n")
    rows[1]["test_joint_cer"] = 0.4
    _write_table({"a": rows}, base, out, TINY, 2, {"dev": 200, "test": 200})
    text = out.read_text()
    assert text.endswith("\n## Reading\n\nhand-written\n") and text.count("| (a)") == 1 and "25.00 ± 21.21" in text


def test_ablation_trains_scores_and_writes_table_json_and_plot(tmp_path):
    import json

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({
        "model": {"d_model": 32, "n_heads": 2, "enc_layers": 1, "dec_layers": 1, "ffn_dim": 64, "backend": "chunked"},
        "train": {"batch_size": 8, "warmup_steps": 1, "max_steps": 2, "eval_every": 0, "ckpt_every": 0,
                  "threads": 1},
        "data": {"synthetic": True, "synthetic_size": 16},
    }))
    results = tmp_path / "ablation.md"
    raw = run_ablation(config, seeds=1, variants="af", out_dir=tmp_path / "runs", results_path=results,
                       quiet=True, eval_max_utts=2)
    assert set(raw) == {"a", "f"} and all(len(rows) == 1 and rows[0]["steps"] == 2 for rows in raw.values())
    assert json.loads(results.with_suffix(".json").read_text()) == raw
    assert results.with_suffix(".png").stat().st_size > 5_000
    assert sum(line.startswith("| (") for line in results.read_text().splitlines()) == 2


def test_no_variant_is_refused_before_any_file_is_written(tmp_path):
    with pytest.raises(ValueError, match="variants must name at least one of"):
        run_ablation(TINY, variants="", out_dir=tmp_path, results_path=tmp_path / "table.md")
    assert not (tmp_path / "table.md").exists()
