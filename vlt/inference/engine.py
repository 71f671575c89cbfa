"""The inference engine: a preallocated in-place decode cache, per-mixer steps, CUDA graphs in one place.

    engine = InferenceEngine(model, batch_size=1, capacity=4096 + 256)
    logits = engine.prefill(input_ids, images)           # eager prompt pass, state loaded into the cache
    logits = engine.decode(next_ids)                     # [B] -> [B, V]; a CUDA-graph replay on the GPU
    logits = engine.step_embeddings(frame_feats, pos)    # T tokens of embeddings (a video frame)

Every consumer decodes through it: ``vlt generate`` / ``vlt chat`` (``vlt.inference.generate``),
``vlt stream`` (``vlt.inference.stream``), evaluation, and ``vlt bench infer|stream``.

- The cache of each layer comes from its mixer's declared state (``TokenMixer.state_spec``) through
  the step registered for the mixer's class (``vlt.inference.steps``); a prefill's state loads into
  a row of it and converts back (``load_state`` / ``export_state``).
- Rows are independent sequences (batch > 1: several prompts at once), each with its own token
  counter (``tok``, the cache write index) and next RoPE position (``next_pos``): they may differ
  in length. ``full`` attention layers hold ``capacity`` tokens (prompt + new tokens).
- Decode on CUDA: vlt's fused kernels where they apply (batch-1 GEMVs with norms / SwiGLU / residual
  fused in, the fused GDN step, the split decode attention with RoPE and the K/V write inside, PDL on
  Hopper), the small ops between them compiled, and the whole step captured in one CUDA graph per
  step size (``capture``) from that size's second use (its first runs as is: a one-off size, such as
  a question's tokens, costs no compile or capture). On CPU the same
  steps run eagerly (the kernels' torch references), so the tests exercise the engine everywhere.
- Every index lives on the device: no host sync inside a step - except for a layer whose state grows
  per token without a step of its own (fla's nsa, moba: ``vlt.inference.growing_step``), which reads
  its rows' lengths on the host; a model with one runs without CUDA graphs.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from vlt.kernels import chunk_attention as chunk_kernel
from vlt.kernels import decode_attention as attn_kernel
from vlt.kernels import gdn_decode, pdl
from vlt.kernels import gemv as gemv_kernel
from vlt.layers import pack_linears
from vlt.layers.rotary import rope_cos_sin
from vlt.inference.steps import StepContext, capturable, head, mixer_out, step_for, tensors


def compile_in_this_process() -> None:
    """Let Inductor compile the engine's small graphs in this process, without its pool of compile
    workers (the vlt generate / stream / eval / chat commands call this; ``TORCHINDUCTOR_COMPILE_THREADS``,
    when set, wins). The engine compiles a few small graphs, read from Inductor's cache on a machine that
    has run them once, so the pool buys nothing there, and a process exits only after the pool's workers:
    on the H200 (2026-12-01) a warm ``vlt generate`` was done 11.75 s after its start and exited at
    16.59 s, the last ~4.8 s in ``shutdown_compile_workers`` waiting for them; with one compile thread it
    was done at 11.94 s and exited at 13.33 s. On a fresh machine the compiles then run one after another;
    what that costs cold is not measured apart: the cold runs with this default took 109 s and 40.2 s on two
    other machines (the second with a complete fla table), against the pool's 77 s on the first."""
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        import torch._inductor.config as inductor_config
        inductor_config.compile_threads = 1


class InferenceEngine:
    def __init__(self, model, *, batch_size: int = 1, capacity: int | None = None, graphs: bool | None = None,
                 fused: bool | None = None, compile: str | None = "auto", pack: bool | None = None, pdl: bool = True,
                 dynamic_sizes: bool = False, chunk_attention: bool | None = None):
        """``capacity``: tokens a ``full`` attention layer holds (None: only constant-state layouts).
        ``graphs``: capture steps in CUDA graphs (None: on CUDA). ``fused``: vlt's decode kernels
        (None: on CUDA with Triton). ``compile``: torch.compile backend for the small ops between the
        kernels (RoPE tables, the residual/MLP half, generic steps; "auto": inductor on CUDA).
        ``pack``: stack the projections that read one input into one GEMM (None: with ``fused``;
        parameters keep names and shapes, so LoRA targets and state dicts are unaffected).
        ``dynamic_sizes``: compile with automatic dynamic shapes: the second step size recompiles once with
        the size as a symbol and later sizes reuse it (a stream's timestamps widening, questions of any
        length), where static compiles cost one compile per size. Off by default: on the H200 stream
        (2026-12-01, together with SDPA moved out of the compiled step) the later stall went from 9 s to
        0.45 s but the first from 9 s to 14 s, and it was not measured alone.
        ``chunk_attention``: steps of T > 1 tokens (frames, prompt chunks) attend through the Triton
        kernel vlt.kernels.chunk_attention instead of a boolean mask + SDPA; effective on CUDA with
        Triton (or under Triton's interpreter, which runs it on CPU tensors: the tests). None: on CUDA
        with Triton. On the H200 stream (InfiniteVL-4B, 256 tokens per frame, 2026-12-01) it took the
        stream from 64.9 to 82.3 FPS; ``False`` keeps the mask + SDPA reference."""
        p = next(model.parameters())
        check_engine_support(model)
        self.model, self.device, self.dtype = model.eval(), p.device, p.dtype
        cuda = self.device.type == "cuda"
        self.batch_size, self.capacity = batch_size, capacity
        self.graphs = cuda if graphs is None else graphs
        if self.graphs and not cuda:
            raise ValueError("graphs=True needs the model on a CUDA device")
        held_on_host = [i for i, b in enumerate(model.layers) if not capturable(b.mixer)]
        if held_on_host and self.graphs:
            if graphs:
                raise ValueError(f"graphs=True: layers {held_on_host} have a state that grows per token with no "
                                 "step of their own (vlt.inference.growing_step), which no CUDA graph can hold; "
                                 "leave graphs to the engine (None) or register a step for the mixer")
            self.graphs = False
        self.fused = (cuda and gdn_decode.triton is not None) if fused is None else fused
        self.pdl = pdl
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if chunk_attention is None:
            chunk_attention = cuda
        self.chunk_attention = bool(chunk_attention) and chunk_kernel.triton is not None and (cuda or interpreted)
        if compile == "auto":
            compile = "inductor" if cuda else None
        self.compile, self.dynamic_sizes = compile, dynamic_sizes
        self._compiled: dict = {}        # fn -> its torch.compile'd copy (one per function, shared by layers)
        self._plain = False               # this run: no compile (a step size's first use)
        if compile:
            from torch import _dynamo
            cfg = _dynamo.config  # one compile per kind of block and step size: room for all
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), 64))
        if pack if pack is not None else self.fused:
            pack_projections(model)
        needs_capacity = [i for i, b in enumerate(model.layers) if getattr(b.mixer, "state_grows", False)]
        if needs_capacity and capacity is None:
            raise ValueError(f"layers {needs_capacity} keep a growing state (full attention): give the engine a "
                             "capacity (the longest prompt + new tokens it must hold)")
        # capacity None: unbounded (constant-state layouts; a sliding window keeps its whole ring).
        # Given, every layer holds at most that many tokens (a window shorter than the window saves memory)
        cap = capacity or (1 << 40)
        self.caches = [step_for(b.mixer).allocate(b.mixer, batch_size, cap, self.dtype, self.device)
                       for b in model.layers]
        self.tok = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.ids = torch.zeros(batch_size, dtype=torch.long, device=self.device)   # decode input
        self._frame_in: dict[int, tuple] = {}                                    # T -> (x, pos) buffers
        self._graphs: dict[tuple, tuple] = {}                                    # key -> (replay, out)
        self._used: set = set()                                                  # keys run once already
        self.mrope = model.config.decoder.mrope_section is not None

    # -- state ------------------------------------------------------------------------------------------
    def reset(self):
        """Empty every row (as before any token)."""
        for blk, cache in zip(self.model.layers, self.caches):
            step_for(blk.mixer).reset(blk.mixer, cache)
        self.tok.zero_()
        self.next_pos.zero_()

    def state_nbytes(self) -> int:
        """Bytes of the decode state (the mixers' declared tensors, without the engine's bookkeeping)."""
        return sum(self.layer_state_nbytes())

    def layer_state_nbytes(self) -> list[int]:
        return [step_for(b.mixer).state_nbytes(b.mixer, c) for b, c in zip(self.model.layers, self.caches)]

    def load_state(self, state: dict, row: int = 0, seen: int | None = None):
        """Put a model state (``model(..., use_cache=True).state``, batch 1) into row ``row``."""
        seen = _seen(state["layers"]) if seen is None else seen
        if seen < 0:
            raise ValueError("the state carries no 'seen' count; pass seen= (the tokens it holds)")
        if self.capacity is not None and seen > self.capacity:
            raise ValueError(f"a prompt of {seen} tokens does not fit the engine's capacity of {self.capacity} "
                             "tokens; shorten it or build the engine with a larger capacity")
        for blk, cache, s in zip(self.model.layers, self.caches, state["layers"]):
            step_for(blk.mixer).load(blk.mixer, cache, s, row, seen)
        self.tok[row] = seen
        self.next_pos[row] = state["next_pos"].reshape(-1)[0]

    def export_state(self, row: int = 0) -> dict:
        """Row ``row`` as a model state (what ``model(..., state=...)`` continues from)."""
        seen = int(self.tok[row])
        layers = [step_for(b.mixer).export(b.mixer, c, row, seen) for b, c in zip(self.model.layers, self.caches)]
        return {"layers": layers, "next_pos": self.next_pos[row:row + 1].clone()}

    @torch.no_grad()
    def fill_random(self, context: int, seed: int = 0):
        """Every row as after ``context`` tokens of random content (K/V, conv and SSM states), for
        benchmarks of long contexts without a prefill of that length. Integer tensors are taken for
        slot indices (attention's ``ktok``), floating ones for contents."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for t in tensors(self.caches):
            if t.dtype == torch.long:   # ktok [B, L]: slot s holds the latest token t < context, t % L == s
                L = t.shape[-1]
                s = torch.arange(L, device=self.device)
                last = context - 1 - ((context - 1 - s) % L)
                t.copy_(torch.where(last >= 0, last, torch.full_like(last, -1)).expand_as(t))
            else:
                t.copy_(torch.randn(t.shape, generator=gen, device=self.device, dtype=torch.float32)
                        * (0.05 if t.dtype == torch.float32 else 1.0))
        self.tok.fill_(context)
        self.next_pos.fill_(context)

    def snapshot(self):
        return [t.clone() for t in tensors(self.caches)], self.tok.clone(), self.next_pos.clone()

    def restore(self, snap):
        saved, tok, nxt = snap
        for dst, src in zip(tensors(self.caches), saved):
            dst.copy_(src)
        self.tok.copy_(tok)
        self.next_pos.copy_(nxt)

    # -- prefill ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, images=None, row: int = 0, chunk: int | None = None,
                extend: bool = False) -> torch.Tensor:
        """Run a prompt (ids [T] or [1, T], images for its image tokens) through the model's parallel
        forward (the mixers' chunked kernels) and load its state into ``row``, replacing what the row
        held (``extend``: continuing from it instead - a chat's next turn). ``chunk``: text-only
        prompts longer than this run in pieces (bounded activation memory). Returns the last
        position's logits [V]."""
        ids = input_ids.reshape(1, -1).to(self.device)
        state = self.export_state(row) if extend and int(self.tok[row]) > 0 else None
        T = ids.shape[1] + (int(self.tok[row]) if state is not None else 0)
        if self.capacity is not None and T > self.capacity:
            raise ValueError(f"the prompt has {T} tokens but the engine holds {self.capacity} (its capacity); "
                             "give a larger capacity or a shorter prompt")
        out = None
        n = ids.shape[1]
        step = n if (chunk is None or images) else chunk
        for s in range(0, n, step):
            out = self.model(ids[:, s:s + step], images=(images or None) if s == 0 else None, state=state,
                             use_cache=True, logits_to_keep=1)
            state = out.state
        self.load_state(state, row, seen=T)
        return out.logits[0, -1]

    # -- the step ---------------------------------------------------------------------------------------
    def _jit(self, fn):
        if fn not in self._compiled:
            self._compiled[fn] = torch.compile(fn, backend=self.compile, dynamic=None if self.dynamic_sizes else False)
        return self._compiled[fn]

    def _context(self, T: int, pos) -> StepContext:
        B = self.batch_size
        fast = self.fused and B == 1 and gemv_kernel.triton is not None
        ctx = StepContext(tok=self.tok, pos=pos, T=T, fast=fast, fused_gdn=self.fused and T == 1,
                          decode_attention=self.fused and T == 1 and attn_kernel.triton is not None,
                          chunk_attention=self.chunk_attention and T > 1,
                          compiled=self._jit if self.compile and not self._plain else None)
        ctx.rope_tables = ctx.jit(rope_cos_sin)
        return ctx

    def _blocks(self, x, pos):
        """The decoder on embeddings x [B, T, D] at positions pos: caches updated, counters advanced;
        returns the last position's logits [B, V]."""
        T = x.shape[1]
        ctx = self._context(T, pos)
        with pdl.disabled(not self.pdl):
            for blk, cache in zip(self.model.layers, self.caches):
                y, o_proj = step_for(blk.mixer)(blk.mixer, cache, ctx, x, blk.input_layernorm)
                x = ctx.jit(mixer_out)(blk, x, o_proj, y, ctx.fast)
            logits = head(self.model, x[:, -1:], ctx.fast)[:, 0]
        self.tok += T
        return logits

    def _decode_impl(self):
        pos = self.next_pos[:, None]                                            # [B, 1]
        if self.mrope:
            pos = pos[None].expand(3, -1, -1)
        logits = self._blocks(self.model.embed_tokens(self.ids)[:, None], pos)
        self.next_pos += 1
        return logits

    def _frame_impl(self, T):
        x, pos = self._frame_in[T]
        logits = self._blocks(x, pos)
        self.next_pos.copy_(pos.reshape(-1, pos.shape[-2], T).amax(dim=(0, 2)) + 1)
        return logits

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """One token per row (ids [B], on the device) -> next-token logits [B, V]."""
        # a full layer's capacity is checked where the host knows the lengths (generate): no sync here
        self.ids.copy_(ids.reshape(-1))
        return self._run(("decode",), self._decode_impl)

    @torch.no_grad()
    def step_embeddings(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """T tokens given as embeddings x [1, T, D] at M-RoPE / RoPE positions pos ([3, 1, T] or
        [1, T]) - a video frame's features - appended to row 0 (batch 1). Returns logits [1, V]."""
        if self.batch_size != 1:
            raise ValueError("step_embeddings (frames, prompt chunks) runs on a batch-1 engine")
        T = x.shape[1]
        if T not in self._frame_in:
            self._frame_in[T] = (torch.zeros(1, T, x.shape[2], device=self.device, dtype=self.dtype),
                                 torch.zeros(pos.shape, device=self.device, dtype=torch.long))
        xb, pb = self._frame_in[T]
        if pb.shape != pos.shape:
            raise ValueError(f"positions of shape {tuple(pos.shape)} for {T} tokens; the engine holds "
                             f"{tuple(pb.shape)} for that size")
        xb.copy_(x)
        pb.copy_(pos)
        return self._run(("frame", T), lambda: self._frame_impl(T))

    def _run(self, key, fn):
        """``fn`` for step ``key`` (decode, or a frame size): from its second use compiled and replayed
        from a CUDA graph; its first use runs as is, so a one-off size (a question's tokens, a new
        timestamp's width) costs neither a compile nor a capture."""
        if key not in self._used:
            self._used.add(key)
            self._plain = True
            try:
                return fn()
            finally:
                self._plain = False
        if not self.graphs:
            return fn()
        if key not in self._graphs:
            self.capture(key, fn)
        replay, out = self._graphs[key]
        replay()
        return out

    def capture(self, key, fn):
        """Capture ``fn`` (a step on the static buffers) in a CUDA graph: the one place vlt captures
        decoder graphs. Warm-up runs (Triton JIT, compile) mutate the cache, so it is saved and
        restored around them: capturing never changes what the engine holds."""
        snap = self.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn()
        self.restore(snap)
        self._graphs[key] = (g.replay, out)


class EngineUnsupported(ValueError):
    """The model has a layer the engine cannot decode (``vlt generate --engine auto`` then runs eager)."""


def check_engine_support(model):
    """A mixer whose state grows per token (``state_grows``) with no step of its own is held by
    ``GrowingStateStep`` along the dimension of its ``state_spec`` that follows the capacity; one whose
    spec has no such dimension cannot be held. Raised before anything is allocated or packed."""
    from vlt.inference.growing_step import GROWING, growing_dims
    bad = []
    for i, b in enumerate(model.layers):
        for m in (b.mixer, *getattr(b.mixer, "branches", ())):
            if step_for(m) is GROWING:
                try:
                    growing_dims(m)
                except ValueError as e:
                    bad.append((i, b.mixer_name, str(e)))
    if bad:
        raise EngineUnsupported(
            f"layers {[i for i, _, _ in bad]} ({sorted({n for _, n, _ in bad})}): {bad[0][2]}. Decode them with the "
            "eager path (vlt generate --engine eager; in Python vlt.inference.generate_eager)")


def _seen(tree) -> int:
    """Tokens seen, from the first mixer state (dict) that carries it."""
    if isinstance(tree, dict) and "seen" in tree:
        return int(tree["seen"])
    for v in (tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()):
        n = _seen(v)
        if n >= 0:
            return n
    return -1


def pack_projections(model) -> int:
    """Stack each block's projections that read one input (the groups its mixer's step declares,
    e.g. attention q/k/v, GDN q/k/v/g/a/b; the MLP's gate/up) with ``vlt.layers.pack_linears``:
    one GEMV each per decode step. LoRA-wrapped groups are left alone. Returns the groups packed."""
    n = 0
    for blk in model.layers:
        groups = [(blk.mixer, g) for g in step_for(blk.mixer).packed] + [(blk.mlp, ("gate_proj", "up_proj"))]
        for mod, names in groups:
            linears = [getattr(mod, name, None) for name in names]
            if all(type(lin) is nn.Linear for lin in linears) and getattr(linears[0], "packed_weight", None) is None:
                pack_linears(*linears)
                n += 1
    return n

