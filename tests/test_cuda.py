"""The hand-written CUDA backend (csrc/cuda, ``echo_kernels._C_cuda``).

Without a GPU (CI) only the build, the bindings and the fallbacks are checked: the
extension imports, the backend reports itself unavailable with a reason naming the GPU,
an explicit ``backend="cuda"`` raises, and ``"auto"`` still serves. With a GPU, the kernels
are compared with the float64 golden under FlashAttention's rule (see ``cases.py``).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import echo_kernels as ek
from cases import (
    CUDA_KERNEL_VARIABLES,
    Case,
    assert_keyless_rows_are_zero,
    check_backend,
    make_case,
    run,
    use_cuda_kernels,
)
from echo_kernels import cuda as cuda_backend
from echo_kernels import dispatch

CUDA = torch.cuda.is_available()
USABLE = dispatch.unavailable_reason("cuda") is None
KERNELS = pytest.mark.skipif(not USABLE, reason=f"needs a CUDA GPU and the built extension: "
                                                f"{dispatch.unavailable_reason('cuda')}")


def _build_expected() -> bool:
    """Whether setup.py builds the CUDA extension here (its ``want_cuda``)."""
    forced = os.environ.get("ECHO_KERNELS_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


# ---- CPU-runnable: build, bindings, dispatch ------------------------------------------------------


@pytest.mark.skipif(not _build_expected(), reason="this environment does not build the CUDA extension")
def test_extension_is_built_and_imports():
    assert cuda_backend._C is not None, cuda_backend._LOAD_ERROR
    for name in ("forward", "backward", "build_info"):
        assert hasattr(cuda_backend._C, name), name
    info = cuda_backend.build_info()
    assert info["cuda_runtime"] > 0 and tuple(info["head_dims"]) == cuda_backend.HEAD_DIMS
    # Every arch is sm80+ (WMMA bfloat16), and the shared memory of the largest kernel is known per head dim.
    assert info["arch_list"] and min(info["arch_list"]) >= 800, info["arch_list"]
    assert set(info["shared_memory_bytes"]) == set(cuda_backend.HEAD_DIMS)


@pytest.mark.skipif(cuda_backend._C is None, reason="the CUDA extension is not built")
def test_bindings_check_their_inputs_before_touching_a_gpu():
    """The argument lists match the Python wrapper (a mismatch would be a TypeError), and CPU tensors are refused."""
    q = torch.zeros(1, 1, 4, 64, dtype=torch.float16)
    feats = [torch.zeros(1, 4) for _ in range(5)]
    lengths = torch.full((1,), 4, dtype=torch.int32)
    args = [feats, feats, torch.ones(1), torch.ones(1), lengths, lengths, 1, False, 0.125]
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        cuda_backend._C.forward(q, q, q, *args, torch.empty_like(q), torch.empty(1, 1, 4))
    rows = torch.empty(1, 1, 4)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        cuda_backend._C.backward(q, q, q, q, q, rows, *args, q.clone(), q.clone(), q.clone(), [rows] * 5, [rows] * 3,
                                 rows.clone())


@pytest.mark.skipif(CUDA, reason="checks the report of a process without a GPU")
def test_backend_reports_no_gpu():
    info = ek.backends()["cuda"]
    assert not info.available
    assert "GPU" in info.reason or "not built" in info.reason


def test_explicit_cuda_backend_on_cpu_tensors_raises():
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(NotImplementedError, match="backend='cuda'"):
        ek.rope_attention(q, q, q, backend="cuda")


def test_auto_serves_cpu_tensors():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 64) for _ in range(3))
    f0 = 100 + 50 * torch.rand(1, 9)
    out = ek.rope_attention(q, k, v, f0, backend="auto")
    want = ek.rope_attention(q, k, v, f0, backend="chunked")
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_input_reason_names_the_argument():
    """dtype and head dim are checked before the device, so this runs on CPU tensors."""
    q32 = torch.zeros(1, 1, 4, 64)
    assert "float32" in cuda_backend.input_reason(q32, q32, q32)
    q48 = torch.zeros(1, 1, 4, 48, dtype=torch.float16)
    assert "D=48" in cuda_backend.input_reason(q48, q48, q48)
    q16 = torch.zeros(1, 1, 4, 64, dtype=torch.float16)
    assert "cpu" in cuda_backend.input_reason(q16, q16, q16)
    assert dispatch.choose_backend("auto", q32, q32, q32, 1, False) != "cuda"


# ---- GPU: the kernels against the float64 golden ---------------------------------------------------


def check(case: Case, dtype: torch.dtype, ties: bool = False) -> dict:
    return check_backend("cuda", case, dtype, "cuda", ties)


F16, BF16 = torch.float16, torch.bfloat16
GPU_CASES = [
    ("gqa_padded_d64_f16", Case(dim=64), F16),
    ("gqa_padded_d64_bf16", Case(dim=64, seed=1), BF16),
    ("gqa_padded_d128_f16", Case(dim=128, seed=2), F16),
    ("gqa_padded_d128_bf16", Case(dim=128, seed=3), BF16),
    ("causal_tq_lt_tk_d64_f16", Case(dim=64, causal=True, seed=4), F16),
    ("causal_tq_gt_tk_d128_bf16", Case(dim=128, tq=113, tk=97, causal=True, seed=5), BF16),  # rows with no key
    ("l1_d64_bf16", Case(dim=64, bias="l1", seed=6), BF16),
    ("l1_causal_d128_f16", Case(dim=128, bias="l1", causal=True, seed=7), F16),
    ("nobias_mqa_d64_f16", Case(dim=64, bias=None, heads=4, kv_heads=1, seed=8), F16),
    ("nobias_d128_bf16", Case(dim=128, bias=None, heads=2, kv_heads=2, seed=9), BF16),
    ("unvoiced_d64_f16", Case(dim=64, voiced_fraction=0.0, seed=10), F16),
    ("all_voiced_causal_d128_bf16", Case(dim=128, voiced_fraction=1.0, causal=True, seed=11), BF16),
    ("mean_f0_unit_radius_d64_bf16", Case(dim=64, theta_mode="mean_f0", radius_mode="unit", seed=12), BF16),
    ("f0_offset_d128_f16", Case(dim=128, theta_mode="f0_offset", seed=13), F16),
    ("short_1x5_d64_f16", Case(dim=64, tq=1, tk=5, heads=2, kv_heads=1, seed=14), F16),
    ("self_256_unpadded_d128_f16", Case(dim=128, tq=256, tk=256, padded=False, causal=True, batch=1, seed=15), F16),
    ("t1025_causal_d128_bf16", Case(dim=128, tq=1025, tk=1025, heads=8, kv_heads=2, causal=True, seed=16), BF16),
    ("t1025_cross_d64_f16", Case(dim=64, tq=1025, tk=777, heads=4, kv_heads=4, seed=17), F16),
    ("t1025_causal_d64_f16_mqa", Case(dim=64, tq=1025, tk=1025, heads=4, kv_heads=1, causal=True, seed=18), F16),
    ("t1025_l1_d128_f16", Case(dim=128, tq=1025, tk=1025, heads=2, kv_heads=1, bias="l1", seed=19), F16),
]


@KERNELS
@pytest.mark.parametrize("case, dtype", [c[1:] for c in GPU_CASES], ids=[c[0] for c in GPU_CASES])
def test_matches_golden(case, dtype):
    check(case, dtype)


# The opt-in CuTe kernels (csrc/cuda/vrope_*_mma.cu), one pass at a time so a failure names its kernel;
# the other pass runs the default WMMA kernel (the backward reads the mma forward's lse and output).
@KERNELS
@pytest.mark.parametrize("mma_pass", list(CUDA_KERNEL_VARIABLES))
@pytest.mark.parametrize("case, dtype", [c[1:] for c in GPU_CASES], ids=[c[0] for c in GPU_CASES])
def test_mma_kernels_match_golden(case, dtype, mma_pass, monkeypatch):
    use_cuda_kernels(monkeypatch, "mma", passes=(mma_pass,))
    check(case, dtype)


@KERNELS
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
def test_mma_kernels_empty_rows_determinism_and_unknown_choice(dtype, monkeypatch):
    use_cuda_kernels(monkeypatch, "mma")
    case = Case(dim=128, empty_row=True, tq=113, tk=97, causal=True, heads=4, kv_heads=2, seed=36)
    fused = check(case, dtype)
    assert_keyless_rows_are_zero(fused, case)
    inputs = make_case(case, dtype, "cuda")
    first, second = run(case, inputs, "cuda"), run(case, inputs, "cuda")
    for name in first:
        assert torch.equal(first[name], second[name]), name
    use_cuda_kernels(monkeypatch, "fast", passes=("backward",))
    with pytest.raises(RuntimeError, match="ECHO_KERNELS_CUDA_BACKWARD must be 'wmma' or 'mma'"):
        run(case, inputs, "cuda")


@KERNELS
def test_tiny_case_for_compute_sanitizer():
    """Small enough to run under ``compute-sanitizer --tool memcheck|racecheck|initcheck`` in seconds."""
    check(Case(batch=2, heads=2, kv_heads=1, tq=5, tk=7, dim=64, causal=True, seed=30), F16)


@KERNELS
@pytest.mark.parametrize("bias", ["exp", "l1"])
def test_pitch_ties_pass_no_pitch_gradient_through_abs(bias):
    """Constant f0: every voiced pair has |dp| = 0; sign(0) = 0 as in torch.abs, no NaN."""
    case = Case(dim=64, bias=bias, voiced_fraction=1.0, heads=2, kv_heads=1, seed=31)
    fused = check(case, F16, ties=True)
    assert fused["pitch_q"].abs().max() == 0 and fused["pitch_k"].abs().max() == 0


@KERNELS
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
def test_empty_rows_are_exact_zeros_with_finite_grads(dtype):
    """Batch 0 has k_length 0 (no key at all); under causal with Tq > Tk early rows see nothing either."""
    case = Case(dim=64, empty_row=True, tq=113, tk=97, causal=True, heads=2, kv_heads=1, seed=32)
    fused = check(case, dtype)
    assert_keyless_rows_are_zero(fused, case)


@KERNELS
@pytest.mark.parametrize("dim", [64, 128])
def test_backward_is_bitwise_deterministic(dim):
    case = Case(dim=dim, tq=1025, tk=1025, heads=8, kv_heads=2, causal=True, seed=33)
    inputs = make_case(case, BF16, "cuda")
    first, second = run(case, inputs, "cuda"), run(case, inputs, "cuda")
    for name in first:
        assert torch.equal(first[name], second[name]), name


@KERNELS
@pytest.mark.parametrize("kernels", ["wmma", "mma"])
def test_every_buffer_is_written(kernels, monkeypatch):
    """Every buffer starts as NaN (tests/conftest.py poisons); nothing may be left NaN (padding, empty rows, tiles)."""
    use_cuda_kernels(monkeypatch, kernels)
    case = Case(dim=128, tq=70, tk=65, heads=2, kv_heads=1, empty_row=True, seed=34)
    inputs = make_case(case, F16, "cuda")
    q, k, v = (inputs[n].to("cuda", F16) for n in ("q", "k", "v"))
    ql, kl = inputs["q_lengths"].to("cuda", torch.int32), inputs["k_lengths"].to("cuda", torch.int32)
    fq = ek.pitch_features(inputs["f0q"].to("cuda"), lengths=ql, dtype=torch.float32)
    fk = ek.pitch_features(inputs["f0k"].to("cuda"), lengths=kl, dtype=torch.float32)
    alpha = inputs["alpha"].to("cuda", torch.float32)
    beta = torch.tensor(0.8, device="cuda")
    for bias, causal in ((1, False), (2, True), (0, True)):
        out, lse = cuda_backend.forward(q, k, v, fq, fk, alpha, beta, bias, causal, ql, kl, 0.1)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        assert torch.isneginf(lse[0]).all()
        grads = cuda_backend.backward(torch.randn_like(out), q, k, v, out, lse, fq, fk, alpha, beta, bias, causal,
                                      ql, kl, 0.1)
        for name, g in zip(grads._fields, grads):
            assert torch.isfinite(g).all(), name


@KERNELS
def test_auto_prefers_the_faster_triton_and_cuda_serves_when_asked():
    q = torch.zeros(1, 2, 8, 64, device="cuda", dtype=F16)
    assert dispatch.choose_backend("auto", q, q, q, 1, False) == "triton"
    assert dispatch.choose_backend("cuda", q, q, q, 1, False) == "cuda"
    q32 = q.float()
    assert dispatch.choose_backend("auto", q32, q32, q32, 1, False) != "cuda"
    assert "float32" in cuda_backend.unsupported_reason(q32, q32, q32, 1, False)


@KERNELS
def test_non_default_stream_and_device_guard():
    """Launches go to the current stream: results on a side stream equal those on the default one."""
    case = Case(dim=64, seed=35)
    inputs = make_case(case, F16, "cuda")
    want = run(case, inputs, "cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = run(case, inputs, "cuda")
    stream.synchronize()
    for name in want:
        assert torch.equal(want[name], got[name]), name
