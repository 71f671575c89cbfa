"""Training progress bars counted in optimizer steps.

Lightning's bars count the batches of the current epoch against the epoch's length, titled
``Epoch E/max_epochs-1``. vlt's runs are set by ``max_steps`` over streamed shards, so a run showed
"Epoch 0/-2" and, after a resume mid-epoch, "100/50". These show ``step N/max_steps``
(``global_step``, which survives a resume) whenever ``max_steps`` is set, and behave as Lightning's
otherwise. ``steps_bar(default_bar)`` swaps Lightning's default bar (rich or tqdm) for its variant.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


def _max_steps(trainer) -> int | None:
    return trainer.max_steps if trainer is not None and trainer.max_steps and trainer.max_steps > 0 else None


class StepTQDMProgressBar(TQDMProgressBar):
    @property
    def total_train_batches(self):
        return _max_steps(self.trainer) or super().total_train_batches

    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
        if _max_steps(trainer) and self.train_progress_bar is not None:
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_description("step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not _max_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, n = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(n, bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()


class StepRichProgressBar(RichProgressBar):
    @property
    def total_train_batches(self):
        return _max_steps(self.trainer) or super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not _max_steps(self.trainer):
            return super()._get_train_description(current_epoch)
        return f"{'step':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer, pl_module):
        super().on_train_epoch_start(trainer, pl_module)
        if _max_steps(trainer):
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not _max_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()   # a resume mid-epoch, as Lightning's bar does
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


def steps_bar(bar):
    """The step-counted variant of Lightning's default bar ``bar`` (None when it is not a default)."""
    if type(bar) is TQDMProgressBar:
        return StepTQDMProgressBar(refresh_rate=bar.refresh_rate)
    if type(bar) is RichProgressBar:
        return StepRichProgressBar(refresh_rate=bar.refresh_rate, leave=bar._leave, theme=bar.theme,
                                   console_kwargs=bar._console_kwargs)
    return None
