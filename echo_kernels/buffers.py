"""Output buffers and the backward's fixed-order reduction, shared by the GPU backends.

Under ``ECHO_KERNELS_POISON=1`` (the tests set it) every output buffer is NaN-filled
before a kernel writes it, so an element a kernel forgets shows up as NaN instead of
stale memory. The backward kernels write per-head / per-row partials of the feature,
alpha and beta gradients; ``reduce_partials`` sums them with ``torch.sum`` over fixed
dimensions, which keeps the result bitwise reproducible (no float atomics).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

from .chunked import Grads


def poisoning() -> bool:
    """True under ``ECHO_KERNELS_POISON=1``."""
    return os.environ.get("ECHO_KERNELS_POISON", "0") == "1"


def output_buffer(shape, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised buffer on ``like``'s device (NaN-filled when poisoning)."""
    out = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    return out.fill_(float("nan")) if poisoning() else out


class BackwardBuffers(NamedTuple):
    dq: Tensor  # like q
    dk: Tensor  # like k
    dv: Tensor  # like v
    q_parts: list[Tensor]  # 5 x [B, H, Tq] float32: log_theta, radius, pitch, alpha rows, beta rows
    k_parts: list[Tensor]  # 3 x [B, Hk, Tk] float32: log_theta, radius, pitch


def backward_buffers(q: Tensor, k: Tensor, v: Tensor) -> BackwardBuffers:
    """Every buffer a backward kernel writes; zero-filled when nothing attends to anything."""
    batch, heads, tq, _ = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    f32 = torch.float32
    buffers = BackwardBuffers(
        output_buffer(q.shape, q), output_buffer(k.shape, k), output_buffer(v.shape, v),
        [output_buffer((batch, heads, tq), q, f32) for _ in range(5)],
        [output_buffer((batch, kv_heads, tk), k, f32) for _ in range(3)],
    )
    if q.numel() == 0 or k.numel() == 0:
        for t in (buffers.dq, buffers.dk, buffers.dv, *buffers.q_parts, *buffers.k_parts):
            t.zero_()
    return buffers


def reduce_partials(buffers: BackwardBuffers, alpha: Tensor, beta: Tensor) -> Grads:
    """``Grads`` from the kernels' partials: per-token sums over heads, dalpha ``[H]``, dbeta 0-d."""
    dlt_q, dr_q, dp_q, dalpha_rows, dbeta_rows = buffers.q_parts
    dlt_k, dr_k, dp_k = buffers.k_parts
    return Grads(
        buffers.dq, buffers.dk, buffers.dv,
        dlt_q.sum(dim=1), dr_q.sum(dim=1), dp_q.sum(dim=1),
        dlt_k.sum(dim=1), dr_k.sum(dim=1), dp_k.sum(dim=1),
        dalpha_rows.sum(dim=(0, 2)).to(alpha.dtype), dbeta_rows.sum().to(beta.dtype),
    )
