"""Smoke test of the CPU roofline script at a tiny length (the real measurement is
``python -m benchmarks.cpu_roofline``)."""

import re

import pytest

from .cpu_roofline import main


@pytest.mark.parametrize("mode, products", [([], 6), (["--forward"], 2)])
def test_prints_bound_and_ratio_per_mask(capsys, mode, products):
    assert main(["--lengths", "64", "--rounds", "1", *mode]) == 0
    out = capsys.readouterr().out
    assert f"Bound = {products} products / best rate." in out
    rows = re.findall(r"^\| 64, (full|causal) \|.*\| (\d+\.\d+)x \| (\d+\.\d+)x \|", out, flags=re.MULTILINE)
    assert [r[0] for r in rows] == ["full", "causal"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
