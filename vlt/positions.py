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

    ``grids`` lists (h, w) of every image run in reading order over the batch; ``start`` [B]
    continues positions from a previous call (decode). Vectorised over tokens: each token advances
    the position by 1 (text) or, for the last token of an image run, by max(h, w); positions are the
    exclusive running sum, restarted at packed boundaries; image tokens add (row, col) offsets.
    """
    B, T = input_ids.shape
    dev = input_ids.device
    is_img = torch.isin(input_ids, torch.tensor(image_token_ids, device=dev))
    adv = (~is_img).long()
    row = torch.zeros(B, T, dtype=torch.long, device=dev)
    col = torch.zeros(B, T, dtype=torch.long, device=dev)
    prev = torch.nn.functional.pad(is_img[:, :-1], (1, 0), value=False)
    starts = (is_img & ~prev).nonzero().tolist()  # row-major = reading order
    if len(starts) != len(grids):
        raise ValueError(f"{len(grids)} images given but input_ids hold {len(starts)} image-token runs")
    for (b, t), (h, w) in zip(starts, grids):
        n = h * w
        run_ok = t + n <= T and bool(is_img[b, t:t + n].all()) and (t + n == T or not bool(is_img[b, t + n]))
        if not run_ok:
            raise ValueError(f"the image-token run at position {t} does not hold exactly its image's {n} tokens")
        adv[b, t + n - 1] = max(h, w)
        row[b, t:t + n] = torch.arange(h, device=dev).repeat_interleave(w)
        col[b, t:t + n] = torch.arange(w, device=dev).repeat(h)
    incl = adv.cumsum(1)
    base = incl - adv
    if cu_seqlens is not None:  # restart at every packed sample
        idx = torch.arange(T, device=dev)
        seg_start = cu_seqlens.to(dev).long()[torch.searchsorted(cu_seqlens[1:].to(dev), idx, right=True)]
        base = base - base[:, seg_start]
        incl = base + adv
    if start is not None:
        base = base + start.to(dev)[:, None]
        incl = incl + start.to(dev)[:, None]
    pos = torch.stack([base, base + row, base + col])
    return pos, incl[:, -1]


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
