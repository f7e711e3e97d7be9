"""Choosing a backend, and saying why one cannot serve.

Every fused backend module exposes ``unavailable_reason()`` (None when it can run in
this process) and ``unsupported_reason(q, k, v, bias, causal)`` (None when it
handles these inputs). ``"auto"`` walks the preference list of the inputs' device
and takes the first backend with neither reason; the chunked PyTorch backend
serves everything, so ``"auto"`` never fails and never picks a wrong answer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import chunked, cpu, cuda
from . import triton as triton_backend

BACKENDS = ("reference", "chunked", "triton", "cuda", "cpu")
FUSED = ("chunked", "triton", "cuda", "cpu")
# Fastest first, as measured: on an H100 the Triton kernels take 0.17-0.54x the time of the
# CUDA C++ ones (T = 4096 and 16384, benchmarks/results/gpu-h100-20261126-s7). Triton on CPU tensors is the
# interpreter: correct but slow, so "auto" never picks it there.
PREFERENCE = {"cuda": ("triton", "cuda", "chunked"), "cpu": ("cpu", "chunked")}


class BackendInfo(NamedTuple):
    available: bool
    reason: str


# Imported with the package, not on first use: torch.compile (fullgraph) cannot trace
# importlib.import_module, which a first call inside a compiled function would make. Importing
# them loads the compiled extensions (a failure becomes an unavailable_reason) but not triton,
# which loads on first use: all four import in ~0.15 s.
_MODULES = {"chunked": chunked, "cpu": cpu, "cuda": cuda, "triton": triton_backend}


def backend_module(name: str):
    """The module implementing fused backend ``name``."""
    return _MODULES[name]


def unavailable_reason(name: str) -> str | None:
    if name == "reference":
        return None
    try:
        return backend_module(name).unavailable_reason()
    except Exception as exc:  # noqa: BLE001  (a broken backend must not break the package)
        return f"failed to load: {type(exc).__name__}: {exc}"


def backends() -> dict[str, BackendInfo]:
    """Every backend name -> (available in this process, why not / what it is)."""
    what = {
        "reference": "dense PyTorch golden (materialises [Tq, Tk])",
        "chunked": "memory-efficient PyTorch (online softmax over key blocks)",
        "triton": "fused Triton kernels",
        "cuda": "fused CUDA C++ kernels",
        "cpu": "fused C++ CPU kernels",
    }
    result = {}
    for name in BACKENDS:
        reason = unavailable_reason(name)
        result[name] = BackendInfo(reason is None, what[name] if reason is None else reason)
    return result


def choose_backend(requested: str, q: Tensor, k: Tensor, v: Tensor, bias: int, causal: bool) -> str:
    """Resolve ``requested`` to a backend name, raising if an explicit choice cannot serve."""
    if requested == "reference":
        return requested
    transformed = _transform_reason()
    if requested == "auto" and transformed is not None:
        return "reference"
    if requested != "auto":
        reason = (transformed or unavailable_reason(requested)
                  or backend_module(requested).unsupported_reason(q, k, v, bias, causal))
        if reason is not None:
            raise NotImplementedError(f"backend={requested!r} cannot run these inputs: {reason}")
        return requested
    for name in PREFERENCE.get(q.device.type, ("chunked",)):
        if unavailable_reason(name) is None and backend_module(name).unsupported_reason(q, k, v, bias, causal) is None:
            return name
    return "chunked"


def _transform_reason() -> str | None:
    """Why no backend but the reference serves inside ``torch.func`` transforms or forward-mode AD
    (the fused kernels have no forward-mode formula: called directly they would drop the tangents),
    or None outside them.

    The fused backends' autograd has no batching rule and no second order: under grad or vmap it
    fails inside torch.library, and under nested grads it would drop a term without a word.
    """
    if torch.autograd.forward_ad._current_level >= 0:
        return "inside forward-mode AD (torch.autograd.forward_ad.dual_level) only backend='reference' runs"
    if not torch._C._are_functorch_transforms_active():  # under torch.compile too: compiled transforms
        return None
    return "inside torch.func transforms (grad, vmap, jacrev, ...) only backend='reference' runs"
