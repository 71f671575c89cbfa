"""Rotary position embeddings: 1D RoPE and Qwen2.5-VL's multimodal M-RoPE (rotate-half layout).

M-RoPE: position_ids [3, B, T] give (temporal, height, width) indices; the rotary frequency pairs
are split into ``mrope_section`` groups (16/24/24 of 64 for head dim 128), group i rotated by axis
i. Text tokens have three equal indices, so M-RoPE reduces to 1D RoPE on text.
"""
from __future__ import annotations

import torch

from vlt.kernels.rotary import apply_rope  # the rotation lives with the kernels that match it

__all__ = ["apply_rope", "rope_cos_sin"]


def rope_cos_sin(position_ids, head_dim: int, theta: float, mrope_section=None, dtype=torch.float32):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                             dtype=torch.float32) / head_dim))
    if position_ids.dim() == 3:  # [3, B, T]
        freqs = position_ids.float()[..., None] * inv_freq           # [3, B, T, D/2]
        if mrope_section is None:
            freqs = freqs[0]
        else:
            chunks = freqs.split(list(mrope_section), dim=-1)
            freqs = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)
    else:
        freqs = position_ids.float()[..., None] * inv_freq           # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)
