"""echo-kernels: fused pitch-aware rotary attention (vRoPE + pitch bias) for Echo.

What every backend computes (the contract, in the project's words) is in docs/attention.md.
"""

from .dispatch import backends
from .features import PitchFeatures, pitch_features
from .interface import rope_attention
from .modules import RopeAttention

__all__ = ["PitchFeatures", "RopeAttention", "backends", "pitch_features", "rope_attention"]
__version__ = "0.1.0"
