"""vlt.kernels: the numerical core of every token mixer, with one entry point per operation.

Each entry point (``gated_delta_rule``, ``linear_attention``, ``attention``, ``short_conv``,
``gated_rms_norm``) picks a backend per device: fla/Triton and SDPA/FlexAttention kernels on CUDA,
pure-PyTorch chunked code everywhere else. The pure-PyTorch paths are the reference the CUDA
paths are tested against. Backends are named strings so a recipe can force one
(``backend: torch``) and asking for one that is unavailable is a clear error.
"""
from vlt.kernels.backends import available_backends, resolve_backend
from vlt.kernels.gated_delta import gated_delta_rule, gated_delta_rule_reference
from vlt.kernels.linear_attn import linear_attention
from vlt.kernels.attention import attention
from vlt.kernels.conv import short_conv
from vlt.kernels.norm import gated_rms_norm, rms_norm

__all__ = [
    "available_backends", "resolve_backend", "gated_delta_rule", "gated_delta_rule_reference",
    "linear_attention", "attention", "short_conv", "gated_rms_norm", "rms_norm",
]
