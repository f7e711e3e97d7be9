"""Every bad input raises an error that names the argument and what is allowed."""

import numpy as np
import pytest
import torch

import echo_kernels as ek


def qkv(b=2, h=4, hk=2, tq=5, tk=6, d=8, dtype=torch.float32):
    return torch.randn(b, h, tq, d, dtype=dtype), torch.randn(b, hk, tk, d, dtype=dtype), torch.randn(b, hk, tk, d, dtype=dtype)


def call(**overrides):
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v}
    args.update(overrides)
    return ek.rope_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


BAD = {
    "q rank": ({"q": torch.randn(2, 5, 8)}, ValueError, "q must have shape"),
    "q not a tensor": ({"q": [[1.0]]}, TypeError, "q must be a torch.Tensor"),
    "integer q": ({"q": torch.ones(2, 4, 5, 8, dtype=torch.int32)}, TypeError, "q must be float16"),
    "dtype mismatch": ({"k": torch.randn(2, 2, 6, 8, dtype=torch.float64)}, TypeError, "share one dtype"),
    "batch mismatch": ({"k": torch.randn(3, 2, 6, 8), "v": torch.randn(3, 2, 6, 8)}, ValueError, "batch size"),
    "kv heads mismatch": ({"v": torch.randn(2, 1, 6, 8)}, ValueError, "same number of heads"),
    "kv length mismatch": ({"v": torch.randn(2, 2, 7, 8)}, ValueError, "same length Tk"),
    "head dim mismatch": ({"k": torch.randn(2, 2, 6, 4)}, ValueError, "head dim D"),
    "odd head dim": ({"q": torch.randn(2, 4, 5, 7), "k": torch.randn(2, 2, 6, 7), "v": torch.randn(2, 2, 6, 7)},
                     ValueError, "must be even"),
    "H % Hk": ({"k": torch.randn(2, 3, 6, 8), "v": torch.randn(2, 3, 6, 8)}, ValueError, "multiple of the key/value"),
    "f0 shape": ({"f0": torch.rand(2, 4) * 100}, ValueError, r"f0 must have shape \[2, 5\]"),
    "f0_k shape": ({"f0_k": torch.rand(2, 5) * 100}, ValueError, r"f0_k must have shape \[2, 6\]"),
    "f0 negative": ({"f0": -torch.ones(2, 5)}, ValueError, ">= 0"),
    "f0 nan": ({"f0": torch.full((2, 5), float("nan"))}, ValueError, "finite"),
    # Finite, but past float32 (cast for the features) or past what float32 sums of it hold.
    "f0 past float32": ({"f0": torch.full((2, 5), 1e39, dtype=torch.float64)}, ValueError, "at most 1e\\+06 Hz"),
    "f0 float16 inf": ({"f0": torch.tensor([[100.0, float("inf"), 0, 90, 80]] * 2, dtype=torch.float16)}, ValueError,
                       "f0 must be finite"),
    "f0 absurd": ({"f0": torch.full((2, 5), 2e38)}, ValueError, "f0 must be at most 1e\\+06 Hz; found 2e\\+38"),
    "features type": ({"features": (1, 2)}, TypeError, "PitchFeatures"),
    "features shape": ({"features": ek.pitch_features(torch.ones(2, 4) * 100)}, ValueError, r"features.pos must have shape"),
    "features dtype": ({"features": ek.pitch_features(torch.ones(2, 5) * 100, dtype=torch.float64)}, TypeError,
                       "features.pos must be torch.float32"),
    "q_lengths shape": ({"q_lengths": torch.tensor([5])}, ValueError, r"q_lengths must have shape \[2\]"),
    "q_lengths range": ({"q_lengths": torch.tensor([5, 6])}, ValueError, r"q_lengths must lie in \[0, 5\]"),
    "k_lengths negative": ({"k_lengths": torch.tensor([-1, 2])}, ValueError, "k_lengths must lie in"),
    "k_lengths float": ({"k_lengths": torch.tensor([1.0, 2.0])}, TypeError, "k_lengths must be an integer"),
    "unknown bias": ({"bias": "gauss"}, ValueError, "bias must be"),
    "bias in a list": ({"bias": ["exp"]}, ValueError, r"bias must be 'exp', 'l1' or None, got \['exp'\]"),
    "numpy bool causal": ({"causal": np.bool_(True)}, TypeError, "causal must be a Python bool, got numpy.bool"),
    "f0 on another device": ({"f0": torch.ones(2, 5, device="meta")}, ValueError, "f0 must be on cpu"),
    "unknown backend": ({"backend": "fast"}, ValueError, "backend must be one of"),
    "unknown theta_mode": ({"f0": torch.ones(2, 5) * 100, "theta_mode": "log"}, ValueError, "theta_mode"),
    "unknown radius_mode": ({"f0": torch.ones(2, 5) * 100, "radius_mode": "x"}, ValueError, "radius_mode"),
    # Checked whether or not f0 is given (without f0 they used to be ignored or fail in math.log).
    "theta_mode without f0": ({"theta_mode": "log"}, ValueError, "theta_mode must be one of"),
    "radius_mode without f0": ({"radius_mode": "x"}, ValueError, "radius_mode must be one of"),
    "theta zero": ({"theta": 0.0}, ValueError, "theta must be a finite float > 0"),
    "theta inf": ({"f0": torch.ones(2, 5) * 100, "theta": float("inf")}, ValueError, "theta must be a finite"),
    "theta type": ({"theta": "1e4"}, TypeError, "theta must be a float"),
    "f0_k negative": ({"f0_k": -torch.ones(2, 6)}, ValueError, "f0_k must be >= 0"),
    "f0_k nan": ({"f0_k": torch.full((2, 6), float("nan"))}, ValueError, "f0_k must be finite"),
    "alpha shape": ({"alpha": torch.ones(2)}, ValueError, r"alpha must have shape \[4\]"),
    "alpha type": ({"alpha": [1.0] * 4}, TypeError, "alpha must be a tensor"),
    "beta negative": ({"beta": -1.0}, ValueError, "beta must be a positive"),
    "beta shape": ({"beta": torch.ones(2)}, ValueError, "beta must be a float or a 0-d"),
    "beta type": ({"beta": "1"}, TypeError, "beta must be"),
    "causal type": ({"causal": 1}, TypeError, "causal must be a Python bool, got int"),
    "scale type": ({"scale": "0.1"}, TypeError, "scale must be"),
    "scale inf": ({"scale": float("inf")}, ValueError, "scale must be finite"),
    "no heads": ({"q": torch.randn(2, 0, 5, 8), "k": torch.randn(2, 0, 6, 8), "v": torch.randn(2, 0, 6, 8)},
                 ValueError, r"at least one head each, got 0 and 0"),
    "zero head dim": ({"q": torch.randn(2, 4, 5, 0), "k": torch.randn(2, 2, 6, 0), "v": torch.randn(2, 2, 6, 0)},
                      ValueError, "must be even and > 0"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_named_error(name):
    overrides, error, match = BAD[name]
    with pytest.raises(error, match=match):
        call(**overrides)


def test_unavailable_backend_says_why():
    with pytest.raises(NotImplementedError, match="backend='cuda'"):
        call(backend="cuda")


def test_float64_features_with_float32_q_rejected_but_float64_works():
    q, k, v = qkv(dtype=torch.float64)
    out = ek.rope_attention(q, k, v, features=ek.pitch_features(torch.ones(2, 5) * 100, dtype=torch.float64),
                            f0_k=torch.ones(2, 6) * 90, backend="chunked")
    assert out.dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 10, "num_heads": 3}, "multiple of num_heads"),
        ({"dim": 12, "num_heads": 4}, "must be even"),
        ({"dim": 16, "num_heads": 4, "num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"dim": 16, "num_heads": 4, "bias": "cos"}, "bias must be"),
        ({"dim": 16, "num_heads": 4, "theta_mode": "log"}, "theta_mode must be one of"),
        ({"dim": 16, "num_heads": 4, "radius_mode": "x"}, "radius_mode must be one of"),
        ({"dim": 16, "num_heads": 4, "theta": -1.0}, "theta must be a finite float > 0"),
        ({"dim": 16, "num_heads": 4, "backend": "fast"}, "backend must be one of"),
        ({"dim": 0, "num_heads": 2}, "dim must be positive, got 0"),
        ({"dim": 16, "num_heads": 4, "bias": ["exp"]}, "bias must be"),
    ],
)
def test_module_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ek.RopeAttention(**kwargs)


def test_module_sizes_must_be_ints():
    with pytest.raises(TypeError, match="num_heads must be an int, got float"):
        ek.RopeAttention(16, 2.0)
    with pytest.raises(TypeError, match="dim must be an int, got bool"):
        ek.RopeAttention(True, 1)


def test_numpy_scalars_are_accepted_as_floats():
    """np.float32 options (a config read through NumPy) work as the same Python floats do."""
    q, k, v = qkv()
    f0 = torch.rand(2, 5) * 200
    expected = ek.rope_attention(q, k, v, f0, f0_k=torch.zeros(2, 6), scale=0.25, beta=0.5, theta=1e4, backend="chunked")
    got = ek.rope_attention(q, k, v, f0, f0_k=torch.zeros(2, 6), scale=np.float32(0.25), beta=np.float32(0.5),
                            theta=np.float32(1e4), backend="chunked")
    assert torch.equal(got, expected)


def test_pitch_features_checks_positions():
    f0 = torch.full((1, 4), 120.0)
    with pytest.raises(ValueError, match="positions must be finite"):
        ek.pitch_features(f0, positions=torch.tensor([[0.0, 1.0, float("nan"), 3.0]]))
    with pytest.raises(ValueError, match="positions must be on f0's device"):
        ek.pitch_features(f0, positions=torch.zeros(1, 4, device="meta"))


def test_module_rejects_bad_calls():
    self_attn, cross_attn = ek.RopeAttention(16, 2), ek.RopeAttention(16, 2, cross=True)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, 16\]"):
        self_attn(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="context is required"):
        cross_attn(x)
    with pytest.raises(ValueError, match="only for cross=True"):
        self_attn(x, context=x)
    with pytest.raises(ValueError, match="only for cross=True"):  # a mask that would do nothing
        self_attn(x, context_lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="context must have shape"):
        cross_attn(x, context=torch.randn(3, 4, 16))
    with pytest.raises(ValueError, match=r"f0 must have shape \[2, 5\]"):
        self_attn(x, torch.full((2, 4), 100.0))
    with pytest.raises(ValueError, match=r"f0_context must have shape \[2, 4\]"):
        cross_attn(x, context=torch.randn(2, 4, 16), f0_context=torch.full((2, 5), 100.0))
    with pytest.raises(ValueError, match="lengths must lie in"):
        self_attn(x, lengths=torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="context_lengths must lie in"):
        cross_attn(x, context=torch.randn(2, 4, 16), context_lengths=torch.tensor([5, 4]))


@pytest.mark.parametrize("backend", ["chunked", "cpu"])
def test_fused_backends_refuse_second_order_gradients_by_name(backend):
    if ek.backends()[backend].available is False:
        pytest.skip(ek.backends()[backend].reason)
    q, k, v = (t.double().requires_grad_() for t in qkv())
    f0 = 100 + 100 * torch.rand(2, 5, dtype=torch.float64)
    loss = ek.rope_attention(q, k, v, f0, f0_k=torch.rand(2, 6, dtype=torch.float64) * 200, backend=backend).square().sum()
    # First order under create_graph=True is the ordinary gradient ...
    grads = torch.autograd.grad(loss, (q, k, v), create_graph=True)
    plain = torch.autograd.grad(loss, (q, k, v), retain_graph=True)
    for g, p in zip(grads, plain):
        torch.testing.assert_close(g, p, rtol=0, atol=0)
    # ... and a backward through it names the backend and the way out, not torch.library's internals,
    # whether it runs as backward() or as autograd.grad naming the inputs (which skips nodes that
    # lead nowhere: the refusal must not be one of them, or the term would be dropped silently).
    refused = f"the {backend} backend has no second-order gradients.*backend='reference'"
    with pytest.raises(RuntimeError, match=refused):
        torch.autograd.grad(grads[0].square().sum(), q)
    w = torch.rand_like(q, requires_grad=True)
    loss = ek.rope_attention(q.detach() * w, k.detach(), v.detach(), f0, backend=backend).square().sum()
    (gw,) = torch.autograd.grad(loss, w, create_graph=True)
    with pytest.raises(RuntimeError, match=refused):
        torch.autograd.grad(gw.square().sum() + w.square().sum(), w)
    with pytest.raises(RuntimeError, match=refused):
        sum(g.square().sum() for g in grads).backward()


def test_torch_func_transforms_run_the_reference():
    # The fused backends have no batching rule and no second order: "auto" takes the reference
    # inside torch.func, and an explicit fused backend is refused by name.
    from torch.func import grad

    q, k, v = (t.double() for t in qkv())
    f0 = 100 + 100 * torch.rand(2, 5, dtype=torch.float64)

    def loss(backend):
        return lambda q: ek.rope_attention(q, k, v, f0, backend=backend).square().sum()

    torch.testing.assert_close(grad(loss("auto"))(q), grad(loss("reference"))(q), rtol=0, atol=0)
    second = grad(lambda q: grad(loss("auto"))(q).square().sum())(q)
    q_ = q.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss("reference")(q_), q_, create_graph=True)
    torch.testing.assert_close(second, torch.autograd.grad(g.square().sum(), q_)[0])
    for backend in ("chunked", "cpu"):
        with pytest.raises(NotImplementedError, match=f"backend='{backend}' cannot run.*torch.func"):
            grad(loss(backend))(q)
    # vmap over f0 (the value checks cannot read a batched tensor, and skip it) is a loop over items.
    f0s = 100 + 100 * torch.rand(3, 2, 5, dtype=torch.float64)
    mapped = torch.func.vmap(lambda f: ek.rope_attention(q, k, v, f, f0_k=f0s[0, :, :1].expand(2, 6)))(f0s)
    for f, out in zip(f0s, mapped):
        torch.testing.assert_close(out, ek.rope_attention(q, k, v, f, f0_k=f0s[0, :, :1].expand(2, 6)))


def test_forward_mode_ad_runs_the_reference():
    # The fused kernels have no forward-mode formula (called directly they would drop the
    # tangent): inside a dual level "auto" takes the reference, a named fused backend is refused.
    import torch.autograd.forward_ad as fwad

    q, k, v = (t.double() for t in qkv())
    f0, tangent = 100 + 100 * torch.rand(2, 5, dtype=torch.float64), torch.randn_like(q)
    tangents = {}
    with fwad.dual_level():
        for backend in ("auto", "reference"):
            out = ek.rope_attention(fwad.make_dual(q, tangent), k, v, f0, backend=backend)
            tangents[backend] = fwad.unpack_dual(out).tangent
        for backend in ("chunked", "cpu"):
            with pytest.raises(NotImplementedError, match=f"backend='{backend}' cannot run.*forward-mode AD"):
                ek.rope_attention(fwad.make_dual(q, tangent), k, v, f0, backend=backend)
    assert tangents["auto"] is not None and torch.equal(tangents["auto"], tangents["reference"])
    assert ek.rope_attention(q, k, v, f0).requires_grad is False  # outside it, the fused default again


def test_self_attention_reads_lengths_and_f0_once(monkeypatch):
    # Every value check reads the tensor on the host (a sync on GPU); self-attention given one
    # lengths tensor and one f0 checks each once, with the same result as two equal tensors.
    q, k, v = qkv(tq=6)
    f0, lengths = 100 + 100 * torch.rand(2, 6), torch.tensor([6, 4])
    two = ek.rope_attention(q, k, v, f0, f0_k=f0.clone(), q_lengths=lengths, k_lengths=lengths.clone(), causal=True)
    reads = []

    def counted(name, original):
        def read(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)
        return read

    for name in ("tolist", "item", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    one = ek.rope_attention(q, k, v, f0, q_lengths=lengths, k_lengths=lengths, causal=True)
    monkeypatch.undo()
    assert torch.equal(one, two)
    assert sorted(reads) == ["__bool__", "tolist"]  # f0's range, the lengths' range
