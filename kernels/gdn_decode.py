"""Fused Gated DeltaNet decode step: two Triton kernels per GDN layer and token.

A batch-1 decode step through the GDN mixer is a handful of GEMVs (the stacked input projection,
``o_proj``) around a chain of tiny ops: three short-conv state updates, SiLU, L2 norms, the decay and
beta gates, the delta-rule recurrence and the gated RMSNorm. Compiled by Inductor that chain is
still about a dozen kernels (see benchmarks/README.md), each too short to load the GPU. Here it is
two:

1. ``_gdn_recurrent_kernel``, a program per (sequence, value head, block of BV value channels):
   q/k conv + SiLU + L2 norm of its key head (recomputed per block: 2 x K channels, cheap), its
   value channels' conv, the gates, and the recurrence on its fp32 state block [K, BV]

       S = exp(g) S;  u = beta (v - S^T k);  S += k u^T;  o = scale S^T q

   writing the raw o and its partial sum of squares;
2. ``_gdn_norm_kernel``, a program per (sequence, key head): shifts the q/k conv states and applies
   ``rmsnorm(o) * weight * silu(gate)``, the input of ``o_proj``.

Split this way each state byte has one writer and nothing is written while another program may
still read it (every block of a head reads the q/k conv state, so its shift waits for kernel 2);
and the recurrence runs on B * HV * V / BV programs instead of B * H, which is what loads the GPU
at batch 1. Conv states [B, C, W-1] and the SSM state [B, HV, K, V] (fp32) are updated in place,
so the step can be captured in a CUDA graph with fixed buffers.

With programmatic dependent launch (Hopper, ``vlt.kernels.pdl``) kernel 1 loads the conv/SSM states
and weights before it waits for the input projection, and kernel 2 starts as kernel 1 drains.

Intermediate roundings follow the reference path (the mixer's forward in ``layers/gdn.py``): the conv
output and its SiLU in the input dtype, the recurrence in fp32, ``o`` rounded to the input dtype
before the norm, the normed value rounded before the gate. ``gdn_decode_reference`` is that path
written out with torch ops; the tests hold the kernel to it (on CPU through Triton's interpreter,
``TRITON_INTERPRET=1``) and to the mixer itself on the GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlt.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the reference path still works
    triton = None


def gdn_decode_step(q_in, k_in, v_in, g_in, a_in, b_in, conv_weights, conv_states, A_log, dt_bias, ssm,
                    norm_weight, eps: float, *, scale: float | None = None, block_v: int = 16,
                    num_warps: int = 4):
    """One token through a GDN layer, between its input projection and ``o_proj``.

    q_in, k_in [B, H*K]; v_in, g_in [B, HV*V]; a_in, b_in [B, HV] - the projections' outputs (views
    of one stacked projection are fine: unit stride along the features). conv_weights (q, k, v)
    [C, W]; conv_states (q, k, v) [B, C, W-1] and ssm [B, HV, K, V] fp32, both contiguous and updated
    in place. Returns o [B, HV*V] in q_in's dtype. The defaults (16 value channels per program, 4
    warps) come from sweeps of ``vlt bench decode-kernels --block-v --num-warps`` (benchmarks/README.md)."""
    if triton is None:
        raise RuntimeError("gdn_decode_step needs Triton (pip install triton); use the mixer's forward instead")
    B, HV, K, V = ssm.shape
    H = q_in.shape[-1] // K
    W = conv_weights[0].shape[-1]
    _check(q_in, k_in, v_in, g_in, a_in, b_in, conv_weights, conv_states, ssm, B, H, HV, K, V, W)
    BV = min(block_v, triton.next_power_of_2(V))
    NV = triton.cdiv(V, BV)
    out = torch.empty(B, HV * V, device=q_in.device, dtype=q_in.dtype)
    sumsq = torch.empty(B, HV, NV, device=q_in.device, dtype=torch.float32)
    use_pdl = pdl.enabled(q_in)
    meta = dict(H=H, HV=HV, K=K, V=V, W=W, BK=triton.next_power_of_2(K), WP=triton.next_power_of_2(max(W - 1, 1)),
                PDL=use_pdl, launch_pdl=use_pdl)
    # 1) every (sequence, value head, value block): q/k conv (read only), v conv, gates, recurrence, raw o
    _gdn_recurrent_kernel[(B * HV, NV)](
        q_in, k_in, v_in, a_in, b_in, q_in.stride(0), k_in.stride(0), v_in.stride(0), a_in.stride(0),
        b_in.stride(0), *conv_weights, *conv_states, A_log, dt_bias, ssm, out, sumsq,
        K ** -0.5 if scale is None else scale, BV=BV, NV=NV, num_warps=num_warps, **meta)
    # 2) every (sequence, key head): shift the q/k conv states, gated RMSNorm of its value heads' o
    _gdn_norm_kernel[(B * H,)](
        q_in, k_in, g_in, q_in.stride(0), k_in.stride(0), g_in.stride(0), conv_states[0], conv_states[1],
        norm_weight, out, sumsq, eps,
        BVN=triton.next_power_of_2(V), NV=NV, BNV=triton.next_power_of_2(NV), num_warps=num_warps, **meta)
    return out


def _check(q_in, k_in, v_in, g_in, a_in, b_in, conv_weights, conv_states, ssm, B, H, HV, K, V, W):
    assert ssm.dtype == torch.float32 and ssm.is_contiguous(), "the SSM state is fp32 and contiguous"
    assert HV % H == 0 and H * K == q_in.shape[-1], (q_in.shape, ssm.shape)
    for x, c in ((q_in, H * K), (k_in, H * K), (v_in, HV * V), (g_in, HV * V), (a_in, HV), (b_in, HV)):
        assert x.shape == (B, c) and x.stride(-1) == 1, (x.shape, x.stride(), B, c)
    for w, s, c in zip(conv_weights, conv_states, (H * K, H * K, HV * V)):
        assert w.shape == (c, W) and w.is_contiguous(), w.shape
        assert s.shape == (B, c, W - 1) and s.is_contiguous(), s.shape


if triton is not None:
    from vlt.kernels.pdl import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _conv_state_part(w_ptr, state_ptr, mask, BC: tl.constexpr, W: tl.constexpr, WP: tl.constexpr):
        """The causal depthwise conv of BC channels over their W-1 state taps (fp32), and the weight of
        the new input's tap: everything but the new input, which comes from the previous kernel.
        Pointers start at the block's first channel."""
        ch = tl.arange(0, BC)
        taps = tl.arange(0, WP)
        old_mask = mask[:, None] & (taps[None, :] < W - 1)
        old = tl.load(state_ptr + ch[:, None] * (W - 1) + taps[None, :], mask=old_mask, other=0.0)
        w_old = tl.load(w_ptr + ch[:, None] * W + taps[None, :], mask=old_mask, other=0.0)
        w_new = tl.load(w_ptr + ch * W + (W - 1), mask=mask, other=0.0)
        return tl.sum(old.to(tl.float32) * w_old.to(tl.float32), 1), w_new.to(tl.float32)

    @triton.jit
    def _conv_silu(x, part, w_new):
        """The conv output (state part + new input x) and its SiLU, as fp32 values rounded to x's
        dtype, as the reference."""
        y = (part + x.to(tl.float32) * w_new).to(x.dtype).to(tl.float32)
        return (y * tl.sigmoid(y)).to(x.dtype).to(tl.float32)

    @triton.jit
    def _shift_state(x, state_ptr, mask, BC: tl.constexpr, W: tl.constexpr, WP: tl.constexpr):
        """state[:, j] = state[:, j + 1], state[:, W - 2] = x, in place for BC channels."""
        ch = tl.arange(0, BC)
        taps = tl.arange(0, WP)
        later = tl.load(state_ptr + ch[:, None] * (W - 1) + taps[None, :] + 1,
                        mask=mask[:, None] & (taps[None, :] < W - 2), other=0.0)
        new_state = tl.where(taps[None, :] == W - 2, x[:, None], later)
        tl.debug_barrier()  # every thread has read the old state before any overwrites it
        tl.store(state_ptr + ch[:, None] * (W - 1) + taps[None, :], new_state,
                 mask=mask[:, None] & (taps[None, :] < W - 1))

    @triton.jit
    def _gdn_recurrent_kernel(
            q_in, k_in, v_in, a_in, b_in, sq, sk, sv, sa, sb, wq, wk, wv, cq, ck, cv,
            A_log, dt_bias, ssm, out, sumsq, scale,
            H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
            BK: tl.constexpr, WP: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, PDL: tl.constexpr):
        pid = tl.program_id(0)
        iv = tl.program_id(1)
        b = pid // HV
        hv = pid % HV
        h = hv // (HV // H)
        kk = tl.arange(0, BK)
        mk = kk < K
        vv = iv * BV + tl.arange(0, BV)
        mv = vv < V
        c0 = hv * V + iv * BV  # this program's value channels: it owns their conv state
        # First what no earlier kernel of this step writes (weights, this layer's states): under PDL
        # (vlt.kernels.pdl) these loads overlap the input projection's last wave.
        # q, k of the key head: conv from the old conv state (read only here: the other value blocks
        # of this head read it too; _gdn_norm_kernel shifts it afterwards)
        q_part, q_w = _conv_state_part(wq + h * K * W, cq + (b * H + h) * K * (W - 1), mk, BK, W, WP)
        k_part, k_w = _conv_state_part(wk + h * K * W, ck + (b * H + h) * K * (W - 1), mk, BK, W, WP)
        v_state = cv + (b * HV * V + c0) * (W - 1)
        v_part, v_w = _conv_state_part(wv + c0 * W, v_state, mv, BV, W, WP)
        s_ptr = ssm + (b * HV + hv) * K * V + kk[:, None] * V + vv[None, :]
        smask = mk[:, None] & mv[None, :]
        S = tl.load(s_ptr, mask=smask, other=0.0)
        a_log = tl.load(A_log + hv).to(tl.float32)
        dtb = tl.load(dt_bias + hv).to(tl.float32)
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        # then the projections' outputs: SiLU(conv), L2 norm as F.normalize
        q = _conv_silu(tl.load(q_in + b * sq + h * K + kk, mask=mk, other=0.0), q_part, q_w)
        k = _conv_silu(tl.load(k_in + b * sk + h * K + kk, mask=mk, other=0.0), k_part, k_w)
        q = q / tl.maximum(tl.sqrt(tl.sum(q * q, 0)), 1e-12)
        k = k / tl.maximum(tl.sqrt(tl.sum(k * k, 0)), 1e-12)
        beta = tl.sigmoid(tl.load(b_in + b * sb + hv).to(tl.float32))
        a = tl.load(a_in + b * sa + hv).to(tl.float32) + dtb
        softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(tl.minimum(a, 20.0))))  # F.softplus
        decay = tl.exp(-tl.exp(a_log) * softplus)
        v_new = tl.load(v_in + b * sv + c0 + tl.arange(0, BV), mask=mv, other=0.0)
        v = _conv_silu(v_new, v_part, v_w)
        _shift_state(v_new, v_state, mv, BV, W, WP)
        S = S * decay
        u = beta * (v - tl.sum(S * k[:, None], 0))
        S = S + k[:, None] * u[None, :]
        tl.store(s_ptr, S, mask=smask)
        o = (tl.sum(S * q[:, None], 0) * scale).to(out.dtype.element_ty)
        tl.store(out + b * HV * V + vv + hv * V, o, mask=mv)
        of = o.to(tl.float32)
        tl.store(sumsq + (b * HV + hv) * NV + iv, tl.sum(tl.where(mv, of * of, 0.0), 0))

    @triton.jit
    def _gdn_norm_kernel(
            q_in, k_in, g_in, sq, sk, sg, cq, ck, norm_w, out, sumsq, eps,
            H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
            BK: tl.constexpr, WP: tl.constexpr, BVN: tl.constexpr, NV: tl.constexpr, BNV: tl.constexpr,
            PDL: tl.constexpr):
        if PDL:  # everything here but the norm weight comes from _gdn_recurrent_kernel
            gdc_wait()
            gdc_launch_dependents()
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        kk = tl.arange(0, BK)
        mk = kk < K
        # the q/k conv states of this key head move by one tap, now that every reader is done
        _shift_state(tl.load(q_in + b * sq + h * K + kk, mask=mk), cq + (b * H + h) * K * (W - 1), mk, BK, W, WP)
        _shift_state(tl.load(k_in + b * sk + h * K + kk, mask=mk), ck + (b * H + h) * K * (W - 1), mk, BK, W, WP)
        out_ty = out.dtype.element_ty
        vv = tl.arange(0, BVN)
        mv = vv < V
        w = tl.load(norm_w + vv, mask=mv, other=0.0).to(tl.float32)
        G: tl.constexpr = HV // H
        for j in tl.static_range(G):
            hv = h * G + j
            nv = tl.arange(0, BNV)
            ss = tl.sum(tl.load(sumsq + (b * HV + hv) * NV + nv, mask=nv < NV, other=0.0), 0)
            rstd = 1.0 / tl.sqrt(ss / V + eps)
            o = tl.load(out + b * HV * V + hv * V + vv, mask=mv, other=0.0).to(tl.float32)
            n = (w * (o * rstd)).to(out_ty).to(tl.float32)
            gate = tl.load(g_in + b * sg + hv * V + vv, mask=mv, other=0.0).to(tl.float32)
            tl.store(out + b * HV * V + hv * V + vv, (n * (gate * tl.sigmoid(gate))).to(out_ty), mask=mv)


def gdn_decode_reference(q_in, k_in, v_in, g_in, a_in, b_in, conv_weights, conv_states, A_log, dt_bias, ssm,
                         norm_weight, eps: float, *, scale: float | None = None):
    """The same step with torch ops, the way the mixer's forward computes it (same arguments and in-place
    updates as ``gdn_decode_step``). Runs anywhere; the kernel's reference in the tests."""
    B, HV, K, V = ssm.shape
    H = q_in.shape[-1] // K
    outs = []
    for x, w, s in zip((q_in, k_in, v_in), conv_weights, conv_states):
        full = torch.cat([s, x[:, :, None]], -1)                                  # [B, C, W]
        y = (full.float() * w.float()).sum(-1).to(x.dtype)
        outs.append(F.silu(y))
        s.copy_(full[:, :, 1:])
    q, k, v = outs
    q = F.normalize(q.float().view(B, H, K), dim=-1).repeat_interleave(HV // H, 1)
    k = F.normalize(k.float().view(B, H, K), dim=-1).repeat_interleave(HV // H, 1)
    v = v.float().view(B, HV, V)
    beta = b_in.float().sigmoid()
    g = -A_log.float().exp() * F.softplus(a_in.float() + dt_bias.float())
    S = ssm * g.exp()[..., None, None]
    u = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", S, k))
    S = S + k[..., None] * u[:, :, None, :]
    ssm.copy_(S)
    o = (torch.einsum("bhkv,bhk->bhv", S, q) * (K ** -0.5 if scale is None else scale)).to(q_in.dtype).float()
    n = (norm_weight.float() * (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps))).to(q_in.dtype)
    return (n.float() * F.silu(g_in.float().view(B, HV, V))).to(q_in.dtype).reshape(B, HV * V)
