"""Linear attention mixer: a feature map on q and k, an optional decay, chunked training and a
constant-size recurrent state [B, H, K, V] for decode.

decay: "none" (plain causal linear attention), "fixed" (a learned per-head decay, RetNet-like) or
"data" (a per-token decay from a_proj, as in GLA/Mamba2). The output is RMS-normalised per head
before o_proj (no denominator), which keeps its scale bounded at any length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlt.kernels import linear_attention, rms_norm
from vlt.layers.base import TensorSpec, TokenMixer, check_heads
from vlt.layers.registry import register_mixer

FEATURE_MAPS = {
    "identity": lambda x: x,
    "elu": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
    "silu": F.silu,
}
DECAYS = ("none", "fixed", "data")


@register_mixer("linear")
class LinearAttention(TokenMixer):
    def __init__(self, hidden_size: int, num_heads: int, head_dim: int | None = None,
                 feature_map: str = "elu", decay: str = "none", norm_eps: float = 1e-6,
                 backend: str = "auto", layer_idx: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.feature_map, self.decay, self.norm_eps, self.backend = feature_map, decay, norm_eps, backend
        inner = num_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)
        self.o_norm_weight = nn.Parameter(torch.ones(self.head_dim))
        if decay == "fixed":  # per-head decays spread over (1 - 2^-5, 1 - 2^-10), as RetNet
            self.log_decay = nn.Parameter(torch.log1p(-2.0 ** (-5 - torch.linspace(0, 5, num_heads))))
        elif decay == "data":
            self.a_proj = nn.Linear(hidden_size, num_heads, bias=True)

    @classmethod
    def validate_options(cls, where="", hidden_size=None, num_heads=None, head_dim=None, feature_map="elu",
                         decay="none", **_):
        check_heads(hidden_size, num_heads, head_dim, where=where)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"{where}feature_map={feature_map!r}; allowed: {sorted(FEATURE_MAPS)}")
        if decay not in DECAYS:
            raise ValueError(f"{where}decay={decay!r}; allowed: {list(DECAYS)}")

    def state_spec(self, batch_size, capacity, dtype=torch.bfloat16):
        return {"ssm": TensorSpec((batch_size, self.num_heads, self.head_dim, self.head_dim), torch.float32)}

    def forward(self, x, *, state=None, cu_seqlens=None, position_ids=None, use_cache=False):
        B, T, _ = x.shape
        phi = FEATURE_MAPS[self.feature_map]
        q = phi(self.q_proj(x).view(B, T, self.num_heads, self.head_dim))
        k = phi(self.k_proj(x).view(B, T, self.num_heads, self.head_dim))
        v = self.v_proj(x).view(B, T, self.num_heads, self.head_dim)
        g = None
        if self.decay == "fixed":
            g = self.log_decay.float().expand(B, T, self.num_heads)
        elif self.decay == "data":
            g = F.logsigmoid(self.a_proj(x).float()) / 16.0  # slow decays at init, as GLA's normaliser
        o, S = linear_attention(q, k, v, g, initial_state=None if state is None else state["ssm"],
                                output_final_state=use_cache, cu_seqlens=cu_seqlens, backend=self.backend)
        o = rms_norm(o.to(x.dtype), self.o_norm_weight, self.norm_eps, self.backend)
        y = self.o_proj(o.reshape(B, T, -1))
        if not use_cache:
            return y, None
        return y, {"ssm": S, "seen": (0 if state is None else state["seen"]) + T}
