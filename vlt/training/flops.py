"""Model FLOPs of one training step, counted per part, for an honest MFU.

Counted: every matrix product a row goes through - vision tower Linears and patch embedding per
image patch, projector per merged (LLM) image token, each decoder mixer's projections and its
sequence term (causal attention: the visible keys of each packed sample; SWA: at most ``window``;
GDN / linear attention: the chunked form's intra-chunk and state products), the MLPs, the LM head
on the rows it actually runs on (the supervised / distilled positions) - and, in distillation, the
teacher's forward. Norms, activations, convs of width 4 and softmax are elementwise and not counted.

Backward counts only what trains: a weight gradient (2 x the forward product) for each trainable
weight, an input gradient (2 x) for each product that has a trainable parameter upstream of it,
and 2 x each sequence term that has one (so a frozen tower costs its forward only, and a LoRA run
pays input gradients through the decoder but weight gradients for the adapters alone).
Recomputation by activation checkpointing is not model work and is not counted.

Peak: the accelerator's dense bf16 peak from its name (``peak_tflops_for``).
"""
from __future__ import annotations

import logging
from collections import defaultdict

from torch import nn

log = logging.getLogger("vlt")
GDN_CHUNK = 64  # the chunk length of fla's chunked kernels (and vlt's torch path)

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
DENSE_BF16_PEAK = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H100", 989.4), ("GH200", 989.4),
                   ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("RTX 4090", 165.2))


def peak_tflops_for(device_name: str) -> tuple[float | None, str | None]:
    """(dense bf16 TFLOP/s, the table entry it matched) for a CUDA device name, or (None, None)."""
    for key, tflops in DENSE_BF16_PEAK:
        if key.lower() in device_name.lower():
            return tflops, f"{key} dense bf16 {tflops} TFLOP/s"
    return None, None


# ---- sequence terms ---------------------------------------------------------------------------------
def mixer_seq_flops(mixer, seg_lens) -> float:
    """Forward FLOPs of a (leaf) mixer's token mixing over packed samples of the given lengths."""
    if hasattr(mixer, "branches"):
        return sum(mixer_seq_flops(b, seg_lens) for b in mixer.branches)
    if hasattr(mixer, "head_k_dim"):  # GDN, chunked: intra-chunk products + state products
        K, V, H = mixer.head_k_dim, mixer.head_v_dim, mixer.num_v_heads
        return 2.0 * H * sum(seg_lens) * (3 * GDN_CHUNK * K + 2 * GDN_CHUNK * V + 3 * K * V)
    if hasattr(mixer, "window"):  # full / swa softmax attention: QK^T and AV over the visible keys
        W = mixer.window
        visible = 0.0
        for T in seg_lens:
            visible += T * (T + 1) / 2 if W is None or W >= T else W * (W + 1) / 2 + (T - W) * W
        return 4.0 * mixer.num_heads * mixer.head_dim * visible
    if hasattr(mixer, "feature_map"):  # linear attention, chunked
        K = V = mixer.head_dim
        return 2.0 * mixer.num_heads * sum(seg_lens) * (GDN_CHUNK * K + GDN_CHUNK * V + 2 * K * V)
    # A user's own mixer: its projections are counted as Linears; its mixing term is unknown, so it
    # counts as 0 (MFU is then a lower bound), said once.
    if type(mixer).__name__ not in _WARNED:
        _WARNED.add(type(mixer).__name__)
        log.warning("no FLOP model for mixer %s: its sequence term counts as 0 in perf/mfu", type(mixer).__name__)
    return 0.0


_WARNED: set = set()


def vision_seq_flops(tower, image_hw) -> float:
    """Forward attention FLOPs (QK^T and AV, not causal) of a vision tower over images of (H, W) px."""
    if tower is None or not image_hw:
        return 0.0
    if hasattr(tower, "visual"):  # Qwen2.5-VL: window attention, full attention at a few blocks
        v = tower.visual
        p, m = v.patch_size, v.spatial_merge_size
        ws = v.window_size // m // p  # window side in merged tokens
        dim = v.config.hidden_size
        full = set(v.fullatt_block_indexes)
        total = 0.0
        for H, W in image_hw:
            gh, gw = H // (p * m), W // (p * m)
            n = gh * gw * m * m
            win = sum((min(ws, gh - i) * min(ws, gw - j) * m * m) ** 2
                      for i in range(0, gh, ws) for j in range(0, gw, ws))
            for b in range(len(v.blocks)):
                total += 4.0 * dim * (n * n if b in full else win)
        return total
    vit = tower.vit  # timm ViT: full attention over each image's patches
    p = tower.patch_size
    dim = vit.embed_dim
    return sum(4.0 * dim * ((H // p) * (W // p)) ** 2 * len(vit.blocks) for H, W in image_hw)


# ---- products -----------------------------------------------------------------------------------------
def _projections(root, kinds=(nn.Linear,)):
    """(name, module) of each product under ``root``: plain Linears (Convs) and peft LoRA wrappers
    (whose base and adapters ``_product`` counts together), in registration order."""
    wrapped = []
    for name, mod in root.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):
            wrapped.append(name)
            yield name, mod
        elif isinstance(mod, kinds):
            yield name, mod


def _trains(mod, recurse=True) -> bool:
    return any(p.requires_grad for p in mod.parameters(recurse=recurse))


def _product(mod, rows, upstream: bool):
    """(fwd, bwd) of one Linear / Conv / peft LoRA Linear over ``rows`` rows, given whether anything
    upstream of its input trains."""
    if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):  # peft LoRA: base + B(A(x))
        f, b = _product(mod.base_layer, rows, upstream)
        a_trains = False
        for key in mod.lora_A:
            fa, ba = _product(mod.lora_A[key], rows, upstream)
            a_trains = a_trains or _trains(mod.lora_A[key])
            fb, bb = _product(mod.lora_B[key], rows, upstream or a_trains)
            f, b = f + fa + fb, b + ba + bb
        return f, b
    w = mod.weight
    f = 2.0 * w.numel() * rows
    return f, f * (int(w.requires_grad) + int(upstream))


class StepFlops:
    """Forward and backward FLOPs per part of one step; ``add_*`` accumulate, ``total`` sums."""

    def __init__(self):
        self.parts = defaultdict(lambda: [0.0, 0.0])

    def add(self, part, fwd, bwd=0.0):
        self.parts[part][0] += fwd
        self.parts[part][1] += bwd

    @property
    def total(self) -> float:
        return sum(f + b for f, b in self.parts.values())

    def as_dict(self) -> dict:
        return {k: {"fwd": v[0], "bwd": v[1]} for k, v in sorted(self.parts.items())}

    # -- pieces of a VLM --
    def add_vision(self, model, image_hw, prefix="", backward=True) -> bool:
        """Vision tower per patch, projector per merged token. Returns whether anything in it trains."""
        tower = model.vision
        if tower is None or not image_hw:
            return False
        ps, ms = model.config.vision.patch_size, model.config.vision.merge_size
        patches = sum((H // ps) * (W // ps) for H, W in image_hw)
        merged = patches // (ms * ms)
        upstream = False
        products = dict(_projections(tower, (nn.Linear, nn.Conv2d, nn.Conv3d)))
        for name, mod in tower.named_modules():
            if name not in products:  # a norm's (or any other) trainable weight needs the grads after it
                if not any(name.startswith(p + ".") for p in products):
                    upstream = upstream or _trains(mod, recurse=False)
                continue
            proj = "projector" in name or "merger" in name
            rows = merged if proj else patches
            pixels = isinstance(mod, (nn.Conv2d, nn.Conv3d))  # the patch embedding reads pixels: no input grad
            f, b = _product(mod, rows, upstream and backward and not pixels)
            self.add(prefix + ("projector" if proj else "vision"), f, b if backward else 0.0)
            upstream = upstream or _trains(mod)
        seq = vision_seq_flops(tower, image_hw)
        self.add(prefix + "vision:attention", seq, 2 * seq if backward and upstream else 0.0)
        return backward and _trains(tower)

    def add_block(self, block, seg_lens, upstream: bool, prefix="", backward=True) -> bool:
        """One decoder block over packed samples; returns whether anything up to its output trains."""
        rows = sum(seg_lens)
        kind = block.mixer_name
        up = backward and (upstream or _trains(block.input_layernorm))
        mixer = block.mixer
        prods = list(_projections(mixer))
        outs = [(n, m) for n, m in prods if n.endswith("o_proj")]
        out_names = tuple(n for n, _ in outs)
        mixer_inner = False
        for name, mod in prods:
            if name in out_names:
                continue
            f, b = _product(mod, rows, up)  # the input projections all read the block's normed input
            self.add(f"{prefix}mixer:{kind}", f, b if backward else 0.0)
        for name, mod in mixer.named_parameters():
            if mod.requires_grad and not name.startswith(out_names):
                mixer_inner = True
        mid = backward and (up or mixer_inner)
        seq = mixer_seq_flops(mixer, seg_lens)
        self.add(f"{prefix}mixer:{kind}:seq", seq, 2 * seq if mid else 0.0)
        for _, mod in outs:
            f, b = _product(mod, rows, mid)
            self.add(f"{prefix}mixer:{kind}", f, b if backward else 0.0)
        up = backward and (upstream or _trains(block.input_layernorm) or _trains(mixer)
                           or _trains(block.post_attention_layernorm))
        mlp = block.mlp
        for mod in (mlp.gate_proj, mlp.up_proj):
            f, b = _product(mod, rows, up)
            self.add(prefix + "mlp", f, b if backward else 0.0)
        f, b = _product(mlp.down_proj, rows, up or _trains(mlp.gate_proj) or _trains(mlp.up_proj))
        self.add(prefix + "mlp", f, b if backward else 0.0)
        return backward and (upstream or _trains(block))

    def add_head(self, model, rows, upstream: bool, prefix="", backward=True):
        up = backward and (upstream or _trains(model.norm))
        f, b = _product(model.lm_head, rows, up)
        self.add(prefix + "lm_head", f, b if backward else 0.0)

    def add_model(self, model, seg_lens, image_hw, head_rows, prefix="", backward=True, head=True, vision=True):
        """A whole VLM forward (and backward of what trains): vision (unless ``vision=False``: its features
        came from elsewhere), embeddings, blocks, head."""
        up = self.add_vision(model, image_hw, prefix, backward) if vision else False
        up = up or (backward and model.embed_tokens.weight.requires_grad)
        for block in model.layers:
            up = self.add_block(block, seg_lens, up, prefix, backward)
        if head:
            self.add_head(model, head_rows, up, prefix, backward)


def segment_lengths(batch) -> list[int]:
    """Lengths of the packed samples of a batch (row padding counts as its own segment, as it is
    computed), or of each row when unpacked."""
    cu = batch.get("cu_seqlens")
    if cu is not None:
        cu = [int(c) for c in cu]
        return [b - a for a, b in zip(cu[:-1], cu[1:]) if b > a]
    B, T = batch["input_ids"].shape
    return [T] * B


def image_sizes(batch) -> list[tuple[int, int]]:
    return [tuple(int(s) for s in im.shape[-2:]) for im in (batch.get("images") or [])]

