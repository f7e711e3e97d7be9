"""Fused CUDA backend, a thin wrapper over ``echo_kernels._C_cuda`` (csrc/cuda)."""

from __future__ import annotations

import torch

from ._extension import load_extension

NAME = "cuda"
_C, _LOAD_ERROR = load_extension("_C_cuda")


def unavailable_reason() -> str | None:
    if _C is None:
        return _LOAD_ERROR
    if not torch.cuda.is_available():
        return "the CUDA extension is built, but this process sees no CUDA GPU"
    if not hasattr(_C, "forward"):
        return "the CUDA extension is built but its attention kernels are not written yet"
    return None


def unsupported_reason(q, k, v, bias, causal) -> str | None:
    return unavailable_reason()


def build_info() -> dict:
    """How the CUDA extension was compiled (nvcc, arches), or {} without it."""
    return dict(_C.build_info()) if _C is not None else {}
