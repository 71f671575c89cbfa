"""Graph-friendly stepping of a VLM decoder: preallocated state updated in place, no host syncs.

The mixers' own decode path (``model(ids, state=..., use_cache=True)``) is out of place and keys the
SWA ring slot and positions off Python ints, so a CUDA graph captured over it would replay one fixed
slot. ``StaticStepper`` runs the same weights over T new tokens (T = 1: a decode step; T = 256: one
video frame) with every index on the device:

- attention layers (``full``, ``swa``) keep K/V buffers [1, L, Hkv, D] and ``ktok`` [L], the token
  index each slot holds (-1 = empty). New keys go to slot ``tok % L`` (the ring convention of
  layers/attention.py, so states convert both ways). The query at token t sees slots with
  ``t - window < ktok <= t``. With T > 1 in a ring the new keys would overwrite keys the earlier new
  queries still see, so they attend over ring + new keys (masked) before the write.
- ``dense=True`` (the decode benchmark: every slot valid, T == 1): write, then unmasked SDPA over the
  whole buffer, so the fastest SDPA kernels run; buffers are sized min(context + 1, window) / context + 1.
- GDN layers run the mixer's own forward with the carried state and copy the new conv/SSM state
  back into the static buffers; or, for decode (T = 1, ``fused_gdn``, the default on CUDA), two
  Triton kernels from the projections to ``o_proj``'s input, updating the buffers in place
  (``vlt.kernels.gdn_decode``).
- decode (T = 1, ``gemv``, the default on CUDA): every block projection is one batch-1 GEMV kernel
  with the RMSNorm before it and the residual adds fused in (``vlt.kernels.gemv``); the MLP's gate
  and up products end in SwiGLU inside their kernel, so the down projection is a plain GEMV; a GDN
  block is 6 kernels: q/k/v/g/a/b, the two GDN kernels, o_proj, gate/up, down. The final norm and
  the LM head are one more GEMV.
- dense decode (``decode_attention``, the default on CUDA): a sliding-window layer's RoPE, K/V
  write and attention are one split kernel and its combine (``vlt.kernels.decode_attention``); full
  layers keep RoPE + index_copy + SDPA, so the caller's SDPA backend choice applies to them.
- on Hopper, vlt's kernels launch with programmatic dependent launch (``pdl``, ``vlt.kernels.pdl``).
- ``advance=True`` adds T to the token counter inside the step (streaming); ``False`` replays the
  same slot (latency benchmark at a fixed context).

``compile``: a ``torch.compile`` backend ("inductor" on the GPU) for the per-block pieces - norms,
projections, RoPE and its tables, the unfused GDN step (the torch recurrence under compile, see
vlt.kernels.gated_delta) and the MLP - so Inductor fuses the small kernels that the fused paths
above leave (RoPE, T > 1 frames, the unfused alternatives the benchmarks compare against). The
attention read/write (index_copy into the buffers + SDPA, or the decode kernel) stays eager between
the compiled pieces: it honours the caller's SDPA backend choice and its buffer length never forces
a recompile. Shared RoPE tables and slot indices are computed once per step.

``eager_step`` is the reference: the model's blocks on the mixers' own state dicts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlt.kernels import gdn_decode, pdl
from vlt.kernels import decode_attention as attn_kernel
from vlt.kernels import gemv as gemv_kernel
from vlt.layers import pack_linears, project
from vlt.layers.attention import Attention
from vlt.layers.gdn import GatedDeltaNet
from vlt.layers.rotary import apply_rope, rope_cos_sin
from vlt.vision import RMSNorm


class StaticStepper:
    def __init__(self, model, T: int, *, capacity: int | None = None, dense: bool = False,
                 advance: bool = True, logits: bool = True, fill: str = "zeros", context: int = 0,
                 compile: str | None = None, fused_gdn: bool | None = None, gemv: bool | None = None,
                 decode_attention: bool | None = None, pdl: bool = True):
        """``capacity``: slots of a ``full`` layer (ring layers hold ``window``). ``fill='random'``
        with ``context``: states as after ``context`` tokens (random K/V and SSM contents).
        ``compile``: torch.compile backend for the per-block pieces (None: eager).
        ``fused_gdn``: GDN decode through the fused Triton step (None: when T == 1 on CUDA).
        ``gemv``: the blocks' projections through vlt's batch-1 GEMV kernel instead of cuBLAS
        (None: when T == 1 on CUDA). ``decode_attention``: sliding-window layers write K/V and attend
        through vlt's split decode kernel instead of index_copy + SDPA (None: the dense decode step
        on CUDA; full layers keep SDPA, whose backend the caller picks). ``pdl``: vlt's kernels start
        early, overlapping the kernel before them, where the GPU can (programmatic dependent
        launch, ``vlt.kernels.pdl``)."""
        p = next(model.parameters())
        self.model, self.T, self.dense, self.advance, self.logits = model, T, dense, advance, logits
        dev, dt = p.device, p.dtype
        self.device, self.dtype = dev, dt
        d = model.config.decoder
        self.x = torch.zeros(1, T, d.hidden_size, device=dev, dtype=dt)      # input embeddings
        self.pos = torch.zeros(3, 1, T, device=dev, dtype=torch.long)         # M-RoPE positions
        self.tok = torch.full((), context, device=dev, dtype=torch.long)      # tokens seen
        self.ar = torch.arange(T, device=dev)
        self.states = []
        rnd = fill == "random"
        for blk in model.layers:
            m = blk.mixer
            if isinstance(m, Attention):
                if m.window is not None:
                    L = min(context + T, m.window) if dense else m.window
                else:
                    L = context + T if dense else capacity
                    if L is None:
                        raise ValueError("full attention layers need capacity= (or dense=True with context=)")
                shape = (1, L, m.num_kv_heads, m.head_dim)
                k = torch.randn(shape, device=dev, dtype=dt) if rnd else torch.zeros(shape, device=dev, dtype=dt)
                v = torch.randn(shape, device=dev, dtype=dt) if rnd else torch.zeros(shape, device=dev, dtype=dt)
                ktok = torch.full((L,), -1, device=dev, dtype=torch.long)
                if context:  # slot s holds the latest token t < context with t % L == s
                    s = torch.arange(L, device=dev)
                    last = context - 1 - ((context - 1 - s) % L)
                    ktok = torch.where(last >= 0, last, ktok)
                self.states.append({"kind": "attn", "k": k, "v": v, "ktok": ktok, "L": L})
            elif isinstance(m, GatedDeltaNet):
                W = m.conv_size - 1
                mk = (torch.randn if rnd else torch.zeros)
                conv = tuple(mk(1, c, W, device=dev, dtype=dt) for c in (m.key_dim, m.key_dim, m.value_dim))
                ssm = mk(1, m.num_v_heads, m.head_k_dim, m.head_v_dim, device=dev, dtype=torch.float32)
                if rnd:
                    ssm.mul_(0.05)
                self.states.append({"kind": "gdn", "conv": conv, "ssm": ssm})
            else:
                raise ValueError(f"static stepping supports full/swa/gdn layers, not {type(m).__name__}")
        self.out = None
        self.compile, self.pieces = compile, step_pieces(compile)
        if fused_gdn is None:
            fused_gdn = T == 1 and dev.type == "cuda" and gdn_decode.triton is not None
        if fused_gdn and T != 1:
            raise ValueError(f"fused_gdn=True is a decode step (T = 1), not T = {T}; use fused_gdn=False")
        self.fused_gdn = fused_gdn
        self.gemv = (T == 1 and dev.type == "cuda" and gemv_kernel.triton is not None) if gemv is None else gemv
        if decode_attention is None:
            decode_attention = T == 1 and dense and dev.type == "cuda" and attn_kernel.triton is not None
        if decode_attention and not (T == 1 and dense):
            raise ValueError(f"decode_attention=True is the dense decode step (T = 1, dense=True), not T = {T}, "
                             f"dense={dense}; use decode_attention=False")
        self.decode_attention = decode_attention
        self.pdl = pdl

    # -- conversions ---------------------------------------------------------------------------
    def state_nbytes(self) -> int:
        n = 0
        for s in self.states:
            for key in ("k", "v", "ssm"):
                if key in s:
                    n += s[key].numel() * s[key].element_size()
            for c in s.get("conv", ()):
                n += c.numel() * c.element_size()
        return n

    def eager_state(self, next_pos: int):
        """The same contents as the mixers' state dicts (clones), for ``eager_step``."""
        seen = int(self.tok)
        layers = []
        for blk, s in zip(self.model.layers, self.states):
            if s["kind"] == "gdn":
                layers.append({"conv": tuple(c.clone() for c in s["conv"]), "ssm": s["ssm"].clone(), "seen": seen})
                continue
            m, L = blk.mixer, s["L"]
            if m.window is not None and seen >= m.window:
                assert L == m.window
                layers.append({"k": s["k"].clone(), "v": s["v"].clone(), "seen": seen})
            else:  # chronological: slot t holds token t
                layers.append({"k": s["k"][:, :seen].clone(), "v": s["v"][:, :seen].clone(), "seen": seen})
        return {"layers": layers, "next_pos": torch.tensor([next_pos])}

    def snapshot(self):
        """Copies of the recurrent (GDN) states, which every step advances; attention slots are
        rewritten with the same key by a non-advancing step, so they need none."""
        return [(tuple(c.clone() for c in s["conv"]), s["ssm"].clone()) if s["kind"] == "gdn" else None
                for s in self.states]

    def restore(self, snap):
        for s, saved in zip(self.states, snap):
            if saved is not None:
                for dst, src in zip(s["conv"], saved[0]):
                    dst.copy_(src)
                s["ssm"].copy_(saved[1])

    # -- the step --------------------------------------------------------------------------------
    def _attend(self, m, s, q, k, v, slot_cache):
        """Write this step's K/V into the buffers and attend; q [B, T, Hq, D], k/v [B, T, Hkv, D].
        ``slot_cache``: this step's (token indices, slots) per buffer length, shared by the layers."""
        T = q.shape[1]
        L = s["L"]
        if L not in slot_cache:  # every layer with this buffer length writes the same slots
            qtok = self.tok + self.ar
            slot_cache[L] = qtok, qtok % L
        qtok, slots = slot_cache[L]
        if self.dense:
            s["k"].index_copy_(1, slots, k)
            s["v"].index_copy_(1, slots, v)
            o = _gqa_sdpa(q, s["k"], s["v"], None)
        elif m.window is not None and T > 1:
            keys, vals = torch.cat([s["k"], k], 1), torch.cat([s["v"], v], 1)
            o = _gqa_sdpa(q, keys, vals, _mask(torch.cat([s["ktok"], qtok]), qtok, m.window))
            s["k"].index_copy_(1, slots, k)
            s["v"].index_copy_(1, slots, v)
        else:
            s["k"].index_copy_(1, slots, k)
            s["v"].index_copy_(1, slots, v)
            s["ktok"].index_copy_(0, slots, qtok)
            return _gqa_sdpa(q, s["k"], s["v"], _mask(s["ktok"], qtok, m.window))
        s["ktok"].index_copy_(0, slots, qtok)
        return o

    @torch.no_grad()
    def step(self):
        """One step over ``self.x`` at positions ``self.pos``; returns last-token logits (or hidden)."""
        with pdl.disabled(not self.pdl):
            return self._step()

    def _step(self):
        attn_in, gdn_in, gdn_block, mixer_out, rope_tables = self.pieces
        fast = self.gemv
        x = self.x
        rope, slot_cache = {}, {}
        for blk, s in zip(self.model.layers, self.states):
            m = blk.mixer
            if s["kind"] == "attn":
                key = (m.head_dim, m.rope_theta, tuple(m.mrope_section or ()))
                if key not in rope:  # every attention layer of a model shares its RoPE tables
                    rope[key] = rope_tables(self.pos, m.head_dim, m.rope_theta, m.mrope_section)
                cos, sin = rope[key]
                if self.decode_attention and m.window is not None:  # RoPE, K/V write, attention: one kernel
                    q, k, v = _attn_qkv(blk, x, fast)
                    y = attn_kernel.decode_attention(q[:, 0], k[:, 0], v[:, 0], s["k"], s["v"], self.tok, s["ktok"],
                                                     cos=cos.view(-1), sin=sin.view(-1)).unsqueeze(1)
                else:
                    y = self._attend(m, s, *attn_in(blk, x, cos, sin, fast), slot_cache)
                x = mixer_out(blk, x, m.o_proj, y, fast)
            elif self.fused_gdn:
                x = mixer_out(blk, x, m.o_proj, _gdn_fused(m, gdn_in(blk, x, fast), s), fast)
            else:
                x = mixer_out(blk, x, None, gdn_block(blk, x, *s["conv"], s["ssm"]), fast)
        if self.advance:
            self.tok += self.T
        self.out = self._head(x[:, -1:], fast)
        return self.out

    def _head(self, last, fast):
        """Final norm (+ LM head): with ``fast`` one GEMV kernel with the norm fused in."""
        norm, head = self.model.norm, self.model.lm_head
        if not self.logits:
            return norm(last)
        if fast and _plain(head) and isinstance(norm, RMSNorm):
            return gemv_kernel.norm_linear(last, norm.weight, norm.eps, head.weight, head.bias)
        return head(norm(last))


# -- the per-block pieces (module functions, so one compiled copy serves every layer of a kind) ----

# ``fast``: projections through vlt.kernels.gemv (batch-1 GEMV kernel) instead of F.linear / cuBLAS,
# with the RMSNorm before them, SwiGLU's product and the residual adds fused into it.

def _attn_qkv(blk, x, fast):
    """An attention block's input norm and q/k/v projections, [B, T, heads, D] each, before RoPE."""
    m = blk.mixer
    B, T, _ = x.shape
    q, k, v = _norm_project(x, blk.input_layernorm, fast, m.q_proj, m.k_proj, m.v_proj)
    return (q.view(B, T, m.num_heads, m.head_dim), k.view(B, T, m.num_kv_heads, m.head_dim),
            v.view(B, T, m.num_kv_heads, m.head_dim))


def _attn_in(blk, x, cos, sin, fast):
    q, k, v = _attn_qkv(blk, x, fast)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _gdn_block(blk, x, conv_q, conv_k, conv_v, ssm):
    """The GDN mixer's own forward on carried state, its new state copied back into the buffers."""
    state = {"conv": (conv_q, conv_k, conv_v), "ssm": ssm, "seen": 0}
    y, ns = blk.mixer(blk.input_layernorm(x), state=state, use_cache=True)
    for dst, src in zip((conv_q, conv_k, conv_v), ns["conv"]):
        dst.copy_(src)
    ssm.copy_(ns["ssm"])
    return y


def _gdn_in(blk, x, fast):
    """A GDN block's input norm and projections (q, k, v, gate, a, b), for the fused step."""
    m = blk.mixer
    return _norm_project(x, blk.input_layernorm, fast, m.q_proj, m.k_proj, m.v_proj, m.g_proj, m.a_proj, m.b_proj)


def _mixer_out(blk, x, o_proj, y, fast):
    """Residual around the mixer (attention's output projection applied here), then the MLP half."""
    mlp = blk.mlp
    if not (fast and _plain(o_proj, mlp.down_proj)):
        if o_proj is not None:
            y = o_proj(y.flatten(2))
        x = x + y
        return x + mlp(blk.post_attention_layernorm(x))
    # vlt.model.DecoderBlock + SwiGLU, each projection one GEMV with its neighbours fused in
    x = x + y if o_proj is None else gemv_kernel.linear(y.flatten(2), o_proj.weight, o_proj.bias, residual=x)
    norm = blk.post_attention_layernorm
    if _plain(mlp.gate_proj, mlp.up_proj) and isinstance(norm, RMSNorm) and mlp.gate_proj.bias is None:
        # norm, gate and up products and SwiGLU in one kernel; the down projection reads the product
        h = gemv_kernel.norm_swiglu(x, norm.weight, norm.eps, mlp.gate_proj.weight, mlp.up_proj.weight)
        return gemv_kernel.linear(h, mlp.down_proj.weight, residual=x)
    gate, up = _norm_project(x, norm, fast, mlp.gate_proj, mlp.up_proj)
    return gemv_kernel.swiglu_linear(gate, up, mlp.down_proj.weight, residual=x)


def _plain(*linears):
    """Plain nn.Linear (or None): a LoRA-wrapped projection runs its own forward instead."""
    return all(lin is None or type(lin) is nn.Linear for lin in linears)


def _norm_project(x, norm, fast, *linears):
    """``vlt.layers.project(norm(x), *linears)``; with ``fast`` the RMSNorm runs inside the GEMV kernel."""
    if not (fast and _plain(*linears) and isinstance(norm, RMSNorm)):
        return project(norm(x), *linears)
    return project(x, *linears, linear=lambda x, w, b: gemv_kernel.norm_linear(x, norm.weight, norm.eps, w, b))


def _gdn_fused(m, proj, s):
    """The fused Triton decode step (conv updates, gates, recurrence, gated norm) on the static
    buffers, in place; returns o_proj's input [1, 1, HV * V]. Runs between the compiled pieces."""
    rows = [p[:, 0] if p.stride(-1) == 1 else p[:, 0].contiguous() for p in proj]
    weights = (m.q_conv1d.weight[:, 0], m.k_conv1d.weight[:, 0], m.v_conv1d.weight[:, 0])
    o = gdn_decode.gdn_decode_step(*rows, weights, s["conv"], m.A_log, m.dt_bias, s["ssm"], m.o_norm_weight,
                                   m.norm_eps)
    return o[:, None]


def step_pieces(backend: str | None):
    pieces = (_attn_in, _gdn_in, _gdn_block, _mixer_out, rope_cos_sin)
    if backend is None:
        return pieces
    import torch._dynamo
    cfg = torch._dynamo.config  # one compile per kind of block, a few per stepper: room for all
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    return tuple(torch.compile(f, backend=backend, dynamic=False) for f in pieces)


def pack_projections(model) -> int:
    """Stack each block's input projections (attention q/k/v; GDN q/k/v/g/a/b; MLP gate/up) with
    ``vlt.layers.pack_linears``: one GEMV each per decode step. Returns how many groups were packed."""
    n = 0
    for blk in model.layers:
        m = blk.mixer
        names = (("q_proj", "k_proj", "v_proj") if isinstance(m, Attention) else
                 ("q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj") if isinstance(m, GatedDeltaNet) else ())
        for mod, group in ((m, names), (blk.mlp, ("gate_proj", "up_proj"))):
            linears = [getattr(mod, name) for name in group]
            if linears and all(type(lin) is nn.Linear for lin in linears):  # not LoRA-wrapped
                pack_linears(*linears)
                n += 1
    return n


def _mask(ktok, qtok, window):
    m = (ktok[None, :] <= qtok[:, None]) & (ktok[None, :] >= 0)
    if window is not None:
        m &= ktok[None, :] > qtok[:, None] - window
    return m


def _gqa_sdpa(q, k, v, mask):
    """q [B, T, Hq, D], k/v [B, L, Hkv, D] (any strides), mask [T, L] bool or None -> [B, T, Hq, D].

    The G = Hq / Hkv query heads of a KV head become G*T query rows of one head, so every SDPA
    kernel runs GQA without expanding K/V (and decode gets G rows per head instead of one)."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    qh = q.view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D)
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)
    if mask is not None:
        mask = mask.repeat(G, 1)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return o.view(B, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, Hq, D)


@torch.no_grad()
def eager_step(model, x, pos, state):
    """The reference: the model's blocks on embeddings x [1, T, D] with the mixers' own state dicts.
    Returns (last-token logits, new state)."""
    layer_states = [None] * len(model.layers) if state is None else state["layers"]
    new = []
    for blk, s in zip(model.layers, layer_states):
        x, ns = blk(x, state=s, position_ids=pos, use_cache=True)
        new.append(ns)
    next_pos = int(pos.max()) + 1
    return model.lm_head(model.norm(x[:, -1:])), {"layers": new, "next_pos": torch.tensor([next_pos])}


def frame_positions(T: int, base: int, device, grid: tuple[int, int] | None = None):
    """M-RoPE positions [3, 1, T] of one video frame of h x w merged tokens (or text if grid is None)."""
    if grid is None:
        p = torch.arange(base, base + T, device=device)
        return p.expand(3, T)[:, None].clone()
    h, w = grid
    r = torch.arange(h, device=device).repeat_interleave(w)
    c = torch.arange(w, device=device).repeat(h)
    return torch.stack([torch.full_like(r, base), base + r, base + c])[:, None]


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))
