"""Teacher-student distillation from a full-attention VLM (InfiniteVL stage I).

phase "layer" (I-1): every converted student layer runs on the teacher's input to that layer
(teacher forcing); loss = scale * mean over converted layers of MSE(student_out, teacher_out),
plus ``cosine_weight`` * (1 - cosine similarity) if set.
phase "kl" (I-2): KL(teacher || student) on logits at temperature T, times T^2, over all
non-padding positions or assistant positions only.

The teacher is a vlt VLM with full attention: built from a config dict (random, for tests and
ablations), loaded from a vlt checkpoint/export, or imported from a Qwen2.5-VL directory. It is
frozen and kept out of the module's parameters and checkpoints.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from vlt.config import VLMConfig
from vlt.model import VLM, shift_labels
from vlt.training.base import VLTModule, build_config

PHASES = ("layer", "kl")
KL_POSITIONS = ("all", "assistant")


def kl_distill_loss(student_logits, teacher_logits, mask, temperature: float):
    """T^2 * mean over masked positions of KL(softmax(t/T) || softmax(s/T))."""
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    s = F.log_softmax(student_logits.float() / temperature, -1)
    kl = (t.exp() * (t - s)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1) * temperature ** 2


def layer_mse_loss(student_outs, teacher_outs, scale: float, cosine_weight: float = 0.0):
    """(scale * mean_l MSE_l [+ cosine_weight * mean_l (1 - cos_l)], per-term dict)."""
    mse = torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(student_outs, teacher_outs)]).mean()
    terms = {"loss/mse": mse}
    loss = scale * mse
    if cosine_weight:
        cos = torch.stack([1 - F.cosine_similarity(s.float(), t.float(), dim=-1).mean()
                           for s, t in zip(student_outs, teacher_outs)]).mean()
        terms["loss/cosine"] = cos
        loss = loss + cosine_weight * cos
    return loss, terms


def load_teacher(teacher, tokens=None) -> VLM:
    if isinstance(teacher, dict):
        teacher = dict(teacher)  # {model_name?, layout?, ...model config overrides}
        cfg = build_config(teacher.pop("model_name", None), teacher, tokens, teacher.pop("layout", None))
        if any(n != "full" for n, _ in cfg.layers()):
            raise ValueError("teacher: the teacher must be full attention in every layer (layout '[full] * N')")
        return VLM(cfg)
    path = Path(str(teacher)).expanduser()
    if (path / "config.json").is_file() and not (path / "vlt_config.json").is_file():
        from vlt.convert import import_qwen2_5_vl  # a transformers Qwen2.5-VL directory
        return import_qwen2_5_vl(str(path))
    from vlt.checkpoint import load_model_state
    cfg, state = load_model_state(path)
    model = VLM(VLMConfig.from_dict(cfg))
    model.load_state_dict(state)
    return model


class Distillation(VLTModule):
    def __init__(self, teacher: dict | str, student_layout: str | list, student_mixers: dict | None = None,
                 init: str = "mimic", phase: str = "layer", temperature: float = 2.0, kl_positions: str = "all",
                 mse_scale: float = 1000.0, cosine_weight: float = 0.0, **kwargs):
        """
        Args:
            teacher: a model config dict (full attention), a vlt checkpoint / export dir, or a Qwen2.5-VL dir.
            student_layout: the student's layout; layers that are not attention there are converted.
            init: ``mimic`` or ``transfer`` for converted layers (see vlt.student).
            phase: ``layer`` (teacher-forced layer MSE) or ``kl`` (end-to-end logit KL).
            kl_positions: ``all`` non-padding positions or ``assistant`` positions only.
        """
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r}; allowed: {list(PHASES)}")
        if kl_positions not in KL_POSITIONS:
            raise ValueError(f"kl_positions={kl_positions!r}; allowed: {list(KL_POSITIONS)}")
        self._teacher_spec = teacher
        super().__init__(**kwargs)
        self.converted = [i for i, b in enumerate(self.model.layers) if b.mixer_name not in ("full", "swa")]

    def build_model(self):
        from vlt.student import convert
        hp = self.hparams
        teacher = load_teacher(self._teacher_spec, hp.tokens).eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never trained, never checkpointed
        student, self._new = convert(teacher, hp.student_layout, hp.student_mixers, hp.init)
        return student

    def initial_new_params(self):
        return list(self._new)

    def default_trainable(self, default):
        if self.hparams.lora:
            return default
        return ["layers.*.mixer.*"] if self.hparams.phase == "kl" else [
            f"layers.{i}.mixer.*" for i, b in enumerate(self.model.layers) if b.mixer_name not in ("full", "swa")]

    def on_fit_start(self):
        self.teacher.to(self.device)
        super().on_fit_start()

    def on_validation_start(self):
        self.teacher.to(self.device)

    def compute_loss(self, batch):
        hp = self.hparams
        inputs = {k: batch.get(k) for k in ("input_ids", "images", "position_ids", "cu_seqlens")}
        with torch.no_grad():
            t = self.teacher(**inputs, output_hidden_states=hp.phase == "layer", compute_logits=hp.phase == "kl")
        if hp.phase == "layer":
            pos, _ = self.model.positions(batch["input_ids"], batch.get("images"), batch.get("position_ids"),
                                          batch.get("cu_seqlens"), None)
            outs = [self.model.layers[i](t.hidden_states[i], cu_seqlens=batch.get("cu_seqlens"), position_ids=pos)[0]
                    for i in self.converted]
            return layer_mse_loss(outs, [t.hidden_states[i + 1] for i in self.converted], hp.mse_scale,
                                  hp.cosine_weight)
        s = self.model(**inputs)
        if hp.kl_positions == "assistant":
            mask = (shift_labels(batch["labels"], batch.get("cu_seqlens")) != -100).float()
        else:
            pad = (self.hparams.tokens or {}).get("pad_token_id")
            mask = torch.ones_like(batch["input_ids"], dtype=torch.float)
            if pad is not None:
                mask = (batch["input_ids"] != pad).float()
        loss = kl_distill_loss(s.logits, t.logits, mask, hp.temperature)
        return loss, {"loss/kl": loss}
