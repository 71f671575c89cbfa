"""The engine's step for fla's delta-rule and linear-attention layers (``kda``, ``gdn2``, ``deltanet``,
``gla``: layers/fla_mixers.py): the cache is held in fla's own layer-cache layout, so fla's forward
updates it where it lies.

vlt's state format (the mixer's ``forward``/``step``) keeps the W-1 inputs each short conv still needs
and the recurrent state [B, HV, K, V]; fla's cache holds W columns per conv (its update kernel shifts
the window in place and never reads the oldest one) and, for KDA and GLA, the state as [B, HV, V, K].
Through the generic step each decode token converted the engine's cache to fla's (a padded copy of
the convs), ran fla, and copied the new state back: on an H200 (2026-12-02, `vlt bench mixers`) that
made vlt's DeltaNet decode 1.13-1.16x fla's own 41-us layer step. Here the cache *is* fla's: the
convs are updated in place by fla's kernel, and only the recurrent state fla returns as a new tensor
is copied into the cache (one kernel). ``load`` / ``export`` convert from / to vlt's format, so
prefill, snapshots and ``VideoStream``'s carried state are unchanged.

On CPU fla's kernels do not run; the step runs the mixer's own torch path (layers/fla_cpu.py) on views
of the same cache (vlt's format: the last W-1 conv columns, the state transposed where fla's is V
first), then writes the new state back: the same cache layout and results on both devices. Steps of
T > 1 tokens (a video frame, a prompt chunk) take that path on CUDA too (the mixer's forward, there
fla's, with its state converted as in a split prefill): they are rare next to decode tokens, and the
in-place path is the one the GPU tests cover (engine decode == eager, 2026-12-02).
"""
from __future__ import annotations

import torch

from vlt.inference.steps import MixerStep, _copy_tree, _rows, _with_seen, generic_forward, tensors

#: fla layers whose engine cache is fla's layout (their vlt state: {"ssm", "conv": (q, k, v)})
KINDS = ("kda", "gdn2", "deltanet", "gla")


def handles(mixer) -> bool:
    return getattr(mixer, "fla_class", None) is not None and getattr(mixer, "kind", None) in KINDS


def _v_first(m) -> bool:
    from vlt.layers.fla_mixers import _V_FIRST
    return m.kind in _V_FIRST


def _vlt_view(m, cache):
    """vlt's state format as views of the fla-layout cache (no copy)."""
    ssm = cache["recurrent_state"]
    out = {"ssm": ssm.transpose(-1, -2) if _v_first(m) else ssm}
    if cache["conv_state"] is not None:
        out["conv"] = tuple(c[..., 1:] for c in cache["conv_state"])
    return out


class FlaDeltaStep(MixerStep):
    def allocate(self, m, batch, capacity, dtype, device):
        spec = m.state_spec(batch, capacity, dtype)
        B, HV, K, V = spec["ssm"].shape
        shape = (B, HV, V, K) if _v_first(m) else (B, HV, K, V)
        conv = None
        if "conv" in spec:   # W columns, as fla's ShortConvolution cache
            conv = tuple(torch.zeros(*s.shape[:-1], s.shape[-1] + 1, dtype=s.dtype, device=device)
                         for s in spec["conv"])
        return {"recurrent_state": torch.zeros(shape, dtype=spec["ssm"].dtype, device=device), "conv_state": conv}

    def state_nbytes(self, m, cache) -> int:
        """vlt's declared state (W-1 conv columns): the unused oldest column is fla's layout, not state."""
        return sum(t.numel() * t.element_size() for t in tensors(_vlt_view(m, cache)))

    def load(self, m, cache, state, row, seen):
        _copy_tree(_vlt_view(m, cache), state, row, type(m).__name__)   # through the views, into fla's layout
        for c in cache["conv_state"] or ():
            c[row, :, 0] = 0   # fla never reads it; zero keeps a loaded row equal to a fresh one

    def export(self, m, cache, row, seen):
        return _with_seen(_rows(_vlt_view(m, cache), row), seen)

    def __call__(self, m, cache, ctx, x, norm):
        if x.device.type != "cuda" or ctx.T > 1:   # T > 1 (frames, chunks): fla_forward, as a split prefill
            return generic_forward(m, norm, x, _vlt_view(m, cache), ctx.tok, ctx.pos), None
        return _fla_step(m, cache, norm(x) if norm is not None else x), None


@torch.compiler.disable   # fla's Triton launchers are not traceable (the engine compiles around its steps)
def _fla_step(m, cache, h):
    from vlt.kernels.fla_tables import use_shipped_tables
    from vlt.layers.fla_mixers import OneLayerCache
    use_shipped_tables(h.device)
    m.check_fla_can_run(h, cache)
    held = OneLayerCache({"recurrent_state": cache["recurrent_state"], "conv_state": cache["conv_state"],
                          "attn_state": None, "ffn_state": None}, seen=1)
    y = m.fla_class.forward(m, h, past_key_values=held, use_cache=True)[0]
    new = held.state
    if new["recurrent_state"] is not cache["recurrent_state"]:
        cache["recurrent_state"].copy_(new["recurrent_state"])
    for dst, src in zip(cache["conv_state"] or (), new["conv_state"] or ()):
        if src is not dst:   # fla's decode kernel updates the cache in place and returns it; copy if it ever doesn't
            dst.copy_(src)
    return y


FLA_DELTA = FlaDeltaStep()
