"""RMSNorm and gated RMSNorm (GDN's output norm: rmsnorm(o) * weight * silu(gate)), statistics in fp32.

CUDA uses fla's fused Triton kernels (one pass forward and backward, only the fp32 row statistics
saved); the torch path is the reference and what runs on CPU and inside torch.compile, where
Inductor fuses it itself (fla's launchers are not traceable).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlt.kernels.backends import resolve_backend


def rms_norm(x, weight, eps: float = 1e-6, backend: str = "auto"):
    if _fused(x, backend):
        from fla.modules.norm.layernorm import rms_norm as fla_rms_norm
        return fla_rms_norm(x, weight, None, eps=eps)
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x).to(dtype)


def gated_rms_norm(x, gate, weight, eps: float = 1e-6, backend: str = "auto"):
    if _fused(x, backend):
        from fla.modules.norm.fused_norm_gate import rms_norm_gated
        return rms_norm_gated(x, gate, weight, None, activation="swish", eps=eps)
    return (rms_norm(x, weight, eps, "torch").float() * F.silu(gate.float())).to(x.dtype)


def _fused(x, backend: str) -> bool:
    return resolve_backend("norm", backend, x.device) == "fla" and not torch.compiler.is_compiling()
