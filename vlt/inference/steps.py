"""Per-mixer in-place steps of the inference engine, registered by mixer class.

A step runs T new tokens (T = 1: decode; T > 1: a video frame or a prompt chunk) of one layer's mixer
on the engine's preallocated cache, updating it in place with every index on the device, so the
engine can capture the whole decoder in one CUDA graph. ``register_step(MixerClass)`` binds a
``MixerStep`` to a class and its subclasses (looked up along the MRO, so ``swa`` inherits ``full``'s
step and ``swa_gdn`` the hybrid's); any other mixer, a user's own included, gets ``GenericStep``:
its own forward on the cached state, the new state copied back in place; one whose state grows per
token (``state_grows``: fla's nsa, moba) gets ``GrowingStateStep`` (vlt.inference.growing_step);
fla's delta-rule layers (kda, gdn2, deltanet, gla) get ``FlaDeltaStep``, which holds their cache in fla's
layout so fla's kernels update it in place (vlt.inference.fla_step).

A ``MixerStep`` answers four things:
- ``allocate``: the cache of one layer, from the mixer's ``state_spec`` (plus any bookkeeping);
- ``load`` / ``export``: a state from an ordinary prefill (``model(..., use_cache=True)``) into row
  ``b`` of the cache, and back (both ways exact);
- ``__call__(mixer, cache, ctx, x, norm)``: the step on the block input ``x`` [B, T, D] (``norm``:
  the block's input norm, or None when ``x`` is normed already, as inside a hybrid) -> (y, o_proj):
  the mixer output before ``o_proj`` and that Linear (None when y is final), so the engine can fuse
  the output projection with the residual add.

Caches hold every row's tokens-seen counter ``ctx.tok`` [B] (the write index) apart from the RoPE
positions ``ctx.pos`` (M-RoPE makes them differ after images).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vlt.kernels import chunk_attention as chunk_kernel
from vlt.kernels import decode_attention as attn_kernel
from vlt.kernels import gdn_decode
from vlt.kernels import gemv as gemv_kernel
from vlt.kernels.rotary import apply_rope
from vlt.layers import RMSNorm, TensorSpec, project
from vlt.layers.attention import Attention
from vlt.layers.gdn import GatedDeltaNet
from vlt.layers.hybrid import HybridMixer

_STEPS: dict[type, "MixerStep"] = {}


def register_step(mixer_cls: type):
    """Class decorator: ``@register_step(MyMixer) class MyStep(MixerStep)`` - the engine runs
    ``MyStep()`` for MyMixer and its subclasses."""
    def wrap(step_cls):
        _STEPS[mixer_cls] = step_cls()
        return step_cls
    return wrap


def step_for(mixer) -> "MixerStep":
    for cls in type(mixer).__mro__:
        if cls in _STEPS:
            return _STEPS[cls]
    from vlt.inference.fla_step import FLA_DELTA, handles
    if handles(mixer):   # fla's delta-rule layers: the cache in fla's layout, updated in place
        return FLA_DELTA
    if getattr(mixer, "state_grows", False):
        from vlt.inference.growing_step import GROWING
        return GROWING
    return GENERIC


def capturable(mixer) -> bool:
    """Whether the mixer's step (and its branches' steps) can run inside a CUDA graph."""
    return step_for(mixer).capturable and all(capturable(b) for b in getattr(mixer, "branches", ()))


@dataclass
class StepContext:
    """What every layer's step of one engine step shares (built once per step, inside the graph)."""
    tok: torch.Tensor                 # [B] long: tokens each row has seen before this step
    pos: torch.Tensor                 # [B, T] or [3, B, T] long: RoPE positions of the new tokens
    T: int
    fast: bool = False                # batch-1 GEMV kernels (vlt.kernels.gemv) for the projections
    fused_gdn: bool = False           # the fused Triton GDN decode step (T == 1)
    decode_attention: bool = False    # the split decode attention kernel (T == 1)
    chunk_attention: bool = False     # the split chunk attention kernel (T > 1; vlt.kernels.chunk_attention)
    rope: dict = field(default_factory=dict)   # (head_dim, theta, sections) -> (cos, sin), shared by layers
    rope_tables: object = None        # fn(pos, head_dim, theta, sections) -> (cos, sin)
    compiled: object = None           # fn -> the engine's torch.compile'd fn (None: run as is)

    def jit(self, fn):
        return fn if self.compiled is None else self.compiled(fn)


def allocate_spec(spec, device):
    if isinstance(spec, TensorSpec):
        return torch.zeros(spec.shape, dtype=spec.dtype, device=device)
    if isinstance(spec, dict):
        return {k: allocate_spec(v, device) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return type(spec)(allocate_spec(v, device) for v in spec)
    raise TypeError(f"state_spec leaves must be TensorSpec, got {type(spec).__name__}")


def _copy_tree(dst, src, row, where):
    """Copy tensors of ``src`` (batch 1 or the full batch) into ``dst``'s row ``row`` (None: all rows)."""
    if isinstance(dst, torch.Tensor):
        if not isinstance(src, torch.Tensor):
            raise ValueError(f"{where}: the mixer's state has {type(src).__name__} where its state_spec "
                             "declares a tensor")
        target = dst if row is None else dst[row:row + 1]
        if src.shape != target.shape:
            raise ValueError(f"{where}: state tensor of shape {tuple(src.shape)} does not match the declared "
                             f"{tuple(target.shape)}; make state_spec describe what forward returns")
        target.copy_(src)
        return
    if isinstance(dst, dict):
        for k, v in dst.items():
            if k not in src:
                raise ValueError(f"{where}: the mixer's state has no key {k!r} declared by its state_spec")
            _copy_tree(v, src[k], row, f"{where}.{k}")
        return
    for i, (d, s) in enumerate(zip(dst, src)):
        _copy_tree(d, s, row, f"{where}[{i}]")


def leaves(tree):
    """The leaves of a nested dict / list / tuple (a cache, a state declaration), in a fixed order."""
    if isinstance(tree, dict):
        for v in tree.values():
            yield from leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from leaves(v)
    else:
        yield tree


def tensors(tree):
    """The tensors of a (nested) cache, in a fixed order."""
    return (x for x in leaves(tree) if isinstance(x, torch.Tensor))


def _rows(tree, row):
    if isinstance(tree, torch.Tensor):
        return tree[row:row + 1].clone()
    if isinstance(tree, dict):
        return {k: _rows(v, row) for k, v in tree.items()}
    return type(tree)(_rows(v, row) for v in tree)


def _with_seen(tree, seen):
    """The mixer's state dict form: declared tensors plus ``seen`` in every dict that holds tensors."""
    if isinstance(tree, dict):
        out = {k: _with_seen(v, seen) for k, v in tree.items()}
        out["seen"] = seen
        return out
    if isinstance(tree, list):
        return [_with_seen(v, seen) for v in tree]
    return tree


class MixerStep:
    #: groups of the mixer's Linears that read the same input, stacked into one GEMM for decode
    #: (``InferenceEngine(pack=True)``, ``vlt.layers.pack_linears``)
    packed: tuple = ()
    #: False: the step reads lengths on the host or changes shapes per token, so no CUDA graph holds it
    capturable: bool = True

    def allocate(self, mixer, batch: int, capacity: int, dtype, device):
        return allocate_spec(mixer.state_spec(batch, capacity, dtype), device)

    def reset(self, mixer, cache):
        """Empty (as before any token): every declared tensor zero."""
        for t in tensors(cache):
            t.zero_()

    def state_nbytes(self, mixer, cache) -> int:
        """Bytes of the declared state in ``cache`` (not the step's own bookkeeping)."""
        return sum(t.numel() * t.element_size() for t in tensors(cache))

    def load(self, mixer, cache, state, row: int, seen: int):
        _copy_tree(cache, state, row, type(mixer).__name__)

    def export(self, mixer, cache, row: int, seen: int):
        return _with_seen(_rows(cache, row), seen)

    def __call__(self, mixer, cache, ctx: StepContext, x, norm):
        raise NotImplementedError


class GenericStep(MixerStep):
    """Any mixer: its own forward with the cached state (``seen`` given as the device counter
    ``ctx.tok`` [B], so nothing depends on a host int), the new state's tensors copied back in place.
    Works for mixers whose computation does not branch on ``seen`` (linear attention, GDN, a user's
    recurrent mixer); attention layers have their own step below."""

    def __call__(self, mixer, cache, ctx, x, norm):
        # compiled (engine on CUDA), the norms, gates and activations around the mixer's kernels fuse
        # (fla's launchers stay outside the compiled graphs: vlt.kernels mark them so)
        return ctx.jit(generic_forward)(mixer, norm, x, cache, ctx.tok, ctx.pos), None


def generic_forward(mixer, norm, x, cache, tok, pos):
    """``mixer(norm(x))`` on the cached state, the new state copied into the cache in place."""
    h = norm(x) if norm is not None else x
    y, new = mixer(h, state=_with_seen(cache, tok), position_ids=pos, use_cache=True)
    _copy_tree(cache, _strip_seen(new), None, type(mixer).__name__)
    return y


def _strip_seen(tree):
    if isinstance(tree, dict):
        return {k: _strip_seen(v) for k, v in tree.items() if k != "seen"}
    if isinstance(tree, list):
        return [_strip_seen(v) for v in tree]
    return tree


GENERIC = GenericStep()


# -- the block's pieces: norm + projections, output projection + residual + MLP ---------------------

def plain(*linears) -> bool:
    """Plain nn.Linear (or None): a LoRA-wrapped projection runs its own forward instead."""
    return all(lin is None or type(lin) is nn.Linear for lin in linears)


def norm_project(x, norm, fast, *linears):
    """``project(norm(x), *linears)``; with ``fast`` the RMSNorm runs inside the GEMV kernel.
    ``norm`` None: x is normed already."""
    if norm is None:
        return project(x, *linears)
    if not (fast and plain(*linears) and isinstance(norm, RMSNorm)):
        return project(norm(x), *linears)
    return project(x, *linears, linear=lambda x, w, b: gemv_kernel.norm_linear(x, norm.weight, norm.eps, w, b))


def mixer_out(blk, x, o_proj, y, fast):
    """Residual around the mixer (``o_proj`` applied here when given), then the MLP half:
    vlt.model.DecoderBlock + SwiGLU; with ``fast`` each projection is one GEMV with the norm,
    SwiGLU and residual add fused in."""
    mlp = blk.mlp
    if not (fast and plain(o_proj, mlp.down_proj)):
        if o_proj is not None:
            y = o_proj(y.flatten(2))
        x = x + y
        return x + mlp(blk.post_attention_layernorm(x))
    x = x + y if o_proj is None else gemv_kernel.linear(y.flatten(2), o_proj.weight, o_proj.bias, residual=x)
    norm = blk.post_attention_layernorm
    if plain(mlp.gate_proj, mlp.up_proj) and isinstance(norm, RMSNorm) and mlp.gate_proj.bias is None:
        h = gemv_kernel.norm_swiglu(x, norm.weight, norm.eps, mlp.gate_proj.weight, mlp.up_proj.weight)
        return gemv_kernel.linear(h, mlp.down_proj.weight, residual=x)
    gate, up = norm_project(x, norm, fast, mlp.gate_proj, mlp.up_proj)
    return gemv_kernel.swiglu_linear(gate, up, mlp.down_proj.weight, residual=x)


def head(model, last, fast):
    """Final norm + LM head on the last hidden state [B, 1, D]: one GEMV with ``fast``."""
    norm, lm_head = model.norm, model.lm_head
    if fast and plain(lm_head) and isinstance(norm, RMSNorm):
        return gemv_kernel.norm_linear(last, norm.weight, norm.eps, lm_head.weight, lm_head.bias)
    return lm_head(norm(last))


# -- attention (full and sliding window) ---------------------------------------------------------------

@register_step(Attention)
class AttentionStep(MixerStep):
    """K/V buffers [B, L, Hkv, D] (L: the window for ``swa``, the capacity for ``full``) and ``ktok``
    [B, L], the token index each slot holds (-1: empty). Token t lives in slot ``t % L`` (the ring
    convention of layers/attention.py, so states convert both ways); a ``full`` cache never wraps
    (the engine refuses tokens past its capacity). The query at token t sees the slots with
    ``t - window < ktok <= t``.
    Decode (T = 1): RoPE, the K/V write and attention over the valid slots in one split kernel
    (``vlt.kernels.decode_attention``; its torch reference off CUDA). T > 1 in a ring would overwrite
    keys the earlier new queries still see, so those attend over ring + new keys (masked), then write
    (with ``ctx.chunk_attention``: ``vlt.kernels.chunk_attention``, the mask built inside the kernel)."""

    packed = (("q_proj", "k_proj", "v_proj"),)

    def allocate(self, mixer, batch, capacity, dtype, device):
        cache = super().allocate(mixer, batch, capacity, dtype, device)
        cache["ktok"] = torch.full(cache["k"].shape[:2], -1, dtype=torch.long, device=device)
        return cache

    def reset(self, mixer, cache):
        cache["k"].zero_()
        cache["v"].zero_()
        cache["ktok"].fill_(-1)

    def state_nbytes(self, mixer, cache) -> int:
        return sum(cache[k].numel() * cache[k].element_size() for k in ("k", "v"))

    def load(self, mixer, cache, state, row, seen):
        L = cache["k"].shape[1]
        n = state["k"].shape[1]
        if seen > L and mixer.window is None:
            raise ValueError(f"a prompt of {seen} tokens does not fit the engine's full-attention capacity of {L}; "
                             "give a larger capacity (max prompt + new tokens)")
        # eager states: chronological (slot t = token t) until a window wraps, then already in ring order
        cache["k"][row, :n] = state["k"][0]
        cache["v"][row, :n] = state["v"][0]
        s = torch.arange(L, device=cache["k"].device)
        last = seen - 1 - ((seen - 1 - s) % L)       # the latest token t < seen with t % L == s
        cache["ktok"][row] = torch.where(last >= 0, last, torch.full_like(last, -1))

    def export(self, mixer, cache, row, seen):
        L = cache["k"].shape[1]
        n = min(seen, L)
        k, v = cache["k"][row:row + 1, :n].clone(), cache["v"][row:row + 1, :n].clone()
        return {"k": k, "v": v, "seen": seen}

    def __call__(self, m, cache, ctx, x, norm):
        B, T, _ = x.shape
        cos = sin = None
        if m.use_rope:
            key = (m.head_dim, m.rope_theta, tuple(m.mrope_section or ()))
            if key not in ctx.rope:  # every attention layer of a model shares its RoPE tables
                ctx.rope[key] = ctx.rope_tables(ctx.pos, m.head_dim, m.rope_theta, m.mrope_section)
            cos, sin = ctx.rope[key]                                            # [B, T, D]
        if T > 1:
            return ctx.jit(attend_tokens)(m, cache, x, norm, ctx.tok, cos, sin, ctx.chunk_attention), m.o_proj
        q, k, v = qkv_heads(m, x, norm, ctx.fast)
        args = (q[:, 0], k[:, 0], v[:, 0], cache["k"], cache["v"], ctx.tok, cache["ktok"])
        rope = {} if cos is None else {"cos": cos[:, 0].float().contiguous(), "sin": sin[:, 0].float().contiguous()}
        if ctx.decode_attention:
            y = attn_kernel.decode_attention(*args, **rope)
        else:
            y = attn_kernel.decode_attention_reference(*args, **rope)
        return y[:, None], m.o_proj


def qkv_heads(m, x, norm, fast):
    """norm(x)'s q, k, v projections as [B, T, heads, head_dim]."""
    B, T, _ = x.shape
    q, k, v = norm_project(x, norm, fast, m.q_proj, m.k_proj, m.v_proj)
    return (q.view(B, T, m.num_heads, m.head_dim), k.view(B, T, m.num_kv_heads, m.head_dim),
            v.view(B, T, m.num_kv_heads, m.head_dim))


def attend_tokens(m, cache, x, norm, tok, cos, sin, chunk: bool = False):
    """T > 1 new tokens (a frame, a prompt chunk) against the cached ring plus themselves: projections,
    RoPE, a mask by token index (causal, the window, empty slots), SDPA, then the new K/V written to
    their slots. ``chunk``: the attention by vlt.kernels.chunk_attention (a torch custom op, so it
    stays one node of the compiled step), which builds the mask in registers and skips key blocks
    no query sees, instead of cat + mask + SDPA."""
    q, k, v = qkv_heads(m, x, norm, False)
    B, T = q.shape[:2]
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    L = cache["k"].shape[1]
    qtok = tok[:, None] + torch.arange(T, device=q.device)                    # [B, T]
    attend = chunk_kernel.chunk_attention if chunk else chunk_kernel.chunk_attention_reference
    y = attend(q, k, v, cache["k"], cache["v"], cache["ktok"], qtok, window=m.window)
    rows = torch.arange(B, device=q.device)[:, None]
    slots = qtok % L
    # with T > L only the last L new tokens stay; the others' slots are rewritten by later ones
    keep = slice(max(0, T - L), T)
    cache["k"][rows, slots[:, keep]] = k[:, keep]
    cache["v"][rows, slots[:, keep]] = v[:, keep]
    cache["ktok"][rows, slots[:, keep]] = qtok[:, keep]
    return y


# -- Gated DeltaNet ------------------------------------------------------------------------------------

@register_step(GatedDeltaNet)
class GatedDeltaNetStep(MixerStep):
    """Decode with ``ctx.fused_gdn``: the projections (one stacked GEMV), then two Triton kernels to
    ``o_proj``'s input updating the conv and SSM states in place (``vlt.kernels.gdn_decode``).
    Otherwise the mixer's own forward on the cached state (the generic path)."""
    packed = (("q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj"),)

    def __call__(self, m, cache, ctx, x, norm):
        if not (ctx.fused_gdn and ctx.T == 1):
            return GENERIC(m, cache, ctx, x, norm)
        proj = norm_project(x, norm, ctx.fast, m.q_proj, m.k_proj, m.v_proj, m.g_proj, m.a_proj, m.b_proj)
        rows = [p[:, 0] if p.stride(-1) == 1 else p[:, 0].contiguous() for p in proj]
        weights = (m.q_conv1d.weight[:, 0], m.k_conv1d.weight[:, 0], m.v_conv1d.weight[:, 0])
        o = gdn_decode.gdn_decode_step(*rows, weights, cache["conv"], m.A_log, m.dt_bias, cache["ssm"],
                                       m.o_norm_weight, m.norm_eps)
        return o[:, None], m.o_proj


# -- intra-layer hybrids ---------------------------------------------------------------------------------

@register_step(HybridMixer)
class HybridStep(MixerStep):
    """Each branch through its own registered step on its part of the cache, combined as the mixer does."""

    def allocate(self, mixer, batch, capacity, dtype, device):
        return [step_for(b).allocate(b, batch, capacity, dtype, device) for b in mixer.branches]

    def reset(self, mixer, cache):
        for b, c in zip(mixer.branches, cache):
            step_for(b).reset(b, c)

    def state_nbytes(self, mixer, cache) -> int:
        return sum(step_for(b).state_nbytes(b, c) for b, c in zip(mixer.branches, cache))

    def load(self, mixer, cache, state, row, seen):
        for b, c, s in zip(mixer.branches, cache, state):
            step_for(b).load(b, c, s, row, seen)

    def export(self, mixer, cache, row, seen):
        return [step_for(b).export(b, c, row, seen) for b, c in zip(mixer.branches, cache)]

    def __call__(self, m, cache, ctx, x, norm):
        h = norm(x) if norm is not None else x
        fast, ctx.fast = ctx.fast, False   # the branches read one normed input: no norm to fuse
        y = 0
        for w, branch, c in zip(m._weights(len(m.branches)), m.branches, cache):
            out, o_proj = step_for(branch)(branch, c, ctx, h, None)
            y = y + w * (out if o_proj is None else o_proj(out.flatten(2)))
        ctx.fast = fast
        return y, None
