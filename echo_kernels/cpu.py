"""Fused C++ CPU backend, a thin wrapper over ``echo_kernels._C_cpu`` (csrc/cpu).

Supports CPU tensors in float32, float64, bfloat16 and float16 with any even head dim,
GQA/MQA, causal and length masks and every bias kind. bfloat16/float16 inputs are
computed with float32 accumulation and float32 statistics (lse, feature gradients);
float64 runs entirely in float64. The backward is deterministic (bitwise identical
for any thread count).
"""

from __future__ import annotations

import torch

from ._extension import load_extension
from .chunked import Grads

NAME = "cpu"
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_C, _LOAD_ERROR = load_extension("_C_cpu")


def unavailable_reason() -> str | None:
    if _C is None:
        return _LOAD_ERROR
    if not hasattr(_C, "forward"):
        return "the C++ CPU extension is built but its attention kernels are not written yet"
    return None


def unsupported_reason(q, k, v, bias, causal) -> str | None:
    reason = unavailable_reason()
    if reason is not None:
        return reason
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type != "cpu":
            return f"{name} is on {t.device}; the cpu backend needs CPU tensors"
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} has dtype {t.dtype}; the cpu backend supports float32, float64, bfloat16 and float16"
    dim = q.shape[-1]
    if dim <= 0 or dim % 2:
        return f"head dim D={dim}; the cpu backend needs an even positive D"
    return None


def forward(q, k, v, fq, fk, alpha, beta, bias, causal, q_lengths, k_lengths, scale):
    out, lse = _C.forward(
        q, k, v, list(fq), list(fk), alpha, beta, q_lengths, k_lengths, int(bias), bool(causal), float(scale)
    )
    return out, lse


def backward(dout, q, k, v, out, lse, fq, fk, alpha, beta, bias, causal, q_lengths, k_lengths, scale) -> Grads:
    grads = _C.backward(
        dout, q, k, v, out, lse, list(fq), list(fk), alpha, beta, q_lengths, k_lengths,
        int(bias), bool(causal), float(scale),
    )
    return Grads(*grads)


def build_info() -> dict:
    """How the CPU extension was compiled (compiler, flags, OpenMP), or {} without it."""
    return dict(_C.build_info()) if _C is not None else {}
