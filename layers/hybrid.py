"""Intra-layer hybrid: several mixers read the same input and their outputs are combined.

``hybrid`` takes ``branches`` - a list of mixer names or ``{"mixer": name, **options}`` - and a
``combine`` rule: "mean", "sum", or "learned" (softmax-normalised per-branch weights, starting
equal). ``swa_gdn`` is the common case pre-filled: a sliding-window branch for exact local recall
and a GDN branch for unbounded context, as in the hybrid layers of the SWA/linear literature.
Each branch keeps its own projection names (``branches.0.q_proj`` ...), so LoRA targets by
suffix still match.
"""
from __future__ import annotations

import torch
from torch import nn

from vlt.layers.base import TokenMixer
from vlt.layers.registry import check_mixer_options, register_mixer, mixer_options

COMBINE = ("mean", "sum", "learned")
# Options the composer passes to every mixer; a hybrid forwards those its branch accepts.
_SHARED = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "rope_theta", "mrope_section",
           "norm_eps", "layer_idx")


def _branch_spec(branch, shared: dict, where: str):
    if isinstance(branch, str):
        name, opts = branch, {}
    elif isinstance(branch, dict) and "mixer" in branch:
        opts = dict(branch)
        name = opts.pop("mixer")
    else:
        raise ValueError(f"{where}each hybrid branch must be a mixer name or a dict with a 'mixer' key, got {branch!r}")
    if name in ("hybrid", "swa_gdn"):
        raise ValueError(f"{where}hybrid branches cannot themselves be hybrids")
    from vlt.layers.registry import get_mixer_class
    allowed = mixer_options(get_mixer_class(name))
    merged = {k: v for k, v in shared.items() if k in allowed and v is not None}
    merged.update(opts)
    return name, merged


@register_mixer("hybrid")
class HybridMixer(TokenMixer):
    def __init__(self, hidden_size: int, num_heads: int, branches: list, combine: str = "mean",
                 num_kv_heads: int | None = None, head_dim: int | None = None, rope_theta: float | None = None,
                 mrope_section: list[int] | None = None, norm_eps: float | None = None,
                 layer_idx: int | None = None):
        super().__init__()
        from vlt.layers.registry import create_mixer
        shared = dict(hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      rope_theta=rope_theta, mrope_section=mrope_section, norm_eps=norm_eps, layer_idx=layer_idx)
        specs = [_branch_spec(b, shared, "") for b in branches]
        self.branch_names = [n for n, _ in specs]
        self.branches = nn.ModuleList([create_mixer(n, **o) for n, o in specs])
        self.combine = combine
        if combine == "learned":
            self.branch_logits = nn.Parameter(torch.zeros(len(specs)))
        self.state_grows = any(b.state_grows for b in self.branches)

    @classmethod
    def validate_options(cls, where="", branches=None, combine="mean", **shared):
        if not isinstance(branches, (list, tuple)) or len(branches) < 2:
            raise ValueError(f"{where}hybrid needs 'branches': a list of at least two mixers, got {branches!r}")
        if combine not in COMBINE:
            raise ValueError(f"{where}combine={combine!r}; allowed: {list(COMBINE)}")
        shared = {k: v for k, v in shared.items() if k in _SHARED}
        for i, b in enumerate(branches):
            name, opts = _branch_spec(b, shared, where)
            check_mixer_options(name, opts, f"{where}branches[{i}]: ")

    def _weights(self, n):
        if self.combine == "mean":
            return [1.0 / n] * n
        if self.combine == "sum":
            return [1.0] * n
        return list(self.branch_logits.softmax(0).unbind(0))

    def state_spec(self, batch_size, capacity, dtype=torch.bfloat16):
        return [b.state_spec(batch_size, capacity, dtype) for b in self.branches]

    def forward(self, x, *, state=None, cu_seqlens=None, position_ids=None, use_cache=False):
        states = state or [None] * len(self.branches)
        y, new = 0, []
        for w, branch, s in zip(self._weights(len(self.branches)), self.branches, states):
            out, ns = branch(x, state=s, cu_seqlens=cu_seqlens, position_ids=position_ids, use_cache=use_cache)
            y = y + w * out
            new.append(ns)
        return y, (new if use_cache else None)


@register_mixer("swa_gdn")
class SWAGDNHybrid(HybridMixer):
    def __init__(self, hidden_size: int, num_heads: int, window: int = 4096, expand_v: float = 2.0,
                 combine: str = "mean", num_kv_heads: int | None = None, head_dim: int | None = None,
                 rope_theta: float | None = None, mrope_section: list[int] | None = None,
                 norm_eps: float | None = None, layer_idx: int | None = None):
        super().__init__(hidden_size, num_heads, [{"mixer": "swa", "window": window},
                                                  {"mixer": "gdn", "expand_v": expand_v}],
                         combine, num_kv_heads, head_dim, rope_theta, mrope_section, norm_eps, layer_idx)

    @classmethod
    def validate_options(cls, where="", window=4096, expand_v=2.0, combine="mean", **shared):
        branches = [{"mixer": "swa", "window": window}, {"mixer": "gdn", "expand_v": expand_v}]
        HybridMixer.validate_options(where, branches, combine, **shared)
