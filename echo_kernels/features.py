"""Per-token pitch features: what every backend reads besides q, k and v.

Each token of a sequence carries five values (all ``[B, T]``, float32, or float64
when the attention runs in float64):

* ``pos``       position used for the rotation angle,
* ``log_theta`` natural log of the token's rotary base,
* ``radius``    magnitude that replaces RoPE's unit circle,
* ``pitch``     z-scored f0 used by the pitch-similarity bias,
* ``voiced``    1.0 where the frame is voiced and inside the sequence, else 0.0.

``pitch_features`` derives them from f0 with plain differentiable PyTorch ops.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

THETA_MODES = ("fixed", "f0", "mean_f0", "f0_offset")
RADIUS_MODES = ("unit", "f0")

# radius_mode="f0": f0 is clamped to the range of human speech, then scaled so
# the highest pitch sits on the unit circle.
RADIUS_F0_MIN = 40.0
RADIUS_F0_MAX = 600.0
# Keeps the z-score finite when every voiced frame has the same f0.
PITCH_EPS = 1e-6


class PitchFeatures(NamedTuple):
    """The five per-token features, each ``[B, T]`` float32 (float64 for float64 attention)."""

    pos: Tensor
    log_theta: Tensor
    radius: Tensor
    pitch: Tensor
    voiced: Tensor


def default_features(
    batch: int, length: int, *, theta: float = 10000.0, device=None, dtype=torch.float32
) -> PitchFeatures:
    """Features of a sequence without f0: positions 0..T-1, fixed base, unit radius, unvoiced."""
    pos = torch.arange(length, device=device, dtype=dtype).expand(batch, length).contiguous()
    zeros = torch.zeros(batch, length, device=device, dtype=dtype)
    return PitchFeatures(
        pos=pos,
        log_theta=torch.full_like(zeros, math.log(theta)),
        radius=torch.ones_like(zeros),
        pitch=zeros,
        voiced=zeros.clone(),
    )


def valid_mask(lengths: Tensor | None, batch: int, length: int, device) -> Tensor:
    """Boolean ``[B, T]``: True for positions ``t < lengths[b]`` (all True without lengths)."""
    if lengths is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    t = torch.arange(length, device=device)
    return t[None, :] < lengths.to(device)[:, None]


def feature_dtype(q_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the features and statistics for queries of ``q_dtype``: float64 with float64,
    else float32."""
    return torch.float64 if q_dtype == torch.float64 else torch.float32


def values_readable(t: Tensor) -> bool:
    """Whether value checks can read ``t``: not while torch.compile traces (they would be
    data-dependent branches; eager calls have run them), not on the meta device (shape-only
    runs, e.g. deferred initialisation), not inside ``vmap`` (one batched tensor has no single
    truth value)."""
    return (not torch.compiler.is_compiling() and t.device.type != "meta"
            and not torch._C._functorch.is_batchedtensor(t))


# Far above any audio's f0 (half a 96 kHz sample rate is 48 kHz), and low enough that the
# statistics' float32 sums and squares stay finite.
F0_MAX_HZ = 1e6


def check_f0(f0: Tensor, name: str = "f0") -> None:
    """Raise if ``f0`` is not a real ``[B, T]`` tensor of Hz in ``[0, F0_MAX_HZ]``."""
    if not isinstance(f0, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, T] in Hz, got {type(f0).__name__}")
    if f0.dim() != 2:
        raise ValueError(f"{name} must have shape [B, T], got {tuple(f0.shape)}")
    if not f0.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (Hz), got {f0.dtype}")
    if not values_readable(f0):
        return
    # One host sync when f0 is good (NaN fails the comparisons; isfinite because float16 rounds
    # F0_MAX_HZ to inf); the message is worked out after.
    if f0.numel() == 0 or bool((torch.isfinite(f0) & (f0 >= 0) & (f0 <= F0_MAX_HZ)).all()):
        return
    if not bool(torch.isfinite(f0).all()):
        raise ValueError(f"{name} must be finite; found NaN or inf (use 0 for unvoiced frames)")
    if bool((f0 < 0).any()):
        raise ValueError(f"{name} must be >= 0 Hz (0 marks an unvoiced frame); found a negative value")
    raise ValueError(f"{name} must be at most {F0_MAX_HZ:g} Hz; found {float(f0.max()):g}")


def is_real_number(value: object) -> bool:
    """True for a Python or NumPy real scalar that is not a bool: what a float option accepts."""
    if isinstance(value, (int, float)):  # first: under torch.compile a float may be symbolic
        return not isinstance(value, bool)
    return isinstance(value, numbers.Real)


def type_name(value: object) -> str:
    """``float``, ``numpy.bool``: a value's type as an error message should name it."""
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def check_feature_options(theta: float, theta_mode: str, radius_mode: str) -> None:
    """Raise unless ``theta`` is a finite float > 0 and both modes are known ones."""
    if theta_mode not in THETA_MODES:
        raise ValueError(f"theta_mode must be one of {THETA_MODES}, got {theta_mode!r}")
    if radius_mode not in RADIUS_MODES:
        raise ValueError(f"radius_mode must be one of {RADIUS_MODES}, got {radius_mode!r}")
    if not is_real_number(theta):
        raise TypeError(f"theta must be a float > 0 (the rotary base), got {type_name(theta)}")
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a float may be symbolic.
    if not 0 < theta < math.inf:
        raise ValueError(f"theta must be a finite float > 0 (the rotary base), got {theta}")


def pitch_features(
    f0: Tensor,
    *,
    lengths: Tensor | None = None,
    theta: float = 10000.0,
    theta_mode: str = "f0",
    radius_mode: str = "f0",
    positions: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> PitchFeatures:
    """Per-token features from f0.

    Args:
        f0: ``[B, T]`` fundamental frequency in Hz, 0 where unvoiced. Must be finite, >= 0.
        lengths: optional integer ``[B]``; frames ``t >= lengths[b]`` are padding.
        theta: the fixed rotary base used by ``"fixed"`` and as fallback (> 0).
        theta_mode: ``"fixed" | "f0" | "mean_f0" | "f0_offset"`` (see the docs).
        radius_mode: ``"unit" | "f0"``.
        positions: optional ``[B, T]`` positions for the rotation angle (default ``t``).
        dtype: float dtype of the result (float32 unless the attention runs in float64).

    Returns:
        ``PitchFeatures`` of ``[B, T]`` tensors of ``dtype`` on f0's device.
    """
    check_f0(f0)
    check_feature_options(theta, theta_mode, radius_mode)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    batch, length = f0.shape
    if lengths is not None:
        check_lengths(lengths, batch, length, "lengths")
    if positions is not None:
        if not isinstance(positions, Tensor):
            raise TypeError(f"positions must be a torch.Tensor [B, T] or None, got {type(positions).__name__}")
        if positions.shape != f0.shape:
            raise ValueError(
                f"positions must have the shape of f0 {tuple(f0.shape)}, got {tuple(positions.shape)}"
            )
        if positions.device != f0.device:
            raise ValueError(f"positions must be on f0's device {f0.device}, got {positions.device}")
        if values_readable(positions) and positions.numel() and not bool(torch.isfinite(positions).all()):
            raise ValueError("positions must be finite; found NaN or inf")
    return _features_from_f0(f0, lengths, theta, theta_mode, radius_mode, positions, dtype)


def side_features(
    f0: Tensor | None,
    batch: int,
    length: int,
    *,
    lengths: Tensor | None,
    name: str,
    theta: float,
    theta_mode: str,
    radius_mode: str,
    dtype: torch.dtype,
    device,
    values_checked: bool = False,
) -> PitchFeatures:
    """The features of one side of an attention call: from ``f0`` (errors name it ``name``),
    or the defaults when there is no f0. ``lengths`` and the options are already checked;
    ``values_checked``: so are f0's values (each check is a host sync on GPU)."""
    if f0 is None:
        return default_features(batch, length, theta=theta, device=device, dtype=dtype)
    if isinstance(f0, Tensor):  # shape and device first: value checks would run on the wrong device
        if f0.shape != (batch, length):
            raise ValueError(f"{name} must have shape [{batch}, {length}], got {tuple(f0.shape)}")
        if f0.device != device:
            raise ValueError(f"{name} must be on {device} like the attention inputs, got {f0.device}")
    if not values_checked:
        check_f0(f0, name)
    return _features_from_f0(f0, lengths, theta, theta_mode, radius_mode, None, dtype)


def _features_from_f0(
    f0: Tensor,
    lengths: Tensor | None,
    theta: float,
    theta_mode: str,
    radius_mode: str,
    positions: Tensor | None,
    dtype: torch.dtype,
) -> PitchFeatures:
    """``pitch_features`` on checked arguments. (Python scalars rather than ``ones_like`` /
    ``zeros_like`` operands and shared subexpressions: at decoding shapes this function is a chain
    of tiny ops, each costing its dispatch, not its arithmetic.)"""
    batch, length = f0.shape
    device = f0.device
    f0 = f0.to(dtype)

    voiced_mask = f0 > 0
    if lengths is not None:
        voiced_mask = voiced_mask & valid_mask(lengths, batch, length, device)
    voiced = voiced_mask.to(dtype)
    count = voiced.sum(dim=1, keepdim=True)
    divisor = count.clamp(min=1)
    mu = (f0 * voiced).sum(dim=1, keepdim=True) / divisor
    centred = f0 - mu
    var = ((centred * voiced) ** 2).sum(dim=1, keepdim=True) / divisor
    # The population std of fewer than two voiced frames says nothing: use 1. sqrt is only
    # taken of a positive variance: at 0 (one voiced frame, none, or a constant f0) its
    # derivative is infinite, and inf * 0 from the branch not taken would make d/df0 NaN.
    two_or_more = count >= 2
    has_spread = two_or_more & (var > 0)
    sigma = torch.where(has_spread, torch.where(has_spread, var, 1.0).sqrt(), torch.where(two_or_more, 0.0, 1.0))
    pitch = torch.where(voiced_mask, centred / (sigma + PITCH_EPS), 0.0)

    log_theta_fixed = math.log(theta)
    if theta_mode == "fixed":
        log_theta = torch.full_like(f0, log_theta_fixed)
    elif theta_mode == "f0_offset":
        log_theta = (f0 * voiced + theta).log()
    else:
        # log(mu) is only defined with a voiced frame; the clamp keeps the unused branch finite.
        log_mu = torch.where(count > 0, mu.clamp(min=1e-30).log(), log_theta_fixed)
        if theta_mode == "f0":
            log_theta = torch.where(voiced_mask, torch.where(voiced_mask, f0, 1.0).log(), log_mu)
        else:  # "mean_f0"
            log_theta = log_mu.expand_as(f0).clone()

    if radius_mode == "unit":
        radius = torch.ones_like(f0)
    else:
        radius = f0.clamp(RADIUS_F0_MIN, RADIUS_F0_MAX) / RADIUS_F0_MAX

    if positions is None:
        pos = torch.arange(length, device=device, dtype=dtype).expand(batch, length).contiguous()
    else:
        pos = positions.to(device=device, dtype=dtype)
    return PitchFeatures(pos=pos, log_theta=log_theta, radius=radius, pitch=pitch, voiced=voiced)


def check_lengths(lengths: Tensor, batch: int, length: int, name: str) -> None:
    """Raise unless ``lengths`` is an integer ``[B]`` tensor with values in ``[0, length]``."""
    if not isinstance(lengths, Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor of shape [{batch}], got {type(lengths).__name__}")
    if lengths.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor (int64, int32, int16, int8 or uint8), got {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}] (one length per batch entry), got {tuple(lengths.shape)}")
    if not values_readable(lengths) or not lengths.numel():
        return
    # One host copy (a sync on GPU, as any value check is), no elementwise ops: at short lengths
    # three small ops were ~40 us of a ~0.5 ms call.
    values = lengths.tolist()
    if min(values) < 0 or max(values) > length:
        raise ValueError(f"{name} must lie in [0, {length}], got {values}")
