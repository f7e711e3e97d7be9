"""Fused C++ CPU backend, a thin wrapper over ``echo_kernels._C_cpu`` (csrc/cpu)."""

from __future__ import annotations

from ._extension import load_extension

NAME = "cpu"
_C, _LOAD_ERROR = load_extension("_C_cpu")


def unavailable_reason() -> str | None:
    if _C is None:
        return _LOAD_ERROR
    if not hasattr(_C, "forward"):
        return "the C++ CPU extension is built but its attention kernels are not written yet"
    return None


def unsupported_reason(q, k, v, bias, causal) -> str | None:
    return unavailable_reason()


def build_info() -> dict:
    """How the CPU extension was compiled (compiler, flags, OpenMP), or {} without it."""
    return dict(_C.build_info()) if _C is not None else {}
