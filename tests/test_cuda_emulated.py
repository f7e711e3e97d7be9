"""The CUDA kernels of csrc/cuda run on the CPU, in the emulator of tests/cuda_emulator.

The same sources as the GPU build (the host glue, the rotation prologue, the WMMA kernels and
the CuTe register-resident mma kernels) are compiled by the host compiler against a model of
CUDA's threads, warps, barriers, shared memory and the warp-level instructions the kernels use,
and checked against the float64 golden under FlashAttention's rule, like tests/test_cuda.py on
a GPU. The WMMA kernels, verified on an H100, pass here too: they vouch for the emulator. It
shows wrong results from indexing, fragment layouts or masks, barriers some threads skip
(a reported deadlock), reads of shared memory nobody wrote or before a cp.async's wait
(poisoned), and ldmatrix bank conflicts. It cannot show speed, out-of-bounds global accesses
(CPU tensors have no guard), races between blocks (they run one after another) or the GPU's
exact rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from cuda_emulator import build

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

MISSING = build.missing_prerequisites()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"cannot build the CUDA emulator: {MISSING}")


@pytest.fixture(scope="module")
def emulated():
    """The emulated extension (built on first use: a few minutes)."""
    return build.load()


@pytest.fixture
def cuda_on_cpu(emulated, monkeypatch):
    """The cuda backend, served by the emulated extension, for CPU tensors."""
    monkeypatch.setattr(cuda_backend, "_C", emulated)
    monkeypatch.setattr(cuda_backend, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cuda_backend, "unsupported_reason", lambda *args: None)


F16, BF16 = torch.float16, torch.bfloat16
CASES = [
    ("gqa_padded_d64_f16", Case(dim=64, tq=70, tk=65, seed=40), F16),
    ("causal_tq_gt_tk_d128_bf16", Case(dim=128, tq=113, tk=97, causal=True, seed=41), BF16),  # rows with no key
    ("l1_causal_d64_bf16", Case(dim=64, tq=65, tk=80, bias="l1", causal=True, seed=42), BF16),
    ("nobias_mqa_d128_f16", Case(dim=128, tq=40, tk=70, bias=None, heads=4, kv_heads=1, seed=43), F16),
    ("empty_unvoiced_causal_d64_f16", Case(dim=64, tq=70, tk=65, empty_row=True, voiced_fraction=0.0, causal=True,
                                           seed=44), F16),
    ("short_1x5_d64_bf16", Case(dim=64, tq=1, tk=5, heads=2, kv_heads=1, seed=45), BF16),
    # Several key tiles per CTA: the mma kernels' double-buffered copies run their steady state.
    ("self_200_causal_d64_f16", Case(dim=64, tq=200, tk=200, batch=1, heads=2, kv_heads=1, causal=True,
                                     padded=False, seed=46), F16),
]


def _check(case: Case, dtype: torch.dtype) -> dict:
    fused = check_backend("cuda", case, dtype, "cpu")
    if case.empty_row:  # batch 0 has no key: its output and q, k gradients exactly 0
        assert_keyless_rows_are_zero(fused, case)
    return fused


@pytest.mark.parametrize("case, dtype", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mma_kernels_match_golden(case, dtype, emulated, cuda_on_cpu, monkeypatch):
    use_cuda_kernels(monkeypatch, "mma")
    emulated.emu_reset_counters()
    _check(case, dtype)
    assert emulated.emu_counters()["ldmatrix_phases"] > 0  # the mma kernels ran (only they use ldmatrix)


# The default kernels, verified on an H100 (sessions 3-7), as a check of the emulator itself. Few
# and small cases: every lane of an emulated WMMA fragment computes the whole 16 x 16 tile.
WMMA_CASES = [c for c in CASES if c[0] in ("empty_unvoiced_causal_d64_f16", "short_1x5_d64_bf16")] + [
    ("l1_causal_small_d64_bf16", Case(dim=64, tq=40, tk=50, bias="l1", causal=True, heads=2, kv_heads=1, seed=42), BF16),
    ("gqa_causal_d128_f16", Case(dim=128, tq=33, tk=40, heads=2, kv_heads=1, causal=True, seed=49), F16),
]


@pytest.mark.parametrize("case, dtype", [c[1:] for c in WMMA_CASES], ids=[c[0] for c in WMMA_CASES])
def test_wmma_kernels_match_golden(case, dtype, cuda_on_cpu, monkeypatch):
    use_cuda_kernels(monkeypatch, "wmma")
    _check(case, dtype)


@pytest.mark.parametrize("mma_pass", list(CUDA_KERNEL_VARIABLES))
def test_one_mma_pass_beside_the_other_wmma_pass(mma_pass, cuda_on_cpu, monkeypatch):
    """The passes exchange out and lse: each mma pass must fit the other generation's."""
    use_cuda_kernels(monkeypatch, "mma", passes=(mma_pass,))
    check_backend("cuda", Case(dim=128, tq=40, tk=33, causal=True, seed=47), BF16, "cpu")


@pytest.mark.parametrize("dim", [64, 128])
def test_mma_kernels_ldmatrix_has_no_bank_conflicts(dim, emulated, cuda_on_cpu, monkeypatch):
    """The XOR swizzle of the shared tiles (vrope_cute.cuh) spreads the 8 rows of every ldmatrix
    phase, plain and transposed, over 8 different bank groups, in the forward and the backward."""
    use_cuda_kernels(monkeypatch, "mma")
    case = Case(dim=dim, tq=70, tk=65, heads=2, kv_heads=1, causal=True, seed=50)
    inputs = make_case(case, F16, "cpu")
    emulated.emu_reset_counters()
    run(case, inputs, "cuda", grads=False)
    forward = emulated.emu_counters()
    run(case, inputs, "cuda")
    both = emulated.emu_counters()
    assert 0 < forward["ldmatrix_phases"] < both["ldmatrix_phases"] - forward["ldmatrix_phases"]  # fwd, then fwd + bwd
    assert both["ldmatrix_conflicted_phases"] == 0, both


def test_mma_backward_is_bitwise_repeatable(cuda_on_cpu, monkeypatch):
    use_cuda_kernels(monkeypatch, "mma")
    case = Case(dim=64, tq=97, tk=113, heads=2, kv_heads=1, causal=True, seed=48)
    inputs = make_case(case, F16, "cpu")
    first, second = run(case, inputs, "cuda"), run(case, inputs, "cuda")
    for name in first:
        assert torch.equal(first[name], second[name]), name


# ---- the emulator itself --------------------------------------------------------------------------


def test_emulated_mma_fragments_are_cutes(emulated):
    """Which lane holds which element of A, B and C/D, for fp16 and bf16: CuTe's traits, entry by entry."""
    assert emulated.emu_mma_layout_mismatches() == [0] * 6


def test_a_missing_barrier_reads_poison(emulated):
    """Warp 0 reads words warp 1 writes: NaN without a __syncthreads between, the values with one."""
    assert all(math.isnan(x) for x in emulated.emu_cross_warp_read(False))
    assert emulated.emu_cross_warp_read(True) == [1.0] * 32


def test_barriers_some_threads_skip_are_reported(emulated):
    with pytest.raises(RuntimeError, match=r"deadlock.*\| B B .*\| x x"):
        emulated.emu_divergent_barrier()  # warp 0 waits at __syncthreads, warp 1 has exited
    with pytest.raises(RuntimeError, match="deadlock"):
        emulated.emu_half_warp_shuffle()  # lanes 0-15 wait at a shuffle lanes 16-31 never reach


def test_a_missing_syncwarp_before_a_wmma_load_is_reported(emulated):
    assert emulated.emu_wmma_load_after_writes(True) == 30.0  # tile[15][15] = 15 + 15
    with pytest.raises(RuntimeError, match="missing __syncwarp"):
        emulated.emu_wmma_load_after_writes(False)


def test_a_store_into_a_cp_async_in_flight_is_reported(emulated):
    with pytest.raises(RuntimeError, match="in flight"):
        emulated.emu_store_into_copy_in_flight()


def test_errors_inside_a_thread_reach_python(emulated):
    """Raised on the fiber's stack, rethrown on the scheduler's: a RuntimeError, not an abort."""
    with pytest.raises(RuntimeError, match="part of a warp"):
        emulated.emu_partial_shuffle()


def test_ldmatrix_bank_conflicts_are_counted(emulated):
    """Rows 128 bytes apart all fall in one bank group (every phase conflicts); 16 bytes apart, none."""
    emulated.emu_reset_counters()
    emulated.emu_strided_ldmatrix(128)
    assert emulated.emu_counters() == {"ldmatrix_phases": 4, "ldmatrix_conflicted_phases": 4}
    emulated.emu_reset_counters()
    emulated.emu_strided_ldmatrix(16)
    assert emulated.emu_counters() == {"ldmatrix_phases": 4, "ldmatrix_conflicted_phases": 0}
