"""Forward and forward+backward time and peak memory: our backends against the baselines.

``pytest benchmarks/`` runs every case once at small sizes (smoke); ``--benchmark``
runs the full shapes with warm-up and rounds and saves JSON for ``benchmarks.report``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import triton

import echo_kernels as ek
from echo_kernels.dispatch import backend_module, unavailable_reason

from .baselines import BASELINES
from .shapes import Shape, dense_bytes, device, full_mode, make_inputs, shapes

OURS = ("reference", "chunked", "cpu", "triton", "cuda")
# ECHO_BENCH_METHODS=cuda,triton,sdpa restricts a run (a GPU lease is short).
_CHOSEN = os.environ.get("ECHO_BENCH_METHODS")
METHODS = tuple(m for m in OURS + tuple(BASELINES) if _CHOSEN is None or m in _CHOSEN.split(","))
DENSE = ("reference", "upstream", "sdpa_rope_bias")
DENSE_BUDGET = (40 if device() == "cuda" else 8) * 2**30


def method_fn(method: str, inp):
    if method in BASELINES:
        return lambda: BASELINES[method](inp)
    return lambda: ek.rope_attention(inp.q, inp.k, inp.v, features=inp.fq, features_k=inp.fk, alpha=inp.alpha,
                                     beta=inp.beta, causal=inp.causal, q_lengths=inp.q_lengths,
                                     k_lengths=inp.k_lengths, backend=method)


def skip_reason(method: str, shape: Shape, dtype: torch.dtype) -> str | None:
    dev = device()
    deadline = float(os.environ.get("ECHO_BENCH_DEADLINE", "inf"))  # a Unix time
    if time.time() > deadline:
        return "the run's time budget (ECHO_BENCH_DEADLINE) is spent"
    if method in OURS and method != "reference":
        reason = unavailable_reason(method)
        if reason:
            return reason
        if method == "triton" and dev == "cpu":
            return "the Triton interpreter is a correctness tool, not a benchmark"
        probe = torch.empty(1, 1, 1, shape.dim, device=dev, dtype=dtype)
        reason = backend_module(method).unsupported_reason(probe, probe, probe, 1, shape.causal)
        if reason:
            return reason
    if method == "flex" and dev == "cpu":
        return "flex_attention is benchmarked on GPU only (its CPU compile takes minutes)"
    if method in DENSE and dense_bytes(shape) > DENSE_BUDGET:
        return f"materialises [Tq, Tk]: about {dense_bytes(shape) / 2**30:.0f} GiB"
    return None


def peak_memory_cuda(fn) -> int:
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def peak_memory_cpu(method: str, shape: Shape, dtype: torch.dtype, backward: bool) -> int:
    """Peak RSS growth of one call, measured in a fresh process (CPU allocations are not tracked)."""
    args = json.dumps({"method": method, "shape": shape.__dict__, "dtype": str(dtype), "backward": backward})
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", args], capture_output=True, text=True,
                         check=True, timeout=600)
    return int(out.stdout.strip().splitlines()[-1])


def run_case(benchmark, method: str, shape: Shape, backward: bool):
    dtype = torch.bfloat16 if device() == "cuda" else torch.float32
    reason = skip_reason(method, shape, dtype)
    if reason:
        pytest.skip(reason)
    inp = make_inputs(shape, dtype, requires_grad=backward)
    attention = method_fn(method, inp)
    sync = torch.cuda.synchronize if device() == "cuda" else (lambda: None)

    def step():
        if backward:
            attention().sum().backward()
            inp.q.grad = inp.k.grad = inp.v.grad = None
        else:
            with torch.no_grad():
                attention()
        sync()

    rounds = (5 if device() == "cuda" else 3) if full_mode() else 1
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1 if full_mode() else 0, iterations=1)
    flops = shape.forward_flops() * (3.5 if backward else 1.0)
    info = dict(method=method, mode="fwd+bwd" if backward else "fwd", device=device(), dtype=str(dtype),
                torch=torch.__version__, triton=triton.__version__, **shape.__dict__, label=shape.label)
    if device() == "cuda":
        info["card"] = torch.cuda.get_device_name()
        info["peak_bytes"] = peak_memory_cuda(step)
        info["tflops"] = flops / benchmark.stats.stats.mean / 1e12
    elif full_mode() or (shape.name == "encoder" and method == "chunked" and not backward):
        info["peak_bytes"] = peak_memory_cpu(method, shape, dtype, backward)
    benchmark.extra_info.update(info)
    benchmark.group = f"{shape.label} {info['mode']}"


# Shape-major order: every method of a shape runs back to back (fair, and a run cut
# short keeps whole rows of the table).
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", shapes(), ids=lambda s: s.label)
def test_forward(benchmark, method, shape):
    run_case(benchmark, method, shape, backward=False)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", shapes(), ids=lambda s: s.label)
def test_forward_backward(benchmark, method, shape):
    run_case(benchmark, method, shape, backward=True)
