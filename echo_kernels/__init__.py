"""echo-kernels: fused pitch-aware rotary attention (vRoPE + pitch bias) for Echo.

The contract every backend computes is in docs/contract.md.
"""

from .dispatch import backends
from .features import PitchFeatures, pitch_features
from .interface import rope_attention
from .modules import RopeAttention

__all__ = ["PitchFeatures", "RopeAttention", "backends", "pitch_features", "rope_attention"]
__version__ = "0.1.0"
