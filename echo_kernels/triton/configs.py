"""Autotune configurations of the Triton kernels.

On a GPU the forward's autotuner picks, per (length bucket, head dim, causal), among
tile shapes that suit Ampere (A100: 4-8 warps, 2-3 stages) and Hopper (H100: bigger
tiles, more stages); the backward uses a fixed table (see ``backward_config``). Under
``TRITON_INTERPRET=1`` there is exactly one config, 64 x 64: the interpreter cannot
benchmark several (it has no GPU driver) and small tiles are slow there.
"""

from __future__ import annotations

import triton

from ._env import interpreting

# TQ_BUCKET / TK_BUCKET are next_power_of_2 of the lengths (see ``forward``).
FWD_KEYS = ["TQ_BUCKET", "TK_BUCKET", "HEAD_DIM", "CAUSAL"]

INTERPRETER_BLOCK = 64
# Rows per program of the rotation kernel on a GPU: bigger tiles spill its sine/cosine registers on sm_90.
ROTATE_BLOCK = 16


def _configs(shapes):
    if interpreting():
        return [triton.Config({"BLOCK_M": INTERPRETER_BLOCK, "BLOCK_N": INTERPRETER_BLOCK}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def forward_configs():
    """(BLOCK_M, BLOCK_N, warps, stages) candidates of the forward kernel."""
    return _configs([
        (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (32, 64, 4, 2),  # small/odd shapes; D = 256
        (128, 64, 4, 3), (128, 64, 8, 3),  # Ampere sweet spot (FA2-like)
        (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 4),  # Hopper: more stages in flight
        (32, 32, 4, 1),  # fallback for D = 256 if nothing larger fits
    ])


def backward_config(head_dim: int, arch: int) -> dict:
    """Fixed launch parameters of the dK/dV and dQ kernels (not timed-autotuned, on purpose).

    The tile shapes fix the order in which the backward sums over tokens. A timing-based
    choice could differ between two processes and so change the last bits of the
    gradients; a table keyed on (head dim, GPU generation) keeps the backward bitwise
    reproducible on a given device. Up to D = 128, as in FlashAttention-2, the resident
    side gets the bigger tile (keys in dK/dV, queries in dQ); D = 256 keeps small tiles
    on both sides to limit register spills.
    ``arch``: compute capability x 10 (80 = A100, 90 = H100). Returns
    ``{"dkdv": {...}, "dq": {...}}`` of BLOCK_M, BLOCK_N, num_warps, num_stages.
    """
    if interpreting():
        block = {"BLOCK_M": INTERPRETER_BLOCK, "BLOCK_N": INTERPRETER_BLOCK, "num_warps": 4, "num_stages": 1}
        return {"dkdv": block, "dq": dict(block)}
    # Timed on an H100 (``python -m benchmarks.tune_triton_backward``, T = 4096, bf16, full
    # mask). D <= 64 (benchmarks/results/gpu-h100-20261126): of six tables this one was
    # fastest (9.9 ms; 8 warps 14.0 ms); re-timed in session 7 beside 2/4 stages and 64 x 64
    # tiles, all within 2% (8.4-8.7 ms). D = 128 (benchmarks/results/gpu-h100-20261126-s7):
    # 4 warps with 32 x 64 / 64 x 32 tiles took 11.4 ms, every 8-warp table 19-24 ms.
    # D = 256: from ahead-of-time compiles (``python -m echo_kernels.triton.compile_check``:
    # fewest spills), not timed.
    hopper = arch >= 90
    if head_dim <= 128:
        dkdv, dq, warps = (32, 64), (64, 32), 4
    else:
        dkdv, dq, warps = (32, 32), (32, 32), 8
    stages = 1 if head_dim >= 256 else (3 if hopper else 2)
    return {
        "dkdv": {"BLOCK_M": dkdv[0], "BLOCK_N": dkdv[1], "num_warps": warps, "num_stages": stages},
        "dq": {"BLOCK_M": dq[0], "BLOCK_N": dq[1], "num_warps": warps, "num_stages": stages},
    }


def prune_configs(configs, named_args, **kwargs):
    """Drop tiles that cannot fit the register file / shared memory for large head dims."""
    head_dim = named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM", 64))
    if head_dim <= 64:
        return configs
    limit = 128 if head_dim == 128 else 64
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= limit * 64]
    return kept or configs
