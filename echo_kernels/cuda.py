"""Fused CUDA backend, a thin wrapper over ``echo_kernels._C_cuda`` (csrc/cuda).

Hand-written kernels (WMMA tensor-core products, float32 statistics): a flash-style
forward and a deterministic backward (delta, dK/dV per key tile, dQ per query tile; no
float atomics). Each pass first rotates q and k once into temporary buffers of their size
and dtype (allocated by the extension through torch's allocator), so the attention kernels
copy rotated tiles instead of recomputing sin/cos per tile. The kernels write per-head /
per-row partials of the feature, alpha and beta gradients; they are summed here with
``torch.sum`` over fixed dimensions, so the backward is bitwise reproducible.

Supported: CUDA tensors on sm80+ (Ampere, Hopper), q/k/v float16 or bfloat16, head dim
64 or 128, GQA/MQA, bias none/exp/l1, causal, padding. Anything else: use triton
(``backend="auto"`` falls back by itself).

Under ``ECHO_KERNELS_POISON=1`` every output buffer is NaN-filled before the kernels
write it, so an element a kernel forgets shows up as NaN instead of stale memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._extension import load_extension
from .buffers import backward_buffers, output_buffer, reduce_partials
from .chunked import Grads

NAME = "cuda"
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
_MAX_GRID_YZ = 65535  # batch and heads index the launch grid's z and y dimensions
_ALIGNMENT = 16  # the kernels copy rows in 16-byte vectors
_C, _LOAD_ERROR = load_extension("_C_cuda")


def unavailable_reason() -> str | None:
    if _C is None:
        return _LOAD_ERROR
    if not torch.cuda.is_available():
        return "the CUDA extension is built, but this process sees no CUDA GPU"
    if not hasattr(_C, "forward"):
        return "the CUDA extension is built but its attention kernels are not written yet"
    return None


def input_reason(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """None when the kernels handle these tensors (ignoring whether a GPU exists), else why not."""
    if q.dtype not in DTYPES:
        return f"q.dtype={q.dtype} is not supported by the cuda backend (float16, bfloat16); use triton"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v must share one dtype for the cuda backend, got {q.dtype}, {k.dtype}, {v.dtype}"
    dim = q.shape[-1]
    if dim not in HEAD_DIMS or k.shape[-1] != dim or v.shape[-1] != dim:
        return f"head dim D={dim} is not supported by the cuda backend (supported: {HEAD_DIMS}); use triton"
    if q.shape[0] > _MAX_GRID_YZ or q.shape[1] > _MAX_GRID_YZ:
        return f"batch and heads must be <= {_MAX_GRID_YZ} for the cuda backend, got {tuple(q.shape[:2])}; use triton"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type != "cuda":
            return f"{name} is on {t.device}; the cuda backend needs CUDA tensors"
    return _device_reason(q.device, dim)


_DEVICE_REASONS: dict[tuple[int, int], str | None] = {}


def _device_reason(device: torch.device, dim: int) -> str | None:
    """None when this GPU can run the kernels for head dim ``dim``, else why not (cached per device)."""
    key = (device.index if device.index is not None else torch.cuda.current_device(), dim)
    if key not in _DEVICE_REASONS:
        _DEVICE_REASONS[key] = _check_device(torch.device("cuda", key[0]), dim)
    return _DEVICE_REASONS[key]


def _check_device(device: torch.device, dim: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        return f"the cuda backend needs sm80 or newer, {device} is sm{major}{minor}; use triton"
    info = build_info()
    # SASS only (no PTX): a cubin for sm_XY runs on sm_XZ with Z >= Y, nothing else.
    arches = tuple(info.get("arch_list", ()))
    if arches and not any(a // 100 == major and a % 100 // 10 <= minor for a in arches):
        return (f"the CUDA extension was built for {arches}, which cannot run on sm{major}{minor} ({device}); "
                f"rebuild with TORCH_CUDA_ARCH_LIST including {major}.{minor}, or use triton")
    needed = info.get("shared_memory_bytes", {}).get(dim, 0)
    available = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    if needed > available:
        return (f"head dim D={dim} needs {needed} bytes of shared memory per block, {device} allows {available}; "
                "use triton")
    return None


def unsupported_reason(q, k, v, bias, causal) -> str | None:
    return unavailable_reason() or input_reason(q, k, v)


def build_info() -> dict:
    """How the CUDA extension was compiled (nvcc, arches), or {} without it."""
    return dict(_C.build_info()) if _C is not None else {}


def _aligned(t: Tensor) -> Tensor:
    """``t`` contiguous and 16-byte aligned (a copy only for odd views)."""
    t = t.contiguous()
    return t if t.data_ptr() % _ALIGNMENT == 0 else t.clone()


def _common_args(fq, fk, alpha, beta, q_lengths, k_lengths) -> list:
    """Features, alpha/beta and lengths as the kernels take them (float32 / int32, contiguous)."""
    f32 = torch.float32
    return [
        [t.to(f32).contiguous() for t in fq], [t.to(f32).contiguous() for t in fk],
        alpha.to(f32).contiguous(), beta.to(f32).reshape(1).contiguous(),
        q_lengths.to(torch.int32).contiguous(), k_lengths.to(torch.int32).contiguous(),
    ]


def forward(q, k, v, fq, fk, alpha, beta, bias, causal, q_lengths, k_lengths, scale):
    """Returns ``(out [B, H, Tq, D] q.dtype, lse [B, H, Tq] float32, -inf on rows with no allowed key)``."""
    batch, heads, tq, _ = q.shape
    out = output_buffer(q.shape, q)
    lse = output_buffer((batch, heads, tq), q, torch.float32)
    if out.numel() == 0:
        return out, lse
    if k.shape[2] == 0:  # no key anywhere: every row is empty
        return out.zero_(), lse.fill_(float("-inf"))
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    _C.forward(q, k, v, *_common_args(fq, fk, alpha, beta, q_lengths, k_lengths), int(bias), bool(causal),
               float(scale), out, lse)
    return out, lse


def backward(dout, q, k, v, out, lse, fq, fk, alpha, beta, bias, causal, q_lengths, k_lengths, scale) -> Grads:
    """Every gradient of ``chunked.Grads``: dq/dk/dv in the input dtype, the rest float32.

    Feature gradients are ``[B, T]`` summed over heads, dalpha ``[H]``, dbeta 0-d.
    """
    buffers = backward_buffers(q, k, v)
    dq, dk, dv, q_parts, k_parts = buffers
    if q.numel() and k.numel():
        delta = output_buffer(q.shape[:3], q, torch.float32)
        tensors = [_aligned(t) for t in (dout, q, k, v, out)]
        _C.backward(*tensors, lse.to(torch.float32).contiguous(), *_common_args(fq, fk, alpha, beta, q_lengths, k_lengths),
                    int(bias), bool(causal), float(scale), dq, dk, dv, q_parts, k_parts, delta)

    return reduce_partials(buffers, alpha, beta)
