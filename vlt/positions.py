"""Position ids for the decoder: 1D (restarting per packed sample) or Qwen2.5-VL's 3D M-RoPE.

M-RoPE (as transformers' Qwen2.5-VL ``get_rope_index`` for images): a text token gets
(p, p, p) and advances p by one; a run of image tokens with merged grid (h, w) gets
(p, p + row, p + col) and then p advances by max(h, w). Each packed sample restarts at 0.
"""
from __future__ import annotations

import torch


def mrope_positions(input_ids, image_token_ids: tuple[int, ...], grids: list[tuple[int, int]],
                    cu_seqlens=None, start=None):
    """input_ids [B, T] -> position ids [3, B, T] and the next text position per row [B].

    ``grids`` lists (h, w) of every image run in reading order over the flattened batch;
    ``start`` [B] continues positions from a previous call (decode).
    """
    B, T = input_ids.shape
    pos = torch.empty(3, B, T, dtype=torch.long)
    ids = input_ids.cpu()
    is_img = torch.isin(ids, torch.tensor(image_token_ids))
    bounds = set(cu_seqlens.tolist()) if cu_seqlens is not None else set()
    next_pos = torch.zeros(B, dtype=torch.long)
    g = 0
    for b in range(B):
        p = 0 if start is None else int(start[b])
        t = 0
        row = is_img[b].tolist()
        while t < T:
            if t in bounds and t > 0:
                p = 0
            if row[t]:
                if g >= len(grids):
                    raise ValueError("more image-token runs in input_ids than images given")
                h, w = grids[g]
                g += 1
                n = h * w
                if t + n > T or not all(row[t:t + n]):
                    raise ValueError(f"an image-token run at position {t} is shorter than its image's {n} tokens")
                r = torch.arange(h).repeat_interleave(w)
                c = torch.arange(w).repeat(h)
                pos[0, b, t:t + n] = p
                pos[1, b, t:t + n] = p + r
                pos[2, b, t:t + n] = p + c
                p += max(h, w)
                t += n
            else:
                pos[:, b, t] = p
                p += 1
                t += 1
        next_pos[b] = p
    if g != len(grids):
        raise ValueError(f"{len(grids)} images given but input_ids hold {g} image-token runs")
    return pos.to(input_ids.device), next_pos


def text_positions(input_ids, cu_seqlens=None, start=None):
    """1D positions [B, T]: start.. per row, or restarting at every packed boundary."""
    B, T = input_ids.shape
    base = torch.arange(T, device=input_ids.device)
    if cu_seqlens is not None:
        seq = torch.searchsorted(cu_seqlens[1:], base, right=True)
        base = base - cu_seqlens[:-1][seq]
    pos = base[None].expand(B, T)
    if start is not None:
        pos = pos + start.to(input_ids.device)[:, None]
    return pos
