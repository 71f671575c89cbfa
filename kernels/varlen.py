"""Packed <-> padded batch conversion for the pure-PyTorch recurrent kernels.

Looping over packed sequences one by one made the CPU path slow for batches of many short
samples; instead each sequence is right-padded to a common length (a multiple of the chunk) and
the batch runs once. Padded steps are made inert by the caller (decay 0 in log space, no write),
so final states are those of the real tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_packed(xs: list[torch.Tensor], cu_seqlens, multiple: int):
    """[1, total, ...] tensors -> [N, L, ...] with L = max length rounded up to ``multiple``."""
    bounds = cu_seqlens.tolist()
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    L = max(1, max(lengths))
    L += (-L) % multiple
    out = []
    for x in xs:
        rows = [F.pad(x[0, s:e], (0, 0) * (x.dim() - 2) + (0, L - (e - s))) for s, e in zip(bounds[:-1], bounds[1:])]
        out.append(torch.stack(rows))
    return out, lengths


def unpad(y: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """[N, L, ...] -> [1, total, ...]"""
    return torch.cat([y[i, :n] for i, n in enumerate(lengths)], dim=0).unsqueeze(0)
