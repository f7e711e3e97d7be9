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
