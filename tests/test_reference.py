"""The two PyTorch backends: exactness, gradients, edge cases and the plain-RoPE limit."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import echo_kernels as ek
from cases import LEARNED_FEATURES, Case, assert_close_to_golden, learnable, make_case, max_err, run, use_cuda_kernels

BACKENDS = ("reference", "chunked")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", ["exp", "l1"])
def test_gradcheck_every_input(backend, bias):
    torch.manual_seed(0)
    b, h, hk, tq, tk, d = 2, 2, 1, 5, 6, 4
    dt = torch.float64
    q = torch.randn(b, h, tq, d, dtype=dt)
    k = torch.randn(b, hk, tk, d, dtype=dt)
    v = torch.randn(b, hk, tk, d, dtype=dt)
    fq = ek.pitch_features(torch.tensor([[100.0, 0, 130, 170, 90], [0, 210, 190, 0, 0]], dtype=dt), dtype=dt)
    fk = ek.pitch_features(torch.tensor([[120.0, 0, 140, 110, 95, 0], [200, 0, 230, 180, 0, 0]], dtype=dt), dtype=dt)
    alpha = torch.rand(h, dtype=dt) + 0.5
    beta = torch.tensor(0.7, dtype=dt)
    ql, kl = torch.tensor([5, 3]), torch.tensor([6, 4])
    leaves = [q, k, v, alpha, beta, *fq[1:4], *fk[1:4]]
    for t in leaves:
        t.requires_grad_(True)

    def fn(q, k, v, alpha, beta, lt_q, r_q, p_q, lt_k, r_k, p_k):
        fqx = ek.PitchFeatures(fq.pos, lt_q, r_q, p_q, fq.voiced)
        fkx = ek.PitchFeatures(fk.pos, lt_k, r_k, p_k, fk.voiced)
        return ek.rope_attention(q, k, v, features=fqx, features_k=fkx, bias=bias, alpha=alpha, beta=beta,
                                 causal=True, q_lengths=ql, k_lengths=kl, backend=backend)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


GRID = list(itertools.product(["exp", "l1", None], [False, True], ["f0", "fixed", "mean_f0", "f0_offset"]))


@pytest.mark.parametrize("bias, causal, theta_mode", GRID)
def test_chunked_equals_dense_in_float64(bias, causal, theta_mode):
    radius_mode = "unit" if theta_mode == "fixed" else "f0"
    case = Case(tq=97, tk=140 if not causal else 113, bias=bias, causal=causal, theta_mode=theta_mode,
                radius_mode=radius_mode, voiced_fraction=0.6, seed=GRID.index((bias, causal, theta_mode)))
    inputs = make_case(case, torch.float64)
    dense, chunked = run(case, inputs, "reference"), run(case, inputs, "chunked")
    for name in dense:
        assert max_err(dense[name], chunked[name]) <= 1e-12 * max(1.0, dense[name].abs().max().item()), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_float16_follows_the_flash_rule(seed):
    """In half precision the scalar gradients (alpha, beta) sum dS over every pair: delta must
    come from P dP in float32, not from the rounded output (else their error is ~10x the reference's)."""
    case = Case(dim=64, seed=seed)
    inputs = make_case(case, torch.float16)
    golden = run(case, inputs, "reference", torch.float64)
    assert_close_to_golden(run(case, inputs, "chunked"), run(case, inputs, "reference"), golden, dtype=torch.float16)


def test_unvoiced_and_empty_rows_are_exact_zeros():
    case = Case(empty_row=True, voiced_fraction=0.0, causal=True)
    inputs = make_case(case, torch.float64)
    for backend in BACKENDS:
        result = run(case, inputs, backend)
        assert torch.equal(result["out"][0], torch.zeros_like(result["out"][0]))  # k_length 0
        padded_rows = result["out"][-1, :, int(inputs["q_lengths"][-1]):]
        assert torch.equal(padded_rows, torch.zeros_like(padded_rows))
        assert all(torch.isfinite(t).all() for t in result.values())
        assert torch.equal(result["q"][0], torch.zeros_like(result["q"][0]))
        # No voiced frame: the bias adds nothing, so its parameters get no gradient.
        assert result["alpha"].abs().max() == 0 and result["beta"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_length_sequences(backend):
    q = torch.randn(1, 2, 0, 8)
    k = torch.randn(1, 2, 0, 8)
    out = ek.rope_attention(q, k, k.clone(), backend=backend)
    assert out.shape == (1, 2, 0, 8)
    q = torch.randn(1, 2, 3, 8)
    out = ek.rope_attention(q, k, k.clone(), backend=backend)
    assert torch.equal(out, torch.zeros_like(out))


def standard_rope(x, theta=10000.0):
    """Interleaved-pair RoPE written from scratch with real arithmetic."""
    t, d = x.shape[-2], x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    xe, xo = x[..., 0::2], x[..., 1::2]
    return torch.stack((xe * cos - xo * sin, xe * sin + xo * cos), dim=-1).flatten(-2)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("causal", [False, True])
def test_plain_rope_matches_sdpa(backend, causal):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 33, 16, dtype=torch.float64) for _ in range(3))
    ours = ek.rope_attention(q, k, v, causal=causal, backend=backend, theta_mode="fixed", radius_mode="unit")
    expected = F.scaled_dot_product_attention(standard_rope(q), standard_rope(k), v, is_causal=causal)
    assert max_err(ours, expected) < 1e-12


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu"])
def test_pos_and_voiced_get_no_gradient(backend):
    """The contract makes pos and voiced constants: no backend sends a gradient into them."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 7, 8, requires_grad=True) for _ in range(3))
    feats = ek.pitch_features(torch.tensor([[110.0, 0, 150, 170, 0, 120, 140]]))
    feats = ek.PitchFeatures(*(f.clone().requires_grad_(True) for f in feats))
    ek.rope_attention(q, k, v, features=feats, backend=backend).sum().backward()
    assert feats.pos.grad is None and feats.voiced.grad is None
    assert all(f.grad is not None for f in (feats.log_theta, feats.radius, feats.pitch))


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu"])
def test_cached_steps_with_sliced_features_reproduce_the_causal_pass(backend):
    """docs/attention.md's recipe for a key/value cache: the newest tq tokens against every key so
    far, their features sliced from the whole sequence's, give the full causal pass's rows."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 4, 23, 16, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA
    f0 = 80 + 150 * torch.rand(2, 23, dtype=torch.float64)
    f0[:, ::4] = 0
    full = ek.rope_attention(q, k, v, f0, causal=True, backend=backend)
    for end, tq in ((23, 1), (23, 5), (9, 1), (9, 3)):
        feats = ek.pitch_features(f0[:, :end], dtype=torch.float64)
        new = ek.PitchFeatures(*(f[:, end - tq:end] for f in feats))
        step = ek.rope_attention(q[:, :, end - tq:end], k[:, :, :end], v[:, :, :end], features=new,
                                 features_k=feats, causal=True, backend=backend)
        if end == 23:  # the whole sequence's statistics: the full pass's own rows
            assert max_err(step, full[:, :, end - tq:end]) < 1e-12
        else:  # a prefix: the full pass over that prefix
            prefix = ek.rope_attention(q[:, :, :end], k[:, :, :end], v[:, :, :end], f0[:, :end], causal=True,
                                       backend=backend)
            assert max_err(step, prefix[:, :, end - tq:]) < 1e-12
    # f0 of the new tokens alone restarts their positions and statistics: not the same numbers.
    alone = ek.rope_attention(q[:, :, -1:], k, v, f0[:, -1:], f0_k=f0, causal=True, backend=backend)
    assert max_err(alone, full[:, :, -1:]) > 1e-3


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu"])
def test_autocast_casts_q_k_v_as_for_sdpa(backend):
    torch.manual_seed(5)
    q, k = torch.randn(2, 4, 17, 16, requires_grad=True), torch.randn(2, 2, 17, 16, requires_grad=True)
    v, f0 = torch.randn(2, 2, 17, 16), 100 + 100 * torch.rand(2, 17)
    expected = ek.rope_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), f0, causal=True, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ek.rope_attention(q, k, v, f0, causal=True, backend=backend)
        mixed = ek.rope_attention(q.bfloat16(), k, v, f0, causal=True, backend=backend)  # a float32 cache
        sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert out.dtype == sdpa.dtype == torch.bfloat16
    assert torch.equal(out, expected) and torch.equal(mixed, expected)
    out.float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == torch.float32
    q64 = q.detach().double()  # float64 is not autocast's to cast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ek.rope_attention(q64, k.double(), v.double(), f0, backend=backend).dtype == torch.float64


def test_f0_k_defaults_to_f0_for_self_attention():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    f0 = torch.linspace(90, 200, 9, dtype=torch.float64)[None]
    a = ek.rope_attention(q, k, v, f0, backend="reference")
    b = ek.rope_attention(q, k, v, f0, f0_k=f0, backend="reference")
    c = ek.rope_attention(q, k, v, backend="reference")
    assert torch.equal(a, b) and max_err(a, c) > 1e-3


def test_auto_uses_a_working_backend():
    case = Case(tq=40, tk=40)
    inputs = make_case(case, torch.float32)
    auto, golden = run(case, inputs, "auto"), run(case, inputs, "reference", torch.float64)
    assert max_err(auto["out"], golden["out"]) < 1e-4
    info = ek.backends()
    assert set(info) == {"reference", "chunked", "triton", "cuda", "cpu"}
    assert info["reference"].available and info["chunked"].available
    assert all(isinstance(i.reason, str) and i.reason for i in info.values())


def test_low_precision_reference_is_close():
    case = Case(tq=64, tk=64)
    inputs = make_case(case, torch.float16)
    golden = run(case, inputs, "reference", torch.float64)
    for backend in BACKENDS:
        result = run(case, inputs, backend, torch.float16)
        assert max_err(result["out"], golden["out"]) < 5e-3, backend
        assert max_err(result["q"], golden["q"]) < 5e-3 * max(1, golden["q"].abs().max().item()), backend


def test_scale_argument():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 1, 5, 4, dtype=torch.float64) for _ in range(3))
    a = ek.rope_attention(2 * q, k, v, scale=0.25, bias=None, backend="chunked")
    b = ek.rope_attention(q, k, v, scale=0.5, bias=None, backend="chunked")
    assert max_err(a, b) < 1e-12


def _padding_case(device: str, dtype: torch.dtype):
    """Padded inputs whose padding (q, k, v past the lengths, dout past Lq) holds NaN."""
    gen = torch.Generator().manual_seed(7)
    b, h, hk, t, d = 2, 4, 2, 70, 64
    q, k, v, dout = (torch.randn(b, heads, t, d, generator=gen) for heads in (h, hk, hk, h))
    ql, kl = torch.tensor([70, 40]), torch.tensor([70, 33])
    f0 = 80 + 200 * torch.rand(b, t, generator=gen)
    clean = [x.to(device, dtype) for x in (q, k, v, dout)]
    for x, cut in ((q, 40), (k, 33), (v, 33), (dout, 40)):
        x[1, :, cut:] = float("nan")
    poisoned = [x.to(device, dtype) for x in (q, k, v, dout)]
    return clean, poisoned, ql.to(device), kl.to(device), f0.to(device)


def _nan_past(features: ek.PitchFeatures, lengths) -> ek.PitchFeatures:
    """``features`` with NaN in every field at the tokens past ``lengths``."""
    pad = torch.arange(features.pos.shape[1], device=lengths.device) >= lengths[:, None]
    return ek.PitchFeatures(*(t.masked_fill(pad, float("nan")) for t in features))


def _padding_run(backend, tensors, ql, kl, f0, poison_features=False):
    """out, then the gradients of q, k, v and of the learned features of both sides
    (``poison_features``: the features' padding holds NaN too)."""
    q, k, v, dout = (x.clone().requires_grad_(x is not tensors[3]) for x in tensors)
    fq, fk = ek.pitch_features(f0, lengths=ql), ek.pitch_features(f0, lengths=kl)
    if poison_features:
        fq, fk = _nan_past(fq, ql), _nan_past(fk, kl)
    fq, fk = learnable(fq), learnable(fk)
    out = ek.rope_attention(q, k, v, features=fq, features_k=fk, bias="exp", causal=True, q_lengths=ql,
                            k_lengths=kl, backend=backend)
    out.backward(dout)
    features = [getattr(side, name).grad for side in (fq, fk) for name in LEARNED_FEATURES]
    return (out.detach(), q.grad, k.grad, v.grad, *features)


PADDING_BACKENDS = [
    pytest.param(name, device, dtype, kernels, id=f"{name}-{device}" + (f"-{kernels}" if kernels else ""))
    for name, device, dtype, kernels in [
        ("reference", "cpu", torch.float32, None), ("chunked", "cpu", torch.float32, None),
        ("cpu", "cpu", torch.float32, None), ("triton", "cpu", torch.float32, None),
        ("triton", "cuda", torch.bfloat16, None), ("cuda", "cuda", torch.bfloat16, "wmma"),
        ("cuda", "cuda", torch.bfloat16, "mma"),
    ]
]


@pytest.mark.parametrize("backend, device, dtype, kernels", PADDING_BACKENDS)
def test_nan_in_padding_changes_nothing(backend, device, dtype, kernels, monkeypatch):
    """The contract ignores tokens past the lengths: NaN there (torch.empty padding, in q, k, v, dout
    and every feature) must not reach any result, the feature gradients included. ``kernels``: the
    CUDA backend's kernel generation."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if kernels is not None:
        use_cuda_kernels(monkeypatch, kernels)
    reason = ek.backends()[backend].reason if not ek.backends()[backend].available else None
    if reason is not None:
        pytest.skip(reason)
    clean, poisoned, ql, kl, f0 = _padding_case(device, dtype)
    want = _padding_run(backend, clean, ql, kl, f0)
    got = _padding_run(backend, poisoned, ql, kl, f0, poison_features=True)
    names = ("out", "dq", "dk", "dv", *(f"d{name}_{side}" for side in "qk" for name in LEARNED_FEATURES))
    assert len(names) == len(want) == len(got)
    for name, w, g in zip(names, want, got):
        assert torch.isfinite(g).all(), name
        assert torch.equal(w, g), name
