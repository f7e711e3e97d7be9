"""The fused C++ CPU backend against the float64 dense golden (tests/cases.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import echo_kernels as ek
from cases import GRAD_NAMES, Case, assert_close_to_golden, assert_keyless_rows_are_zero, make_case, max_err, run
from echo_kernels import cpu as cpu_backend

pytestmark = pytest.mark.skipif(
    cpu_backend.unavailable_reason() is not None, reason=f"cpu backend: {cpu_backend.unavailable_reason()}"
)

CASES = {
    "odd_lengths": Case(),
    "causal": Case(causal=True),
    "causal_tq_gt_tk": Case(causal=True, tq=113, tk=97),
    "tq_eq_tk_unpadded": Case(tq=97, tk=97, padded=False, causal=True),
    "l1": Case(bias="l1"),
    "l1_causal": Case(bias="l1", causal=True, kv_heads=4),
    "no_bias": Case(bias=None),
    "mqa": Case(kv_heads=1),
    "mha_dim64": Case(kv_heads=4, dim=64, tq=70, tk=130),
    "unvoiced": Case(voiced_fraction=0.0),
    "all_voiced": Case(voiced_fraction=1.0, causal=True),
    "empty_row": Case(empty_row=True),
    "empty_row_causal": Case(empty_row=True, causal=True, bias="l1"),
    "odd_dim_pairs": Case(dim=6, theta_mode="fixed", radius_mode="unit"),
    # The backward splits each (batch, kv head)'s blocks of 128 keys into ceil(32 / (B x Hk))
    # chunks: 5 blocks in 4 uneven chunks (the last holds 2), and B x Hk = 32 with a single chunk.
    "key_chunks_uneven": Case(kv_heads=4, tq=97, tk=600, causal=True),
    "one_key_chunk": Case(batch=4, heads=8, kv_heads=8, tq=70, tk=130, dim=16),
    # Causal with Tq > Tk: a chunk's first key block meets no query row above its diagonal, and
    # the last chunk of the padded entry lies past Lk, so those dQ~ rows are never written.
    "key_chunks_causal_tq_gt_tk": Case(kv_heads=4, tq=400, tk=300, causal=True, dim=16),
    # The exp bias is a product of per-token factors exp(+-beta p) while beta max|p| <= 8 (the
    # cases above: max|p| = 2.4, beta = 0.8) and an exp per score beyond (see also
    # test_float32_exp_bias_at_the_factor_limit).
    "exp_wide_pitch": Case(pitch_scale=10.0),
    # At most one query block per head (Tq <= 64): key tiles rotated one at a time (8 keys at a
    # time in registers for float32, a scalar tail), values read in place or copied (dim 6).
    "decode_step": Case(tq=1, tk=600, dim=64, causal=True),
    # Multi-head attention with one query: the keys meet the query turned by their angles
    # (8 keys at a time; the last block of a tile repeats its last key: 611 and 366 keys).
    "decode_step_mha": Case(tq=1, tk=611, dim=64, kv_heads=4, causal=True),
    "decode_step_mha_d40": Case(tq=1, tk=300, dim=40, heads=3, kv_heads=3, bias="l1", theta_mode="mean_f0"),
    "few_queries_mqa": Case(tq=13, tk=300, kv_heads=1, bias="l1", causal=True),
    "few_queries_odd_dim": Case(tq=5, tk=200, dim=6, theta_mode="fixed"),
}


def _relative_errors(got: dict, golden: dict) -> dict:
    return {n: max_err(got[n], golden[n]) / max(1.0, golden[n].abs().max().item()) for n in got}


@pytest.fixture(scope="module")
def goldens():
    cache = {}

    def get(name: str, case: Case):
        if name not in cache:
            inputs = make_case(case, torch.float64)
            cache[name] = (inputs, run(case, inputs, "reference", torch.float64))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_float64_matches_golden(name, goldens):
    case = CASES[name]
    inputs, golden = goldens(name, case)
    got = run(case, inputs, "cpu", torch.float64)
    for n, err in _relative_errors(got, golden).items():
        assert err <= 1e-10, f"{n}: relative error {err:.2e}"


@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_golden(name, goldens):
    case = CASES[name]
    inputs, golden = goldens(name, case)
    got = run(case, inputs, "cpu", torch.float32)
    reference = run(case, inputs, "reference", torch.float32)
    assert_close_to_golden(got, reference, golden)
    # dbeta sums every (i, j) term with cancellation; the float32 reference misses the
    # float64 golden by ~2e-4 relative too (feature rounding), so it is left to the rule above.
    for n, err in _relative_errors(got, golden).items():
        if n != "beta":
            assert err <= 1e-4, f"{n}: relative error {err:.2e}"


def _max_abs_pitch(case: Case, inputs: dict) -> float:
    """max |pitch| over both sides' features as `cases.run` builds them (before pitch_scale)."""
    sides = (("f0q", "q_lengths"), ("f0k", "k_lengths"))
    return max(ek.pitch_features(inputs[f0], lengths=inputs[n]).pitch.abs().max().item() for f0, n in sides)


@pytest.mark.parametrize("product", [7.9, 8.1])
def test_float32_exp_bias_at_the_factor_limit(product):
    """Just under beta max|p| = 8 the factorised bias is at its least accurate (its factors'
    arguments carry ~|beta p| ulp of rounding); just over, the exp is taken per score. Both
    meet the float32 rule."""
    base = Case(seed=5)
    inputs = make_case(base, torch.float64)
    case = Case(seed=5, pitch_scale=product / (base.beta * _max_abs_pitch(base, inputs)))
    golden = run(case, inputs, "reference", torch.float64)
    got = run(case, inputs, "cpu", torch.float32)
    assert_close_to_golden(got, run(case, inputs, "reference", torch.float32), golden)
    for n, err in _relative_errors(got, golden).items():
        if n != "beta":
            assert err <= 1e-4, f"{n}: relative error {err:.2e}"


def test_empty_rows_are_zero():
    case = CASES["empty_row_causal"]
    inputs = make_case(case, torch.float32)
    got = run(case, inputs, "cpu", torch.float32)
    assert_keyless_rows_are_zero(got, case)
    assert all(torch.isfinite(t).all() for t in got.values())


def test_pitch_ties(goldens):
    """Equal pitches (|x| at 0) take derivative 0, like torch.abs."""
    case = Case(tq=97, tk=97, voiced_fraction=0.8, seed=3)
    inputs = make_case(case, torch.float64)
    f0 = (inputs["f0q"] / 40).round() * 40  # a few discrete pitches: many exact ties
    inputs["f0q"] = f0
    inputs["f0k"] = f0.clone()
    inputs["k_lengths"] = inputs["q_lengths"].clone()
    golden = run(case, inputs, "reference", torch.float64)
    got = run(case, inputs, "cpu", torch.float64)
    for n, err in _relative_errors(got, golden).items():
        assert err <= 1e-10, f"{n}: relative error {err:.2e}"


def test_bfloat16_flash_rule(goldens):
    for name in ("odd_lengths", "causal", "mqa", "decode_step", "decode_step_mha"):
        case = CASES[name]
        inputs, golden = goldens(name, case)
        got = run(case, inputs, "cpu", torch.bfloat16)
        reference = run(case, inputs, "reference", torch.bfloat16)
        assert_close_to_golden(got, reference, golden, atol=1e-3)


def test_float16_flash_rule(goldens):
    case = CASES["causal"]
    inputs, golden = goldens("causal", case)
    got = run(case, inputs, "cpu", torch.float16)
    reference = run(case, inputs, "reference", torch.float16)
    assert_close_to_golden(got, reference, golden, atol=1e-3)


def _tiny_inputs(causal: bool, bias: str | None):
    gen = torch.Generator().manual_seed(7)
    b, h, hk, tq, tk, d = 2, 2, 1, 5, 7, 4
    dt = torch.float64
    q = torch.randn(b, h, tq, d, generator=gen, dtype=dt, requires_grad=True)
    k = torch.randn(b, hk, tk, d, generator=gen, dtype=dt, requires_grad=True)
    v = torch.randn(b, hk, tk, d, generator=gen, dtype=dt, requires_grad=True)

    def features(t):
        return ek.PitchFeatures(
            pos=torch.arange(t, dtype=dt).expand(b, t).contiguous(),
            log_theta=(2.0 + torch.rand(b, t, generator=gen, dtype=dt)).requires_grad_(),
            radius=(0.5 + torch.rand(b, t, generator=gen, dtype=dt)).requires_grad_(),
            pitch=torch.randn(b, t, generator=gen, dtype=dt).requires_grad_(),
            voiced=(torch.rand(b, t, generator=gen, dtype=dt) < 0.8).to(dt),
        )

    fq, fk = features(tq), features(tk)
    alpha = (0.5 + torch.rand(h, generator=gen, dtype=dt)).requires_grad_()
    beta = torch.tensor(0.7, dtype=dt, requires_grad=True)
    ql, kl = torch.tensor([tq, 4]), torch.tensor([tk, 5])

    def fn(q, k, v, alpha, beta, ltq, rq, pq, ltk, rk, pk):
        fq2 = fq._replace(log_theta=ltq, radius=rq, pitch=pq)
        fk2 = fk._replace(log_theta=ltk, radius=rk, pitch=pk)
        return ek.rope_attention(q, k, v, features=fq2, features_k=fk2, bias=bias, alpha=alpha, beta=beta,
                                 causal=causal, q_lengths=ql, k_lengths=kl, backend="cpu")

    args = (q, k, v, alpha, beta, fq.log_theta, fq.radius, fq.pitch, fk.log_theta, fk.radius, fk.pitch)
    return fn, args


@pytest.mark.parametrize("causal,bias", [(False, "exp"), (True, "l1")])
def test_gradcheck_float64(causal, bias):
    fn, args = _tiny_inputs(causal, bias)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def _grads_of(case: Case, inputs: dict, dtype) -> dict:
    return run(case, inputs, "cpu", dtype)


def test_backward_is_bitwise_repeatable():
    # Threads take tasks as they free up, so which thread runs which task changes from call to
    # call (most with tasks of unequal cost: a padded batch entry, causal rows).
    case = Case(batch=3, tq=150, tk=200, dim=64, causal=True)
    inputs = make_case(case, torch.float32)
    first = _grads_of(case, inputs, torch.float32)
    for _ in range(4):
        again = _grads_of(case, inputs, torch.float32)
        for n in first:
            assert torch.equal(first[n], again[n]), n


@pytest.mark.parametrize("heads,tq", [(4, 1), (4, 3)], ids=["lone_query_rows", "query_tiles"])
def test_backward_recomputes_the_forward_scores_exactly(heads, tq):
    # Against a single key, softmax weights are exactly 1 only if the backward's recomputed
    # score equals the forward's bit for bit (P = exp(s - lse) with lse = s): then out = v and
    # dv = the sum of dout over the queries, exactly. A lone query row scores its keys another
    # way (the query turned by each key's angle); the backward must follow it.
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        q = torch.randn(2, heads, tq, 64, generator=gen, requires_grad=True)
        k = torch.randn(2, heads, 1, 64, generator=gen, requires_grad=True)
        v = torch.randn(2, heads, 1, 64, generator=gen, requires_grad=True)
        f0q, f0k = 150 * torch.rand(2, tq, generator=gen), 150 * torch.rand(2, 1, generator=gen)
        out = ek.rope_attention(q, k, v, f0q, f0_k=f0k, backend="cpu")
        dout = torch.randn(out.shape, generator=gen)
        (dv,) = torch.autograd.grad(out, (v,), dout)
        assert torch.equal(out, v.detach().expand_as(out))
        assert torch.equal(dv, dout.sum(2, keepdim=True))


@pytest.mark.parametrize("case", [
    Case(batch=2, heads=4, kv_heads=2, tq=150, tk=200, dim=64),
    # A few queries: the forward packs 8, 4 and 2 heads of the MQA group per task for 1, 2 and
    # 4 threads (so that each thread has a task).
    Case(batch=1, heads=8, kv_heads=1, tq=2, tk=300, dim=64, causal=True),
    # One query per head: each task scores its keys against the query turned by their angles.
    Case(batch=1, heads=8, kv_heads=8, tq=1, tk=300, dim=64, causal=True),
], ids=["blocks", "packed_heads", "lone_query_rows"])
def test_thread_count_does_not_change_results(case):
    inputs = make_case(case, torch.float32)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append(_grads_of(case, inputs, torch.float32))
    finally:
        torch.set_num_threads(before)
    one = results[0]
    assert set(one) == {"out", *GRAD_NAMES}
    for other in results[1:]:
        for n in one:
            assert torch.equal(one[n], other[n]), n


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("empty_row_causal", torch.float32),  # an all-masked batch entry, padded rows and keys
        ("empty_row", torch.float64),
        ("causal_tq_gt_tk", torch.float32),
        ("no_bias", torch.float32),  # the bias partials are written as zeros too
        ("mqa", torch.bfloat16),  # the exact-delta path of low-precision inputs
        ("few_queries_mqa", torch.float32),  # a task's rows from several heads
    ],
)
def test_poisoned_outputs_are_all_written(name, dtype, monkeypatch):
    """ECHO_KERNELS_POISON=1 NaN-fills every output before the kernels run: nothing may stay NaN."""
    case = CASES[name]
    inputs = make_case(case, torch.float64)
    monkeypatch.delenv("ECHO_KERNELS_POISON", raising=False)
    clean = run(case, inputs, "cpu", dtype)
    monkeypatch.setenv("ECHO_KERNELS_POISON", "1")
    assert cpu_backend._C.poisoning()
    poisoned = run(case, inputs, "cpu", dtype)
    assert set(poisoned) == {"out", *GRAD_NAMES}
    for n, value in poisoned.items():
        assert torch.isfinite(value).all(), f"{n}: an element was left unwritten"
        assert torch.equal(value, clean[n]), n


def test_unsupported_reasons():
    q = torch.zeros(1, 2, 4, 8)
    assert cpu_backend.unsupported_reason(q, q, q, 1, False) is None
    qi = q.to(torch.int32)
    assert "dtype" in cpu_backend.unsupported_reason(qi, qi, qi, 1, False)
    assert "meta" in cpu_backend.unsupported_reason(q.to("meta"), q.to("meta"), q.to("meta"), 1, False)


def test_kernel_rejects_bad_input():
    case = Case(batch=1, heads=2, kv_heads=1, tq=8, tk=8, dim=8)
    q = torch.randn(1, 2, 8, 8)
    k = v = torch.randn(1, 1, 8, 8)
    f = list(ek.features.default_features(1, 8))
    alpha, beta = torch.ones(2), torch.tensor(1.0)
    lengths = torch.full((1,), 8, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="q_lengths"):
        cpu_backend._C.forward(q, k, v, f, f, alpha, beta, torch.tensor([9]), lengths, 1, False, 0.3)
    with pytest.raises(RuntimeError, match="stat dtype"):
        f64 = [t.double() for t in f]
        cpu_backend._C.forward(q, k, v, f64, f, alpha, beta, lengths, lengths, 1, False, 0.3)
    with pytest.raises(RuntimeError, match="multiple"):
        cpu_backend._C.forward(q, torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8), f, f, alpha, beta, lengths,
                               lengths, 1, False, 0.3)
    assert case.dim == 8


def test_empty_batch():
    """B = 0: empty outputs and gradients, zero dalpha / dbeta (no tasks to split keys over)."""
    q = torch.randn(0, 2, 70, 8)
    k = v = torch.randn(0, 1, 70, 8)
    f = list(ek.features.default_features(0, 70))
    alpha, beta = torch.ones(2), torch.tensor(1.0)
    lengths = torch.zeros(0, dtype=torch.int32)
    out, lse = cpu_backend._C.forward(q, k, v, f, f, alpha, beta, lengths, lengths, 1, False, 0.3)
    grads = cpu_backend._C.backward(out, q, k, v, out, lse, f, f, alpha, beta, lengths, lengths, 1, False, 0.3)
    assert out.shape == q.shape and lse.shape == (0, 2, 70)
    assert [tuple(g.shape) for g in grads[:3]] == [tuple(q.shape), tuple(k.shape), tuple(v.shape)]
    assert torch.equal(grads[9], torch.zeros(2)) and torch.equal(grads[10], torch.tensor(0.0))


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu"])
def test_without_a_bias_its_parameters_get_no_gradient(backend):
    """bias=None: alpha, beta and the pitch features do not enter the output, so autograd leaves
    their .grad None on every backend (not zeros, which AdamW's weight decay would act on)."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 9, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 9, 8, generator=gen, requires_grad=True) for _ in range(2))
    feats = ek.pitch_features(150 * torch.rand(2, 9, generator=gen))
    pitch = feats.pitch.clone().requires_grad_()
    alpha, beta = torch.ones(4, requires_grad=True), torch.tensor(0.7, requires_grad=True)
    for bias, used in ((None, False), ("exp", True)):
        out = ek.rope_attention(q, k, v, features=feats._replace(pitch=pitch), bias=bias, alpha=alpha, beta=beta,
                                backend=backend)
        out.sum().backward()
        assert (alpha.grad is not None, beta.grad is not None, pitch.grad is not None) == (used,) * 3, bias
        assert q.grad is not None and torch.isfinite(q.grad).all()
        for t in (q, k, v, alpha, beta, pitch):
            t.grad = None


def test_plain_eager_calls_skip_the_custom_op_and_watched_calls_use_it(monkeypatch):
    # In plain eager mode the kernels are called directly (the op's dispatch cost more than the
    # kernel at a decoding step's shapes); the profiler and dispatch modes still see the ops.
    from torch.utils.flop_counter import FlopCounterMode

    from echo_kernels import ops

    calls = []
    registered = ops.fused_ops

    def counting(name):
        fwd, bwd = registered(name)
        return (lambda *a: calls.append("fwd") or fwd(*a)), (lambda *a: calls.append("bwd") or bwd(*a))

    monkeypatch.setattr(ops, "fused_ops", counting)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 9, 16, requires_grad=True) for h in (4, 2, 2))
    f0, g = 100 + 100 * torch.rand(2, 9), torch.randn(2, 4, 9, 16)
    class Watching(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    watchers = {"plain": contextlib.nullcontext, "profiler": torch.autograd.profiler.profile,
                "dispatch mode": lambda: FlopCounterMode(display=False), "function mode": Watching}
    results = {}
    for name, watcher in watchers.items():
        calls.clear()
        with watcher():
            out = ek.rope_attention(q, k, v, f0, causal=True, backend="cpu")
            grads = torch.autograd.grad(out, (q, k, v), g)
            with torch.no_grad():
                inference = ek.rope_attention(q, k, v, f0, causal=True, backend="cpu")
        results[name] = (out, *grads, inference)
        # (The autograd engine runs the backward outside torch function modes.)
        expected = {"plain": [], "function mode": ["fwd", "fwd"]}.get(name, ["fwd", "bwd", "fwd"])
        assert calls == expected, name
    for name in ("profiler", "dispatch mode", "function mode"):
        assert all(torch.equal(a, b) for a, b in zip(results[name], results["plain"])), name
    assert torch.equal(results["plain"][0], results["plain"][-1])


def test_random_configurations_match_the_float64_golden(monkeypatch):
    # Shapes drawn across every path of the kernels: one or several query blocks, GQA packing,
    # key tiles with and without a tail, head dims off the vector width, masks, empty rows; with
    # poisoned outputs. A fresh draw each run; the seed is in the failure message.
    monkeypatch.setenv("ECHO_KERNELS_POISON", "1")
    seed = int(torch.randint(0, 2**31 - 1, ()))
    gen = torch.Generator().manual_seed(seed)

    def pick(*options):
        return options[int(torch.randint(len(options), (), generator=gen))]

    def draw(low, high):
        return int(torch.randint(low, high + 1, (), generator=gen))

    for trial in range(24):
        kv_heads, group = draw(1, 3), pick(1, 2, 4)
        case = Case(batch=draw(1, 3), heads=kv_heads * group, kv_heads=kv_heads,
                    tq=pick(1, draw(2, 64), draw(65, 140)), tk=draw(1, 300), dim=pick(2, 6, 16, 32, 48, 64),
                    bias=pick("exp", "l1", None), causal=pick(True, False), padded=pick(True, False),
                    voiced_fraction=pick(0.0, 0.7, 1.0), empty_row=pick(False, False, True),
                    theta_mode=pick("f0", "fixed"), seed=draw(0, 10**6))
        inputs = make_case(case, torch.float64)
        golden = run(case, inputs, "reference")
        for n, err in _relative_errors(run(case, inputs, "cpu"), golden).items():
            assert err <= 1e-10, f"seed {seed}, trial {trial}, {case}: {n} relative error {err:.2e}"
        # float32 (the vectorised rotation): the FlashAttention rule against the float32 reference.
        got, reference = run(case, inputs, "cpu", torch.float32), run(case, inputs, "reference", torch.float32)
        try:
            assert_close_to_golden(got, reference, golden)
        except AssertionError as error:
            raise AssertionError(f"seed {seed}, trial {trial}, {case}: {error}") from None
