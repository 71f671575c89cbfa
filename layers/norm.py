"""Normalisation layers shared by the decoder, the vision projectors and the inference engine.

``RMSNorm`` is the module (a learned per-channel scale, ``eps`` inside the root); the arithmetic
(fp32 statistics, fla's fused kernel on CUDA, torch elsewhere) is ``vlt.kernels.rms_norm``. The
inference engine recognises this class to fuse the norm into the following GEMV.
"""
from __future__ import annotations

import torch
from torch import nn

from vlt.kernels import rms_norm


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension, in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)
