"""``rope_attention``: validation, feature resolution and dispatch to a backend."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import ops
from .dispatch import BACKENDS, choose_backend
from .features import (
    PitchFeatures,
    check_feature_options,
    check_lengths,
    feature_dtype,
    is_real_number,
    side_features,
    type_name,
)
from .reference import BIAS_KINDS, check_bias_kind, reference_attention

QKV_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, heads, T, D] (4 dims), got {tuple(t.shape)}")
        if t.dtype not in QKV_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, heads, _, dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"q, k and v must share the batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length Tk, got {k.shape[2]} and {v.shape[2]}")
    if k.shape[3] != dim or v.shape[3] != dim:
        raise ValueError(f"q, k and v must share the head dim D, got {dim}, {k.shape[3]}, {v.shape[3]}")
    if dim <= 0 or dim % 2:
        raise ValueError(f"head dim D must be even and > 0 (rotary pairs), got {dim}")
    if heads == 0 or k.shape[1] == 0:
        raise ValueError(f"q and k need at least one head each, got {heads} and {k.shape[1]}")
    if heads % k.shape[1]:
        raise ValueError(
            f"the number of query heads ({heads}) must be a multiple of the key/value heads ({k.shape[1]})"
        )


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast(q, k, v):
    """Under ``torch.autocast``, q, k and v in the autocast dtype, as autocast hands them to
    ``scaled_dot_product_attention`` (float64 and non-tensors are left to the checks)."""
    if not isinstance(q, Tensor) or q.device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(
        q.device.type
    ):
        return q, k, v
    dtype = torch.get_autocast_dtype(q.device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in _AUTOCAST_ELIGIBLE else t for t in (q, k, v))


def _check_features(feats: PitchFeatures, batch: int, length: int, name: str, dtype, device) -> PitchFeatures:
    if not isinstance(feats, PitchFeatures):
        raise TypeError(f"{name} must be echo_kernels.PitchFeatures, got {type(feats).__name__}")
    for field, t in zip(PitchFeatures._fields, feats):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}.{field} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != (batch, length):
            raise ValueError(f"{name}.{field} must have shape [{batch}, {length}], got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{name}.{field} must be {dtype} (float64 only with float64 q), got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}.{field} must be on {device} like q, got {t.device}")
    # The contract gives pos and voiced no gradient; detached, every backend agrees on that.
    if feats.pos.requires_grad or feats.voiced.requires_grad:
        return feats._replace(pos=feats.pos.detach(), voiced=feats.voiced.detach())
    return feats


def _resolve_lengths(lengths: Tensor | None, batch: int, length: int, name: str, device) -> Tensor:
    if lengths is None:
        return torch.full((batch,), length, dtype=torch.int32, device=device)
    check_lengths(lengths, batch, length, name)
    if lengths.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {lengths.device}")
    return lengths.to(torch.int32).contiguous()


def _side_features(features, f0, batch, length, lengths, name, dtype, device, feature_args) -> PitchFeatures:
    if features is not None:
        return _check_features(features, batch, length, name, dtype, device)
    f0_name = "f0" if name == "features" else "f0_k"
    return side_features(
        f0, batch, length, lengths=lengths, name=f0_name, dtype=dtype, device=device, **feature_args
    )


def _resolve_alpha(alpha, heads: int, dtype, device) -> Tensor:
    if alpha is None:
        return torch.ones(heads, dtype=dtype, device=device)
    if not isinstance(alpha, Tensor):
        raise TypeError(f"alpha must be a tensor of shape [{heads}] or None, got {type(alpha).__name__}")
    if alpha.shape != (heads,):
        raise ValueError(f"alpha must have shape [{heads}] (one weight per query head), got {tuple(alpha.shape)}")
    if alpha.device != device:
        raise ValueError(f"alpha must be on {device} like q, got {alpha.device}")
    return alpha.to(dtype)


def _resolve_beta(beta, dtype, device) -> Tensor:
    if isinstance(beta, Tensor):
        if beta.dim() != 0:
            raise ValueError(f"beta must be a float or a 0-d tensor, got shape {tuple(beta.shape)}")
        if beta.device != device and beta.device.type != "cpu":
            raise ValueError(f"beta must be on {device} like q, got {beta.device}")
        return beta.to(device=device, dtype=dtype)
    if not is_real_number(beta):
        raise TypeError(f"beta must be a positive float or a 0-d tensor, got {type_name(beta)}")
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a float may be symbolic
    # (as is the scale check in rope_attention).
    if not 0 < beta < math.inf:
        raise ValueError(f"beta must be a positive finite float, got {beta}")
    return torch.tensor(float(beta), dtype=dtype, device=device)


def rope_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    f0: Tensor | None = None,
    *,
    f0_k: Tensor | None = None,
    features: PitchFeatures | None = None,
    features_k: PitchFeatures | None = None,
    bias: str | None = "exp",
    alpha: Tensor | None = None,
    beta: float | Tensor = 1.0,
    causal: bool = False,
    q_lengths: Tensor | None = None,
    k_lengths: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    theta: float = 10000.0,
    theta_mode: str = "f0",
    radius_mode: str = "f0",
) -> Tensor:
    """Pitch-aware rotary attention.

    Args:
        q: ``[B, H, Tq, D]``; k, v: ``[B, Hk, Tk, D]`` with ``H % Hk == 0`` and D even;
            float16, bfloat16, float32 (or float64 on the reference, chunked and CPU paths).
        f0: ``[B, Tq]`` Hz of the query tokens (0 = unvoiced). f0_k: ``[B, Tk]`` of the
            keys; defaults to f0 when ``Tq == Tk`` (self-attention).
        features, features_k: precomputed ``PitchFeatures``; override f0 / f0_k.
        bias: ``"exp"``, ``"l1"`` or None. alpha: per-head weight ``[H]`` (default ones);
            beta: positive float or 0-d tensor.
        causal: bottom-right aligned causal mask. q_lengths, k_lengths: integer ``[B]``
            valid lengths (padding at the end).
        scale: logit scale, default ``1/sqrt(D)``.
        backend: ``"auto" | "reference" | "chunked" | "triton" | "cuda" | "cpu"``.
        theta, theta_mode, radius_mode: passed to ``pitch_features`` for a side given as f0.

    Returns:
        ``[B, H, Tq, D]`` in q's dtype (under ``torch.autocast``, q, k and v are first cast to its
        dtype, as for SDPA); padded query rows and rows with no allowed key are 0.
    """
    q, k, v = _autocast(q, k, v)
    _check_qkv(q, k, v)
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    check_bias_kind(bias)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a Python bool, got {type_name(causal)}")
    check_feature_options(theta, theta_mode, radius_mode)
    batch, heads, tq, dim = q.shape
    tk = k.shape[2]
    device = q.device
    stat_dtype = feature_dtype(q.dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(dim)
    elif not is_real_number(scale):
        raise TypeError(f"scale must be a float or None, got {type_name(scale)}")
    elif not -math.inf < scale < math.inf:
        raise ValueError(f"scale must be finite, got {scale}")
    elif not isinstance(scale, (int, float)):
        scale = float(scale)  # a NumPy scalar: the kernels take a Python float

    # Self-attention passes one lengths tensor (and f0 or features) for both sides: checked and
    # computed once (each value check is a host sync on GPU).
    same_lengths = k_lengths is q_lengths and tk == tq
    ql = _resolve_lengths(q_lengths, batch, tq, "q_lengths", device)
    kl = ql if same_lengths else _resolve_lengths(k_lengths, batch, tk, "k_lengths", device)
    feature_args = {"theta": theta, "theta_mode": theta_mode, "radius_mode": radius_mode}
    fq = _side_features(features, f0, batch, tq, q_lengths, "features", stat_dtype, device, feature_args)
    if features_k is None and f0_k is None and tq == tk:
        # Self-attention: the keys are the query tokens.
        features_k = features
        f0_k = f0 if features is None else None
    if same_lengths and features_k is features and f0_k is f0:
        fk = fq
    else:
        fk = _side_features(features_k, f0_k, batch, tk, k_lengths, "features_k", stat_dtype, device, feature_args)
    alpha_t = _resolve_alpha(alpha, heads, stat_dtype, device)
    beta_t = _resolve_beta(beta, stat_dtype, device)
    bias_kind = BIAS_KINDS[bias]

    name = choose_backend(backend, q, k, v, bias_kind, causal)
    if name == "reference":
        return reference_attention(q, k, v, fq, fk, alpha_t, beta_t, bias, causal, ql, kl, scale)
    return ops.fused_attention(name, q, k, v, fq, fk, alpha_t, beta_t, bias_kind, causal, ql, kl, scale)
