"""Batch-1-style decode attention over a K/V buffer, with RoPE and the new token's K/V write fused in.

A decode step of an attention layer rotates q and the new key (RoPE), writes the new key/value into
slot ``tok % L`` of its buffers [B, L, Hkv, D] and attends over all L slots (the inference engine's
dense decode: every slot valid). Through torch ops that is two RoPE kernels (compiled), an add, a
remainder and three index_copy kernels, then SDPA's flash split-KV kernel and its combine kernel:
9 kernels (their timings, and these kernels' against them: benchmarks/README.md). Here it is two:

1. ``_attn_split_kernel``, a program per (sequence, KV head, split of the slots): all G query heads
   of the KV head at once (one [G, D] x [D, BN] product per block of BN keys, so K/V are read once
   for the group), online softmax, partial (max, sum, output) per split. The program whose split
   holds the slot writes the new K/V there (and the slot's token index); every block of keys that
   covers the slot takes the new K/V from registers, so no program reads what another writes;
2. ``_attn_combine_kernel``, a program per (sequence, query head): merges the splits.

``vlt bench decode-kernels`` times the two against index_copy + SDPA. Splits are sized so that
about ``programs_per_sm`` programs per SM run. With ``cos``/``sin`` (the step's RoPE tables)
the kernel rotates q and the new key itself (rotate-half layout, in fp32, rounded once as
vlt.kernels.rotary.apply_rope), so the step needs no RoPE kernels before it. Both kernels launch with
programmatic dependent launch where available (vlt.kernels.pdl). Softmax and products accumulate in
fp32; the probabilities are rounded to the K/V dtype before the product with V, as flash attention
does. ``decode_attention_reference`` is the same step in torch ops (index_copy + SDPA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlt.kernels import pdl
from vlt.kernels.rotary import apply_rope

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def decode_attention(q, k_new, v_new, k_cache, v_cache, tok, ktok=None, *, cos=None, sin=None,
                     scale: float | None = None, block_n: int = 64, splits: int | None = None,
                     programs_per_sm: int = 2):
    """q [B, Hq, D]; k_new, v_new [B, Hkv, D] (unit stride along D; any other strides); k_cache,
    v_cache [B, L, Hkv, D] contiguous; tok: long tensor on the device, the new token's index per
    sequence ([B]) or for all of them (0-d or [1]): the new K/V go to slot ``tok % L``; ktok [B, L]
    long (or [L] with B = 1; optional), the token index of each slot, updated too; cos, sin [D] or
    [B, D] float32 (optional): RoPE for this token, applied to q and k_new first.
    Writes the new K/V into the caches in place and returns the attention output [B, Hq, D] in q's
    dtype over the slots ``0 .. min(tok, L - 1)``: every slot of a wrapped ring (a sliding window's
    ring holds exactly its visible keys), or a cache filled from slot 0 that has not wrapped (full
    attention sized to its capacity). Splits past a sequence's valid slots do no work."""
    if triton is None:
        raise RuntimeError("decode_attention needs Triton; use decode_attention_reference instead")
    B, Hq, D = q.shape
    _, L, Hkv, _ = k_cache.shape
    assert Hq % Hkv == 0 and k_new.shape == v_new.shape == (B, Hkv, D), (q.shape, k_new.shape, k_cache.shape)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
    assert q.stride(-1) == k_new.stride(-1) == v_new.stride(-1) == 1 and tok.numel() in (1, B), tok.shape
    assert (cos is None) == (sin is None) and (cos is None or (cos.shape == sin.shape and cos.shape[-1] == D
                                                             and cos.numel() in (D, B * D) and D % 2 == 0
                                                             and cos.dtype == sin.dtype == torch.float32))
    assert ktok is None or (ktok.numel() == B * L and ktok.is_contiguous()), (None if ktok is None else ktok.shape)
    tok_stride = 0 if tok.numel() == 1 else 1
    cs_stride = 0 if cos is None or cos.numel() == D else D
    G = Hq // Hkv
    if splits is None:  # a few programs per SM (loads of one overlap another's math), over whole key blocks
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
        splits = max(1, min(256, triton.cdiv(programs_per_sm * sms, B * Hkv)))
    chunk = max(block_n, triton.cdiv(triton.cdiv(L, splits), block_n) * block_n)
    S = triton.cdiv(L, chunk)
    part_o = torch.empty(B, Hkv, S, G, D, device=q.device, dtype=torch.float32)
    part_ml = torch.empty(B, Hkv, S, 2, G, device=q.device, dtype=torch.float32)
    out = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype)
    use_pdl = pdl.enabled(q)
    meta = dict(G=G, GP=max(16, triton.next_power_of_2(G)), D=D, BD=triton.next_power_of_2(D), HKV=Hkv,
                PDL=use_pdl, launch_pdl=use_pdl)
    _attn_split_kernel[(B * Hkv, S)](
        q, k_new, v_new, k_cache, v_cache, ktok if ktok is not None else tok, tok, part_o, part_ml,
        cos if cos is not None else part_o, sin if sin is not None else part_o,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        tok_stride, cs_stride, L, chunk, S, D ** -0.5 if scale is None else scale, HAS_KTOK=ktok is not None,
        ROPE=cos is not None, BN=block_n,
        PREC="ieee" if q.dtype == torch.float32 else None, UPCAST=not q.is_cuda, **meta)
    _attn_combine_kernel[(B * Hq,)](part_o, part_ml, out, S, BS=triton.next_power_of_2(S), **meta)
    return out


def decode_attention_reference(q, k_new, v_new, k_cache, v_cache, tok, ktok=None, *, cos=None, sin=None,
                               scale=None):
    """The same step in torch ops: RoPE (vlt.kernels.rotary), the K/V write into slot ``tok % L`` of
    each sequence, then SDPA with the G query heads of a KV head as rows of one head, masked to the
    valid slots ``0 .. min(tok, L - 1)``. Graph-safe (no host syncs)."""
    B, Hq, D = q.shape
    L, Hkv = k_cache.shape[1], k_cache.shape[2]
    if cos is not None:
        cos, sin = cos.reshape(-1, 1, D), sin.reshape(-1, 1, D)
        q, k_new = (apply_rope(t[:, None], cos, sin)[:, 0] for t in (q, k_new))
    tok = tok.reshape(-1).expand(B)
    slot = tok % L
    rows = torch.arange(B, device=q.device)
    k_cache[rows, slot] = k_new
    v_cache[rows, slot] = v_new
    if ktok is not None:
        ktok.view(B, L)[rows, slot] = tok
    valid = torch.arange(L, device=q.device)[None, :] <= tok[:, None]          # [B, L]
    qh = q.view(B, Hkv, Hq // Hkv, D)
    o = F.scaled_dot_product_attention(qh, k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                       attn_mask=valid[:, None, None, :], scale=scale)
    return o.reshape(B, Hq, D)


if triton is not None:
    from vlt.kernels.pdl import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _rope(ptr, d, md, cos, sin, D: tl.constexpr):
        """Rows at ``ptr`` + d (d [BD] or [1, BD]) rotated as apply_rope: x cos + rotate_half(x) sin,
        in fp32, rounded once to the input dtype."""
        lo = d < D // 2
        x = tl.load(ptr + d, mask=md, other=0.0)
        partner = tl.load(ptr + tl.where(lo, d + D // 2, d - D // 2), mask=md, other=0.0).to(tl.float32)
        rot = tl.where(lo, -partner, partner)
        return (x.to(tl.float32) * cos + rot * sin).to(x.dtype)

    @triton.jit
    def _attn_split_kernel(q, k_new, v_new, k_cache, v_cache, ktok, tok_ptr, part_o, part_ml, cos_ptr, sin_ptr,
                           sqb, sqh, skb, skh, svb, svh, tok_stride, cs_stride, L, chunk, S, scale,
                           G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                           HKV: tl.constexpr, HAS_KTOK: tl.constexpr, ROPE: tl.constexpr, BN: tl.constexpr,
                           PREC: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
        bh = tl.program_id(0)
        s = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        if PDL:  # q and the new K/V come from the kernel before; nothing here can be loaded earlier
            gdc_wait()
            gdc_launch_dependents()
        d = tl.arange(0, BD)
        md = d < D
        tok = tl.load(tok_ptr + b * tok_stride)
        slot = tok % L
        start = s * chunk
        end = tl.minimum(start + chunk, tl.minimum(L, tok + 1))  # slots past the valid ones: no work
        row = (b * L).to(tl.int64) * HKV + h  # (b, slot 0, h) in units of D
        # the new K/V: written to the slot by the program whose split holds it, and taken from
        # registers (not re-read from the cache) where a block of keys covers the slot
        if ROPE:
            cos = tl.load(cos_ptr + b * cs_stride + d, mask=md, other=0.0)
            sin = tl.load(sin_ptr + b * cs_stride + d, mask=md, other=0.0)
            kn = _rope(k_new + b * skb + h * skh, d, md, cos, sin, D)
        else:
            kn = tl.load(k_new + b * skb + h * skh + d, mask=md, other=0.0)
        vn = tl.load(v_new + b * svb + h * svh + d, mask=md, other=0.0)
        if (slot >= start) & (slot < end):
            tl.store(k_cache + (row + slot * HKV) * D + d, kn, mask=md)
            tl.store(v_cache + (row + slot * HKV) * D + d, vn, mask=md)
            if HAS_KTOK:
                if h == 0:
                    tl.store(ktok + b * L + slot, tok)
        g = tl.arange(0, GP)
        mg = g < G
        if ROPE:
            qg = _rope(q + b * sqb + (h * G + g)[:, None] * sqh, d[None, :], mg[:, None] & md[None, :],
                       cos[None, :], sin[None, :], D)
        else:
            qg = tl.load(q + b * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=mg[:, None] & md[None, :],
                         other=0.0)
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, BD), tl.float32)
        for n0 in range(start, end, BN):
            n = n0 + tl.arange(0, BN)
            mn = n < end
            offs = (row + n[:, None].to(tl.int64) * HKV) * D + d[None, :]
            kt = tl.load(k_cache + offs, mask=mn[:, None] & md[None, :], other=0.0)
            vt = tl.load(v_cache + offs, mask=mn[:, None] & md[None, :], other=0.0)
            new = (n == slot)[:, None]
            kt = tl.where(new, kn[None, :], kt)
            vt = tl.where(new, vn[None, :], vt)
            if UPCAST:  # Triton's interpreter multiplies bf16 tiles wrongly; same products in fp32
                sc = tl.dot(qg.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision=PREC) * scale
            else:
                sc = tl.dot(qg, tl.trans(kt), input_precision=PREC) * scale
            sc = tl.where(mn[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            p = tl.exp(sc - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if UPCAST:
                pv = tl.dot(p.to(vt.dtype).to(tl.float32), vt.to(tl.float32), input_precision=PREC)
            else:
                pv = tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        base = (bh * S + s).to(tl.int64)
        tl.store(part_o + (base * G + g[:, None]) * D + d[None, :], acc, mask=mg[:, None] & md[None, :])
        tl.store(part_ml + (base * 2) * G + g, m_i, mask=mg)
        tl.store(part_ml + (base * 2 + 1) * G + g, l_i, mask=mg)

    @triton.jit
    def _attn_combine_kernel(part_o, part_ml, out, S, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                             BD: tl.constexpr, HKV: tl.constexpr, BS: tl.constexpr, PDL: tl.constexpr):
        pid = tl.program_id(0)  # (b, query head)
        bh = pid // G           # (b, KV head): query heads h * G .. h * G + G - 1 share it
        g = pid % G
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        ss = tl.arange(0, BS)
        ms = ss < S
        d = tl.arange(0, BD)
        md = d < D
        base = (bh * S + ss).to(tl.int64)
        m = tl.load(part_ml + (base * 2) * G + g, mask=ms, other=float("-inf"))
        lsum = tl.load(part_ml + (base * 2 + 1) * G + g, mask=ms, other=0.0)
        w = tl.where(ms, tl.exp(m - tl.max(m, 0)), 0.0)
        o = tl.load(part_o + (base[:, None] * G + g) * D + d[None, :], mask=ms[:, None] & md[None, :], other=0.0)
        o = tl.sum(o * w[:, None], 0) / tl.sum(lsum * w, 0)
        tl.store(out + pid.to(tl.int64) * D + d, o.to(out.dtype.element_ty), mask=md)
