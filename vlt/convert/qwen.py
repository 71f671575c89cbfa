"""Qwen2.5-VL (transformers) on the vlt side: load a local checkpoint as a teacher, map its config,
convert it (``vlt.convert.convert_to_student`` is the entry point; mimic/transfer are described in
``vlt.convert.student``), import it whole, and run it on a vlt batch.

- ``load_hf_teacher(path)``: a local Qwen2.5-VL checkpoint (config.json + safetensors) as a frozen,
  eval-mode ``Qwen2_5_VLForConditionalGeneration`` (through transformers, never from a hub). Not to be
  confused with ``vlt.training.distill.load_vlt_teacher``, which builds the vlt ``VLM`` a distillation
  run learns from (and calls ``import_qwen2_5_vl`` for such a directory).
- ``vlm_from_teacher_config(hf_config, layout, mixers, window)``: the ``VLMConfig`` with the teacher's
  shapes.
- ``convert_hf_teacher(teacher_or_path, layout, mixers, init, window)``: what ``convert_to_student`` runs
  for a transformers teacher: vision tower, merger, embeddings, MLPs and norms copied; attention
  layers of the layout (``full``/``swa``) get the teacher's q/k/v/o (with biases) and M-RoPE; every
  other mixer is initialised by ``init`` (``vlt.convert.student``).
- ``import_qwen2_5_vl(path)``: the teacher as a vlt ``VLM`` (every layer ``full``), same logits.
- ``teacher_forward(teacher, batch, layer_io=False)``: run it on a vlt batch (input_ids, list of
  normalised images, optional packed ``cu_seqlens``) -> logits and, for layer-wise distillation, each
  decoder layer's input and output. Video frames are fed as images, as the student sees them.
- ``QWEN_SPECIAL_TOKENS`` / ``QWEN_CHAT_TEMPLATE``: Qwen2.5-VL's special tokens and chat template
  (``vlt.testing`` builds tiny tokenizers with them).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from vlt.config import DecoderConfig, VisionConfig, VLMConfig
from vlt.qwen_vision import pixel_inputs
from vlt.convert.student import INITS, attention_weights, init_mixer_from_attention, recording_copy

log = logging.getLogger(__name__)

ARCH = "Qwen2_5_VLForConditionalGeneration"


# ---- checkpoint checks and loading ---------------------------------------------------------------
def check_teacher_dir(path) -> Path:
    """Raise FileNotFoundError / ValueError naming what a Qwen2.5-VL checkpoint directory lacks."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"teacher checkpoint {str(p)!r} is not a directory; expected a local Qwen2.5-VL "
                                "folder with config.json and model*.safetensors (as saved by save_pretrained)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p / 'config.json'} is missing; a Qwen2.5-VL checkpoint needs its config.json")
    cfg = json.loads((p / "config.json").read_text())
    if cfg.get("model_type") != "qwen2_5_vl":
        raise ValueError(f"{p / 'config.json'}: model_type={cfg.get('model_type')!r} "
                         f"(architectures {cfg.get('architectures')}); expected 'qwen2_5_vl' ({ARCH})")
    if not (list(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file()):
        raise FileNotFoundError(f"no *.safetensors weights in {p}; expected model.safetensors or "
                                "model.safetensors.index.json with its shards")
    return p


def load_hf_teacher(path, dtype=torch.float32, device=None, attn_implementation: str = "sdpa"):
    """The checkpoint as a frozen ``Qwen2_5_VLForConditionalGeneration`` in eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    p = check_teacher_dir(path)
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(p), dtype=dtype, local_files_only=True, attn_implementation=attn_implementation,
        output_loading_info=True, ignore_mismatched_sizes=True)  # so we can name them below
    missing = sorted(k for k in info.get("missing_keys", ()) if k != "lm_head.weight" or not _tied(model.config))
    bad = [f"{k}: file {tuple(a)}, config.json expects {tuple(b)}" for k, a, b in info.get("mismatched_keys", ())]
    if missing or bad:
        raise ValueError(f"{p}: the safetensors weights do not match its config.json: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; shape mismatches {sorted(bad)[:5]}")
    if device is not None:
        model.to(device)
    model.eval().requires_grad_(False)
    return model


def _tied(hf_config) -> bool:
    tie = getattr(hf_config, "tie_word_embeddings", None)
    if tie is None:
        tie = getattr(hf_config.text_config, "tie_word_embeddings", False)
    return bool(tie)


# ---- config mapping ----------------------------------------------------------------------------------
def vlm_from_teacher_config(hf_config, layout=None, mixers: dict | None = None, window: int | None = None,
                            name: str = "qwen2_5_vl-student") -> VLMConfig:
    """A ``VLMConfig`` with the teacher's shapes; ``layout`` defaults to every layer ``full``.

    ``full``/``swa`` get ``qkv_bias`` and M-RoPE from the teacher; ``window`` sets ``swa``'s window
    (required when the layout has ``swa``); ``mixers`` adds or overrides per-mixer options.
    """
    if isinstance(hf_config, (str, Path)):
        from transformers import Qwen2_5_VLConfig
        hf_config = Qwen2_5_VLConfig.from_pretrained(str(check_teacher_dir(hf_config)), local_files_only=True)
    if getattr(hf_config, "model_type", None) != "qwen2_5_vl":
        raise ValueError(f"teacher config has model_type={getattr(hf_config, 'model_type', None)!r}; "
                         "expected 'qwen2_5_vl'")
    t, v = hf_config.text_config, hf_config.vision_config
    rope = dict(getattr(t, "rope_parameters", None) or getattr(t, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
        raise ValueError(f"teacher rope_type={rope.get('rope_type')!r} is not supported; expected 'default' (M-RoPE)")
    theta = rope.get("rope_theta", getattr(t, "rope_theta", None))
    if t.hidden_act != "silu":
        raise ValueError(f"teacher text_config.hidden_act={t.hidden_act!r}; vlt's MLP is SwiGLU (expected 'silu')")
    if getattr(t, "use_sliding_window", False):
        raise ValueError("teacher text_config.use_sliding_window=true is not supported; expected full attention "
                         "in every teacher layer (choose student swa layers with the layout instead)")
    mix = {"full": {"qkv_bias": True}, "swa": {"qkv_bias": True}}
    if window is not None:
        mix["swa"]["window"] = window
        mix["swa_gdn"] = {"window": window}
    for key, opts in (mixers or {}).items():
        mix.setdefault(key, {}).update(opts or {})
    vision = VisionConfig(kind="qwen2_5_vl", hf_config=json.loads(v.to_json_string(use_diff=False)),
                          patch_size=v.patch_size, merge_size=v.spatial_merge_size)
    decoder = DecoderConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_heads=t.num_attention_heads, num_kv_heads=t.num_key_value_heads,
        layout=layout if layout is not None else f"[full] * {t.num_hidden_layers}",
        num_layers=t.num_hidden_layers, mixers=mix, norm_eps=t.rms_norm_eps, rope_theta=float(theta),
        mrope_section=list(rope["mrope_section"]) if rope.get("mrope_section") else None,
        tie_embeddings=_tied(hf_config), initializer_range=t.initializer_range)
    cfg = VLMConfig(vision=vision, decoder=decoder, image_token_id=hf_config.image_token_id,
                    video_token_id=hf_config.video_token_id,
                    vision_start_token_id=getattr(hf_config, "vision_start_token_id", None), name=name)
    for i, (mixer, opts) in enumerate(cfg.layers()):
        if mixer in ("swa", "swa_gdn") and "window" not in opts:
            raise ValueError(f"decoder.layout[{i}] is {mixer!r} but no window was given; pass window=... "
                             "(the recipe's swa window) or mixers={'swa': {'window': ...}}")
    return cfg


# ---- conversion ----------------------------------------------------------------------------------------
def convert_hf_teacher(teacher_or_path, layout=None, mixers: dict | None = None, init: str = "mimic",
                       window: int | None = None):
    """(student ``VLM``, names of parameters not copied from the teacher) from a transformers Qwen2.5-VL
    (or its directory); ``layout`` defaults to every layer ``full``. Called by ``convert_to_student``."""
    from vlt.model import VLM
    if init not in INITS:
        raise ValueError(f"init={init!r}; allowed: {list(INITS)}")
    teacher = teacher_or_path if isinstance(teacher_or_path, nn.Module) else load_hf_teacher(teacher_or_path)
    cfg = vlm_from_teacher_config(teacher.config, layout, mixers, window)
    student = VLM(cfg)
    t_lm, t_vis = teacher.model.language_model, teacher.model.visual
    copy, copied = recording_copy()

    for n, p in student.vision.visual.named_parameters():
        copy(p, t_vis.get_parameter(n), f"vision.visual.{n}")
    copy(student.embed_tokens.weight, t_lm.embed_tokens.weight, "embed_tokens.weight")
    copy(student.norm.weight, t_lm.norm.weight, "norm.weight")
    if not cfg.decoder.tie_embeddings:
        copy(student.lm_head.weight, teacher.lm_head.weight, "lm_head.weight")
    for i, (block, t_layer) in enumerate(zip(student.layers, t_lm.layers)):
        for sub in ("input_layernorm", "post_attention_layernorm", "mlp"):
            for n, p in getattr(block, sub).named_parameters():
                copy(p, getattr(t_layer, sub).get_parameter(n), f"layers.{i}.{sub}.{n}")
        attn = t_layer.self_attn
        init_mixer_from_attention(block.mixer, attention_weights(attn), attn.config.num_attention_heads,
                                  attn.config.num_key_value_heads, attn.head_dim, init, f"layers.{i}.mixer.", copy)
    new = [n for n, _ in student.named_parameters() if n not in copied]
    return student, new


def import_qwen2_5_vl(path, dtype=torch.float32):
    """The checkpoint as a vlt ``VLM`` with ``full`` attention in every layer: the same function as the
    HF model (fp32 logits agree to ~1e-6), usable as a vlt teacher or converted with convert_to_student."""
    model, _ = convert_hf_teacher(load_hf_teacher(path))
    return model.to(dtype)


# ---- running the teacher on a vlt batch ---------------------------------------------------------------
@torch.no_grad()
def teacher_forward(teacher, batch: dict, layer_io: bool = False) -> dict:
    """Teacher logits [B, T, V] (and with ``layer_io`` each decoder layer's input/output [B, T, D]).

    ``batch``: ``input_ids`` [B, T], ``images`` (list of normalised [3, H, W], reading order) and
    ``cu_seqlens`` (packed samples, B == 1: each sample runs on its own, positions restart at 0).
    """
    ids, images, cu = batch["input_ids"], list(batch.get("images") or []), batch.get("cu_seqlens")
    if cu is None:
        return _teacher_forward_one(teacher, ids, images, layer_io)
    if ids.shape[0] != 1:
        raise ValueError(f"packed batches (cu_seqlens) need batch size 1, got input_ids of shape {tuple(ids.shape)}")
    media = teacher.config.image_token_id, teacher.config.video_token_id
    unit = teacher.config.vision_config.patch_size * teacher.config.vision_config.spatial_merge_size
    outs = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seg = ids[:, s:e]
        need, mine = int(torch.isin(seg, torch.tensor(media, device=seg.device)).sum()), []
        while need > 0:  # take this sample's images, in order, until their tokens are accounted for
            if not images:
                raise ValueError(f"packed sample [{s}:{e}] has image tokens left but no images remain")
            im = images.pop(0)
            need -= (im.shape[-2] // unit) * (im.shape[-1] // unit)
            mine.append(im)
        outs.append(_teacher_forward_one(teacher, seg, mine, layer_io))
    out = {"logits": torch.cat([o["logits"] for o in outs], 1)}
    if layer_io:
        for key in ("layer_inputs", "layer_outputs"):
            out[key] = [torch.cat(xs, 1) for xs in zip(*[o[key] for o in outs])]
    return out


def _teacher_forward_one(teacher, input_ids, images, layer_io):
    cfg = teacher.config
    p = next(teacher.parameters())
    ids = input_ids.to(p.device)
    # Frames arrive as images: give video pads the image id so HF scatters image features there.
    ids = torch.where(ids == cfg.video_token_id, torch.full_like(ids, cfg.image_token_id), ids)
    B, T = ids.shape
    kwargs = {}
    if images:
        v = cfg.vision_config
        pixels, grid = pixel_inputs(images, v.patch_size, v.spatial_merge_size, v.temporal_patch_size)
        mm = (ids == cfg.image_token_id).int()
        pos, _ = teacher.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid.to(p.device))
        kwargs = dict(pixel_values=pixels.to(p.device, p.dtype), image_grid_thw=grid.to(p.device))
    else:
        pos = torch.arange(T, device=p.device).view(1, 1, T).expand(3, B, T)
    inputs, outputs, hooks = [], [], []
    if layer_io:
        for layer in teacher.model.language_model.layers:
            hooks.append(layer.register_forward_pre_hook(
                lambda m, a, k: inputs.append(a[0] if a else k["hidden_states"]), with_kwargs=True))
            hooks.append(layer.register_forward_hook(
                lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o)))
    try:
        logits = teacher(input_ids=ids, position_ids=pos, use_cache=False, **kwargs).logits
    finally:
        for h in hooks:
            h.remove()
    out = {"logits": logits}
    if layer_io:
        out["layer_inputs"], out["layer_outputs"] = inputs, outputs
    return out


# ---- Qwen2.5-VL's tokens and chat template ---------------------------------------------------------
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")
# Qwen2-VL / Qwen2.5-VL's chat template (tokenizer_config.json of the released checkpoints).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
