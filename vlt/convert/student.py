"""Student conversion: a full-attention teacher -> a vlt ``VLM`` with another layout, of the same depth.

The one entry point is ``convert_to_student(teacher, layout=None, mixers=None, init="mimic", window=None)``;
``teacher`` is a vlt ``VLM`` with attention (``full``/``swa``) in every layer, a transformers
``Qwen2_5_VLForConditionalGeneration`` (``vlt.convert.load_hf_teacher``), or the path of a local Qwen2.5-VL
directory. It returns ``(student, new)``: the student and the names of the parameters *not* copied from
the teacher (in full), which training must not leave frozen.

Everything outside the converted mixers is copied: vision tower, projector/merger, embeddings, MLPs,
norms (and ``lm_head`` when untied). A layer that stays attention (``full``/``swa``) keeps the teacher's
q/k/v/o with their biases (and M-RoPE from a Qwen2.5-VL teacher). Every other mixer is initialised by
``init``:

- ``mimic`` (InfiniteVL): the mixer's own init, then its ``mimic_init()`` where it has one (GDN:
  beta 0.5, decay ~0.999, identity convs; kda/gdn2/deltanet likewise); projections stay random;
- ``transfer`` (Mamba-in-the-Llama, RADLADS): ``mimic_init()`` for the gates, then q/k/v/o copied from
  the teacher's attention where the shapes allow, KV heads repeated to the query heads (GQA). Where a
  value head is wider than the teacher's (GDN ``expand_v=2``: 2 * head_dim), the teacher's head fills
  the first ``head_dim`` channels of that head in v_proj and o_proj; the extra channels keep their
  random v_proj rows and get zero o_proj columns: at init they add nothing to o_proj's output directly
  (they do enter the per-head gated RMSNorm's scale) yet still receive gradient. Teacher q/k/v biases
  are dropped (GDN and linear projections have none).

``window`` sets the ``swa`` (and ``swa_gdn``) window; ``mixers`` adds or overrides per-mixer options.
The building blocks (``recording_copy``, ``attention_weights``, ``init_mixer_from_attention``) serve
both teacher kinds; ``vlt.convert.qwen`` maps a Qwen2.5-VL's modules onto them.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from vlt.config import VLMConfig

log = logging.getLogger(__name__)

INITS = ("mimic", "transfer")
ATTENTION = ("full", "swa")


def convert_to_student(teacher, layout=None, mixers: dict | None = None, init: str = "mimic",
                       window: int | None = None):
    """(student ``VLM``, names of parameters not copied from the teacher); see the module docstring."""
    from vlt.model import VLM
    if init not in INITS:
        raise ValueError(f"init={init!r}; allowed: {list(INITS)}")
    if isinstance(teacher, VLM):
        return _convert_vlm(teacher, layout, _with_window(mixers, window), init)
    from vlt.convert.qwen import convert_hf_teacher  # a transformers Qwen2.5-VL model, or its directory
    return convert_hf_teacher(teacher, layout, mixers, init, window)


def _with_window(mixers: dict | None, window: int | None) -> dict | None:
    if window is None:
        return mixers
    out = {"swa": {"window": window}, "swa_gdn": {"window": window}}
    for key, opts in (mixers or {}).items():
        out.setdefault(key, {}).update(opts or {})
    return out


def student_config(teacher_cfg: VLMConfig, layout, mixers: dict | None = None) -> VLMConfig:
    """The teacher's config with the student's layout and per-mixer options merged in."""
    d = teacher_cfg.to_dict()
    d["decoder"]["layout"] = layout
    d["decoder"]["num_layers"] = None
    for name, opts in (mixers or {}).items():  # per mixer: a window must not drop the teacher's qkv_bias
        d["decoder"]["mixers"].setdefault(name, {}).update(opts or {})
    d["name"] = f"{teacher_cfg.name}-student"
    return VLMConfig.from_dict(d)


def _convert_vlm(teacher, layout, mixers: dict | None, init: str):
    from vlt.model import VLM
    cfg = student_config(teacher.config, layout if layout is not None else teacher.layout, mixers)
    if len(cfg.layers()) != len(teacher.layers):
        raise ValueError(f"student layout has {len(cfg.layers())} layers but the teacher has "
                         f"{len(teacher.layers)}; conversion keeps depth - give one mixer per teacher layer")
    student = VLM(cfg)
    t_params = dict(teacher.named_parameters())
    copy, copied = recording_copy()

    for name, p in student.named_parameters():
        if ".mixer." in name:
            continue
        if name not in t_params:
            raise ValueError(f"student parameter {name!r} has no counterpart in the teacher")
        copy(p, t_params[name], name)
    for i, (s_block, t_block) in enumerate(zip(student.layers, teacher.layers)):
        if t_block.mixer_name not in ATTENTION:
            raise ValueError(f"teacher layer {i} is {t_block.mixer_name!r}; conversion starts from attention "
                             "layers")
        attn = t_block.mixer
        init_mixer_from_attention(s_block.mixer, attention_weights(attn), attn.num_heads, attn.num_kv_heads,
                                  attn.head_dim, init, f"layers.{i}.mixer.", copy)
    return student, [n for n, _ in student.named_parameters() if n not in copied]


def recording_copy():
    """``(copy, copied)``: ``copy(dst, src, name)`` copies a teacher tensor into a student parameter
    (shapes must agree) and records ``name`` in the set ``copied``; what is not in it is new."""
    copied: set[str] = set()

    def copy(dst, src, name):
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"{name}: teacher tensor has shape {tuple(src.shape)} but the student expects "
                             f"{tuple(dst.shape)}; check the mixer options against the teacher's config")
        with torch.no_grad():
            dst.copy_(src.to(dst.dtype))
        copied.add(name)

    return copy, copied


def attention_weights(attn) -> dict:
    """{proj: (weight, bias or None)} of an attention module with q/k/v/o_proj (vlt's or transformers')."""
    return {p: (getattr(attn, p).weight, getattr(attn, p).bias) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}


def init_mixer_from_attention(mixer, weights: dict, num_heads: int, num_kv_heads: int, head_dim: int, init: str,
                              prefix: str, copy):
    """Initialise one student mixer from a teacher attention layer by ``init`` (see the module docstring).

    ``copy(dst, src, name)`` copies a whole tensor and records ``name`` as coming from the teacher."""
    from vlt.layers.attention import Attention
    from vlt.layers.hybrid import HybridMixer
    if isinstance(mixer, Attention):
        for proj, (w, b) in weights.items():
            dst = getattr(mixer, proj)
            if (dst.bias is None) != (b is None):
                raise ValueError(f"{prefix}{proj}: the teacher's projection {'has' if b is not None else 'has no'} "
                                 f"bias; give this attention mixer qkv_bias={b is not None} (for a hybrid, use "
                                 "'hybrid' with branches [{mixer: swa, window: W, qkv_bias: true}, gdn])")
            copy(dst.weight, w, f"{prefix}{proj}.weight")
            if b is not None:
                copy(dst.bias, b, f"{prefix}{proj}.bias")
    elif isinstance(mixer, HybridMixer):
        for j, branch in enumerate(mixer.branches):
            init_mixer_from_attention(branch, weights, num_heads, num_kv_heads, head_dim, init,
                                      f"{prefix}branches.{j}.", copy)
    else:
        if hasattr(mixer, "mimic_init"):
            mixer.mimic_init()
        if init == "transfer":
            _transfer_qkvo(mixer, weights, num_heads, num_kv_heads, head_dim, prefix, copy)


@torch.no_grad()
def _transfer_qkvo(mixer, weights, H, Hkv, d, prefix, copy):
    """q/k/v/o into a non-attention mixer, per head, KV heads repeated for GQA; a wider value head
    (GDN expand_v = 2) gets the teacher's head in its first ``d`` channels and silent o_proj columns."""
    D = weights["q_proj"][0].shape[1]
    rep = lambda w: w.view(Hkv, d, D).repeat_interleave(H // Hkv, 0).reshape(H * d, D)  # noqa: E731
    src = {"q_proj": weights["q_proj"][0], "k_proj": rep(weights["k_proj"][0]), "v_proj": rep(weights["v_proj"][0])}
    for proj, w in src.items():
        dst = getattr(mixer, proj, None)
        if not isinstance(dst, nn.Linear):
            continue
        R = dst.weight.shape[0]
        if R == H * d:
            copy(dst.weight, w, f"{prefix}{proj}.weight")
        elif R % H == 0 and R // H >= d:  # wider heads: fill each head's first d channels
            dst.weight.view(H, R // H, D)[:, :d] = w.view(H, d, D)
        else:
            log.warning("transfer: %s%s has %d rows, cannot map %d teacher heads of %d; left at init",
                        prefix, proj, R, H, d)
    dst = getattr(mixer, "o_proj", None)
    if isinstance(dst, nn.Linear):
        C = dst.weight.shape[1]
        if C == H * d:
            copy(dst.weight, weights["o_proj"][0], f"{prefix}o_proj.weight")
        elif C % H == 0 and C // H >= d:
            o = dst.weight.view(D, H, C // H)
            o.zero_()  # extra value channels start silent
            o[:, :, :d] = weights["o_proj"][0].view(D, H, d)
        else:
            log.warning("transfer: %so_proj has %d columns, cannot map %d teacher heads of %d; left at init",
                        prefix, C, H, d)


def teacher_like(student_cfg: VLMConfig) -> VLMConfig:
    """The full-attention config with the same shapes (for a registry-built teacher)."""
    d = copy.deepcopy(student_cfg.to_dict())
    d["decoder"]["layout"] = ["full"] * len(student_cfg.layers())
    d["decoder"]["num_layers"] = None
    return VLMConfig.from_dict(d)
