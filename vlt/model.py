"""The composed VLM: vision tower + projector + a decoder whose layers are registry mixers.

Legend: B batch, T tokens, D model width, V vocab. ``forward(**batch)`` takes the data module's
batch (input_ids, labels, images, position_ids, cu_seqlens) and returns logits [B, T, V], the
next-token loss when labels are given (positions with label -100 and packed-sample boundaries
excluded), and the decode state when ``use_cache``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from vlt.config import VLMConfig
from vlt.layers import RMSNorm, create_mixer, project
from vlt.positions import mrope_positions, text_positions
from vlt.vision import build_vision_tower, image_grid


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class DecoderBlock(nn.Module):
    """Pre-norm block: x + mixer(norm(x)), then x + mlp(norm(x)). Names follow HF Qwen2 where they can."""

    def __init__(self, mixer_name: str, mixer_options: dict, hidden: int, intermediate: int, eps: float):
        super().__init__()
        self.mixer_name = mixer_name
        self.input_layernorm = RMSNorm(hidden, eps)
        self.mixer = create_mixer(mixer_name, **mixer_options)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = SwiGLU(hidden, intermediate)

    def forward(self, x, *, state=None, cu_seqlens=None, position_ids=None, use_cache=False):
        h, new_state = self.mixer(self.input_layernorm(x), state=state, cu_seqlens=cu_seqlens,
                                  position_ids=position_ids, use_cache=use_cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), new_state


@dataclass
class VLMOutput:
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    state: dict | None = None
    hidden_states: list | None = None  # input of each layer, then the final (pre-norm) output
    last_hidden: torch.Tensor | None = None  # the final (pre-norm) output: what fused LM-head losses take


class VLM(nn.Module):
    """Vision tower + projector + decoder of per-layer token mixers, built from a ``VLMConfig``.

    ``forward(input_ids, labels=None, images=None, position_ids=None, cu_seqlens=None, state=None,
    use_cache=False, ...) -> VLMOutput(logits, loss, state)``: ``images`` are spliced in at the image
    pad tokens; packed rows take ``cu_seqlens`` (no state crosses a boundary); ``labels`` give the
    next-token loss at non -100 positions; ``use_cache=True`` returns the decode state, and the same
    call with one token and that ``state`` is a decode step. ``layout`` lists the mixer per layer.
    """

    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = config
        d = config.decoder
        layers = config.layers()  # validated before anything below allocates
        self.vision = build_vision_tower(config.vision, d.hidden_size)
        self.embed_tokens = nn.Embedding(d.vocab_size, d.hidden_size)
        self.layers = nn.ModuleList([DecoderBlock(n, o, d.hidden_size, d.intermediate_size, d.norm_eps)
                                     for n, o in layers])
        self.norm = RMSNorm(d.hidden_size, d.norm_eps)
        self.lm_head = nn.Linear(d.hidden_size, d.vocab_size, bias=False)
        self._init_weights()
        if d.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing: bool | float = False  # see checkpointed_blocks
        self.image_token_ids = tuple(t for t in (config.image_token_id, config.video_token_id) if t is not None)

    def _init_weights(self):
        std = self.config.decoder.initializer_range
        for name, m in self.named_modules():
            if name.startswith("vision"):
                continue  # towers keep their own (timm / HF) initialisation
            if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.dim() == 2:
                if name.endswith(("a_proj", "b_proj")):
                    continue  # GDN gate projections keep their mixer's init
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    @property
    def layout(self) -> list[str]:
        return [b.mixer_name for b in self.layers]

    # ---- pieces ---------------------------------------------------------------------------------
    def embed(self, input_ids, images=None, image_features=None):
        """Token embeddings with the images' features spliced in at their pad tokens. ``image_features``:
        this tower's output for ``images``, computed already (distillation shares the frozen teacher's)."""
        x = self.embed_tokens(input_ids)
        if not images:
            return x
        if self.vision is None:
            raise ValueError("the batch has images but the model has no vision tower (vision.kind='none')")
        feats = (self.vision(images) if image_features is None else image_features).to(x.dtype)
        mask = torch.isin(input_ids, torch.tensor(self.image_token_ids, device=input_ids.device))
        n = int(mask.sum())
        if n != feats.shape[0]:
            raise ValueError(f"input_ids hold {n} image tokens but the images give {feats.shape[0]} features; "
                             "each <image> must expand to (H/28)*(W/28) <|image_pad|> tokens for its image")
        return x.masked_scatter(mask[..., None], feats)

    @staticmethod
    def positions_1d(input_ids, position_ids, cu_seqlens, start):
        pos = position_ids if position_ids is not None else text_positions(input_ids, cu_seqlens, start)
        return pos, pos[:, -1] + 1

    def positions(self, input_ids, images, position_ids, cu_seqlens, start):
        """Position ids for the mixers ([B, T], or [3, B, T] with M-RoPE) and the next position [B]."""
        if self.config.decoder.mrope_section is None:
            return self.positions_1d(input_ids, position_ids, cu_seqlens, start)
        if not images:  # text only: M-RoPE's three axes are equal
            pos, nxt = self.positions_1d(input_ids, position_ids, cu_seqlens, start)
            return pos[None].expand(3, *pos.shape), nxt
        v = self.config.vision
        grids = [image_grid(im, v.patch_size, v.merge_size) for im in images]
        return mrope_positions(input_ids, self.image_token_ids, grids, cu_seqlens, start)

    def forward(self, input_ids, labels=None, images=None, position_ids=None, cu_seqlens=None, state=None,
                use_cache=False, output_hidden_states=False, compute_logits=True, logits_to_keep: int = 0,
                image_features=None, **_unused):
        x = self.embed(input_ids, images, image_features)
        start = None if state is None else state["next_pos"]
        pos, next_pos = self.positions(input_ids, images, position_ids if state is None else None, cu_seqlens, start)
        layer_states = [None] * len(self.layers) if state is None else state["layers"]
        hidden, new_states = [], []
        n_ckpt = checkpointed_blocks(self.gradient_checkpointing, len(self.layers)) \
            if self.training and torch.is_grad_enabled() else 0
        for i, (block, s) in enumerate(zip(self.layers, layer_states)):
            if output_hidden_states:
                hidden.append(x)
            if i < n_ckpt:  # recompute the block in backward: its activations are not kept
                x, ns = torch.utils.checkpoint.checkpoint(block, x, state=s, cu_seqlens=cu_seqlens, position_ids=pos,
                                                          use_cache=use_cache, use_reentrant=False)
            else:
                x, ns = block(x, state=s, cu_seqlens=cu_seqlens, position_ids=pos, use_cache=use_cache)
            new_states.append(ns)
        if output_hidden_states:
            hidden.append(x)
        out = VLMOutput(hidden_states=hidden if output_hidden_states else None, last_hidden=x)
        if use_cache:
            out.state = {"layers": new_states, "next_pos": next_pos}
        if compute_logits or labels is not None:
            # logits_to_keep=N: only the last N positions (generation prefill: a [T, vocab] matrix for
            # a long prompt would dwarf the model); 0 keeps all, and a loss always needs all.
            h = x[:, -logits_to_keep:] if logits_to_keep and labels is None else x
            out.logits = self.lm_head(self.norm(h))
        if labels is not None:
            out.loss = next_token_loss(out.logits, labels, cu_seqlens)
        return out


def shift_labels(labels, cu_seqlens=None):
    """Targets for next-token prediction, -100 where the next token belongs to another sample."""
    target = F.pad(labels[:, 1:], (0, 1), value=-100)
    if cu_seqlens is not None:
        ends = cu_seqlens[1:-1].long() - 1
        target[:, ends] = -100
    return target


def next_token_loss(logits, labels, cu_seqlens=None):
    target = shift_labels(labels, cu_seqlens)
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100)


def checkpointed_blocks(setting, num_blocks: int) -> int:
    """How many blocks (the first ones) recompute their activations in backward.

    ``setting``: True / False (all / none) or a fraction in (0, 1] of the blocks - a memory/speed dial
    between the two: each block not recomputed saves a forward in backward and keeps its activations."""
    if isinstance(setting, bool):
        return num_blocks if setting else 0
    if isinstance(setting, (int, float)) and 0 <= setting <= 1:
        return math.ceil(setting * num_blocks)
    raise ValueError(f"activation_checkpointing={setting!r}; allowed: true, false, or a fraction of the "
                     "blocks in [0, 1] (e.g. 0.5 recomputes the first half)")


# torch.nn.init's in-place initialisers: what nn.Linear / nn.Embedding / norms and VLM._init_weights call
_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                 "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                 "sparse_")


@contextlib.contextmanager
def skipped_init(enabled: bool = True):
    """Modules built inside keep their parameters' memory as allocated (torch.nn.init's initialisers do
    nothing), for a model whose every parameter is loaded next: building InfiniteVL-4B on the CPU spent
    43 of 58 s in nn.Linear's kaiming init (one thread: CPU random draws take a lock). Only where the
    caller then loads a full state dict strictly; buffers are computed as usual."""
    if not enabled:
        yield
        return
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS if hasattr(nn.init, name)}
    try:
        for name in saved:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_vlm(config: VLMConfig, device=None, dtype=None) -> "VLM":
    """A VLM built directly on ``device`` in ``dtype`` (its parameters initialised there): a 4B
    model initialised on the CPU in fp32 and then moved took most of a generate command's start-up."""
    dtype = dtype or torch.get_default_dtype()
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device or "cpu"):
            model = VLM(config)
    finally:
        torch.set_default_dtype(before)
    return model.to(dtype)
