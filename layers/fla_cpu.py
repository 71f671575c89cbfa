"""CPU paths of fla-backed mixers: the layer's own parameters run through fla's pure-PyTorch naive
reference for its op (token-by-token recurrences), vlt's torch short conv and torch norms.

Each path mirrors the fla layer's forward (fla/layers/<layer>.py, fla 0.6.0) step by step and takes
and returns the state in vlt's format (layers/fla_mixers.py), so a state from a CPU prefill
continues on CUDA and back. The naive references take no ``cu_seqlens``: the projections, gates
and short convs run on the packed sequence (the convs restart at each boundary), then the
recurrence runs the sequences as one right-padded batch whose pads are inert (zero key, write and
log-decay), so nothing crosses a boundary and each final state is that of its real tokens. Speed
is not a goal here: they are for tests, tiny CPU runs and as the readable reference of what the
CUDA path computes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlt.kernels import short_conv
from vlt.kernels.varlen import pad_packed, unpad


def _conv(conv, x, state, use_cache, cu_seqlens=None):
    """fla's ShortConvolution (an nn.Conv1d [C, 1, W] with an optional bias and activation) on
    vlt's torch causal conv; the state is vlt's [B or N, C, W-1]."""
    act = getattr(conv, "activation", None)
    if act not in (None, "silu", "swish"):
        raise ValueError(f"short conv activation {act!r} has no CPU path; allowed: silu, None")
    return short_conv(x, conv.weight[:, 0], conv.bias, activation="silu" if act else None, conv_state=state,
                      output_final_state=use_cache, cu_seqlens=cu_seqlens, backend="torch")


def _gated_rms_norm(norm, o, g):
    """fla's FusedRMSNormGated: rmsnorm(o) * weight * act(g), in fp32 (weight None without affine)."""
    of = o.float()
    y = of * torch.rsqrt(of.square().mean(-1, keepdim=True) + norm.eps)
    if norm.weight is not None:
        y = y * norm.weight.float()
    act = torch.sigmoid if norm.activation == "sigmoid" else F.silu
    return (y * act(g.float())).to(o.dtype)


def _rms_norm(norm, o):
    of = o.float()
    y = of * torch.rsqrt(of.square().mean(-1, keepdim=True) + norm.eps)
    return (y * norm.weight.float() if norm.weight is not None else y).to(o.dtype)


def _recur(op, cu_seqlens, xs, h0):
    """``op(*xs, initial_state=h0, output_final_state=True) -> (o, S)`` on [B, T, ...] inputs; packed
    sequences (``cu_seqlens``, B == 1) run as one right-padded batch [N, L, ...]: zero pads write
    nothing and decay nothing (k, beta / write gate and log-decay all 0), and ``h0`` is [N, ...]."""
    if cu_seqlens is None:
        return op(*xs, initial_state=h0, output_final_state=True)
    padded, lengths = pad_packed(list(xs), cu_seqlens, 1)
    o, S = op(*padded, initial_state=h0, output_final_state=True)
    return unpad(o, lengths), S


def _qkv(m, x, state, use_cache, cu_seqlens):
    """q, k, v projections through the short convs (or fla's SiLU without them) + the new conv states."""
    q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    if not m.use_short_conv:
        return F.silu(q), F.silu(k), F.silu(v), None
    conv = (None, None, None) if state is None else state["conv"]
    (q, cq), (k, ck), (v, cv) = (_conv(c, t, s, use_cache, cu_seqlens) for c, t, s in
                                 zip((m.q_conv1d, m.k_conv1d, m.v_conv1d), (q, k, v), conv))
    return q, k, v, (cq, ck, cv)


def _finish(m, x, o, conv, ssm, state, use_cache):
    if not use_cache:
        return o, None
    out = {"ssm": ssm.float(), "seen": (0 if state is None else state["seen"]) + x.shape[1]}
    if conv is not None:
        out["conv"] = conv
    return o, out


def kda_cpu(m, x, state, cu_seqlens, use_cache):
    """fla.layers.KimiDeltaAttention through fla.ops.kda.naive.naive_recurrent_kda."""
    from fla.ops.kda.gate import naive_kda_gate
    from fla.ops.kda.naive import naive_recurrent_kda
    if m.lower_bound is not None or m.safe_gate:
        raise ValueError(f"mixer {m.mixer_name!r}: lower_bound / safe_gate have no CPU path; leave them unset on CPU")
    B, T, _ = x.shape
    q, k, v, conv = _qkv(m, x, state, use_cache, cu_seqlens)
    q = F.normalize(q.view(B, T, m.num_heads, m.head_k_dim).float(), dim=-1)   # use_qk_l2norm_in_kernel
    k = F.normalize(k.view(B, T, m.num_heads, m.head_k_dim).float(), dim=-1)
    v = v.view(B, T, m.num_v_heads, m.head_v_dim)
    g = naive_kda_gate(m.f_proj(x).view(B, T, m.num_v_heads, m.head_k_dim), m.A_log, m.dt_bias)
    beta = m.b_proj(x).float().sigmoid() * (2.0 if m.allow_neg_eigval else 1.0)
    o, ssm = _recur(naive_recurrent_kda, cu_seqlens, (q, k, v.float(), g, beta),
                    None if state is None else state["ssm"])
    gate = m.g_proj(x).view(B, T, m.num_v_heads, m.head_v_dim)
    o = _gated_rms_norm(m.o_norm, o.to(x.dtype), gate)
    return _finish(m, x, m.o_proj(o.reshape(B, T, m.value_dim)), conv, ssm, state, use_cache)


def deltanet_cpu(m, x, state, cu_seqlens, use_cache):
    """fla.layers.DeltaNet through fla.ops.delta_rule.naive.delta_rule_recurrence."""
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    if m.qk_activation != "silu" or m.qk_norm != "l2":
        raise ValueError(f"mixer {m.mixer_name!r}: the CPU path takes qk_activation='silu', qk_norm='l2' "
                         f"(got {m.qk_activation!r}, {m.qk_norm!r})")
    B, T, _ = x.shape
    q, k, v, conv = _qkv(m, x, state, use_cache, cu_seqlens)
    q = F.normalize(q.view(B, T, m.num_heads, m.head_k_dim).float(), dim=-1)
    k = F.normalize(k.view(B, T, m.num_heads, m.head_k_dim).float(), dim=-1)
    v = v.view(B, T, m.num_heads, m.head_v_dim).float()
    beta = m.b_proj(x).float().sigmoid() if m.use_beta else q.new_ones(B, T, m.num_heads)
    beta = beta * (2.0 if m.allow_neg_eigval else 1.0)
    def head_major(q, k, v, beta, **kw):   # the naive reference takes [B, H, T, K]
        o, S = delta_rule_recurrence(*(t.transpose(1, 2) for t in (q, k, v, beta)), **kw)
        return o.transpose(1, 2), S
    o, ssm = _recur(head_major, cu_seqlens, (q, k, v, beta), None if state is None else state["ssm"])
    o = o.to(x.dtype)
    if m.use_gate:
        o = _gated_rms_norm(m.o_norm, o, m.g_proj(x).view(B, T, m.num_heads, m.head_v_dim))
    else:
        o = _rms_norm(m.o_norm, o)
    return _finish(m, x, m.o_proj(o.reshape(B, T, m.value_dim)), conv, ssm, state, use_cache)


def gdn2_cpu(m, x, state, cu_seqlens, use_cache):
    """fla.layers.GatedDeltaNet2 through fla.ops.gdn2.naive.naive_recurrent_gdn2."""
    from fla.ops.gdn2.naive import naive_recurrent_gdn2
    B, T, _ = x.shape
    H, HV, K, V = m.num_heads, m.num_v_heads, m.head_k_dim, m.head_v_dim
    q, k, v, conv = _qkv(m, x, state, use_cache, cu_seqlens)
    q = F.normalize(q.view(B, T, H, K).float(), dim=-1)   # use_qk_l2norm_in_kernel
    k = F.normalize(k.view(B, T, H, K).float(), dim=-1)
    g = -m.A_log.float().exp()[:, None] * F.softplus(m.f_proj(x).float() + m.dt_bias).view(B, T, H, K)
    b = m.b_proj(x).float().sigmoid().view(B, T, H, K) * (2.0 if m.allow_neg_eigval else 1.0)
    w = m.w_proj(x).float().sigmoid().view(B, T, HV, V)
    # GVA: the q/k-side tensors broadcast to the value heads (value head j reads q/k head j // (HV // H))
    q, k, g, b = (t.repeat_interleave(HV // H, 2) for t in (q, k, g, b))
    o, ssm = _recur(naive_recurrent_gdn2, cu_seqlens, (q, k, v.view(B, T, HV, V).float(), g, b, w),
                    None if state is None else state["ssm"])
    o = _gated_rms_norm(m.o_norm, o.to(x.dtype), m.g_proj(x).view(B, T, HV, V))
    return _finish(m, x, m.o_proj(o.reshape(B, T, m.value_dim)), conv, ssm, state, use_cache)


_GATE_FNS = {"swish": F.silu, "silu": F.silu, "sigmoid": torch.sigmoid}


def gla_cpu(m, x, state, cu_seqlens, use_cache):
    """fla.layers.GatedLinearAttention through fla.ops.gla.naive.naive_recurrent_gla."""
    from fla.ops.gla.naive import naive_recurrent_gla
    if m.feature_map_fn is not None:
        raise ValueError(f"mixer {m.mixer_name!r}: feature_map has no CPU path (fla's activations are Triton "
                         "kernels); leave it None on CPU")
    B, T, _ = x.shape
    H, K, V, G = m.num_heads, m.head_k_dim, m.head_v_dim, m.num_kv_groups
    if m.use_short_conv:
        conv = (None, None, None) if state is None else state["conv"]
        (q, cq), (k, ck), (v, cv) = (_conv(c, t, s, use_cache, cu_seqlens) for c, t, s in zip(
            (m.q_conv1d, m.k_conv1d, m.v_conv1d), (m.q_proj(x), m.k_proj(x), m.v_proj(x)), conv))
        conv = (cq, ck, cv)
    else:   # GLA applies no activation without the convs (unlike the delta-rule layers)
        q, k, v, conv = m.q_proj(x), m.k_proj(x), m.v_proj(x), None
    gk = m.gk_proj(x)
    # MQA-style groups: each k/v head serves num_kv_groups consecutive query heads
    q = q.view(B, T, H, K)
    k, gk = (t.view(B, T, H // G, K).repeat_interleave(G, 2) for t in (k, gk))
    v = v.view(B, T, H // G, V).repeat_interleave(G, 2)
    gk = F.logsigmoid(gk.float()) / m.gate_logit_normalizer
    if m.clamp_min is not None:
        gk = gk.clamp_min(m.clamp_min)
    o, ssm = _recur(naive_recurrent_gla, cu_seqlens, (q.float(), k.float(), v.float(), gk),
                    None if state is None else state["ssm"])
    o = o.to(x.dtype)
    if m.use_output_gate and m.fuse_norm_and_gate:
        o = _gated_rms_norm(m.g_norm_swish_gate, o, m.g_proj(x).view(B, T, H, V)).reshape(B, T, -1)
    else:
        o = _rms_norm(m.g_norm, o).reshape(B, T, -1)
        if m.use_output_gate:
            o = o * _gate_fn(m)(m.g_proj(x))
    return _finish(m, x, m.o_proj(o), conv, ssm, state, use_cache)


def _gate_fn(m):
    # fla builds gate_fn from its ACT2FN table (Triton activations on CUDA); the name is read back
    from fla.modules.activations import ACT2FN
    name = next((n for n, f in ACT2FN.items() if f is m.gate_fn), None)
    if name not in _GATE_FNS:
        raise ValueError(f"mixer {m.mixer_name!r}: gate_fn {name!r} has no CPU path; allowed: {sorted(_GATE_FNS)}")
    return _GATE_FNS[name]


def _token_shift(x, cache, cu_seqlens):
    """RWKV's token shift: (previous token's input - x, the new cache: each sequence's last input
    [N, D]); the previous input of a sequence's first token is its carried cache (zeros without)."""
    if cu_seqlens is None:
        (xp,), lengths = (x,), [x.shape[1]] * x.shape[0]
    else:
        (xp,), lengths = pad_packed([x], cu_seqlens, 1)
    first = xp.new_zeros(xp.shape[0], 1, xp.shape[-1]) if cache is None else cache[:, None].to(xp.dtype)
    delta = torch.cat([first, xp[:, :-1]], 1) - xp
    last = torch.stack([xp[i, n - 1] for i, n in enumerate(lengths)])
    return (delta if cu_seqlens is None else unpad(delta, lengths)), last


def rwkv7_cpu(m, x, state, cu_seqlens, use_cache):
    """fla.layers.RWKV7Attention through fla's naive DPLR recurrence (fla.ops.generalized_delta_rule.
    dplr.naive.dplr_recurrence, the op chunk_rwkv7 runs) and fla's torch references of its addcmul,
    k update and output correction. As every vlt rwkv7 layer, RWKV-7's layer 0: v_first = v."""
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence
    from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7
    from fla.ops.rwkv7.fused_k_update import k_update_ref
    from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref
    B, T, _ = x.shape
    H, K, V = m.num_heads, m.head_dim, m.head_v_dim
    delta, shift = _token_shift(x, None if state is None else state["shift"], cu_seqlens)
    xr, xw, xk, xv, xa, xg = torch_addcmul_rwkv7(x, delta, m.x_r, m.x_w, m.x_k, m.x_v, m.x_a, m.x_g)
    r, k, v = m.r_proj(xr), m.k_proj(xk), m.v_proj(xv)
    w = -0.6065306597126334 * m.w_lora(xw).sigmoid()   # log-decay in [-exp(-0.5), 0], as fla's layer
    a, g = m.a_lora(xa).sigmoid(), m.g_lora(xg)
    kk = F.normalize((k * m.k_k).view(B, T, H, K), dim=-1)
    k = k_update_ref(k, a, m.k_a)
    r, w, k, a = (t.view(B, T, H, K) for t in (r, w, k, a))
    v = v.view(B, T, H, V)

    def head_major(r, k, v, alpha, beta, gk, initial_state, output_final_state):
        # S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1}^T alpha_t) beta_t^T + k_t v_t^T (state [K, V]);
        # the naive op scales q by K^-1/2, RWKV-7 by 1: r comes in pre-multiplied by K^1/2
        o, S = dplr_recurrence(*(t.transpose(1, 2).float() for t in (r * K ** 0.5, k, v, alpha, beta, gk)),
                               initial_state=initial_state, output_final_state=output_final_state)
        return o.transpose(1, 2), S
    o, ssm = _recur(head_major, cu_seqlens, (r, k, v, -kk, kk * a, w), None if state is None else state["ssm"])
    o = o.to(x.dtype).reshape(B, T, H * V)
    if isinstance(m.g_norm, torch.nn.GroupNorm):
        o = m.g_norm(o.reshape(B * T, -1)).view(B, T, -1)
    else:   # fla's fused GroupNorm (fuse_norm=True): per-head layer norm with its affine
        of = o.float().view(B, T, H, V)
        if not m.g_norm.is_rms_norm:
            of = of - of.mean(-1, keepdim=True)
        of = of * torch.rsqrt(of.square().mean(-1, keepdim=True) + m.g_norm.eps)
        of = of.reshape(B, T, -1)
        if m.g_norm.weight is not None:
            of = of * m.g_norm.weight.float() + (0 if m.g_norm.bias is None else m.g_norm.bias.float())
        o = of.to(x.dtype)
    o = m.o_proj(gate_output_correction_ref(o, r, k, m.r_k, v, g))
    if not use_cache:
        return o, None
    return o, {"shift": shift, "ssm": ssm.float(), "seen": (0 if state is None else state["seen"]) + T}


def mamba2_path(m, x, state, cu_seqlens, use_cache):
    """fla.layers.Mamba2 on vlt's kernels, on every device.

    Mamba-2's SSD is decayed linear attention with a scalar decay per head: with dt = softplus(dt_raw
    + dt_bias), h_t = exp(dt_t A) h_{t-1} + B_t (dt_t x_t)^T and y_t = C_t^T h_t + D x_t, i.e. q = C,
    k = B, v = dt x, g = dt A, scale 1 - ``vlt.kernels.linear_attention`` (fla's simple-GLA kernels on
    CUDA, the chunked torch path elsewhere) with the causal conv on ``vlt.kernels.short_conv``. fla's
    own Mamba2 forward is not used on CUDA either: without mamba_ssm it ignores ``cu_seqlens``
    (packed samples would leak into each other) and refuses a prefill that continues a state, both of
    which vlt's contract needs. fla's parameters and their names are kept. Head h reads B/C group
    h // (num_heads // n_groups), as mamba_ssm's kernels do.
    """
    from vlt.kernels import linear_attention, short_conv
    if m.activation not in ("silu", "swish"):
        raise ValueError(f"mixer {m.mixer_name!r}: hidden_act={m.activation!r} is not supported; allowed: silu, swish")
    B, T, _ = x.shape
    H, P, N, G, inner = m.num_heads, m.head_dim, m.ssm_state_size, m.n_groups, m.intermediate_size
    gate, xbc, dt = m.in_proj(x).split([inner, m.conv_dim, H], dim=-1)
    xbc, conv = short_conv(xbc, m.conv1d.weight[:, 0], m.conv1d.bias, activation="silu",
                           conv_state=None if state is None else state["conv"], output_final_state=use_cache,
                           cu_seqlens=cu_seqlens)
    xs, Bm, Cm = xbc.split([inner, G * N, G * N], dim=-1)
    dt = F.softplus(dt.float() + m.dt_bias.float()).clamp(*m.dt_limit)          # [B, T, H]
    xs = xs.view(B, T, H, P)
    Bm, Cm = (t.view(B, T, G, N).repeat_interleave(H // G, 2) for t in (Bm, Cm))
    h0 = None if state is None else state["ssm"].transpose(-1, -2)              # vlt/fla [H, P, N] -> [H, N, P]
    o, S = linear_attention(Cm, Bm, xs * dt[..., None].to(xs.dtype), dt * -m.A_log.float().exp(), scale=1.0,
                            initial_state=h0, output_final_state=use_cache, cu_seqlens=cu_seqlens)
    y = (o + xs * m._get_D(expand_to_head_dim=True).to(xs.dtype)).reshape(B, T, inner)
    if not m.rmsnorm:
        y = y * F.silu(gate)
    elif x.device.type == "cuda":
        y = m.norm(y, gate)
    else:
        from fla.modules.norm.layernorm_gated import rms_norm_ref
        y = rms_norm_ref(y, m.norm.weight, None, z=gate, eps=m.norm.eps, group_size=m.norm.group_size,
                         norm_before_gate=m.norm.norm_before_gate)
    out = m.out_proj(y.to(x.dtype))
    if not use_cache:
        return out, None
    return out, {"conv": conv, "ssm": S.transpose(-1, -2).float().contiguous(),
                 "seen": (0 if state is None else state["seen"]) + T}


#: kind (layers/fla_mixers.SHORT_NAMES) -> CPU path
CPU_PATHS = {"kda": kda_cpu, "deltanet": deltanet_cpu, "gdn2": gdn2_cpu, "gla": gla_cpu, "rwkv7": rwkv7_cpu,
             "mamba2": mamba2_path}
#: kinds whose path here also runs on CUDA instead of fla's forward (see mamba2_path)
EVERY_DEVICE = {"mamba2"}
# Not here: nsa, moba and any fla:Class: they raise the ValueError in FlaMixer.forward on CPU.
