"""Gated DeltaNet (GDN) mixer, as in InfiniteVL / Qwen3-Next / fla's GatedDeltaNet.

x -> q_proj, k_proj (H * K), v_proj, g_proj (HV * V, V = K * expand_v) -> short causal convs
(kernel 4, SiLU) on q, k, v -> L2-normalised q, k -> gated delta rule with
beta = sigmoid(b_proj(x)) and log-decay g = -exp(A_log) * softplus(a_proj(x) + dt_bias)
-> per-head gated RMSNorm(o, g_proj(x)) -> o_proj. No positional encoding.

State: {"conv": (q, k, v) conv states [B, C, kernel-1], "ssm": [B, HV, K, V] fp32, "seen": int},
the same size after 10 tokens or 10 million.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlt.kernels import gated_delta_rule, gated_rms_norm, short_conv
from vlt.layers.base import TensorSpec, TokenMixer, check_heads, check_positive_int, project
from vlt.layers.registry import register_mixer


class ShortConv(nn.Module):
    """Depthwise causal conv with the weight layout of nn.Conv1d ([C, 1, W]) so checkpoints load."""

    def __init__(self, channels: int, kernel_size: int, backend: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.backend = backend

    def forward(self, x, conv_state=None, cu_seqlens=None, use_cache=False):
        return short_conv(x, self.weight[:, 0], activation="silu", conv_state=conv_state,
                          output_final_state=use_cache, cu_seqlens=cu_seqlens, backend=self.backend)


@register_mixer("gdn")
class GatedDeltaNet(TokenMixer):
    def __init__(self, hidden_size: int, num_heads: int, head_dim: int | None = None,
                 num_v_heads: int | None = None, expand_v: float = 2.0, conv_size: int = 4,
                 norm_eps: float = 1e-6, backend: str = "auto", layer_idx: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_v_heads = num_v_heads or num_heads
        self.head_k_dim = head_dim or hidden_size // num_heads
        self.head_v_dim = int(self.head_k_dim * expand_v)
        self.key_dim = self.num_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_size, self.norm_eps, self.backend = conv_size, norm_eps, backend
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.a_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.q_conv1d = ShortConv(self.key_dim, conv_size, backend)
        self.k_conv1d = ShortConv(self.key_dim, conv_size, backend)
        self.v_conv1d = ShortConv(self.value_dim, conv_size, backend)
        # Mamba2-style decay init, as fla: A ~ U(0, 16), dt ~ logU(1e-3, 1e-1), dt_bias = softplus^-1(dt).
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads).uniform_(0, 16).log())
        dt = torch.exp(torch.rand(self.num_v_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.o_norm_weight = nn.Parameter(torch.ones(self.head_v_dim))
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        # A_log / dt_bias are fp32 in every reference implementation: decay precision matters.
        self.A_log._no_weight_decay = self.dt_bias._no_weight_decay = True

    @classmethod
    def validate_options(cls, where="", hidden_size=None, num_heads=None, head_dim=None, num_v_heads=None,
                         expand_v=2.0, conv_size=4, **_):
        check_heads(hidden_size, num_heads, head_dim, where=where)
        check_positive_int(conv_size, "conv_size", where)
        if num_v_heads is not None and num_v_heads % num_heads:
            raise ValueError(f"{where}num_v_heads={num_v_heads} must be a multiple of num_heads={num_heads} (GVA)")
        hk = head_dim or hidden_size // num_heads
        if expand_v <= 0 or int(hk * expand_v) != hk * expand_v:
            raise ValueError(f"{where}expand_v={expand_v} must make head_dim*expand_v a positive integer")

    @torch.no_grad()
    def mimic_init(self):
        """InfiniteVL's init: beta 0.5 (b_proj 0), decay ~0.999 (a_proj 0, A_log 0, dt 1e-3), identity convs."""
        self.a_proj.weight.zero_()
        self.b_proj.weight.zero_()
        self.A_log.zero_()
        dt = torch.tensor(1e-3)
        self.dt_bias.fill_(float(dt + torch.log(-torch.expm1(-dt))))
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.weight.zero_()
            conv.weight[:, 0, -1] = 1.0

    def state_spec(self, batch_size, capacity, dtype=torch.bfloat16):
        W = self.conv_size - 1
        conv = tuple(TensorSpec((batch_size, c, W), dtype) for c in (self.key_dim, self.key_dim, self.value_dim))
        # the recurrent state is kept in fp32 whatever the weights' dtype
        ssm = TensorSpec((batch_size, self.num_v_heads, self.head_k_dim, self.head_v_dim), torch.float32)
        return {"conv": conv, "ssm": ssm}

    def forward(self, x, *, state=None, cu_seqlens=None, position_ids=None, use_cache=False):
        B, T, _ = x.shape
        conv_q, conv_k, conv_v = (None, None, None) if state is None else state["conv"]
        q, k, v, gate, a, b = project(x, self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.a_proj, self.b_proj)
        q, cq = self.q_conv1d(q, conv_q, cu_seqlens, use_cache)
        k, ck = self.k_conv1d(k, conv_k, cu_seqlens, use_cache)
        v, cv = self.v_conv1d(v, conv_v, cu_seqlens, use_cache)
        q = q.view(B, T, self.num_heads, self.head_k_dim)
        k = k.view(B, T, self.num_heads, self.head_k_dim)
        v = v.view(B, T, self.num_v_heads, self.head_v_dim)
        beta = b.float().sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        o, ssm = gated_delta_rule(q, k, v, g, beta, initial_state=None if state is None else state["ssm"],
                                  output_final_state=use_cache, cu_seqlens=cu_seqlens, qk_l2norm=True,
                                  backend=self.backend)
        gate = gate.view(B, T, self.num_v_heads, self.head_v_dim)
        o = gated_rms_norm(o.to(x.dtype), gate, self.o_norm_weight, self.norm_eps, self.backend)
        y = self.o_proj(o.reshape(B, T, self.value_dim))
        if not use_cache:
            return y, None
        seen = 0 if state is None else state["seen"]
        return y, {"conv": (cq, ck, cv), "ssm": ssm, "seen": seen + T}
