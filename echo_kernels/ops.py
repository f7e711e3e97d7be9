"""Autograd and ``torch.library`` glue shared by every fused backend.

Each fused backend module (``chunked``, ``cpu``, ``triton``, ``cuda``) provides

    forward(q, k, v, fq, fk, alpha, beta, bias, causal, q_lengths, k_lengths, scale)
        -> (out [B, H, Tq, D] in q's dtype, lse [B, H, Tq] float32/64, -inf on empty rows)
    backward(dout, q, k, v, out, lse, fq, fk, alpha, beta, bias, causal, q_lengths,
             k_lengths, scale) -> chunked.Grads

with q/k/v contiguous, ``fq``/``fk`` ``PitchFeatures`` of contiguous ``[B, T]`` tensors,
``alpha [H]``, 0-d ``beta``, int32 ``[B]`` lengths and ``bias`` 0 (none) / 1 (exp) / 2 (l1).
This module turns each pair into two custom ops, ``echo_kernels::<name>_fwd`` and
``echo_kernels::<name>_bwd``, with fake implementations (so ``torch.compile`` traces
them without graph breaks) and one autograd formula for all.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .dispatch import backend_module
from .features import PitchFeatures

FEATURES = ("pos", "log_theta", "radius", "pitch", "voiced")
_SIDE_Q = ", ".join(f"Tensor {f}_q" for f in FEATURES)
_SIDE_K = ", ".join(f"Tensor {f}_k" for f in FEATURES)
_ARGS = (
    f"Tensor q, Tensor k, Tensor v, {_SIDE_Q}, {_SIDE_K}, Tensor alpha, Tensor beta, "
    "Tensor q_lengths, Tensor k_lengths, int bias, bool causal, float scale"
)
FWD_SCHEMA = f"({_ARGS}) -> (Tensor, Tensor)"
BWD_SCHEMA = f"(Tensor dout, Tensor out, Tensor lse, {_ARGS}) -> ({', '.join(['Tensor'] * 11)})"

# Positions in the forward op's inputs of the tensors that may receive a gradient.
_DIFFERENTIABLE = {
    "q": 0, "k": 1, "v": 2,
    "log_theta_q": 4, "radius_q": 5, "pitch_q": 6,
    "log_theta_k": 9, "radius_k": 10, "pitch_k": 11,
    "alpha": 13, "beta": 14,
}
_NUM_INPUTS = 20
_NUM_TENSOR_INPUTS = 17  # the inputs before bias, causal and scale
# Without a bias (kind 0) these do not enter the output: no gradient (None, as autograd gives an
# unused input in the reference), not zeros that an optimiser's weight decay would act on.
_BIAS_ONLY = frozenset(_DIFFERENTIABLE[n] for n in ("pitch_q", "pitch_k", "alpha", "beta"))


def _unpack(args):
    q, k, v = args[0:3]
    fq = PitchFeatures(*args[3:8])
    fk = PitchFeatures(*args[8:13])
    alpha, beta, q_lengths, k_lengths, bias, causal, scale = args[13:20]
    return q, k, v, fq, fk, alpha, beta, bias, causal, q_lengths, k_lengths, scale


def _forward_impl(name: str, *args):
    return backend_module(name).forward(*_unpack(args))


def _backward_impl(name: str, dout, out, lse, *args):
    q, k, v, fq, fk, alpha, beta, bias, causal, ql, kl, scale = _unpack(args)
    grads = backend_module(name).backward(dout, q, k, v, out, lse, fq, fk, alpha, beta, bias, causal, ql, kl, scale)
    return tuple(g.contiguous() for g in grads)


def _register(name: str):
    fwd = torch.library.custom_op(
        f"echo_kernels::{name}_fwd", functools.partial(_forward_impl, name), mutates_args=(), schema=FWD_SCHEMA)
    bwd = torch.library.custom_op(
        f"echo_kernels::{name}_bwd", functools.partial(_backward_impl, name), mutates_args=(), schema=BWD_SCHEMA)

    @fwd.register_fake
    def _fwd_fake(*args):
        q, v, pos_q = args[0], args[2], args[3]
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        return out, pos_q.new_empty(q.shape[:-1])

    @bwd.register_fake
    def _bwd_fake(dout, out, lse, *args):
        q, k, v = args[0:3]
        fq, fk = args[3:8], args[8:13]
        alpha, beta = args[13], args[14]
        return (
            torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(fq[1]), torch.empty_like(fq[2]), torch.empty_like(fq[3]),
            torch.empty_like(fk[1]), torch.empty_like(fk[2]), torch.empty_like(fk[3]),
            torch.empty_like(alpha), torch.empty_like(beta),
        )

    return fwd, bwd


class _FusedAttention(torch.autograd.Function):
    """The autograd formula of every fused backend: the forward op saves its inputs, out and lse,
    the backward op gives every gradient the spec lists. (A plain ``autograd.Function`` over the two
    ops rather than ``register_autograd``, whose wrapper re-reads the op's schema on every call:
    ~0.25 ms, a sixth of a forward at Echo tiny's shapes.)"""

    @staticmethod
    def forward(ctx, name: str, *inputs):
        out, lse = _run_forward(name, inputs)
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(*inputs[:_NUM_TENSOR_INPUTS], out, lse)
        ctx.name, ctx.flags = name, inputs[_NUM_TENSOR_INPUTS:]
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        *saved, out, lse = ctx.saved_tensors
        second_order = torch.is_grad_enabled()  # backward(create_graph=True)
        with torch.no_grad():
            args = (dout.contiguous(), out, lse, *saved, *ctx.flags)
            grads = _backward_impl(ctx.name, *args) if _direct_call_serves(saved) else fused_ops(ctx.name)[1](*args)
        biased = ctx.flags[0] != 0
        wanted = {index: grad for grad, index in zip(grads, _DIFFERENTIABLE.values())
                  if ctx.needs_input_grad[1 + index] and (biased or index not in _BIAS_ONLY)}  # input 0: the name
        kept = list(wanted.values())
        if second_order:
            kept = _refuse_second_order(kept, [dout, *saved], ctx.name)
        result = [None] * _NUM_INPUTS
        for index, grad in zip(wanted, kept):
            result[index] = grad
        return (None, *result)


def _refuse_second_order(grads: list[Tensor], inputs: list[Tensor], name: str) -> list[Tensor]:
    """``grads`` as tensors whose own backward raises: the kernels have no second-order formula, and
    without this the error would come from deep inside torch.library, pointing at register_autograd.
    The error node takes the backward's ``inputs`` that carry a graph, so that every way back to
    them (``backward()``, or ``autograd.grad`` naming them) meets it instead of skipping the term.
    (What torch's ``once_differentiable`` does, with a message that says what to use instead.)"""
    anchors = [t for t in inputs if t.requires_grad]
    if not grads or not anchors:
        return grads  # nothing upstream needs a gradient: no second order to refuse
    message = (f"the {name} backend has no second-order gradients (a backward through a backward); "
               "use backend='reference' for double backward, e.g. gradient penalties")
    outputs = torch._C._functions.DelayedError(message, len(grads) + len(anchors))(
        *(g.detach() for g in grads), *anchors)
    return list(outputs[:len(grads)])


def _direct_call_serves(tensors) -> bool:
    """Whether the backend may be called directly instead of through its custom op: in plain eager
    mode, on plain CPU/CUDA tensors, where nothing needs to see the op (torch.compile and the JIT
    tracer, fake tensors and other dispatch and function modes, the profiler's op names, autocast's
    view of the chunked backend's torch ops). The op's dispatch costs ~45 us a call, twice a kernel's time at
    a decoding step's shapes."""
    q = tensors[0]
    return not (
        torch.compiler.is_compiling()
        or torch._C._get_tracing_state() is not None
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
        or torch.autograd.profiler._is_profiler_enabled
        or q.device.type not in ("cpu", "cuda")
        or torch.is_autocast_enabled(q.device.type)
        or any(type(t) is not Tensor for t in tensors)
    )


def _run_forward(name: str, inputs: tuple):
    """The forward op of backend ``name`` on ``inputs`` (its schema's arguments): ``(out, lse)``."""
    if _direct_call_serves(inputs[:_NUM_TENSOR_INPUTS]):
        return _forward_impl(name, *inputs)
    return fused_ops(name)[0](*inputs)


_OPS: dict[str, tuple[object, object]] = {}


def fused_ops(name: str):
    """The forward and backward custom ops of backend ``name`` (registered on first use)."""
    if name not in _OPS:
        _OPS[name] = _register(name)
    return _OPS[name]


def fused_attention(
    name: str, q: Tensor, k: Tensor, v: Tensor, fq: PitchFeatures, fk: PitchFeatures,
    alpha: Tensor, beta: Tensor, bias: int, causal: bool,
    q_lengths: Tensor, k_lengths: Tensor, scale: float,
) -> Tensor:
    """Run backend ``name`` (through its custom op where something needs to see the op); returns
    the output ``[B, H, Tq, D]``."""
    inputs = (
        q.contiguous(), k.contiguous(), v.contiguous(),
        *(t.contiguous() for t in fq), *(t.contiguous() for t in fk),
        alpha.contiguous(), beta, q_lengths, k_lengths, int(bias), bool(causal), float(scale),
    )
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs[:_NUM_TENSOR_INPUTS]):
        return _FusedAttention.apply(name, *inputs)[0]
    return _run_forward(name, inputs)[0]  # nothing to differentiate: no autograd node


# Registered at import: registering inside a region torch.compile is tracing fails.
for _name in ("chunked", "triton", "cuda", "cpu"):
    fused_ops(_name)
