"""pitch_features against values worked out by hand."""

import math

import pytest
import torch

import echo_kernels as ek


def f0_of(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_mixed_voiced_unvoiced_by_hand():
    f0 = f0_of([100.0, 0.0, 200.0, 300.0])
    feats = ek.pitch_features(f0, dtype=torch.float64)
    mu, sigma = 200.0, math.sqrt((100.0**2 + 0 + 100.0**2) / 3)
    assert feats.voiced.tolist() == [[1.0, 0.0, 1.0, 1.0]]
    expected_pitch = [(100 - mu) / (sigma + 1e-6), 0.0, 0.0, (300 - mu) / (sigma + 1e-6)]
    torch.testing.assert_close(feats.pitch, torch.tensor([expected_pitch], dtype=torch.float64))
    expected_log_theta = [math.log(100), math.log(mu), math.log(200), math.log(300)]
    torch.testing.assert_close(feats.log_theta, torch.tensor([expected_log_theta], dtype=torch.float64))
    torch.testing.assert_close(feats.radius, torch.tensor([[100 / 600, 40 / 600, 200 / 600, 300 / 600]], dtype=torch.float64))
    assert feats.pos.tolist() == [[0.0, 1.0, 2.0, 3.0]]


def test_one_voiced_frame_uses_unit_sigma():
    feats = ek.pitch_features(f0_of([0.0, 150.0, 0.0]), dtype=torch.float64)
    # mu = 150, sigma = 1 (fewer than two voiced frames): the only voiced pitch is 0.
    assert feats.pitch.tolist() == [[0.0, 0.0, 0.0]]
    torch.testing.assert_close(feats.log_theta, torch.full((1, 3), math.log(150.0), dtype=torch.float64))


def test_no_voiced_frame_falls_back_to_theta():
    for mode in ("f0", "mean_f0", "fixed"):
        feats = ek.pitch_features(f0_of([0.0, 0.0]), theta=500.0, theta_mode=mode, dtype=torch.float64)
        torch.testing.assert_close(feats.log_theta, torch.full((1, 2), math.log(500.0), dtype=torch.float64))
        assert feats.voiced.sum() == 0 and feats.pitch.abs().sum() == 0


def test_padding_is_ignored_by_the_statistics():
    f0 = f0_of([100.0, 300.0, 999.0], [120.0, 0.0, 0.0])
    feats = ek.pitch_features(f0, lengths=torch.tensor([2, 3]), dtype=torch.float64)
    assert feats.voiced.tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    # Row 0: mu 200, sigma 100 (the padded 999 Hz frame does not count).
    torch.testing.assert_close(feats.pitch[0], torch.tensor([-100 / (100 + 1e-6), 100 / (100 + 1e-6), 0.0], dtype=torch.float64))
    torch.testing.assert_close(feats.log_theta[0, 2], torch.tensor(math.log(200.0), dtype=torch.float64))


def test_theta_and_radius_modes():
    f0 = f0_of([100.0, 0.0, 700.0])
    mean = ek.pitch_features(f0, theta_mode="mean_f0", dtype=torch.float64)
    torch.testing.assert_close(mean.log_theta, torch.full((1, 3), math.log(400.0), dtype=torch.float64))
    offset = ek.pitch_features(f0, theta_mode="f0_offset", theta=10.0, dtype=torch.float64)
    torch.testing.assert_close(offset.log_theta, torch.log(torch.tensor([[110.0, 10.0, 710.0]], dtype=torch.float64)))
    fixed = ek.pitch_features(f0, theta_mode="fixed", radius_mode="unit", dtype=torch.float64)
    torch.testing.assert_close(fixed.log_theta, torch.full((1, 3), math.log(10000.0), dtype=torch.float64))
    assert fixed.radius.tolist() == [[1.0, 1.0, 1.0]]
    clamped = ek.pitch_features(f0, dtype=torch.float64)
    torch.testing.assert_close(clamped.radius, torch.tensor([[100 / 600, 40 / 600, 1.0]], dtype=torch.float64))


def test_custom_positions_and_float32_default():
    feats = ek.pitch_features(f0_of([100.0, 120.0]), positions=torch.tensor([[5.0, 7.0]]))
    assert feats.pos.tolist() == [[5.0, 7.0]]
    assert all(t.dtype == torch.float32 for t in feats)


@pytest.mark.parametrize(
    "f0, kwargs, error, match",
    [
        (torch.tensor([[100.0, -1.0]]), {}, ValueError, ">= 0"),
        (torch.tensor([[100.0, float("nan")]]), {}, ValueError, "finite"),
        (torch.tensor([[100.0, float("inf")]]), {}, ValueError, "finite"),
        (torch.tensor([100.0]), {}, ValueError, r"\[B, T\]"),
        (torch.tensor([[100, 120]]), {}, TypeError, "floating"),
        (torch.tensor([[100.0]]), {"theta_mode": "log"}, ValueError, "theta_mode"),
        (torch.tensor([[100.0]]), {"radius_mode": "big"}, ValueError, "radius_mode"),
        (torch.tensor([[100.0]]), {"theta": 0.0}, ValueError, "theta"),
        (torch.tensor([[100.0]]), {"lengths": torch.tensor([2])}, ValueError, "lengths"),
        (torch.tensor([[100.0]]), {"lengths": torch.tensor([1.0])}, TypeError, "lengths"),
        (torch.tensor([[100.0]]), {"positions": torch.zeros(1, 2)}, ValueError, "positions"),
        (torch.tensor([[100.0]]), {"positions": [[0.0]]}, TypeError, "positions must be a torch.Tensor"),
        (torch.tensor([[100.0]]), {"dtype": torch.int64}, TypeError, "dtype must be"),
    ],
)
def test_bad_f0_arguments(f0, kwargs, error, match):
    with pytest.raises(error, match=match):
        ek.pitch_features(f0, **kwargs)


@pytest.mark.parametrize(
    "f0",
    [
        [[0.0, 0.0, 0.0, 0.0]],  # unvoiced: sigma = 1 by rule
        [[0.0, 130.0, 0.0, 0.0]],  # one voiced frame: sigma = 1 by rule
        [[120.0, 0.0, 120.0, 120.0]],  # constant voiced f0: sigma = 0
        [[0.0, 120.0, 150.0, 180.0]],
    ],
)
@pytest.mark.parametrize("theta_mode", ["f0", "mean_f0", "f0_offset"])
def test_f0_gradient_is_finite_where_sigma_has_no_spread(f0, theta_mode):
    # sqrt at a zero variance has an infinite derivative; the branch torch.where does not take
    # must not turn it into NaN (an unvoiced utterance is the spec's own corner case).
    f0 = torch.tensor(f0, dtype=torch.float64, requires_grad=True)
    feats = ek.pitch_features(f0, theta_mode=theta_mode, dtype=torch.float64)
    loss = sum((t * torch.linspace(0.5, 2.0, 4, dtype=torch.float64)).sum() for t in (feats.pitch, feats.log_theta, feats.radius))
    (grad,) = torch.autograd.grad(loss, f0)
    assert torch.isfinite(grad).all(), grad


def test_f0_gradient_matches_finite_differences_with_spread():
    # All voiced: gradcheck nudges every frame both ways, and f0 < 0 is refused.
    f0 = torch.tensor([[120.0, 150.0, 185.0, 140.0]], dtype=torch.float64, requires_grad=True)

    def pitch_of(x):
        return ek.pitch_features(x, dtype=torch.float64).pitch

    assert torch.autograd.gradcheck(pitch_of, (f0,))
