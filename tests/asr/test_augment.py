"""Batch augmentation: masks stay inside each utterance, the warp and f0 scale do what they say,
draws depend only on (seed, step), bad settings are named."""

import pytest
import torch

from echo.augment import (
    FEATURE_PER_DB,
    AugmentConfig,
    augment_batch,
    colour_mel,
    step_generator,
    stretch_time,
    warp_mel,
)


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    mel = torch.randn(3, 50, 20, generator=gen)
    lengths = torch.tensor([50, 31, 12])
    for b, n in enumerate(lengths):
        mel[b, n:] = 0
    f0 = torch.where(torch.rand(3, 50, generator=gen) < 0.6, 100 + 100 * torch.rand(3, 50, generator=gen),
                     torch.zeros(3, 50))
    token_f0 = torch.tensor([[120.0, 0.0, 150.0], [0.0, 0.0, 0.0], [90.0, 110.0, 0.0]])
    return {"mel": mel, "mel_lengths": lengths, "f0": f0, "token_f0": token_f0, "tokens": torch.zeros(3, 3).long()}


def test_disabled_is_identity():
    inputs = _inputs()
    assert augment_batch(inputs, AugmentConfig(), step_generator(0, 0)) is inputs


def test_masks_stay_inside_each_utterance_and_padding_is_untouched():
    inputs = _inputs()
    cfg = AugmentConfig(freq_masks=2, freq_width=6, time_masks=2, time_width=0.2)
    out = augment_batch(inputs, cfg, step_generator(0, 3))
    changed = out["mel"] != inputs["mel"]
    assert changed.any()
    for b, n in enumerate(inputs["mel_lengths"]):
        assert not changed[b, n:].any()  # padding frames keep their zeros
        assert torch.equal(out["mel"][b, n:], inputs["mel"][b, n:])
    assert inputs["mel"].abs().sum() > 0 and torch.equal(out["f0"], inputs["f0"])


def test_same_seed_and_step_give_the_same_draws():
    cfg = AugmentConfig(freq_masks=2, time_masks=2, mel_warp=0.1, f0_scale=0.1, tempo=0.1, timbre_db=6.0)
    a = augment_batch(_inputs(), cfg, step_generator(7, 11))
    b = augment_batch(_inputs(), cfg, step_generator(7, 11))
    c = augment_batch(_inputs(), cfg, step_generator(7, 12))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["mel"], c["mel"])


def test_f0_scale_keeps_unvoiced_frames_at_zero_and_scales_each_utterance_once():
    inputs = _inputs()
    out = augment_batch(inputs, AugmentConfig(f0_scale=0.2), step_generator(1, 0))
    voiced = inputs["f0"] > 0
    assert torch.equal(out["f0"] == 0, ~voiced)
    ratio = out["f0"][voiced] / inputs["f0"][voiced]
    for b in range(3):
        r = out["f0"][b][voiced[b]] / inputs["f0"][b][voiced[b]]
        assert torch.allclose(r, r[0].expand_as(r)) and 0.8 <= r[0] <= 1.2
        tok = inputs["token_f0"][b] > 0
        if tok.any():
            assert torch.allclose(out["token_f0"][b][tok] / inputs["token_f0"][b][tok], r[0].expand(int(tok.sum())))
    assert ratio.numel() > 0


def test_warp_by_one_is_identity_and_a_stretch_moves_a_peak_up():
    mel = torch.zeros(2, 4, 40)
    mel[:, :, 10] = 1.0
    assert torch.allclose(warp_mel(mel, torch.ones(2)), mel)
    warped = warp_mel(mel, torch.tensor([1.2, 0.8]))
    assert warped[0, 0].argmax() == 12 and warped[1, 0].argmax() == 8


def test_timbre_is_one_smooth_bounded_curve_per_utterance_and_padding_is_untouched():
    inputs = _inputs()
    out = augment_batch(inputs, AugmentConfig(timbre_db=6.0), step_generator(2, 5))
    gain = out["mel"] - inputs["mel"]
    curves = []
    for b, n in enumerate(inputs["mel_lengths"]):
        assert torch.equal(out["mel"][b, n:], inputs["mel"][b, n:])
        curve = gain[b, 0]
        assert torch.allclose(gain[b, :n], curve.expand(int(n), -1), atol=1e-6)  # the same gain in every frame
        assert curve.abs().max() <= 6.0 * FEATURE_PER_DB + 1e-6 and curve.abs().max() > 0
        curves.append(curve)
    assert not torch.allclose(curves[0], curves[1])
    # Smooth: three cosines over 20 bins change little from one bin to the next.
    assert (curves[0].diff().abs().max() < 0.5 * curves[0].abs().max() + 1e-6)


def test_colour_mel_adds_the_cosines_in_feature_units():
    mel = torch.zeros(1, 2, 5)
    out = colour_mel(mel, torch.tensor([2]), torch.tensor([[4.0, 0.0, 0.0]]))
    want = 4.0 * FEATURE_PER_DB * torch.cos(torch.pi * torch.arange(5) / 4)
    assert torch.allclose(out[0, 0], want) and torch.allclose(out[0, 1], want)


@pytest.mark.parametrize("kw", [{"freq_masks": -1}, {"time_width": 1.5}, {"mel_warp": -0.1}, {"tempo": 1.0},
                                {"timbre_db": 25.0}])
def test_bad_settings_are_named(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        AugmentConfig(**kw)


def test_stretch_by_one_is_identity_and_a_ramp_stays_a_ramp():
    inputs = _inputs()
    mel, f0, lengths = stretch_time(inputs["mel"], inputs["f0"], inputs["mel_lengths"], torch.ones(3))
    assert torch.equal(lengths, inputs["mel_lengths"]) and torch.allclose(mel, inputs["mel"])
    valid = torch.arange(50)[None] < inputs["mel_lengths"][:, None]
    assert torch.equal(f0, inputs["f0"] * valid)
    # A linear ramp over frame centres resamples to the same line at the new rate.
    ramp = torch.arange(20.0)[None, :, None].expand(1, 20, 2).contiguous()
    slow, _, n = stretch_time(ramp, torch.zeros(1, 20), torch.tensor([20]), torch.tensor([1.5]))
    assert int(n) == 30
    inner = slow[0, 1:-1, 0]
    assert torch.allclose(inner, (torch.arange(1, 29) + 0.5) * 20 / 30 - 0.5, atol=1e-5)


def test_tempo_changes_each_length_within_the_range_and_keeps_f0_voicing_values():
    inputs = _inputs()
    out = augment_batch(inputs, AugmentConfig(tempo=0.2), step_generator(3, 1))
    new, old = out["mel_lengths"], inputs["mel_lengths"]
    assert not torch.equal(new, old)
    assert ((new.float() >= (old * 0.8).floor()) & (new.float() <= (old * 1.2).ceil())).all()
    assert out["mel"].shape[1] == int(new.max()) and out["f0"].shape == out["mel"].shape[:2]
    for b, n in enumerate(new):
        assert not out["mel"][b, n:].any() and not out["f0"][b, n:].any()  # zero padding past the new length
        # Nearest-frame f0: every value is one of the utterance's own (voiced or exactly 0).
        own = set(inputs["f0"][b, : old[b]].tolist())
        assert set(out["f0"][b, :n].tolist()) <= own
    assert torch.equal(out["token_f0"], inputs["token_f0"])
