"""Gated delta rule (Gated DeltaNet's token mixing), chunked, with carried state and varlen.

Shapes (time-first, as fla): q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV];
state [N, HV, K, V] in float32 where N = B, or the number of sequences with ``cu_seqlens``
(then B must be 1). HV may be a multiple of H (grouped value attention, GVA).

Recurrence per head (decay first, then the delta-rule write, as fla's naive reference):
    S_t = exp(g_t) S_{t-1};  u_t = beta_t (v_t - S_t^T k_t);  S_t += k_t u_t^T;  o_t = scale S_t^T q_t

The torch backend is the chunked (WY) form: inside a chunk of C tokens the writes solve one unit
lower-triangular system, across chunks the state is carried, so cost is O(T C (K + V) + T K V)
and memory O(T) - never the O(T^2) quadratic form. It runs on any device and is the reference the
fla Triton kernels are tested against. A few tokens (decode: T <= ``RECURRENT_MAX_T``, defined in
vlt.kernels.backends for every kernel) run the token-by-token recurrence instead of padding a whole
chunk.

Decode under ``torch.compile``: fla's kernels are opaque to Dynamo (they run outside the graph), so
inside a compiled region a decode step takes the recurrence, which is plain tensor math that Inductor
fuses with the norms, gates and convs around it - the fused GDN decode step of the inference engine.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlt.kernels.backends import RECURRENT_MAX_T, resolve_backend
from vlt.kernels.varlen import pad_packed, unpad


def gated_delta_rule(q, k, v, g, beta, *, scale: float | None = None, initial_state=None,
                     output_final_state: bool = False, cu_seqlens=None, qk_l2norm: bool = False,
                     backend: str = "auto", chunk_size: int = 64):
    """Returns ``(o [B, T, HV, V] in v's dtype, final_state [N, HV, K, V] fp32 or None)``."""
    _check_shapes(q, k, v, g, beta, initial_state, cu_seqlens)
    backend = resolve_backend("gated_delta", backend, q.device)
    few = q.shape[1] <= RECURRENT_MAX_T and cu_seqlens is None
    if backend == "fla" and not (few and torch.compiler.is_compiling()):
        return _fla(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, qk_l2norm)
    if qk_l2norm:
        q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
    if few:
        f32 = [x.float() for x in (q, k, v, g, beta)]
        o, S = gated_delta_rule_reference(*f32, scale=scale, initial_state=initial_state)
        return o.to(v.dtype), (S if output_final_state else None)
    return _torch_varlen(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size)


def _check_shapes(q, k, v, g, beta, initial_state, cu_seqlens):
    B, T, H, K = q.shape
    HV = v.shape[2]
    assert k.shape == q.shape and v.shape[:2] == (B, T), (q.shape, k.shape, v.shape)
    assert g.shape == (B, T, HV) and beta.shape == (B, T, HV), (g.shape, beta.shape, v.shape)
    assert HV % H == 0, f"value heads {HV} must be a multiple of key heads {H}"
    if cu_seqlens is not None:
        assert B == 1, "packed sequences (cu_seqlens) need batch size 1"
    if initial_state is not None:
        n = B if cu_seqlens is None else len(cu_seqlens) - 1
        assert initial_state.shape == (n, HV, K, v.shape[-1]), (initial_state.shape, n, HV, K)


@torch.compiler.disable  # fla's autotuned Triton launchers are not traceable; they run between graphs
def _fla(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, qk_l2norm):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=qk_l2norm)
    # The fused recurrent kernel has no backward; decode (no grad, a few tokens) is what it is for.
    if q.shape[1] <= RECURRENT_MAX_T and not torch.is_grad_enabled():
        return fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, **kwargs)
    return chunk_gated_delta_rule(q, k, v, g, beta, **kwargs)


def _torch_varlen(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    if cu_seqlens is None:
        return _torch_chunked(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)
    # All packed sequences at once as a padded batch; padding has g = 0 and beta = 0, so it neither
    # decays nor writes the state and each sequence's final state is that of its last real token.
    (q, k, v, g, beta), lengths = pad_packed([q, k, v, g, beta], cu_seqlens, chunk_size)
    o, h = _torch_chunked(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)
    return unpad(o, lengths), h


def _torch_chunked(q, k, v, g, beta, scale, initial_state, output_final_state, C):
    out_dtype = v.dtype
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if HV != H:  # GVA: each key head serves HV // H value heads
        q, k = (x.repeat_interleave(HV // H, dim=2) for x in (q, k))
    scale = K ** -0.5 if scale is None else scale
    # [B, T, H, D] -> [B, H, T, D], fp32 for the triangular solve and the carried state.
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))
    g, beta = (x.transpose(1, 2).float() for x in (g, beta))
    pad = (-T) % C
    if pad:  # padded steps have g = 0 (no decay) and beta = 0 (no write): the state passes through
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // C
    q, k, v = (x.reshape(B, HV, n, C, -1) for x in (q, k, v))
    g, beta = (x.reshape(B, HV, n, C) for x in (g, beta))

    G = g.cumsum(-1)                                        # log decay from chunk start to i
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
    decay = diff.exp()                                      # exp(G_i - G_j), j <= i, else 0
    kk = k @ k.transpose(-1, -2)
    A = (beta.unsqueeze(-1) * kk * decay).tril(-1)          # strictly lower
    eye = torch.eye(C, device=q.device, dtype=q.dtype)
    Tinv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
    U0 = Tinv @ (beta.unsqueeze(-1) * v)                    # writes if the chunk started from S = 0
    W = Tinv @ (beta.unsqueeze(-1) * G.exp().unsqueeze(-1) * k)  # how the carried state shifts them
    qk = (q @ k.transpose(-1, -2)) * decay                  # causal, decayed scores (diag included)
    q_dec = q * G.exp().unsqueeze(-1)
    k_dec = k * (G[..., -1:] - G).exp().unsqueeze(-1)       # decay from j to chunk end

    S = (torch.zeros(B, HV, K, V, device=q.device) if initial_state is None
         else initial_state.float().clone())
    o = torch.empty(B, HV, n, C, V, device=q.device)
    for i in range(n):
        U = U0[:, :, i] - W[:, :, i] @ S
        o[:, :, i] = q_dec[:, :, i] @ S + qk[:, :, i] @ U
        S = S * G[:, :, i, -1, None, None].exp() + k_dec[:, :, i].transpose(-1, -2) @ U
    o = (o * scale).reshape(B, HV, n * C, V)[:, :, :T].transpose(1, 2).to(out_dtype)
    return o, (S if output_final_state else None)


def gated_delta_rule_reference(q, k, v, g, beta, *, scale=None, initial_state=None):
    """Token-by-token recurrence in the inputs' dtype (use float64 for references). No varlen."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if HV != H:
        q, k = (x.repeat_interleave(HV // H, dim=2) for x in (q, k))
    scale = K ** -0.5 if scale is None else scale
    S = q.new_zeros(B, HV, K, V) if initial_state is None else initial_state.to(q.dtype).clone()
    o = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        o.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(o, dim=1), S
