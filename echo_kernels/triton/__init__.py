"""Fused Triton backend: flash-style vRoPE attention forward and deterministic backward.

The kernels live in ``forward_kernel.py`` (the rotation and one flash kernel) and
``backward_kernels.py`` (delta, dK/dV, dQ), built from the shared pieces of ``common.py``;
this module checks what the backend can serve, allocates outputs, launches, and reduces
the backward's per-head partials. The rotated queries and keys are the only extra
memory: one tensor like q and one like k, never anything of size ``[Tq, Tk]``.

Supported: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter: slow, for tests); q/k/v float16, bfloat16 (GPU only: the interpreter's
bfloat16 ``tl.dot`` is wrong) or float32 (IEEE dots: no TF32); head dims 32, 64, 128,
256 (the rotation works on D/2-wide half tiles and ``tl.dot`` needs K >= 16); any lengths,
GQA/MQA, bias none/exp/l1, causal, padding.

Set ``ECHO_KERNELS_POISON=1`` to fill every output buffer with NaN before the kernels
write it (tests use it to prove every element is written).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor

from ..buffers import backward_buffers, output_buffer, reduce_partials
from ..chunked import Grads
from ._env import interpreting

NAME = "triton"
HEAD_DIMS = (32, 64, 128, 256)
_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETER_DTYPES = (torch.float16, torch.float32)


MAX_GRID_Y = 65535


def unavailable_reason() -> str | None:
    """None when Triton kernels can run in this process, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available() or interpreting():
        return None
    return "no CUDA device, and TRITON_INTERPRET=1 is not set (the Triton interpreter runs kernels on CPU)"


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor, bias: int, causal: bool) -> str | None:
    """None when these inputs can run here, else a reason naming the argument and what is supported."""
    if q.device.type == "cuda":
        dtypes = _GPU_DTYPES
    elif q.device.type == "cpu" and interpreting():
        dtypes = _INTERPRETER_DTYPES
    else:
        return f"q is on {q.device}; the Triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
    if q.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        where = "on CUDA" if q.device.type == "cuda" else "under the Triton interpreter"
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            where += " (its bfloat16 dots are wrong)"
        return f"q.dtype={q.dtype} is not supported by the Triton backend {where}; supported: {names}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim D={q.shape[-1]} is not supported by the Triton backend; supported: {HEAD_DIMS}"
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        # Every kernel puts one (batch, head) pair per program on the grid's second axis.
        return (f"batch * heads = {q.shape[0] * q.shape[1]} is more than the Triton backend's grid takes "
                f"({MAX_GRID_Y}, CUDA's limit on a grid's second axis)")
    return None


class _KernelArgs(NamedTuple):
    """Features, alpha/beta and lengths as the kernels take them (float32 / int32, contiguous)."""

    fq: list[Tensor]  # pos, log_theta, radius, pitch, voiced: [B, Tq] each
    fk: list[Tensor]  # the same for the keys, [B, Tk]
    alpha: Tensor  # [H]
    beta: Tensor  # 0-d
    q_lengths: Tensor  # [B]
    k_lengths: Tensor  # [B]

    def flat(self) -> list[Tensor]:
        """In the order every attention kernel's signature lists them."""
        return [*self.fq, *self.fk, self.alpha, self.beta, self.q_lengths, self.k_lengths]


def _kernel_args(fq, fk, alpha, beta, q_lengths, k_lengths) -> _KernelArgs:
    def floats(features):
        return [t.to(torch.float32).contiguous() for t in features]

    def ints(lengths):
        return lengths.to(torch.int32).contiguous()

    return _KernelArgs(floats(fq), floats(fk), alpha.to(torch.float32).contiguous(),
                       beta.to(torch.float32).reshape(()), ints(q_lengths), ints(k_lengths))


def _meta(q, k, bias, causal):
    """``(H, GROUPS, Tq, Tk)`` and the constexprs shared by every launch."""
    heads, tq, dim = q.shape[1:]
    kv_heads, tk = k.shape[1], k.shape[2]
    ints = (heads, heads // kv_heads, tq, tk)
    constexprs = {
        "HEAD_DIM": dim, "BIAS": int(bias), "CAUSAL": bool(causal),
        # float32 dots stay IEEE-exact (no TF32); for half types the setting has no effect.
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }
    return ints, constexprs


def _device(t: Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device), or no-op on CPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _rotated(x: Tensor, features: list[Tensor], lengths: Tensor) -> Tensor:
    """``radius * R(phi) x`` per token, ``[B, heads, T, D]`` in x's dtype; tokens past a length are 0.

    ``features``: ``_KernelArgs.fq`` or ``.fk``; ``lengths`` int32 ``[B]``.
    """
    import triton

    from .configs import INTERPRETER_BLOCK, ROTATE_BLOCK
    from .forward_kernel import rotate_kernel

    block = INTERPRETER_BLOCK if interpreting() else ROTATE_BLOCK
    batch, heads, length, dim = x.shape
    out = output_buffer(x.shape, x)
    grid = (triton.cdiv(length, block), batch * heads)
    with _device(x):
        rotate_kernel[grid](x, out, *features[:3], lengths, heads, length,
                            HEAD_DIM=dim, BLOCK=block)
    return out


def forward(q, k, v, fq, fk, alpha, beta, bias, causal, q_lengths, k_lengths, scale):
    """Returns ``(out [B, H, Tq, D] q.dtype, lse [B, H, Tq] float32, -inf on rows with no allowed key)``."""
    import triton

    from .common import LOG2E
    from .forward_kernel import attention_fwd_kernel

    batch, heads, tq, dim = q.shape
    tk = k.shape[2]
    out = output_buffer((batch, heads, tq, dim), q)
    lse = output_buffer((batch, heads, tq), q, torch.float32)
    if out.numel() == 0:
        return out, lse
    if tk == 0:  # no key anywhere: every row is empty
        return out.zero_(), lse.fill_(float("-inf"))
    ints, constexprs = _meta(q, k, bias, causal)
    args = _kernel_args(fq, fk, alpha, beta, q_lengths, k_lengths)
    q_rotated = _rotated(q, args.fq, args.q_lengths)
    k_rotated = _rotated(k, args.fk, args.k_lengths)

    # The autotuner re-tunes for every distinct key: bucketing the lengths (next power
    # of two) lets variable-length ASR batches share one tuning.
    buckets = (triton.next_power_of_2(tq), triton.next_power_of_2(tk))

    def grid(meta):
        return (triton.cdiv(tq, meta["BLOCK_M"]), batch * heads)

    with _device(q):
        attention_fwd_kernel[grid](
            q_rotated, k_rotated, v, out, lse, *args.flat(),
            float(scale) * LOG2E.value, *ints, *buckets, **constexprs,
        )
    return out, lse


def backward(dout, q, k, v, out, lse, fq, fk, alpha, beta, bias, causal, q_lengths, k_lengths, scale) -> Grads:
    """Every gradient of ``chunked.Grads``: dq/dk/dv in the input dtype, the rest float32.

    Feature gradients are ``[B, T]`` summed over heads, dalpha ``[H]``, dbeta 0-d. The
    kernels write per-head / per-row partials; they are reduced here with ``torch.sum``
    over fixed dimensions, so the result is bitwise reproducible.
    """
    import triton

    from .backward_kernels import delta_kernel, dkdv_kernel, dq_kernel
    from .configs import backward_config

    batch, heads, tq, dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    buffers = backward_buffers(q, k, v)
    dq, dk, dv, q_parts, k_parts = buffers
    if q.numel() and k.numel():
        ints, constexprs = _meta(q, k, bias, causal)
        args = _kernel_args(fq, fk, alpha, beta, q_lengths, k_lengths)
        q_rotated = _rotated(q, args.fq, args.q_lengths)
        k_rotated = _rotated(k, args.fk, args.k_lengths)
        dout = dout.contiguous()
        delta = output_buffer((batch, heads, tq), q, torch.float32)
        major, minor = torch.cuda.get_device_capability(q.device) if q.is_cuda else (0, 0)
        launch = backward_config(dim, 10 * major + minor)
        kv_grid = (triton.cdiv(tk, launch["dkdv"]["BLOCK_N"]), batch * kv_heads)
        q_grid = (triton.cdiv(tq, launch["dq"]["BLOCK_M"]), batch * heads)
        block = 64
        with _device(q):
            delta_kernel[(triton.cdiv(tq, block), batch * heads)](out, dout, delta, tq, HEAD_DIM=dim, BLOCK_M=block)
            dkdv_kernel[kv_grid](
                q_rotated, k, k_rotated, v, dout, lse, delta, dk, dv, *k_parts, *args.flat(), float(scale), *ints,
                **constexprs, **launch["dkdv"],
            )
            dq_kernel[q_grid](
                q, q_rotated, k_rotated, v, dout, lse, delta, dq, *q_parts, *args.flat(), float(scale), *ints,
                **constexprs, **launch["dq"],
            )

    return reduce_partials(buffers, alpha, beta)
