"""The LightningModule every training stage shares: model construction, init from a previous
stage, freezing + the new-parameter guard, LoRA, optimiser/schedule, and the logging users expect
(each loss term, lr, grad norm, tokens/s, MFU estimate, skipped samples, answer accuracy)."""
from __future__ import annotations

import copy
import logging
import math
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from vlt.checkpoint.lightning import describe_mismatch, load_model_state
from vlt.config import VLMConfig, deep_update
from vlt.model import VLM, checkpointed_blocks, shift_labels, skipped_init
from vlt.training.flops import StepFlops, image_sizes, peak_tflops_for, segment_lengths
from vlt.training.freezing import apply_trainable, check_new_params_train, trainable_table
from vlt.training.losses import IMPLS, linear_cross_entropy
from vlt.training.nonfinite import NonFiniteGuard, assert_finite_weights

log = logging.getLogger("vlt")

SCHEDULES = ("cosine", "constant")


def build_config(model_name: str | None, model: dict | None, tokens: dict | None, layout=None,
                 mixers: dict | None = None, base: dict | None = None) -> VLMConfig:
    """Named config (or ``base``), then the recipe's overrides, the layout, and the token ids
    linked from the data module."""
    if model_name is not None:
        base = VLMConfig.from_name(model_name).to_dict()
    base = copy.deepcopy(base or {})
    deep_update(base, copy.deepcopy(model or {}))
    if layout is not None:
        base.setdefault("decoder", {}).update(layout=layout, num_layers=None)
    if mixers:
        dec = base.setdefault("decoder", {})
        merged = dec.setdefault("mixers", {})
        for name, opts in mixers.items():  # per mixer, so {swa: {window}} keeps swa's other options
            merged[name] = {**merged.get(name, {}), **(opts or {})}
    if tokens:
        # The embedding table may be larger than the tokenizer (Qwen pads 151665 to 151936), never smaller.
        dec = base.setdefault("decoder", {})
        dec["vocab_size"] = max(tokens["vocab_size"], dec.get("vocab_size", 0))
        for k in ("image_token_id", "video_token_id", "vision_start_token_id"):
            if tokens.get(k) is not None:
                base[k] = tokens[k]
    try:
        return VLMConfig.from_dict(base)
    except ValueError as e:  # name the argument the user wrote, not the merged config's key
        raise ValueError(_argument_key_path(str(e), model, layout, mixers)) from None


def _argument_key_path(msg: str, model: dict | None, layout, mixers: dict | None) -> str:
    """``decoder.mixers.swa.windw: ...`` -> ``mixers.swa.windw: ...`` when ``mixers`` set it, and
    ``decoder.layout[0]`` -> ``layout[0]`` when ``layout`` did; other model keys are under ``model.``."""
    for name in mixers or {}:
        if msg.startswith(f"decoder.mixers.{name}.") or msg.startswith(f"decoder.mixers.{name}:"):
            return msg[len("decoder."):]
    if layout is not None and msg.startswith("decoder.layout"):
        return msg[len("decoder."):]
    if model is not None and msg.startswith(("decoder.", "vision.", "unknown key")):
        return f"model.{msg}" if not msg.startswith("unknown key") else msg.replace("['", "['model.")
    return msg


class VLTModule(L.LightningModule):
    def __init__(self, model_name: str | None = None, model: dict | None = None, layout: str | list | None = None,
                 mixers: dict | None = None, tokens: dict | None = None, init_from: str | None = None,
                 trainable: list[str] | None = None, lora: dict | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 0, schedule: str = "cosine", min_lr_ratio: float = 0.1,
                 activation_checkpointing: bool | float = False, peak_tflops: float | None = None,
                 max_nonfinite_skips: int = 10, fused_adamw: bool | None = None, loss_impl: str = "auto"):
        """
        Args:
            model_name: a named config (``tiny-hybrid``, ``infinitevl-4b``); ``model`` overrides it.
            model: the model config as a dict (vision / decoder / token ids), see vlt.config.
            layout: the decoder layout (``"[swa, gdn, gdn, gdn] * 9"`` or a per-layer list); overrides ``model``.
            mixers: default options per mixer name (``{swa: {window: 8192}}``), merged over ``model``'s.
            tokens: vocab size and special token ids, linked from the data module by the CLI.
            init_from: a previous stage's ``.ckpt`` or exported directory; layout and shapes must match.
            trainable: part names (mixers, mlps, norms, embeddings, projector, vision, lora, all) or
                parameter patterns (``layers.*.mixer.*``). Default: everything (or LoRA only with lora).
            lora: peft LoRA options ``{r, alpha, dropout, target_modules, adapter_only_checkpoint}``.
            activation_checkpointing: recompute decoder blocks in backward: true (all), false, or a
                fraction of the blocks (0.5: the first half) to trade memory for speed.
            peak_tflops: accelerator peak for ``perf/mfu`` (default: the device's dense bf16 peak from
                its name, vlt.training.flops.DENSE_BF16_PEAK; none on the CPU).
            max_nonfinite_skips: a step with a non-finite loss or gradient norm is skipped (weights and
                optimizer state untouched, counted as ``train/skipped_nonfinite``); this many in a row stop the run.
            fused_adamw: AdamW's fused kernel (default: on when the parameters are on CUDA, except under
                16-mixed, whose GradScaler would have to unscale inside the fused step, after clipping).
            loss_impl: the fused LM-head losses: ``auto`` (Liger-Kernel on CUDA when installed, else
                vlt's chunked torch path), ``torch`` or ``liger`` (vlt.training.losses).
        """
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}; allowed: {list(SCHEDULES)}")
        if loss_impl not in IMPLS:
            raise ValueError(f"loss_impl={loss_impl!r}; allowed: {list(IMPLS)}")
        self._built_at = time.perf_counter()
        self.save_hyperparameters()
        self._nonfinite = NonFiniteGuard(max_nonfinite_skips)  # a bad value fails before the model is built
        self.model: VLM = self.build_model()
        self.new_params = self.initial_new_params()
        if init_from:
            self.load_init(init_from)
        self.lora_cfg = dict(lora) if lora else None
        if self.lora_cfg:
            from vlt.lora import apply_lora
            opts = {k: v for k, v in self.lora_cfg.items() if k != "adapter_only_checkpoint"}
            apply_lora(self.model, **opts)
            self.new_params += [n for n, _ in self.model.named_parameters() if "lora_" in n]
            if self.lora_cfg.get("adapter_only_checkpoint", True):
                self.strict_loading = False  # base weights come from init_from, not the checkpoint
        checkpointed_blocks(activation_checkpointing, 1)  # a bad value fails here, before training starts
        self.model.gradient_checkpointing = activation_checkpointing
        default = ["lora"] if self.lora_cfg else ["all"]
        apply_trainable(self.model, trainable if trainable is not None else self.default_trainable(default))
        # time to the first optimizer step, split: this constructor (model and teacher built, init_from
        # read, LoRA applied), then Lightning's set-up and the first step (perf/first_step_s)
        self._build_s = time.perf_counter() - self._built_at
        self._t0 = None
        self._fit_t0 = None
        self._device_peak = None

    # ---- hooks for subclasses ---------------------------------------------------------------------
    def build_model(self) -> VLM:
        hp = self.hparams
        base = None
        if hp.model_name is None and hp.model is None and hp.init_from:
            self._init_state = load_model_state(hp.init_from)  # kept: load_init reuses it (4B = 8 GB)
            base = self._init_state[0]  # take the previous stage's model as it was
        # with init_from every parameter is loaded next (load_init is strict): no random init to pay for
        with skipped_init(bool(hp.init_from)):
            return VLM(build_config(hp.model_name, hp.model, hp.tokens, hp.layout, hp.mixers, base))

    def initial_new_params(self) -> list[str]:
        """Parameters not loaded from anywhere (all of them when training from scratch)."""
        return [n for n, _ in self.model.named_parameters()]

    def default_trainable(self, default):
        return default

    # ---- init from a previous stage ---------------------------------------------------------------
    def load_init(self, path: str):
        cfg, state = self.__dict__.pop("_init_state", None) or load_model_state(path)
        why = describe_mismatch(self.model.config.to_dict(), cfg)
        if why:
            raise ValueError(f"init_from {path!r} does not fit this recipe's model: {why}. Use the previous "
                             "stage's model config (or drop `model:` to take the checkpoint's)")
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [m for m in missing if "lora_" not in m]
        if unexpected or missing:
            raise ValueError(f"init_from {path!r}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.new_params = []
        rank_zero_info(f"vlt: init_from: loaded all {len(state)} tensors from {path}")  # shown, not only logged

    # ---- Lightning ----------------------------------------------------------------------------
    def on_fit_start(self):
        self._fit_t0 = time.perf_counter()
        table = trainable_table(self.model)
        if self.global_rank == 0:
            print(f"\nlayout: {self.model.layout}\n{table}\n")
        check_new_params_train(self.model, self.new_params)

    def forward(self, **batch):
        return self.model(**batch)

    def loss_rows(self, batch) -> torch.Tensor:
        """Flat indices of the positions the loss is taken on (supervised next tokens)."""
        target = shift_labels(batch["labels"], batch.get("cu_seqlens")).flatten()
        return (target != -100).nonzero().squeeze(1)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # On the host, before the copy: the loss rows and the step's FLOPs need the labels and
        # packing boundaries, and reading them here costs no device synchronisation. (Not
        # on_before_batch_transfer: the data module has its own, and Lightning then skips this one's.)
        if self.training and isinstance(batch, dict) and "labels" in batch and batch["labels"].device.type == "cpu":
            batch["loss_rows"] = self.loss_rows(batch)
            batch["step_flops"] = self.count_step_flops(batch).total
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def count_step_flops(self, batch) -> StepFlops:
        """Model FLOPs of a training step on this (host) batch, per part (vlt.training.flops)."""
        fl = StepFlops()
        rows = batch.get("loss_rows")
        fl.add_model(self.model, segment_lengths(batch), image_sizes(batch),
                     int(rows.numel()) if rows is not None else batch["input_ids"].numel())
        return fl

    def compute_loss(self, batch) -> tuple[torch.Tensor, dict]:
        inputs = {k: batch.get(k) for k in ("input_ids", "images", "position_ids", "cu_seqlens")}
        out = self.model(**inputs, compute_logits=False)
        rows = batch.get("loss_rows")
        if rows is None:
            rows = self.loss_rows(batch)
        target = shift_labels(batch["labels"], batch.get("cu_seqlens")).flatten()[rows]
        h = self.model.norm(out.last_hidden.flatten(0, 1)[rows])  # the head runs on supervised rows only
        loss = linear_cross_entropy(h, lm_head_weight(self.model), target, impl=self.hparams.loss_impl)
        return loss, {"loss/ce": loss}

    def training_step(self, batch, batch_idx):
        loss, terms = self.compute_loss(batch)
        bs = int(batch.get("num_samples", batch["input_ids"].shape[0]))
        for k, v in terms.items():
            self.log(f"train/{k}", v, batch_size=bs, prog_bar=(k == next(iter(terms))))
        self.log("train/loss", loss, batch_size=bs, prog_bar=True)
        self._nonfinite.record_loss(loss)
        return loss

    def on_train_start(self):
        if self.device.type == "cuda":
            self._device_peak, which = peak_tflops_for(torch.cuda.get_device_name(self.device))
            if self.global_rank == 0 and not self.hparams.peak_tflops:
                print(f"perf/mfu against {which or 'no known peak (set peak_tflops)'}")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._fit_t0 is not None:  # the first optimizer step is done: time to it, caches as they were
            now = time.perf_counter()
            self.log("perf/first_step_s", now - self._fit_t0)
            self.log("perf/first_step_since_build_s", now - self._built_at)
            self.log("perf/build_s", self._build_s)
            self._fit_t0 = None
        # Throughput from the wall time between consecutive steps: no device synchronisation (which
        # would stall the CUDA queue every step); in steady state this is the true step time.
        now = time.perf_counter()
        last, self._t0 = self._t0, now
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "stats"):  # vlt's data module: data/train/..., data/val/...
            for reason, n in (dm.logged_stats() if hasattr(dm, "logged_stats") else dm.stats()).items():
                self.log(f"data/{reason}", float(n))
        if last is None:
            return
        dt = now - last
        tokens = batch["input_ids"].numel() * self.trainer.world_size
        self.log("perf/tokens_per_s", tokens / dt)
        flops = batch.get("step_flops")
        if flops:  # this rank's model FLOPs; every rank runs the same shapes
            self.log("perf/tflops", flops / dt / 1e12)
            peak = self.hparams.peak_tflops or self._device_peak
            if peak:
                self.log("perf/mfu", flops / dt / (peak * 1e12))
        if self.device.type == "cuda":
            self.log("perf/peak_mem_gib", torch.cuda.max_memory_allocated(self.device) / 2 ** 30)

    def on_train_epoch_start(self):
        self._t0 = None  # the gap across an epoch boundary (loader restart) is not a step

    def on_validation_end(self):
        self._t0 = None  # nor is a validation pass

    def _grad_scaler(self):
        trainer = self._trainer  # None outside a Trainer
        return getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Two cases Lightning's own clipping refuses, both hit by the InfiniteVL recipes (gradient_clip_val 1.0):
        # - FSDP: clipping by norm needs the norm over every rank's shards, which only the root FSDP
        #   module computes; Lightning's FSDP precision plugin raises instead (Lightning issue #19235).
        # - fused AdamW (vlt's default on CUDA): the mixed-precision plugin refuses any optimizer that
        #   unscales gradients itself, also under bf16-mixed where there is no GradScaler and nothing to
        #   unscale. Without a scaler the gradients are the true ones: clip them as the base plugin would.
        # Otherwise (16-mixed with its scaler, fp32, value clipping) Lightning's own path stands.
        from lightning.pytorch.plugins.precision import FSDPPrecision, MixedPrecision, Precision
        from lightning.pytorch.utilities import GradClipAlgorithmType
        plugin = self.trainer.precision_plugin
        by_norm = GradClipAlgorithmType(gradient_clip_algorithm or "norm") == GradClipAlgorithmType.NORM
        if (gradient_clip_val or 0) > 0 and by_norm and isinstance(plugin, FSDPPrecision):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        if ((gradient_clip_val or 0) > 0 and type(plugin) is MixedPrecision and plugin.scaler is None
                and getattr(optimizer, "_step_supports_amp_scaling", False)):
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val,
                                     GradClipAlgorithmType(gradient_clip_algorithm or "norm"))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer):
        # a non-finite loss or gradient (on any rank) clears the gradients: the optimizer skips this step
        params = [p for g in optimizer.param_groups for p in g["params"]]
        scaler = self._grad_scaler()  # 16-mixed handles overflow itself
        _, norm = self._nonfinite.check(params, self.global_step, grad_scaler=scaler is not None)
        if norm is not None:
            self.log("train/grad_norm", norm)
        self.log("train/skipped_nonfinite", float(self._nonfinite.skipped))

    def validation_step(self, batch, batch_idx, prefix="val"):
        out = self.model(**batch)
        bs = int(batch.get("num_samples", batch["input_ids"].shape[0]))
        correct, total, tok_ok, tok_n = answer_accuracy(out.logits, batch["labels"], batch.get("cu_seqlens"))
        self.log(f"{prefix}/loss", out.loss, batch_size=bs, prog_bar=True, sync_dist=True)
        self.log(f"{prefix}/answer_acc", correct / max(total, 1), batch_size=max(total, 1), prog_bar=True,
                 sync_dist=True)
        self.log(f"{prefix}/token_acc", tok_ok / max(tok_n, 1), batch_size=max(tok_n, 1), sync_dist=True)

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx, prefix="test")

    def predict_step(self, batch, batch_idx):
        """The sample's last answer generated greedily from its prompt (token ids; vlt.predict
        writes them as JSONL text)."""
        from vlt.predict import predict_sample
        tok = self.trainer.datamodule.tokenizer
        return predict_sample(self.model, batch, [tok.im_end_id], getattr(self, "predict_max_new_tokens", 64))

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            exempt = p.dim() < 2 or "embed_tokens" in n or getattr(p, "_no_weight_decay", False)
            (no_decay if exempt else decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        params = [p for g in groups for p in g["params"]]
        scaled = self._grad_scaler() is not None
        fused = hp.fused_adamw if hp.fused_adamw is not None else bool(params) and not scaled and all(
            p.device.type == "cuda" for p in params)  # one kernel for all tensors instead of a loop of ops
        if fused and scaled and (self.trainer.gradient_clip_val or 0) > 0:
            raise ValueError("model.fused_adamw=true with precision 16-mixed and trainer.gradient_clip_val > 0: the "
                             "fused step unscales the gradients itself, after clipping would have run on scaled "
                             "ones; use precision bf16-mixed, fused_adamw false, or gradient_clip_val 0")
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=tuple(hp.betas), fused=fused)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm, floor = hp.warmup_steps, hp.min_lr_ratio

        def factor(step):
            if step < warm:
                return (step + 1) / warm
            if hp.schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- checkpoints carry the layout; LoRA runs may save adapters only --------------------------
    def on_save_checkpoint(self, checkpoint):
        assert_finite_weights(self.model)  # never replace a good checkpoint with a nan one
        checkpoint["vlt_nonfinite"] = self._nonfinite.state_dict()
        checkpoint["vlt_config"] = self.model.config.to_dict()
        checkpoint["vlt_layout"] = self.model.layout
        if self.lora_cfg and self.lora_cfg.get("adapter_only_checkpoint", True):
            keep = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint):
        self._nonfinite.load_state_dict(checkpoint.get("vlt_nonfinite", {}))
        saved = checkpoint.get("vlt_config")
        if saved is not None:
            why = describe_mismatch(self.model.config.to_dict(), saved)
            if why:
                raise ValueError(f"checkpoint does not match this run's model: {why}")


def lm_head_weight(model) -> torch.Tensor:
    head = model.lm_head
    if type(head) is not torch.nn.Linear or head.bias is not None:
        raise ValueError("the fused LM-head loss needs lm_head to be a plain bias-free Linear; leave lm_head out "
                         "of lora.target_modules")
    return head.weight


def answer_accuracy(logits, labels, cu_seqlens=None):
    """Teacher-forced accuracy: a sample is right when every supervised token is the argmax.

    Returns (samples right, samples with supervision, tokens right, supervised tokens)."""
    target = shift_labels(labels, cu_seqlens)
    pred = logits.argmax(-1)
    sup = target != -100
    ok = (pred == target) | ~sup
    if cu_seqlens is not None:
        seg = torch.searchsorted(cu_seqlens[1:].to(labels.device), torch.arange(labels.shape[1], device=labels.device),
                                 right=True)
        n = len(cu_seqlens) - 1
        wrong = torch.zeros(n, device=labels.device).index_add_(0, seg, (~ok[0]).float())
        has = torch.zeros(n, device=labels.device).index_add_(0, seg, sup[0].float())
    else:
        wrong, has = (~ok).float().sum(1), sup.float().sum(1)
    samples = has > 0
    correct = int(((wrong == 0) & samples).sum())
    return correct, int(samples.sum()), int(((pred == target) & sup).sum()), int(sup.sum())
