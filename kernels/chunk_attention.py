"""Chunk attention: T > 1 new query tokens (a video frame, a prompt chunk) over a ring K/V cache plus themselves.

The inference engine's multi-token step (vlt.inference.steps.attend_tokens) attends each new query
over the layer's K/V buffers [B, L, Hkv, D] (token t in slot ``t % L``, ``ktok`` [B, L] the token
each slot holds, -1: empty) and the T new keys, masked by token index: the query at token p sees
key token j iff ``0 <= j <= p`` and ``j > p - window``. Through torch ops that is a concatenation of
cache and new K/V, a [B, T, L + T] boolean mask and SDPA's mem-efficient kernel with an explicit
mask, about a quarter of a streamed frame's GPU time at InfiniteVL-4B shapes. Here it is two kernels:

1. ``_chunk_split_kernel``, a program per (sequence, KV head, block of query tokens, split of the
   key blocks): the M rows of a tile are the G = Hq / Hkv query heads of the KV head times BT query
   tokens (so K/V are read once per group, never expanded), the key axis is the ring's blocks of
   BN slots then the new keys' blocks, and a split takes a run of them. Online softmax in fp32,
   probabilities rounded to the V dtype before the product (as flash attention does), the mask
   built in registers from ``ktok`` / ``qtok``. Ring blocks that cannot hold a token the tile sees
   (a full cache's empty tail, slots out of every query's window) are left out by the loop bounds,
   which assumes the engine's ring convention: slot s holds -1 or a token t with t % L == s.
   Partial (max, sum, output) per split, or the output itself when there is one split;
2. ``_chunk_combine_kernel``, a program per (tile, block of rows): merges the splits.

Splits: a 4B frame step (B 1, Hkv 2, T 256, 128-row tiles of 8 heads x 16 tokens) has only
B * Hkv * cdiv(T, BT) = 32 tiles for 132 SMs, so the key axis is split into runs of whole key blocks
until up to ``programs_per_sm`` programs per SM exist: 8 splits there, 256 programs. Rounded down,
so the last wave is nearly full: at D 128 with 8 warps ptxas gives ~230 registers a thread for the
sm_90 split kernel, one program per SM at a time (not measured on a GPU). The cache is not
written (the caller writes the new K/V after, as attend_tokens does). No host syncs, shapes fixed
per call: CUDA-graph capturable; a torch custom op, so a torch.compile'd step keeps it as one node.
``chunk_attention_reference`` is the same in torch ops (mask + SDPA). Not yet measured on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlt.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_LOG2E = 1.4426950408889634


def chunk_attention(q, k_new, v_new, k_cache, v_cache, ktok, qtok, *, window, scale: float | None = None,
                    block_m: int = 128, block_n: int = 64, splits: int | None = None, programs_per_sm: int = 2,
                    num_warps: int | None = None):
    """q [B, T, Hq, D]; k_new, v_new [B, T, Hkv, D]; k_cache, v_cache [B, L, Hkv, D] (unit stride
    along D, any other strides; the caches' strides equal); ktok [B, L] long (-1: empty slot);
    qtok [B, T] long, the token index of each new query (and of the new key at the same position);
    window: the sliding window (None: causal only). Returns [B, T, Hq, D] in q's dtype: attention
    over cat(cache, new) with the visibility rule above. ``block_m``: rows per tile (query heads of
    a group x query tokens), ``block_n``: keys per block; ``splits``: of the key blocks (None: to
    fill the GPU)."""
    if triton is None:
        raise RuntimeError("chunk_attention needs Triton; use chunk_attention_reference instead")
    return torch.ops.vlt.chunk_attention(q, k_new, v_new, k_cache, v_cache, ktok, qtok, window, scale, block_m,
                                         block_n, 0 if splits is None else splits, programs_per_sm, num_warps or 0)


def chunk_attention_reference(q, k_new, v_new, k_cache, v_cache, ktok, qtok, *, window, scale=None):
    """The same in torch ops: keys cat(cache, new), a mask by token index, SDPA with the G query heads
    of a KV head as G * T rows of one head (no K/V expansion). Graph-safe (no host syncs)."""
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    keys, vals = torch.cat([k_cache, k_new], 1), torch.cat([v_cache, v_new], 1)
    kt = torch.cat([ktok, qtok], 1)[:, None, :]                                 # [B, 1, L + T]
    qt = qtok[:, :, None]                                                      # [B, T, 1]
    vis = (kt <= qt) & (kt >= 0)
    if window is not None:
        vis &= kt > qt - window
    qh = q.reshape(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D)
    o = F.scaled_dot_product_attention(qh, keys.transpose(1, 2), vals.transpose(1, 2),
                                       attn_mask=vis.repeat(1, G, 1)[:, None], scale=scale)
    return o.view(B, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, Hq, D)


@torch.library.custom_op("vlt::chunk_attention", mutates_args=())
def _chunk_attention_op(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, ktok: torch.Tensor, qtok: torch.Tensor, window: int | None,
                        scale: float | None, block_m: int, block_n: int, splits: int, programs_per_sm: int,
                        num_warps: int) -> torch.Tensor:
    B, T, Hq, D = q.shape
    _, L, Hkv, _ = k_cache.shape
    assert Hq % Hkv == 0 and k_new.shape == v_new.shape == (B, T, Hkv, D), (q.shape, k_new.shape, k_cache.shape)
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride(), (k_cache.stride(), v_cache.stride())
    assert q.stride(-1) == k_new.stride(-1) == v_new.stride(-1) == k_cache.stride(-1) == 1
    assert ktok.shape == (B, L) and qtok.shape == (B, T), (ktok.shape, qtok.shape)
    assert block_m >= 16 and block_n >= 16 and block_m & (block_m - 1) == 0 and block_n & (block_n - 1) == 0
    ktok, qtok = ktok.contiguous(), qtok.contiguous()
    G = Hq // Hkv
    GP = triton.next_power_of_2(G)
    # BT query tokens per tile: block_m rows, fewer for a short chunk, at least 16 rows (tl.dot's minimum)
    BT = max(min(max(1, block_m // GP), triton.next_power_of_2(T)), max(1, 16 // GP))
    BM, BD = BT * GP, max(16, triton.next_power_of_2(D))
    QB = triton.cdiv(T, BT)
    NBR = triton.cdiv(L, block_n)                     # ring blocks; the new keys' blocks follow
    NB = NBR + triton.cdiv(T, block_n)
    tiles = B * Hkv * QB
    if splits <= 0:  # up to programs_per_sm waves of programs (a short split's SM takes another), not more
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
        splits = max(1, programs_per_sm * sms // tiles)
    CB = triton.cdiv(NB, max(1, min(NB, splits)))    # key blocks per split
    S = triton.cdiv(NB, CB)
    out = torch.empty(B, T, Hq, D, device=q.device, dtype=q.dtype)
    part_o = torch.empty(tiles * S * BM * D if S > 1 else 1, device=q.device, dtype=torch.float32)
    part_ml = torch.empty(tiles * S * 2 * BM if S > 1 else 1, device=q.device, dtype=torch.float32)
    use_pdl = pdl.enabled(q)
    meta = dict(G=G, GP=GP, BT=BT, D=D, BD=BD, HKV=Hkv, PDL=use_pdl, launch_pdl=use_pdl,
                num_warps=num_warps or (8 if BM * BD >= 128 * 128 else 4))
    scale = D ** -0.5 if scale is None else scale
    _chunk_split_kernel[(B * Hkv, QB, S)](
        q, k_new, v_new, k_cache, v_cache, ktok, qtok, out, part_o, part_ml,
        *q.stride()[:3], *k_new.stride()[:3], *v_new.stride()[:3], *k_cache.stride()[:3], *out.stride()[:3],
        T, L, 0 if window is None else window, NBR, NB, CB, S, QB, scale * _LOG2E,
        BN=block_n, HAS_WINDOW=window is not None, ONE_SPLIT=S == 1,
        PREC="ieee" if q.dtype == torch.float32 else None, UPCAST=not q.is_cuda, **meta)
    if S > 1:
        RB = min(BM, 16)
        _chunk_combine_kernel[(tiles, BM // RB)](part_o, part_ml, out, *out.stride()[:3], T, S, QB, RB=RB, **meta)
    return out


@_chunk_attention_op.register_fake
def _(q, k_new, v_new, k_cache, v_cache, ktok, qtok, window, scale, block_m, block_n, splits, programs_per_sm,
      num_warps):
    return q.new_empty(q.shape)


if triton is not None:
    from vlt.kernels.pdl import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _attend_block(acc, m_i, l_i, qg, qt, kt, k_ptrs, v_ptrs, kv_mask, qk_scale, window,
                      HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """One block of keys into the tile's online softmax (scores in log2 units: qk_scale has log2 e)."""
        vis = (kt[None, :] <= qt[:, None]) & (kt[None, :] >= 0)
        if HAS_WINDOW:
            vis = vis & (kt[None, :] > qt[:, None] - window)
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        if UPCAST:  # Triton's interpreter multiplies bf16 tiles wrongly; same products in fp32
            sc = tl.dot(qg.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=PREC)
        else:
            sc = tl.dot(qg, tl.trans(k), input_precision=PREC)
        sc = tl.where(vis, sc * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        # a row that has seen no key yet keeps max -inf: subtract 0 instead (its p and alpha are 0, not nan)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(sc - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision=PREC)
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return acc * alpha[:, None] + pv, m_new, l_i

    @triton.jit
    def _ring_block(acc, m_i, l_i, qg, qt, nb, b, h, k_cache, v_cache, ktok, scb, scl, sch, L, qk_scale, window,
                    BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    PREC: tl.constexpr, UPCAST: tl.constexpr):
        """Ring block ``nb`` (slots nb * BN ..) into the tile."""
        n = nb * BN + tl.arange(0, BN)
        mn = n < L
        d = tl.arange(0, BD)
        kt = tl.load(ktok + b * L + n, mask=mn, other=-1)
        offs = b * scb + n[:, None].to(tl.int64) * scl + h * sch + d[None, :]
        return _attend_block(acc, m_i, l_i, qg, qt, kt, k_cache + offs, v_cache + offs, mn[:, None] & (d < D)[None, :],
                             qk_scale, window, HAS_WINDOW, PREC, UPCAST)

    @triton.jit
    def _chunk_split_kernel(q, k_new, v_new, k_cache, v_cache, ktok, qtok, out, part_o, part_ml,
                            sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, scb, scl, sch, sob, sot, soh,
                            T, L, window, NBR, NB, CB, S, QB, qk_scale,
                            G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                            HKV: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr, ONE_SPLIT: tl.constexpr,
                            PREC: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
        bh = tl.program_id(0)
        qb = tl.program_id(1)
        s = tl.program_id(2)
        b = (bh // HKV).to(tl.int64)
        h = bh % HKV
        if PDL:  # q and the new K/V come from the kernel before; nothing here can be loaded earlier
            gdc_wait()
            gdc_launch_dependents()
        BM: tl.constexpr = BT * GP
        r = tl.arange(0, BM)          # row r: query token qb * BT + r // GP, query head h * G + r % GP
        t = qb * BT + r // GP
        g = r % GP
        mt = t < T
        mrow = mt & (g < G)
        d = tl.arange(0, BD)
        md = d < D
        qt = tl.load(qtok + b * T + t, mask=mt, other=-1)
        qmax = tl.max(qt, 0)
        qmin = tl.min(tl.where(mt, qt, qmax), 0)
        qg = tl.load(q + b * sqb + t[:, None].to(tl.int64) * sqt + (h * G + g)[:, None] * sqh + d[None, :],
                     mask=mrow[:, None] & md[None, :], other=0.0)
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, BD), tl.float32)
        # The ring blocks that may hold a token the tile sees: slot j % L for j in [jlo, qmax] (a slot
        # holds -1 or a token t with t % L == s), one cyclic run of slots, so at most two runs of blocks.
        # Skipped by loop bounds, not by a branch per block: a branch in the loop stops Triton from
        # pipelining the K/V loads (no async copies in the sm_90 code), which costs more than masked
        # blocks do. The exact mask is applied per block regardless.
        if HAS_WINDOW:
            jlo = tl.maximum(qmin - window + 1, 0)
        else:
            jlo = qmin * 0
        first, last = ((jlo % L) // BN).to(tl.int32), ((qmax % L) // BN).to(tl.int32)
        whole = qmax - jlo + 1 >= L
        wrap = (jlo % L) > (qmax % L)
        r0s = tl.where(whole | wrap, 0, first)
        r0e = tl.where(whole, NBR, last + 1)
        r1s = tl.where(wrap & ~whole, tl.maximum(first, last + 1), NBR)  # the wrapped run's older part
        lo = s * CB
        hi = tl.minimum(lo + CB, NB)
        for nb in range(tl.maximum(lo, r0s), tl.minimum(hi, r0e)):
            acc, m_i, l_i = _ring_block(acc, m_i, l_i, qg, qt, nb, b, h, k_cache, v_cache, ktok, scb, scl, sch, L,
                                        qk_scale, window, BN, D, BD, HAS_WINDOW, PREC, UPCAST)
        for nb in range(tl.maximum(lo, r1s), tl.minimum(hi, NBR)):
            acc, m_i, l_i = _ring_block(acc, m_i, l_i, qg, qt, nb, b, h, k_cache, v_cache, ktok, scb, scl, sch, L,
                                        qk_scale, window, BN, D, BD, HAS_WINDOW, PREC, UPCAST)
        # the new keys, causal among themselves: all T of them (at most a few blocks; with qtok in any
        # order no bound is safe, and the mask drops the later ones)
        for nb in range(tl.maximum(lo, NBR), hi):
            n = (nb - NBR) * BN + tl.arange(0, BN)
            mn = n < T
            kt = tl.load(qtok + b * T + n, mask=mn, other=-1)
            nk = n[:, None].to(tl.int64)
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, qg, qt, kt, k_new + b * skb + nk * skt + h * skh + d[None, :],
                                          v_new + b * svb + nk * svt + h * svh + d[None, :],
                                          mn[:, None] & md[None, :], qk_scale, window, HAS_WINDOW, PREC, UPCAST)
        if ONE_SPLIT:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out + b * sob + t[:, None].to(tl.int64) * sot + (h * G + g)[:, None] * soh + d[None, :],
                     o.to(out.dtype.element_ty), mask=mrow[:, None] & md[None, :])
        else:
            base = ((bh * QB + qb) * S + s).to(tl.int64)
            tl.store(part_o + (base * BM + r[:, None]) * D + d[None, :], acc, mask=md[None, :])
            tl.store(part_ml + (base * 2) * BM + r, m_i)
            tl.store(part_ml + (base * 2 + 1) * BM + r, l_i)

    @triton.jit
    def _chunk_combine_kernel(part_o, part_ml, out, sob, sot, soh, T, S, QB, G: tl.constexpr, GP: tl.constexpr,
                              BT: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, HKV: tl.constexpr,
                              RB: tl.constexpr, PDL: tl.constexpr):
        tile = tl.program_id(0)       # (b, KV head, query block), as the split kernel's partials
        rb = tl.program_id(1)
        bh = tile // QB
        b = (bh // HKV).to(tl.int64)
        h = bh % HKV
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        BM: tl.constexpr = BT * GP
        r = rb * RB + tl.arange(0, RB)
        t = (tile % QB) * BT + r // GP
        g = r % GP
        d = tl.arange(0, BD)
        md = d < D
        m = tl.full((RB,), float("-inf"), tl.float32)
        lsum = tl.zeros((RB,), tl.float32)
        o = tl.zeros((RB, BD), tl.float32)
        for s in range(S):  # running merge: a split that saw no key (max -inf) weighs 0
            base = (tile * S + s).to(tl.int64)
            m_s = tl.load(part_ml + (base * 2) * BM + r)
            l_s = tl.load(part_ml + (base * 2 + 1) * BM + r)
            o_s = tl.load(part_o + (base * BM + r[:, None]) * D + d[None, :], mask=md[None, :], other=0.0)
            m_new = tl.maximum(m, m_s)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            a, w = tl.exp2(m - m_use), tl.exp2(m_s - m_use)
            lsum = lsum * a + l_s * w
            o = o * a[:, None] + o_s * w[:, None]
            m = m_new
        o = o / tl.where(lsum > 0, lsum, 1.0)[:, None]
        mrow = (t < T) & (g < G)
        tl.store(out + b * sob + t[:, None].to(tl.int64) * sot + (h * G + g)[:, None] * soh + d[None, :],
                 o.to(out.dtype.element_ty), mask=mrow[:, None] & md[None, :])
