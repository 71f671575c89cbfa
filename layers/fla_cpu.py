"""CPU paths of fla-backed mixers: the layer's own parameters run through fla's pure-PyTorch naive
reference for its op (token-by-token recurrences), vlt's torch short conv and torch norms.

Each path mirrors the fla layer's forward (fla/layers/<layer>.py, fla 0.6.0) step by step and takes
and returns the state in vlt's format (layers/fla_mixers.py), so a state from a CPU prefill
continues on CUDA and back. Packed ``cu_seqlens`` run each sequence on its own (nothing can cross a
boundary); the naive references take no ``cu_seqlens``. Speed is not a goal here: they are for
tests, tiny CPU runs and as the readable reference of what the CUDA path computes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlt.kernels import short_conv


def _conv(conv, x, state, use_cache):
    """fla's ShortConvolution (an nn.Conv1d [C, 1, W] with an optional bias and activation) on
    vlt's torch causal conv; the state is vlt's [B, C, W-1]."""
    act = getattr(conv, "activation", None)
    if act not in (None, "silu", "swish"):
        raise ValueError(f"short conv activation {act!r} has no CPU path; allowed: silu, None")
    return short_conv(x, conv.weight[:, 0], conv.bias, activation="silu" if act else None, conv_state=state,
                      output_final_state=use_cache, backend="torch")


def _gated_rms_norm(norm, o, g):
    """fla's FusedRMSNormGated: rmsnorm(o) * weight * act(g), in fp32."""
    of = o.float()
    y = of * torch.rsqrt(of.square().mean(-1, keepdim=True) + norm.eps) * norm.weight.float()
    act = torch.sigmoid if norm.activation == "sigmoid" else F.silu
    return (y * act(g.float())).to(o.dtype)


def _rms_norm(norm, o):
    of = o.float()
    y = of * torch.rsqrt(of.square().mean(-1, keepdim=True) + norm.eps)
    return (y * norm.weight.float() if norm.weight is not None else y).to(o.dtype)


def _packed(path, m, x, state, cu_seqlens, use_cache):
    """Run ``path`` on each packed sequence (row i of ``state`` for sequence i) and join the outputs
    along T and the states along the batch."""
    bounds = cu_seqlens.tolist()
    ys, states = [], []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        row = None if state is None else _take_row(state, i)
        y, s = path(m, x[:, a:b], row, None, use_cache)
        ys.append(y)
        states.append(s)
    y = torch.cat(ys, 1)
    if not use_cache:
        return y, None
    return y, _cat_rows(states)


def _take_row(tree, i):
    if isinstance(tree, torch.Tensor):
        return tree[i:i + 1]
    if isinstance(tree, dict):
        return {k: _take_row(v, i) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_take_row(v, i) for v in tree)
    return tree


def _cat_rows(trees):
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(trees, 0)
    if isinstance(first, dict):
        return {k: _cat_rows([t[k] for t in trees]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_cat_rows(list(parts)) for parts in zip(*trees))
    return first


def _qkv(m, x, state, use_cache):
    """q, k, v projections through the short convs (or fla's SiLU without them) + the new conv states."""
    q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    if not m.use_short_conv:
        return F.silu(q), F.silu(k), F.silu(v), None
    conv = (None, None, None) if state is None else state["conv"]
    (q, cq), (k, ck), (v, cv) = (_conv(c, t, s, use_cache) for c, t, s in
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
    if cu_seqlens is not None:
        return _packed(kda_cpu, m, x, state, cu_seqlens, use_cache)
    B, T, _ = x.shape
    q, k, v, conv = _qkv(m, x, state, use_cache)
    q = F.normalize(q.view(B, T, m.num_heads, m.head_k_dim).float(), dim=-1)   # use_qk_l2norm_in_kernel
    k = F.normalize(k.view(B, T, m.num_heads, m.head_k_dim).float(), dim=-1)
    v = v.view(B, T, m.num_v_heads, m.head_v_dim)
    g = naive_kda_gate(m.f_proj(x).view(B, T, m.num_v_heads, m.head_k_dim), m.A_log, m.dt_bias)
    beta = m.b_proj(x).float().sigmoid() * (2.0 if m.allow_neg_eigval else 1.0)
    o, ssm = naive_recurrent_kda(q, k, v.float(), g, beta, initial_state=None if state is None else state["ssm"],
                                 output_final_state=True)
    gate = m.g_proj(x).view(B, T, m.num_v_heads, m.head_v_dim)
    o = _gated_rms_norm(m.o_norm, o.to(x.dtype), gate)
    return _finish(m, x, m.o_proj(o.reshape(B, T, m.value_dim)), conv, ssm, state, use_cache)


def deltanet_cpu(m, x, state, cu_seqlens, use_cache):
    """fla.layers.DeltaNet through fla.ops.delta_rule.naive.delta_rule_recurrence."""
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    if m.qk_activation != "silu" or m.qk_norm != "l2":
        raise ValueError(f"mixer {m.mixer_name!r}: the CPU path takes qk_activation='silu', qk_norm='l2' "
                         f"(got {m.qk_activation!r}, {m.qk_norm!r})")
    if cu_seqlens is not None:
        return _packed(deltanet_cpu, m, x, state, cu_seqlens, use_cache)
    B, T, _ = x.shape
    q, k, v, conv = _qkv(m, x, state, use_cache)
    q = F.normalize(q.view(B, T, m.num_heads, m.head_k_dim).float(), dim=-1)
    k = F.normalize(k.view(B, T, m.num_heads, m.head_k_dim).float(), dim=-1)
    v = v.view(B, T, m.num_heads, m.head_v_dim).float()
    beta = m.b_proj(x).float().sigmoid() if m.use_beta else q.new_ones(B, T, m.num_heads)
    beta = beta * (2.0 if m.allow_neg_eigval else 1.0)
    # the naive reference is head-major [B, H, T, K]
    o, ssm = delta_rule_recurrence(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), beta.transpose(1, 2),
                                   initial_state=None if state is None else state["ssm"], output_final_state=True)
    o = o.transpose(1, 2).to(x.dtype)
    if m.use_gate:
        o = _gated_rms_norm(m.o_norm, o, m.g_proj(x).view(B, T, m.num_heads, m.head_v_dim))
    else:
        o = _rms_norm(m.o_norm, o)
    return _finish(m, x, m.o_proj(o.reshape(B, T, m.value_dim)), conv, ssm, state, use_cache)


#: kind (layers/fla_mixers.SHORT_NAMES) -> CPU path
CPU_PATHS = {"kda": kda_cpu, "deltanet": deltanet_cpu}
# Not here: mamba2 (fla's torch_forward still calls its Triton swish), gdn2, gla, rwkv7, nsa, moba and
# any fla:Class: they raise the ValueError in FlaMixer.forward on CPU.
