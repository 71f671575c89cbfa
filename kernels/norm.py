"""RMSNorm and gated RMSNorm (GDN's output norm: rmsnorm(o) * weight * silu(gate)), in fp32."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps: float = 1e-6):
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x).to(dtype)


def gated_rms_norm(x, gate, weight, eps: float = 1e-6):
    return (rms_norm(x, weight, eps).float() * F.silu(gate.float())).to(x.dtype)
