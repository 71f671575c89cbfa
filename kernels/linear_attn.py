"""(Decayed) linear attention, chunked, with carried state and varlen.

    S_t = exp(g_t) S_{t-1} + k_t v_t^T;   o_t = scale S_t^T q_t        (g = 0: plain linear attention)

Shapes as in ``gated_delta``: q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] or None;
state [N, H, K, V] fp32. CUDA uses fla's simple-GLA kernels; the torch path is chunked,
O(T C (K + V)) time and O(T) memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlt.kernels.backends import RECURRENT_MAX_T, resolve_backend
from vlt.kernels.varlen import pad_packed, unpad


def linear_attention(q, k, v, g=None, *, scale: float | None = None, initial_state=None,
                     output_final_state: bool = False, cu_seqlens=None, backend: str = "auto",
                     chunk_size: int = 64):
    B, T, H, K = q.shape
    assert k.shape == q.shape and v.shape[:3] == (B, T, H), (q.shape, k.shape, v.shape)
    assert cu_seqlens is None or B == 1, "packed sequences (cu_seqlens) need batch size 1"
    backend = resolve_backend("linear_attn", backend, q.device)
    scale = K ** -0.5 if scale is None else scale
    if backend == "fla":
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
        fn = fused_recurrent_simple_gla if (T <= RECURRENT_MAX_T and not torch.is_grad_enabled()) else chunk_simple_gla
        g_gamma = None
        if g is not None and g.stride(0) == 0 and g.stride(1) == 0 and not g.requires_grad:
            # a per-head constant decay broadcast over (B, T): fla's g_gamma form skips the cumsum
            # (it gives g_gamma no gradient, hence only when none is needed)
            g, g_gamma = None, g[0, 0]
        out_dtype = v.dtype
        if g is not None and q.dtype != torch.float32 and _gated_bwd_needs_fp32(q, k, v, g):
            # fla refuses the gated backward on Hopper with triton < 3.7.1 (it miscompiles), and its
            # tilelang replacement takes fp32 inputs only: run the kernel in fp32, return v's dtype.
            q, k, v = q.float(), k.float(), v.float()
        o, S = fn(q, k, v, g=g, g_gamma=g_gamma, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        return o.to(out_dtype), S
    if g is None:
        g = q.new_zeros(B, T, H, dtype=torch.float32)
    if cu_seqlens is None:
        return _chunked(q, k, v, g, scale, initial_state, output_final_state, chunk_size)
    # Packed sequences as one padded batch: zero k/v padding writes nothing, g = 0 decays nothing.
    (q, k, v, g), lengths = pad_packed([q, k, v, g], cu_seqlens, chunk_size)
    o, h = _chunked(q, k, v, g, scale, initial_state, output_final_state, chunk_size)
    return unpad(o, lengths), h


def _chunked(q, k, v, g, scale, initial_state, output_final_state, C):
    out_dtype = v.dtype
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))
    g = g.transpose(1, 2).float()
    pad = (-T) % C
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g = F.pad(g, (0, pad))
    n = (T + pad) // C
    q, k, v = (x.reshape(B, H, n, C, -1) for x in (q, k, v))
    G = g.reshape(B, H, n, C).cumsum(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
    intra = ((q @ k.transpose(-1, -2)) * decay) @ v
    q_dec = q * G.exp().unsqueeze(-1)
    k_dec = k * (G[..., -1:] - G).exp().unsqueeze(-1)
    S = torch.zeros(B, H, K, V, device=q.device) if initial_state is None else initial_state.float().clone()
    o = torch.empty(B, H, n, C, V, device=q.device)
    for i in range(n):
        o[:, :, i] = q_dec[:, :, i] @ S + intra[:, :, i]
        S = S * G[:, :, i, -1, None, None].exp() + k_dec[:, :, i].transpose(-1, -2) @ v[:, :, i]
    o = (o * scale).reshape(B, H, n * C, V)[:, :, :T].transpose(1, 2).to(out_dtype)
    return o, (S if output_final_state else None)


def _gated_bwd_needs_fp32(*xs) -> bool:
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in xs)):
        return False
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:  # other fla versions: trust the kernel
        return False
    return bool(IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)
