"""The rotary rotation (rotate-half layout) in torch ops: the reference the decode-attention kernel
matches (vlt.kernels.decode_attention rotates q and the new key the same way, in fp32, rounded once)
and what the attention layers apply. The cos/sin tables (1D RoPE and M-RoPE) are built by
vlt.layers.rotary.rope_cos_sin.
"""
from __future__ import annotations

import torch


def apply_rope(x, cos, sin):
    """x [B, T, H, D]; cos/sin [B, T, D]."""
    d = x.shape[-1] // 2
    rotated = torch.cat([-x[..., d:], x[..., :d]], dim=-1)
    return (x * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype)
