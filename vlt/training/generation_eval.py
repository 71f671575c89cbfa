"""Generation-based validation during training: every N steps, answers generated on a small held-out
set and scored as ``vlt eval`` scores them, logged as ``val/<task>/acc`` (and ``val/gen/acc``).

    trainer:
      callbacks:
        - class_path: vlt.training.generation_eval.GenerationEval
          init_args: {data: data/synthetic/mix/val, every_n_steps: 200, limit: 64, max_new_tokens: 16}

Teacher-forced answer accuracy (``val/acc``) says whether the right token is the most likely next
one given the right prefix; this says whether the model, decoding on its own, produces the answer.
``acc`` is the task's own metric (exact / numeric / ANLS, vlt.evaluation.scoring). The prompt is
built with the data module's tokenizer, system prompt and image processor, as training sees it.

The engine is built without CUDA graphs, projection packing or torch.compile, so the training
model's modules and parameters are left exactly as they were (the engine only reads them). Every
rank runs the same samples (DDP replicas are whole models); FSDP-sharded models are not supported.
Logged to every logger of the trainer at the global step (W&B, CSV and TensorBoard alike); the keys
are not ``pl_module.log`` metrics, so ModelCheckpoint cannot monitor them.
"""
from __future__ import annotations

import lightning as L

from vlt.evaluation.runner import evaluate
from vlt.evaluation.samples import Skips, read_samples
from vlt.evaluation.scoring import mean


class GenerationEval(L.Callback):
    def __init__(self, data: str, every_n_steps: int = 500, limit: int = 64, max_new_tokens: int = 16,
                 batch_size: int = 8, tasks: list[str] | None = None, images: str | None = None, metric: str = "auto"):
        if every_n_steps < 1 or limit < 1:
            raise ValueError(f"GenerationEval: every_n_steps and limit must be >= 1 (got {every_n_steps}, {limit})")
        self.data, self.every_n_steps, self.limit, self.max_new_tokens = data, every_n_steps, limit, max_new_tokens
        self.batch_size, self.tasks, self.images, self.metric = batch_size, tasks, images, metric
        self.last: dict[str, float] = {}
        self._ran_at = -1  # with gradient accumulation several batches end at one global step: run once

    def run(self, vlm, tokenizer, image_processor, system) -> dict[str, float]:
        """The metrics for ``vlm`` now: {"val/<task>/acc": ..., "val/gen/acc": ...} (also kept in ``last``)."""
        skips = Skips()
        was_training = vlm.training
        try:
            results, _ = evaluate(vlm, tokenizer, read_samples(self.data, self.images, skips),
                                  image_processor=image_processor, system=system, batch_size=self.batch_size,
                                  max_new_tokens=self.max_new_tokens, metric=self.metric, tasks=self.tasks,
                                  limit=self.limit, progress=False, skips=skips,
                                  engine_kwargs={"graphs": False, "pack": False, "compile": None})
        finally:
            vlm.train(was_training)  # the engine puts the model in eval mode
        by_task: dict[str, list[float]] = {}
        for r in results:
            by_task.setdefault(r["task"], []).append(r["score"])
        out = {f"val/{t}/acc": mean(v) for t, v in sorted(by_task.items())}
        out["val/gen/acc"] = mean(r["score"] for r in results)
        self.last = out
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._ran_at:
            return
        self._ran_at = step
        dm = trainer.datamodule
        vlm = getattr(pl_module, "model", pl_module)
        metrics = self.run(vlm, dm.tokenizer, dm.image_processor, dm.system_prompt or None)
        # straight to the loggers at this global step: pl_module.log from a callback's batch hook is
        # re-emitted by Lightning's result collection at later steps, which would repeat stale values
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
