"""Packed <-> padded batch conversion for the pure-PyTorch recurrent kernels.

Looping over packed sequences one by one made the CPU path slow for batches of many short
samples; instead each sequence is right-padded to a common length (a multiple of the chunk) and
the batch runs once. Padded steps are made inert by the caller (decay 0 in log space, no write),
so final states are those of the real tokens.
"""
from __future__ import annotations

import torch


def pad_packed(xs: list[torch.Tensor], cu_seqlens, multiple: int):
    """[1, total, ...] tensors -> [N, L, ...] with L = max length rounded up to ``multiple``: one gather per
    tensor (index_select over the packed rows plus one zero row for the padding), so the op count does not
    grow with the number of sequences (a per-sequence slice + pad was ~25 ops a sequence with its backward;
    a 32-row training batch is launch-bound on a GPU)."""
    bounds = cu_seqlens.tolist()
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    L = max(1, max(lengths))
    L += (-L) % multiple
    total = bounds[-1]
    j = torch.arange(L)
    starts, lens = torch.tensor(bounds[:-1]), torch.tensor(lengths)
    # row (i, j) is packed row starts[i] + j while j < lengths[i], else the zero row appended at ``total``
    idx = torch.where(j < lens[:, None], starts[:, None] + j, total).reshape(-1).to(xs[0].device)
    out = []
    for x in xs:
        rows = torch.cat([x[0], x.new_zeros((1, *x.shape[2:]))])
        out.append(rows.index_select(0, idx).view(len(lengths), L, *x.shape[2:]))
    return out, lengths


def unpad(y: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """[N, L, ...] -> [1, total, ...]: the real rows of every sequence, in order, in one gather."""
    N, L = y.shape[:2]
    lens = torch.tensor(lengths)
    j = torch.arange(L)
    idx = (torch.arange(N)[:, None] * L + j)[j < lens[:, None]]
    return y.reshape(N * L, *y.shape[2:]).index_select(0, idx.to(y.device)).unsqueeze(0)
