"""Causal softmax attention with GQA, an optional sliding window, and packed sequences.

q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D] with Tk >= Tq: queries are the LAST Tq positions of the
key sequence (bottom-right alignment, as in chunked prefill over a cache). Query at absolute
position p sees keys j with  p - window < j <= p  (window = keys visible, the current one
included; None = full causal). With ``cu_seqlens`` (B == 1, Tq == Tk) keys must also lie in the
query's own sequence.

Backends: "sdpa" (torch SDPA: cuDNN / FlashAttention-2 for full attention), "flex"
(FlexAttention block masks: windows and documents), "fla" (fla.ops.attn.parallel_attn),
"flash_attn" (when installed), "torch" (SDPA math with explicit masks, processed in query blocks
so a sliding window costs O(T * window) memory on any device; the reference).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from vlt.kernels.backends import available_backends, resolve_backend

_Q_BLOCK = 1024


def attention(q, k, v, *, window: int | None = None, cu_seqlens=None, scale: float | None = None,
              backend: str = "auto"):
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    assert Tk >= Tq and Hq % Hkv == 0, (q.shape, k.shape)
    assert cu_seqlens is None or (B == 1 and Tq == Tk), "packed attention needs B == 1 and Tq == Tk"
    if window is not None and Tq == 1 and cu_seqlens is None and Tk > window:
        # Decode: the one query (position Tk-1) sees exactly the last `window` keys, so slicing
        # them (a view) turns SWA into unmasked attention: SDPA's fast decode path, no mask built.
        k, v, Tk = k[:, -window:], v[:, -window:], window
    if window is not None and window >= Tk and cu_seqlens is None:
        window = None  # a window longer than the input is full attention
    op = "attention" if (window is None and cu_seqlens is None) else (
        "varlen_attention" if window is None else "swa")
    backend = resolve_backend(op, backend, q.device)
    scale = D ** -0.5 if scale is None else scale
    if backend in ("fla", "flash_attn", "flex") and Tq != Tk:
        # Queries over a cache (decode, chunked prefill): these paths take Tq == Tk only. Without a
        # window SDPA aligns bottom-right natively; with one only the masked torch path does.
        backend = "sdpa" if (window is None and q.is_cuda) else "torch"
    if backend == "sdpa":
        return _sdpa(q, k, v, scale)
    if backend == "fla" and q.dtype == torch.float32:
        # fla 0.6.0 routes fp32 parallel_attn to a tilelang kernel that fails to compile on Hopper
        # ("Layout infer conflict"); FlexAttention computes the same masks in fp32.
        backend = "flex" if "flex" in available_backends(op, q.device) else "torch"
    if backend == "flex" and Tq == Tk:
        return _flex(q, k, v, window, cu_seqlens, scale)
    if backend == "fla" and Tq == Tk:
        from fla.ops.attn import parallel_attn
        return parallel_attn(q, k, v, scale=scale, window_size=window, cu_seqlens=cu_seqlens)
    if backend == "flash_attn" and Tq == Tk:
        return _flash_attn(q, k, v, window, cu_seqlens, scale)
    return _torch_blocked(q, k, v, window, cu_seqlens, scale)


# SDPA kernels in order of preference on CUDA: on Hopper cuDNN's fused attention is ~1.7x faster than
# FlashAttention-2 for causal prefill/training (REFERENCE.md); SDPA skips any that cannot take the
# inputs (dtype, GQA, head dim) and falls through to the next.
SDPA_PRIORITY = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def _sdpa(q, k, v, scale):
    Tq, Tk = q.shape[1], k.shape[1]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if Tq == Tk:
        kw = dict(is_causal=True)
    elif Tq == 1:  # decode: the one query sees every cached key
        kw = {}
    else:
        from torch.nn.attention.bias import causal_lower_right
        kw = dict(attn_mask=causal_lower_right(Tq, Tk))
    if q.is_cuda:
        with _sdpa_priority():
            o = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **kw)
    else:
        o = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **kw)
    return o.transpose(1, 2)


def _sdpa_priority():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, b) for b in SDPA_PRIORITY], set_priority=True)


def _torch_blocked(q, k, v, window, cu_seqlens, scale):
    B, Tq, Hq, D = q.shape
    Tk = k.shape[1]
    off = Tk - Tq
    rep = Hq // k.shape[2]
    kh, vh = (x.transpose(1, 2).repeat_interleave(rep, dim=1) for x in (k, v))
    qh = q.transpose(1, 2)
    doc = None
    if cu_seqlens is not None:
        doc = torch.searchsorted(cu_seqlens[1:], torch.arange(Tk, device=q.device), right=True)
    out = []
    for s in range(0, Tq, _Q_BLOCK):
        e = min(Tq, s + _Q_BLOCK)
        qpos = torch.arange(s + off, e + off, device=q.device)
        k_lo = 0 if window is None else max(0, s + off - window + 1)
        k_hi = e + off
        kpos = torch.arange(k_lo, k_hi, device=q.device)
        mask = kpos[None, :] <= qpos[:, None]
        if window is not None:
            mask &= kpos[None, :] > qpos[:, None] - window
        if doc is not None:
            mask &= doc[kpos][None, :] == doc[qpos][:, None]
        o = F.scaled_dot_product_attention(qh[:, :, s:e], kh[:, :, k_lo:k_hi], vh[:, :, k_lo:k_hi],
                                           attn_mask=mask, scale=scale)
        out.append(o)
    return torch.cat(out, dim=2).transpose(1, 2)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


_block_masks: dict = {}


def _flex_block_mask(T, window, cu_seqlens, device):
    from torch.nn.attention.flex_attention import create_block_mask
    key = (T, window, None if cu_seqlens is None else tuple(cu_seqlens.tolist()), str(device))
    if key in _block_masks:
        return _block_masks[key]
    doc = None
    if cu_seqlens is not None:
        doc = torch.searchsorted(cu_seqlens[1:], torch.arange(T, device=device), right=True)

    def mask_mod(b, h, qi, ki):
        m = ki <= qi
        if window is not None:
            m = m & (ki > qi - window)
        if doc is not None:
            m = m & (doc[qi] == doc[ki])
        return m

    # _compile: the eager builder materialises a dense T x T mask first (128 GiB at T = 128K)
    bm = create_block_mask(mask_mod, None, None, T, T, device=device, _compile=True)
    if len(_block_masks) > 32:  # packed batches change boundaries every step; keep the cache small
        _block_masks.clear()
    _block_masks[key] = bm
    return bm


# Extra FlexAttention kernel options (block sizes, stages, "USE_TMA"); None = inductor's defaults.
FLEX_KERNEL_OPTIONS: dict | None = None


def _flex(q, k, v, window, cu_seqlens, scale):
    T = q.shape[1]
    bm = _flex_block_mask(T, window, cu_seqlens, q.device)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    o = _compiled_flex()(q, k, v, block_mask=bm, scale=scale, enable_gqa=True,
                         kernel_options=FLEX_KERNEL_OPTIONS)
    return o.transpose(1, 2)


def _flash_attn(q, k, v, window, cu_seqlens, scale):
    from flash_attn import flash_attn_func, flash_attn_varlen_func
    ws = (-1, -1) if window is None else (window - 1, 0)
    if cu_seqlens is None:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=ws)
    cu = cu_seqlens.to(torch.int32)
    maxlen = int((cu[1:] - cu[:-1]).max())
    o = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, maxlen, maxlen, softmax_scale=scale,
                               causal=True, window_size=ws)
    return o.unsqueeze(0)
