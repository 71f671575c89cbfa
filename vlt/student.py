"""Turn a full-attention vlt VLM (the teacher, or a teacher imported from Qwen2.5-VL) into a
student with another layout.

Everything outside the converted mixers is copied: vision tower, projector, embeddings, MLPs,
norms, and the mixers of layers whose type does not change. A layer that becomes ``swa`` keeps
the teacher's q/k/v/o (same shapes). A layer that becomes another mixer is initialised by:

- ``mimic`` (InfiniteVL): the mixer's own init, then ``mimic_init()`` where it has one (GDN:
  beta 0.5, decay ~0.999, identity convs);
- ``transfer`` (Mamba-in-the-Llama, RADLADS): q/k/v/o copied from the attention layer where the
  shapes allow (KV heads repeated to the query heads; a wider value/o projection gets the
  teacher's weights in its first block and keeps its init elsewhere), then ``mimic_init()``.

Returns the student and the names of the parameters that did not come from the teacher, which the
training code refuses to leave frozen.
"""
from __future__ import annotations

import copy

import torch

from vlt.config import VLMConfig
from vlt.model import VLM

INITS = ("mimic", "transfer")
ATTENTION = ("full", "swa")


def student_config(teacher_cfg: VLMConfig, layout, mixers: dict | None = None) -> VLMConfig:
    d = teacher_cfg.to_dict()
    d["decoder"]["layout"] = layout
    d["decoder"]["num_layers"] = None
    if mixers is not None:
        d["decoder"]["mixers"] = {**d["decoder"]["mixers"], **mixers}
    d["name"] = f"{teacher_cfg.name}-student"
    return VLMConfig.from_dict(d)


def convert(teacher: VLM, layout, mixers: dict | None = None, init: str = "mimic") -> tuple[VLM, list[str]]:
    if init not in INITS:
        raise ValueError(f"init={init!r}; allowed: {list(INITS)}")
    cfg = student_config(teacher.config, layout, mixers)
    if len(cfg.layers()) != len(teacher.layers):
        raise ValueError(f"student layout has {len(cfg.layers())} layers but the teacher has {len(teacher.layers)}; "
                         "conversion keeps depth - give one mixer per teacher layer")
    student = VLM(cfg)
    t_sd = teacher.state_dict()
    new: list[str] = []
    s_sd = student.state_dict()
    for i, (s_block, t_block) in enumerate(zip(student.layers, teacher.layers)):
        if t_block.mixer_name not in ATTENTION:
            continue
        if s_block.mixer_name in ATTENTION:
            continue  # same projections; copied below with everything else
        prefix = f"layers.{i}.mixer."
        new += [prefix + n for n, _ in s_block.mixer.named_parameters()]
        if init == "transfer":
            _transfer(s_block.mixer, t_block.mixer)
        if hasattr(s_block.mixer, "mimic_init"):
            s_block.mixer.mimic_init()
    fresh = {prefix for prefix in new}
    with torch.no_grad():
        for name, tensor in s_sd.items():
            if name in fresh:
                continue
            if name not in t_sd:
                raise ValueError(f"student parameter {name!r} has no counterpart in the teacher")
            if t_sd[name].shape != tensor.shape:
                raise ValueError(f"shape mismatch for {name!r}: teacher {tuple(t_sd[name].shape)}, "
                                 f"student {tuple(tensor.shape)}")
            tensor.copy_(t_sd[name])
    return student, new


@torch.no_grad()
def _transfer(mixer, attn):
    rep = attn.num_heads // attn.num_kv_heads
    hd = attn.head_dim

    def heads(w, n):  # [n*hd, D] -> repeat each KV head `rep` times -> [n*rep*hd, D]
        return w.view(n, hd, -1).repeat_interleave(rep, 0).reshape(n * rep * hd, -1)

    src = {"q_proj": attn.q_proj.weight, "k_proj": heads(attn.k_proj.weight, attn.num_kv_heads),
           "v_proj": heads(attn.v_proj.weight, attn.num_kv_heads)}
    for name, w in src.items():
        dst = getattr(mixer, name, None)
        if dst is None:
            continue
        r, c = min(dst.weight.shape[0], w.shape[0]), min(dst.weight.shape[1], w.shape[1])
        dst.weight[:r, :c] = w[:r, :c]
    if hasattr(mixer, "o_proj"):
        w = attn.o_proj.weight
        r, c = min(mixer.o_proj.weight.shape[0], w.shape[0]), min(mixer.o_proj.weight.shape[1], w.shape[1])
        mixer.o_proj.weight[:r, :c] = w[:r, :c]
        if mixer.o_proj.weight.shape[1] > w.shape[1]:  # the extra value channels start silent
            mixer.o_proj.weight[:, c:] = 0


def teacher_like(student_cfg: VLMConfig) -> VLMConfig:
    """The full-attention config with the same shapes (for a registry-built teacher)."""
    d = copy.deepcopy(student_cfg.to_dict())
    d["decoder"]["layout"] = ["full"] * len(student_cfg.layers())
    d["decoder"]["num_layers"] = None
    return VLMConfig.from_dict(d)
