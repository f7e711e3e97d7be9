"""The fused Triton backend against the float64 golden (FlashAttention's error rule).

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors
(conftest sets ``TRITON_INTERPRET=1``): shapes stay small (lengths <= 256, D <= 64,
one 64 x 64 tile config) and bfloat16 is skipped, because the interpreter's bfloat16
``tl.dot`` is wrong. Larger shapes and bfloat16 run only on a GPU.
"""

from __future__ import annotations

import pytest
import torch

import echo_kernels as ek
from cases import Case, assert_keyless_rows_are_zero, check_backend, make_case, run
from echo_kernels import dispatch
from echo_kernels import triton as triton_backend
from echo_kernels.buffers import output_buffer

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GPU_ONLY = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (too slow or unsupported in the Triton interpreter)")
BF16_GPU_ONLY = pytest.mark.skipif(not CUDA, reason="the Triton interpreter computes bfloat16 tl.dot wrongly")

pytestmark = pytest.mark.skipif(
    dispatch.unavailable_reason("triton") is not None,
    reason=f"triton backend unavailable: {dispatch.unavailable_reason('triton')}",
)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every output buffer starts as NaN, so an element a kernel forgets to write shows up."""
    monkeypatch.setenv("ECHO_KERNELS_POISON", "1")


def check(case: Case, dtype: torch.dtype, ties: bool = False) -> dict:
    return check_backend("triton", case, dtype, DEVICE, ties)


# (id, case, dtype): the interpreter set (~5-10 s each on 2 CPU cores).
CPU_CASES = [
    ("gqa_padded_f32", Case(), torch.float32),
    ("gqa_padded_f16", Case(seed=1), torch.float16),
    ("causal_tq_lt_tk_f32", Case(causal=True, seed=2), torch.float32),
    ("causal_tq_gt_tk_f16", Case(tq=113, tk=97, causal=True, seed=3), torch.float16),  # rows with no key
    ("l1_f32", Case(bias="l1", seed=4), torch.float32),
    ("l1_causal_f16", Case(bias="l1", causal=True, seed=5), torch.float16),
    ("nobias_mqa_f32", Case(bias=None, heads=2, kv_heads=1, seed=6), torch.float32),
    ("mqa_d64_f16", Case(heads=3, kv_heads=1, dim=64, tq=70, tk=130, seed=7), torch.float16),
    ("unvoiced_f32", Case(voiced_fraction=0.0, heads=2, kv_heads=2, seed=8), torch.float32),
    ("all_voiced_causal_f32", Case(voiced_fraction=1.0, causal=True, heads=2, kv_heads=1, seed=9), torch.float32),
    ("self_attn_256_unpadded_f32", Case(tq=256, tk=256, padded=False, causal=True, batch=1, heads=2, kv_heads=1,
                                        theta_mode="mean_f0", seed=10), torch.float32),
    ("short_1x1_f32", Case(tq=1, tk=5, batch=2, heads=2, kv_heads=1, seed=11), torch.float32),
    # Wide pitch ranges (|beta pitch| up to ~90) and a negative beta: no overflow, no shortcut.
    ("wide_pitch_f32", Case(pitch_scale=40.0, heads=2, kv_heads=1, seed=17), torch.float32),
    ("negative_beta_f16", Case(beta=-0.3, heads=2, kv_heads=1, seed=18), torch.float16),
]


@pytest.mark.parametrize("case, dtype", [c[1:] for c in CPU_CASES], ids=[c[0] for c in CPU_CASES])
def test_matches_golden(case, dtype):
    check(case, dtype)


@pytest.mark.parametrize("bias", ["exp", "l1"])
def test_pitch_ties_pass_no_pitch_gradient_through_abs(bias):
    """Constant f0: every voiced pair has |dp| = 0; sign(0) = 0 as in torch.abs, no NaN."""
    case = Case(bias=bias, voiced_fraction=1.0, heads=2, kv_heads=1, seed=12)
    fused = check(case, torch.float32, ties=True)
    assert fused["pitch_q"].abs().max() == 0 and fused["pitch_k"].abs().max() == 0


def test_empty_rows_are_exact_zeros_with_finite_grads():
    """Batch 0 has k_length 0 (no key at all); under causal with Tq > Tk early rows see nothing either."""
    case = Case(empty_row=True, tq=113, tk=97, causal=True, heads=2, kv_heads=1, seed=13)
    fused = check(case, torch.float32)
    assert_keyless_rows_are_zero(fused, case)


def test_backward_is_bitwise_deterministic():
    case = Case(seed=14, causal=True, heads=2, kv_heads=1)
    inputs = make_case(case, torch.float32, DEVICE)
    first, second = run(case, inputs, "triton"), run(case, inputs, "triton")
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_poisoned_buffers_are_fully_overwritten():
    """The wrapper's buffers are NaN-filled first (ECHO_KERNELS_POISON=1); the results hold no NaN."""
    case = Case(seed=15, tq=70, tk=65, heads=2, kv_heads=1, empty_row=True)
    inputs = make_case(case, torch.float32, DEVICE)
    q = inputs["q"].to(DEVICE, torch.float32)
    k, v = (inputs[n].to(DEVICE, torch.float32) for n in ("k", "v"))
    ql, kl = inputs["q_lengths"].to(DEVICE, torch.int32), inputs["k_lengths"].to(DEVICE, torch.int32)
    fq = ek.pitch_features(inputs["f0q"].to(DEVICE), lengths=ql, dtype=torch.float32)
    fk = ek.pitch_features(inputs["f0k"].to(DEVICE), lengths=kl, dtype=torch.float32)
    alpha = inputs["alpha"].to(DEVICE, torch.float32)
    beta = torch.tensor(0.8, device=DEVICE)
    assert torch.isnan(output_buffer((3,), q)).all()
    out, lse = triton_backend.forward(q, k, v, fq, fk, alpha, beta, 1, False, ql, kl, 0.2)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.isneginf(lse[0]).all()
    grads = triton_backend.backward(torch.randn_like(out), q, k, v, out, lse, fq, fk, alpha, beta, 1, False, ql, kl, 0.2)
    for name, g in zip(grads._fields, grads):
        assert torch.isfinite(g).all(), name


class _TinyAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.tensor([0.7, 1.3]))

    def forward(self, q, k, v, f0):
        return ek.rope_attention(q, k, v, f0, alpha=self.alpha, causal=True, backend="triton")


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(16)
    model = _TinyAttention().to(DEVICE)
    q = torch.randn(1, 2, 40, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 1, 40, 32, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 1, 40, 32, device=DEVICE, requires_grad=True)
    f0 = torch.where(torch.rand(1, 40) < 0.7, 100 + 100 * torch.rand(1, 40), torch.zeros(1, 40)).to(DEVICE)

    def step(fn):
        out = fn(q, k, v, f0)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, model.alpha))
        return out.detach(), grads

    compiled = torch.compile(model, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    out, grads = step(compiled)
    eager_out, eager_grads = step(model)
    torch.testing.assert_close(out, eager_out, rtol=0, atol=1e-6)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_unsupported_inputs_are_named():
    q = torch.zeros(1, 1, 4, 32, dtype=torch.float64, device=DEVICE)
    assert "float64" in triton_backend.unsupported_reason(q, q, q, 1, False)
    q48 = torch.zeros(1, 1, 4, 48, device=DEVICE)
    assert "D=48" in triton_backend.unsupported_reason(q48, q48, q48, 1, False)
    # One program per (batch, head) on the grid's second axis: past CUDA's 65535, another backend serves.
    wide = torch.zeros(1, 1, 1, 32, device=DEVICE).expand(8192, 8, 1, 32)
    assert "batch * heads = 65536" in triton_backend.unsupported_reason(wide, wide, wide, 1, False)
    assert triton_backend.unsupported_reason(wide[:8191], wide[:8191], wide[:8191], 1, False) is None
    if not CUDA:
        qb = torch.zeros(1, 1, 4, 32, dtype=torch.bfloat16)
        assert "bfloat16" in triton_backend.unsupported_reason(qb, qb, qb, 1, False)
        with pytest.raises(NotImplementedError, match="triton"):
            ek.rope_attention(qb, qb, qb, backend="triton")
    # auto never chooses a backend that cannot serve: float64 falls back.
    assert dispatch.choose_backend("auto", q, q, q, 1, False) != "triton"


def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter accepts code the GPU compiler rejects (non-constexpr globals, loop-carried
    type changes): compile every kernel for sm_90 ahead of time, in a process without the interpreter."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "echo_kernels.triton.compile_check", "--arch", "90", "--dim", "64", "--causal"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "REG:" in line]
    assert len(lines) == 5, result.stdout


# ---- GPU-only: bfloat16, long sequences, large head dims -----------------------------------------

GPU_CASES = [
    ("bf16_gqa", Case(seed=20), torch.bfloat16),
    ("bf16_causal_l1", Case(bias="l1", causal=True, seed=21), torch.bfloat16),
    ("t1025_d128_bf16", Case(tq=1025, tk=1025, dim=128, heads=8, kv_heads=2, causal=True, seed=22), torch.bfloat16),
    ("t1025_d128_f16_cross", Case(tq=1025, tk=777, dim=128, heads=4, kv_heads=4, seed=23), torch.float16),
    ("t1025_d128_f32", Case(tq=1025, tk=1025, dim=128, heads=2, kv_heads=1, seed=24), torch.float32),
    ("d256_f16", Case(tq=300, tk=300, dim=256, causal=True, seed=25), torch.float16),
    ("d32_long_bf16_mqa", Case(tq=2048, tk=2048, dim=32, heads=4, kv_heads=1, causal=True, seed=26), torch.bfloat16),
]


@GPU_ONLY
@pytest.mark.parametrize("case, dtype", [c[1:] for c in GPU_CASES], ids=[c[0] for c in GPU_CASES])
def test_matches_golden_gpu(case, dtype):
    check(case, dtype)


@BF16_GPU_ONLY
def test_bfloat16_matches_golden():
    check(Case(seed=27, causal=True), torch.bfloat16)


@GPU_ONLY
def test_gpu_backward_is_bitwise_deterministic():
    case = Case(tq=1025, tk=1025, dim=128, heads=8, kv_heads=2, seed=28)
    inputs = make_case(case, torch.bfloat16, DEVICE)
    first, second = run(case, inputs, "triton"), run(case, inputs, "triton")
    for name in first:
        assert torch.equal(first[name], second[name]), name
