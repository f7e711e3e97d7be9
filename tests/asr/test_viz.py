"""Pictures: pixel sizes, the rotation maths and the attention CLI's failure mode."""

import math
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from echo import viz


def test_rotation_similarity_plain_rope_is_toeplitz() -> None:
    u = torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = 20
    s = viz.rotation_similarity(u, torch.arange(t, dtype=torch.float32),
                                torch.full((t,), math.log(10000.0)), torch.ones(t))
    # unit radius: S[i, i] = |u|^2 and S depends only on i - j
    assert np.allclose(np.diag(s), float(u @ u))
    assert np.allclose(s[3:, 3:], s[:-3, :-3])
    # against the literal spec form for one pair of positions
    i, j = 2, 7
    ro = [viz.rotate(u, torch.tensor([float(p)]), torch.tensor([math.log(10000.0)]),
                     torch.tensor([1.0]))[0] for p in (i, j)]
    real = [torch.view_as_real(z).reshape(-1) for z in ro]
    assert s[i, j] == pytest.approx(float(real[0] @ real[1]))


def test_radius_scales_similarity() -> None:
    u = torch.ones(8, dtype=torch.float64)
    r = torch.tensor([0.5, 2.0])
    s = viz.rotation_similarity(u, torch.zeros(2), torch.zeros(2), r)
    assert np.allclose(s, 8.0 * np.outer(r.numpy(), r.numpy()))


def test_fallback_features_follow_spec() -> None:
    f0 = torch.tensor([0.0, 100.0, 200.0, 0.0])
    f = viz._fallback_pitch_features(f0)
    assert f.voiced.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert torch.allclose(f.log_theta, torch.log(torch.tensor([150.0, 100, 200, 150])))
    assert torch.allclose(f.radius, torch.tensor([40.0, 100, 200, 40]) / 600)
    assert torch.allclose(f.pitch, torch.tensor([0.0, -1.0, 1.0, 0.0]), atol=1e-5)
    none = viz._fallback_pitch_features(torch.zeros(3))
    assert torch.allclose(none.log_theta, torch.full((3,), math.log(10000.0)))
    b = viz.pitch_bias_matrix(f.pitch, f.voiced)
    assert b[0].tolist() == [0, 0, 0, 0] and b[1, 2] == pytest.approx(math.exp(-2.0), rel=1e-5)


def test_rope_command_writes_png(tmp_path) -> None:
    sr = 16000
    t = np.arange(int(sr * 1.2)) / sr
    glide = 0.4 * np.sin(2 * np.pi * (120 * t + 40 * t**2))  # 120 -> 216 Hz glide
    wave = np.concatenate([np.zeros(sr // 5), glide, np.zeros(sr // 5)])
    sf.write(tmp_path / "g.wav", wave, sr, subtype="PCM_16")
    out = tmp_path / "rope.png"
    assert viz.main(["rope", "--wav", str(tmp_path / "g.wav"), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    w, h = (int(x * viz.DPI) for x in viz.ROPE_FIGSIZE)
    assert Image.open(out).size == (w, h)


def test_plot_attention_maps(tmp_path) -> None:
    g = np.random.default_rng(0)
    maps = [g.random((4, 30, 50)), g.random((2, 30, 50))]
    out = tmp_path / "attn.png"
    viz.plot_attention_maps(maps, ["enc 0", "enc 1"], out)
    cell = viz.ATTN_CELL_INCHES * viz.DPI
    assert Image.open(out).size == (int(4 * cell), int(2 * cell))
    assert out.stat().st_size > 5_000
    with pytest.raises(ValueError):
        viz.plot_attention_maps([g.random((30, 50))], ["bad"], out)


def test_attention_command_without_model_exits_2(tmp_path, capsys, monkeypatch) -> None:
    # A None entry in sys.modules makes `import echo.model` raise ImportError, whether
    # or not the model module exists in this checkout.
    monkeypatch.setitem(sys.modules, "echo.model", None)
    rc = viz.main(["attention", "--checkpoint", "c.pt", "--wav", "x.wav",
                   "--out", str(tmp_path / "a.png")])
    assert rc == 2
    assert "echo.model" in capsys.readouterr().err


def test_fallback_matches_echo_kernels_when_available() -> None:
    ek = pytest.importorskip("echo_kernels", reason="echo_kernels not importable here")
    if not hasattr(ek, "pitch_features"):
        pytest.skip("echo_kernels has no pitch_features yet")
    f0 = torch.tensor([0.0, 100.0, 220.0, 0.0, 180.0, 0.0, 95.0])
    real = ek.pitch_features(f0[None])
    mine = viz._fallback_pitch_features(f0)
    for name, a, b in zip(mine._fields, real, mine, strict=True):
        assert torch.allclose(a[0].float(), b, atol=1e-5), name


def _fake_run(path, dev_cers, losses) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(path / "tb"))
    for step, loss in losses:
        writer.add_scalar("train/att_loss", loss, step)
    for step, cer in dev_cers:
        writer.add_scalar("dev/cer", cer, step)
    writer.close()


def test_curves_reads_the_logs_and_draws_both_panels(tmp_path) -> None:
    _fake_run(tmp_path / "a", [(100, 0.5), (200, 0.3)], [(s, 3.0 - s / 100) for s in range(10, 210, 10)])
    _fake_run(tmp_path / "b", [(100, 0.4)], [(10, 2.0)])
    steps, values = viz.read_scalars(tmp_path / "a")["dev/cer"]
    assert steps.tolist() == [100, 200] and np.allclose(values, [0.5, 0.3])
    assert len(viz.read_scalars(tmp_path / "a")["train/att_loss"][0]) == 20  # every point, not a sample
    out = tmp_path / "curves.png"
    rc = viz.main(["curves", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "run a", "run b",
                   "--out", str(out)])
    assert rc == 0 and out.stat().st_size > 10_000
    assert Image.open(out).size == tuple(int(x * viz.DPI) for x in viz.CURVES_FIGSIZE)
    assert viz.main(["curves", str(tmp_path / "a"), "--labels", "x", "y", "--out", str(out)]) == 2
    with pytest.raises(FileNotFoundError, match="no TensorBoard events"):
        viz.read_scalars(tmp_path)


def test_smooth_is_a_trailing_mean() -> None:
    x = np.array([1.0, 3.0, 5.0, 7.0])
    assert np.allclose(viz.smooth(x, 2), [1.0, 2.0, 4.0, 6.0])
    assert np.allclose(viz.smooth(x, 1), x)


def test_ablation_plot_draws_every_variant(tmp_path) -> None:
    rows = [{"test_cer": 0.2, "test_ctc_cer": 0.3}, {"test_cer": 0.25}]  # a seed may lack a score
    out = tmp_path / "ablation.png"
    viz.plot_ablation({"(a) plain": rows, "(b) a much longer variant name that wraps": rows},
                      [("test_cer", "CER"), ("test_ctc_cer", "CTC CER")], out)
    assert out.stat().st_size > 5_000
    assert Image.open(out).size == tuple(int(x * viz.DPI) for x in viz.ABLATION_FIGSIZE)
    with pytest.raises(ValueError, match="at least one variant"):
        viz.plot_ablation({}, [("test_cer", "CER")], out)
