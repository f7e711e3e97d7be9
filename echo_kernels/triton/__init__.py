"""Fused Triton backend (not written yet: see the Triton kernels issue)."""

NAME = "triton"


def unavailable_reason() -> str | None:
    return "not implemented yet (fused Triton kernels are still to land)"


def unsupported_reason(q, k, v, bias, causal) -> str | None:
    return unavailable_reason()
