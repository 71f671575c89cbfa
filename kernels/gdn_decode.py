"""Fused Gated DeltaNet decode step: one Triton kernel per GDN layer and token.

A batch-1 decode step through the GDN mixer is a handful of GEMVs (the stacked input projection,
``o_proj``) around a chain of tiny ops: three short-conv state updates, SiLU, L2 norms, the decay and
beta gates, the delta-rule recurrence and the gated RMSNorm. Compiled by Inductor that chain is
still about a dozen kernels (about 28 us per layer on an H100, measured in
``benchmarks/profiles/profile_decode_hybrid.txt``), each too short to load the GPU. Here it is one
kernel: a program per (sequence, key head) convolves its head's q/k channels, then for each value
head of its group walks the value dimension in blocks of the fp32 state [K, BV]:

    S = exp(g) S;  u = beta (v - S^T k);  S += k u^T;  o = scale S^T q

and finishes with ``rmsnorm(o) * weight * silu(gate)``, the input of ``o_proj``. Conv states
[B, C, W-1] and the SSM state [B, HV, K, V] (fp32) are updated in place, so the step can be captured
in a CUDA graph with fixed buffers. One program owns every channel it writes, so no two programs
touch the same state.

Intermediate roundings follow the reference path (the mixer's forward in ``layers/gdn.py``): the conv
output and its SiLU in the input dtype, the recurrence in fp32, ``o`` rounded to the input dtype
before the norm, the normed value rounded before the gate. ``gdn_decode_reference`` is that path
written out with torch ops; the tests hold the kernel to it (on CPU through Triton's interpreter,
``TRITON_INTERPRET=1``) and to the mixer itself on the GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the reference path still works
    triton = None


def gdn_decode_step(q_in, k_in, v_in, g_in, a_in, b_in, conv_weights, conv_states, A_log, dt_bias, ssm,
                    norm_weight, eps: float, *, scale: float | None = None, block_v: int = 64,
                    num_warps: int = 4):
    """One token through a GDN layer, between its input projection and ``o_proj``.

    q_in, k_in [B, H*K]; v_in, g_in [B, HV*V]; a_in, b_in [B, HV] - the projections' outputs (views
    of one stacked projection are fine: unit stride along the features). conv_weights (q, k, v)
    [C, W]; conv_states (q, k, v) [B, C, W-1] and ssm [B, HV, K, V] fp32, both contiguous and updated
    in place. Returns o [B, HV*V] in q_in's dtype."""
    if triton is None:
        raise RuntimeError("gdn_decode_step needs Triton (pip install triton); use the mixer's forward instead")
    B, HV, K, V = ssm.shape
    H = q_in.shape[-1] // K
    W = conv_weights[0].shape[-1]
    _check(q_in, k_in, v_in, g_in, a_in, b_in, conv_weights, conv_states, ssm, B, H, HV, K, V, W)
    out = torch.empty(B, HV * V, device=q_in.device, dtype=q_in.dtype)
    BV = min(block_v, triton.next_power_of_2(V))
    _gdn_decode_kernel[(B * H,)](
        q_in, k_in, v_in, g_in, a_in, b_in,
        q_in.stride(0), k_in.stride(0), v_in.stride(0), g_in.stride(0), a_in.stride(0), b_in.stride(0),
        *conv_weights, *conv_states, A_log, dt_bias, ssm, norm_weight, out,
        K ** -0.5 if scale is None else scale, eps,
        H=H, HV=HV, K=K, V=V, W=W, BK=triton.next_power_of_2(K), BV=BV,
        WP=triton.next_power_of_2(max(W - 1, 1)), num_warps=num_warps)
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
    @triton.jit
    def _conv_silu(x_ptr, w_ptr, state_ptr, mask, BC: tl.constexpr, W: tl.constexpr, WP: tl.constexpr):
        """Causal depthwise conv of BC channels over (state, new input), SiLU, state shifted by one
        in place. Pointers start at the block's first channel; returns fp32 values rounded to x's dtype."""
        ch = tl.arange(0, BC)
        taps = tl.arange(0, WP)
        old_mask = mask[:, None] & (taps[None, :] < W - 1)
        x = tl.load(x_ptr + ch, mask=mask, other=0.0)
        old = tl.load(state_ptr + ch[:, None] * (W - 1) + taps[None, :], mask=old_mask, other=0.0)
        w_old = tl.load(w_ptr + ch[:, None] * W + taps[None, :], mask=old_mask, other=0.0)
        w_new = tl.load(w_ptr + ch * W + (W - 1), mask=mask, other=0.0)
        # the next state is the old one moved left by one tap, the new input last
        later = tl.load(state_ptr + ch[:, None] * (W - 1) + taps[None, :] + 1,
                        mask=mask[:, None] & (taps[None, :] < W - 2), other=0.0)
        new_state = tl.where(taps[None, :] == W - 2, x[:, None], later)
        acc = tl.sum(old.to(tl.float32) * w_old.to(tl.float32), 1) + x.to(tl.float32) * w_new.to(tl.float32)
        y = acc.to(x.dtype).to(tl.float32)
        y = (y * tl.sigmoid(y)).to(x.dtype).to(tl.float32)
        tl.debug_barrier()  # every thread has read the old state before any overwrites it
        tl.store(state_ptr + ch[:, None] * (W - 1) + taps[None, :], new_state, mask=old_mask)
        return y

    @triton.jit
    def _gdn_decode_kernel(
            q_in, k_in, v_in, g_in, a_in, b_in, sq, sk, sv, sg, sa, sb,
            wq, wk, wv, cq, ck, cv, A_log, dt_bias, ssm, norm_w, out, scale, eps,
            H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
            BK: tl.constexpr, BV: tl.constexpr, WP: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        kk = tl.arange(0, BK)
        mk = kk < K
        # q, k of this key head: conv + SiLU, then L2-normalised as F.normalize (norm clamped at 1e-12)
        q = _conv_silu(q_in + b * sq + h * K, wq + h * K * W, cq + (b * H + h) * K * (W - 1), mk, BK, W, WP)
        k = _conv_silu(k_in + b * sk + h * K, wk + h * K * W, ck + (b * H + h) * K * (W - 1), mk, BK, W, WP)
        q = q / tl.maximum(tl.sqrt(tl.sum(q * q, 0)), 1e-12)
        k = k / tl.maximum(tl.sqrt(tl.sum(k * k, 0)), 1e-12)
        out_ty = out.dtype.element_ty
        G: tl.constexpr = HV // H
        for j in tl.static_range(G):  # the value heads that share this key head (GVA), one by one
            hv = h * G + j
            beta = tl.sigmoid(tl.load(b_in + b * sb + hv).to(tl.float32))
            a = tl.load(a_in + b * sa + hv).to(tl.float32) + tl.load(dt_bias + hv).to(tl.float32)
            softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(tl.minimum(a, 20.0))))  # F.softplus
            decay = tl.exp(-tl.exp(tl.load(A_log + hv).to(tl.float32)) * softplus)
            s_ptr = ssm + (b * HV + hv) * K * V
            o_ptr = out + b * HV * V + hv * V
            sumsq = 0.0
            for v0 in tl.static_range(0, V, BV):
                vv = v0 + tl.arange(0, BV)
                mv = vv < V
                c0 = hv * V + v0
                v = _conv_silu(v_in + b * sv + c0, wv + c0 * W, cv + (b * HV * V + c0) * (W - 1), mv, BV, W, WP)
                smask = mk[:, None] & mv[None, :]
                S = tl.load(s_ptr + kk[:, None] * V + vv[None, :], mask=smask, other=0.0) * decay
                u = beta * (v - tl.sum(S * k[:, None], 0))
                S = S + k[:, None] * u[None, :]
                tl.store(s_ptr + kk[:, None] * V + vv[None, :], S, mask=smask)
                o = (tl.sum(S * q[:, None], 0) * scale).to(out_ty)
                tl.store(o_ptr + vv, o, mask=mv)
                of = o.to(tl.float32)
                sumsq += tl.sum(tl.where(mv, of * of, 0.0), 0)
            rstd = 1.0 / tl.sqrt(sumsq / V + eps)
            tl.debug_barrier()  # the raw o of the whole head is written before it is read back
            for v0 in tl.static_range(0, V, BV):
                vv = v0 + tl.arange(0, BV)
                mv = vv < V
                o = tl.load(o_ptr + vv, mask=mv, other=0.0).to(tl.float32)
                n = (tl.load(norm_w + vv, mask=mv, other=0.0).to(tl.float32) * (o * rstd)).to(out_ty).to(tl.float32)
                gate = tl.load(g_in + b * sg + hv * V + vv, mask=mv, other=0.0).to(tl.float32)
                tl.store(o_ptr + vv, (n * (gate * tl.sigmoid(gate))).to(out_ty), mask=mv)


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
