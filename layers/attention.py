"""Softmax attention mixers: ``full`` (causal, growing KV cache) and ``swa`` (sliding window,
a ring buffer of the last ``window`` keys/values, so its state is constant after ``window`` tokens).

GQA (num_kv_heads < num_heads), optional q/k/v bias (Qwen2.5 has it), RoPE or M-RoPE
(``mrope_section``), and positions that continue from the carried state.
"""
from __future__ import annotations

import torch
from torch import nn

from vlt.kernels import attention as attention_kernel
from vlt.kernels.rotary import apply_rope
from vlt.layers.base import TensorSpec, TokenMixer, check_heads, check_positive_int, project, seq_positions
from vlt.layers.registry import register_mixer
from vlt.layers.rotary import rope_cos_sin


@register_mixer("full")
class Attention(TokenMixer):
    state_grows = True

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, qkv_bias: bool = False, rope_theta: float = 10000.0,
                 mrope_section: list[int] | None = None, use_rope: bool = True, backend: str = "auto",
                 layer_idx: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.rope_theta, self.mrope_section, self.use_rope = rope_theta, mrope_section, use_rope
        self.backend = backend
        self.window: int | None = None
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    @classmethod
    def validate_options(cls, where="", hidden_size=None, num_heads=None, num_kv_heads=None,
                         head_dim=None, mrope_section=None, window=None, **_):
        check_heads(hidden_size, num_heads, head_dim, num_kv_heads, where)
        check_positive_int(window, "window", where, allow_none=cls is Attention)
        if mrope_section is not None:
            hd = head_dim or hidden_size // num_heads
            if sum(mrope_section) * 2 != hd:
                raise ValueError(f"{where}mrope_section {list(mrope_section)} must sum to head_dim/2 = {hd // 2}")

    # -- state: {"k": [B, L, Hkv, Dh], "v": ..., "seen": tokens so far} ---------------------------
    def _cache_len(self, seen: int) -> int:
        return seen if self.window is None else min(seen, self.window)

    def state_spec(self, batch_size, capacity, dtype=torch.bfloat16):
        kv = TensorSpec((batch_size, self._cache_len(capacity), self.num_kv_heads, self.head_dim), dtype)
        return {"k": kv, "v": kv}

    def _cached_kv(self, state):
        """Cached keys/values in chronological order (the ring buffer unrolled)."""
        k, v, seen = state["k"], state["v"], state["seen"]
        if self.window is None or seen <= self.window:
            return k[:, :seen], v[:, :seen]
        idx = (torch.arange(self.window, device=k.device) + seen) % self.window
        return k[:, idx], v[:, idx]

    def _update_cache(self, state, k_new, v_new):
        T = k_new.shape[1]
        seen = 0 if state is None else state["seen"]
        if state is None or seen == 0:
            k_old, v_old = k_new[:, :0], v_new[:, :0]
        else:
            k_old, v_old = self._cached_kv(state)
        k, v = torch.cat([k_old, k_new], 1), torch.cat([v_old, v_new], 1)   # chronological
        total = seen + T
        if self.window is None or total <= self.window:
            return {"k": k, "v": v, "seen": total}  # full attention: the cache grows with every token
        # Sliding window: exactly `window` slots; position p lives in slot p % window, so a decode
        # step overwrites one slot and the buffer never grows.
        W = self.window
        slots = torch.arange(total - W, total, device=k.device) % W
        ring_k, ring_v = torch.empty_like(k[:, -W:]), torch.empty_like(v[:, -W:])
        ring_k[:, slots], ring_v[:, slots] = k[:, -W:], v[:, -W:]
        return {"k": ring_k, "v": ring_v, "seen": total}

    def forward(self, x, *, state=None, cu_seqlens=None, position_ids=None, use_cache=False):
        B, T, _ = x.shape
        if state is not None and cu_seqlens is not None:
            raise ValueError(f"{self.mixer_name}: a carried state with packed sequences (cu_seqlens) is not "
                             "supported; prefill packed samples without state or decode them one by one")
        seen = 0 if state is None else state["seen"]
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.use_rope:
            if position_ids is None:
                position_ids = seq_positions(T, cu_seqlens, seen, x.device).expand(B, T)
            cos, sin = rope_cos_sin(position_ids, self.head_dim, self.rope_theta, self.mrope_section)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if T == 1 and self.window is not None and seen >= self.window and state is not None:
            # Decode with a full ring: write the new key into its slot (out of place: the caller's
            # state stays valid) and attend over the whole ring, unmasked - the ring holds exactly
            # the `window` visible keys, and softmax does not care about their order.
            s = seen % self.window
            ring_k, ring_v = (torch.cat([r[:, :s], new, r[:, s + 1:]], 1) for r, new in
                              ((state["k"], k), (state["v"], v)))
            o = attention_kernel(q, ring_k, ring_v, window=None, backend=self.backend)
            y = self.o_proj(o.reshape(B, T, -1))
            return y, ({"k": ring_k, "v": ring_v, "seen": seen + 1} if use_cache else None)
        if state is not None and seen > 0:
            k_prev, v_prev = self._cached_kv(state)
            k_all, v_all = torch.cat([k_prev, k], 1), torch.cat([v_prev, v], 1)
        else:
            k_all, v_all = k, v
        o = attention_kernel(q, k_all, v_all, window=self.window, cu_seqlens=cu_seqlens, backend=self.backend)
        y = self.o_proj(o.reshape(B, T, -1))
        if not use_cache:
            return y, None
        if cu_seqlens is not None:
            raise ValueError(f"{self.mixer_name}: use_cache with packed sequences is not supported")
        return y, self._update_cache(state, k, v)


@register_mixer("swa")
class SlidingWindowAttention(Attention):
    state_grows = False

    def __init__(self, hidden_size: int, num_heads: int, window: int = 4096, num_kv_heads: int | None = None,
                 head_dim: int | None = None, qkv_bias: bool = False, rope_theta: float = 10000.0,
                 mrope_section: list[int] | None = None, use_rope: bool = True, backend: str = "auto",
                 layer_idx: int | None = None):
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim, qkv_bias, rope_theta, mrope_section,
                         use_rope, backend, layer_idx)
        self.window = window
