"""Teacher-student distillation from a full-attention VLM (InfiniteVL stage I).

phase "layer" (I-1): every converted student layer runs on the teacher's input to that layer
(teacher forcing); loss = scale * mean over converted layers of MSE(student_out, teacher_out),
plus ``cosine_weight`` * (1 - cosine similarity) if set.
phase "kl" (I-2): KL(teacher || student) on logits at temperature T, times T^2, over all
non-padding positions or assistant positions only.

What a step keeps: the teacher runs under no_grad (in bf16 on CUDA by default), so none of its
activations outlive their layer. In the layer phase the teacher and student advance together, one
layer at a time: only each converted layer's input and target are held for the student's
backward, and with ``activation_checkpointing`` a converted layer's own activations are recomputed
in backward instead of kept. In the KL phase only the teacher's final hidden states at the loss
positions are kept; both models' logits are formed a chunk at a time inside the fused loss
(vlt.training.losses), never as [tokens, vocab].

The teacher is a vlt VLM with full attention: built from a config dict (random, for tests and
ablations), loaded from a vlt checkpoint/export, or imported from a Qwen2.5-VL directory. It is
frozen and kept out of the module's parameters and checkpoints.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from vlt.config import VLMConfig
from vlt.model import VLM, checkpointed_blocks, skipped_init
from vlt.training.base import VLTModule, build_config, lm_head_weight
from vlt.training.flops import StepFlops, image_sizes, segment_lengths
from vlt.training.losses import kl_distill_reference as kl_distill_loss  # noqa: F401 - the plain formula
from vlt.training.losses import linear_kl_distill

PHASES = ("layer", "kl")
KL_POSITIONS = ("all", "assistant")
TEACHER_DTYPES = ("auto", "bfloat16", "float32")


def _layer_terms(s, t, cosine: bool):
    mse = F.mse_loss(s.float(), t.float())
    cos = 1 - F.cosine_similarity(s.float(), t.float(), dim=-1).mean() if cosine else None
    return mse, cos


def combine_layer_terms(mses, coss, scale: float, cosine_weight: float = 0.0):
    """(scale * mean_l MSE_l [+ cosine_weight * mean_l (1 - cos_l)], per-term dict)."""
    mse = torch.stack(mses).mean()
    terms = {"loss/mse": mse}
    loss = scale * mse
    if cosine_weight:
        cos = torch.stack(coss).mean()
        terms["loss/cosine"] = cos
        loss = loss + cosine_weight * cos
    return loss, terms


def layer_mse_loss(student_outs, teacher_outs, scale: float, cosine_weight: float = 0.0):
    """The layer loss of lists of outputs (what the layer phase computes one layer at a time)."""
    pairs = [_layer_terms(s, t, bool(cosine_weight)) for s, t in zip(student_outs, teacher_outs)]
    return combine_layer_terms([m for m, _ in pairs], [c for _, c in pairs], scale, cosine_weight)


def load_vlt_teacher(teacher, tokens=None) -> VLM:
    """The vlt ``VLM`` a distillation run learns from: built from a config dict (full attention in every
    layer), read from a vlt checkpoint / export directory, or imported from a Qwen2.5-VL directory
    (``vlt.convert.import_qwen2_5_vl``; ``vlt.convert.load_hf_teacher`` is the transformers model itself)."""
    if isinstance(teacher, dict):
        teacher = dict(teacher)  # {model_name?, layout?, ...model config overrides}
        cfg = build_config(teacher.pop("model_name", None), teacher, tokens, teacher.pop("layout", None))
        if any(n != "full" for n, _ in cfg.layers()):
            raise ValueError("teacher: the teacher must be full attention in every layer (layout '[full] * N')")
        return VLM(cfg)
    path = Path(str(teacher)).expanduser()
    if (path / "config.json").is_file() and not (path / "vlt_config.json").is_file():
        from vlt.convert.qwen import import_qwen2_5_vl  # a transformers Qwen2.5-VL directory
        return import_qwen2_5_vl(str(path))
    from vlt.checkpoint.lightning import load_model_state
    cfg, state = load_model_state(path, role="teacher")
    model = VLM(VLMConfig.from_dict(cfg))
    model.load_state_dict(state)
    return model


class Distillation(VLTModule):
    def __init__(self, teacher: dict | str, student_layout: str | list, student_mixers: dict | None = None,
                 init: str = "mimic", phase: str = "layer", temperature: float = 2.0, kl_positions: str = "all",
                 mse_scale: float = 1000.0, cosine_weight: float = 0.0, teacher_dtype: str = "auto", **kwargs):
        """
        Args:
            teacher: a model config dict (full attention), a vlt checkpoint / export dir, or a Qwen2.5-VL dir.
            student_layout: the student's layout; layers that are not attention there are converted.
            init: ``mimic`` or ``transfer`` for converted layers (see vlt.convert.student).
            phase: ``layer`` (teacher-forced layer MSE) or ``kl`` (end-to-end logit KL).
            kl_positions: ``all`` non-padding positions or ``assistant`` positions only.
            teacher_dtype: ``auto`` (bf16 on CUDA, fp32 elsewhere), ``bfloat16`` or ``float32``.
        """
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r}; allowed: {list(PHASES)}")
        if kl_positions not in KL_POSITIONS:
            raise ValueError(f"kl_positions={kl_positions!r}; allowed: {list(KL_POSITIONS)}")
        if teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype={teacher_dtype!r}; allowed: {list(TEACHER_DTYPES)}")
        self._teacher_spec = teacher
        super().__init__(**kwargs)
        self.converted = [i for i, b in enumerate(self.model.layers) if b.mixer_name not in ("full", "swa")]
        self._shared_vision = False  # set at fit start (_vision_is_shared)

    def build_model(self):
        from vlt.convert.student import convert_to_student
        hp = self.hparams
        teacher = load_vlt_teacher(self._teacher_spec, hp.tokens).eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never trained, never checkpointed
        with skipped_init(bool(hp.init_from)):   # the teacher above is built as usual: it is not loaded over
            student, self._new = convert_to_student(teacher, hp.student_layout, hp.student_mixers, hp.init)
        return student

    def initial_new_params(self):
        return list(self._new)

    def default_trainable(self, default):
        if self.hparams.lora:
            return default
        return ["layers.*.mixer.*"] if self.hparams.phase == "kl" else [
            f"layers.{i}.mixer.*" for i, b in enumerate(self.model.layers) if b.mixer_name not in ("full", "swa")]

    def _place_teacher(self):
        want = self.hparams.teacher_dtype
        dtype = torch.bfloat16 if want == "bfloat16" or (want == "auto" and self.device.type == "cuda") \
            else torch.float32
        self.teacher.to(self.device, dtype=dtype)

    def _teacher_context(self):
        """bf16 autocast when the teacher is bf16 but the run's precision is not."""
        dtype = next(self.teacher.parameters()).dtype
        dev = self.device.type
        if dtype == torch.bfloat16 and not torch.is_autocast_enabled(dev):
            return torch.autocast(dev, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def on_fit_start(self):
        super().on_fit_start()
        self._place_teacher()
        # every rank decides alike (under FSDP a rank holds only its shard of the weights it compares)
        self._shared_vision = self.trainer.strategy.reduce_boolean_decision(self._vision_is_shared(), all=True)

    def _vision_is_shared(self) -> bool:
        """True when the student's vision tower (projector included) is frozen and holds the teacher's
        weights (as converted, in the teacher's dtype): then the KL phase computes the images' features
        once, in the teacher's forward, and gives the student the same ones - a 4B stage1_kl step ran
        the tower twice (a quarter of its FLOPs each). Checked once: frozen weights cannot drift."""
        s, t = self.model.vision, self.teacher.vision
        if s is None or t is None or any(p.requires_grad for p in s.parameters()):
            return False
        s_state, t_state = s.state_dict(), t.state_dict()
        return s_state.keys() == t_state.keys() and all(
            s_state[k].shape == v.shape and torch.equal(s_state[k].to(v.device, v.dtype), v)
            for k, v in t_state.items())

    def on_validation_start(self):
        self._place_teacher()

    def loss_rows(self, batch):
        if self.hparams.phase == "kl" and self.hparams.kl_positions == "all":
            pad = (self.hparams.tokens or {}).get("pad_token_id")
            keep = batch["input_ids"].flatten() != pad if pad is not None else \
                torch.ones(batch["input_ids"].numel(), dtype=torch.bool)
            return keep.nonzero().squeeze(1)
        return super().loss_rows(batch)

    def count_step_flops(self, batch) -> StepFlops:
        fl = StepFlops()
        segs, imgs = segment_lengths(batch), image_sizes(batch)
        rows = int(batch["loss_rows"].numel()) if batch.get("loss_rows") is not None else batch["input_ids"].numel()
        kl = self.hparams.phase == "kl"
        fl.add_model(self.teacher, segs, imgs, rows, prefix="teacher/", backward=False, head=kl)
        if kl:  # a shared tower ran once, in the teacher's forward
            fl.add_model(self.model, segs, imgs, rows, vision=not self._shared_vision)
        else:  # each converted layer on the teacher's input: nothing upstream of it trains
            for i in self.converted:
                fl.add_block(self.model.layers[i], segs, False)
        return fl

    def compute_loss(self, batch):
        hp = self.hparams
        inputs = {k: batch.get(k) for k in ("input_ids", "images", "position_ids", "cu_seqlens")}
        if hp.phase == "layer":
            return self._layer_loss(inputs)
        rows = batch.get("loss_rows")
        if rows is None:
            rows = self.loss_rows(batch).to(self.device)
        amp = self._teacher_context()
        feats = None
        with torch.no_grad(), amp:
            if inputs["images"] and self._shared_vision:
                feats = self.teacher.vision(inputs["images"])
            t = self.teacher(**inputs, compute_logits=False, image_features=feats)
            h_t = self.teacher.norm(t.last_hidden.flatten(0, 1)[rows])
            del t  # the teacher's other outputs are not needed
        s = self.model(**inputs, compute_logits=False, image_features=feats)
        h_s = self.model.norm(s.last_hidden.flatten(0, 1)[rows])
        loss = linear_kl_distill(h_s, lm_head_weight(self.model), h_t, lm_head_weight(self.teacher), hp.temperature,
                                 impl=hp.loss_impl)
        return loss, {"loss/kl": loss}

    def _layer_loss(self, inputs):
        hp = self.hparams
        ids, images, cu = inputs["input_ids"], inputs["images"], inputs["cu_seqlens"]
        amp = self._teacher_context()
        with torch.no_grad(), amp:
            x = self.teacher.embed(ids, images)
            pos, _ = self.teacher.positions(ids, images, inputs["position_ids"], cu, None)
        training = self.training and torch.is_grad_enabled()
        n_ckpt = checkpointed_blocks(self.model.gradient_checkpointing, len(self.converted)) if training else 0
        student_dtype = next(self.model.parameters()).dtype
        where = {layer: k for k, layer in enumerate(self.converted)}
        mses, coss = [], []
        for i, block in enumerate(self.teacher.layers):
            with torch.no_grad(), amp:
                y = block(x, cu_seqlens=cu, position_ids=pos)[0]
            if i in where:
                x_in = x if torch.is_autocast_enabled(x.device.type) else x.to(student_dtype)
                fn = functools.partial(self._student_layer_terms, i, cu, pos, bool(hp.cosine_weight))
                if where[i] < n_ckpt:  # recomputed in backward: only x_in and y stay for it
                    mse, cos = torch.utils.checkpoint.checkpoint(fn, x_in, y, use_reentrant=False)
                else:
                    mse, cos = fn(x_in, y)
                mses.append(mse)
                coss.append(cos)
            x = y
        return combine_layer_terms(mses, coss, hp.mse_scale, hp.cosine_weight)

    def _student_layer_terms(self, i, cu, pos, cosine, x, target):
        out = self.model.layers[i](x, cu_seqlens=cu, position_ids=pos)[0]
        return _layer_terms(out, target, cosine)
