"""The resolved config of a run, saved beside its checkpoints whatever the logger, and the settings
people compare runs by in every logger's hyperparameters.

Lightning's ``SaveConfigCallback`` writes ``config.yaml`` to ``trainer.log_dir``, which for loggers
other than CSV/TensorBoard is the logger's ``save_dir`` itself (``lightning_logs/config.yaml`` with
W&B): shared by every run and overwritten by the next. Here it goes to the run's own directory,
the one ``ModelCheckpoint`` puts ``checkpoints/`` in (``save_dir/name/version``).

The module's own hyperparameters say ``layout: null`` when a named model is used and hold neither
the trainer settings nor the stage, so runs logged to W&B could not be grouped by layout. After
Lightning has logged them, this callback adds: ``layout`` (the expanded per-layer layout, one
string), ``stage`` (the LightningModule class), ``model_config`` (the full model config, every
per-layer option included), ``trainer`` (the trainer section of the config) and ``data_class``.
"""
from __future__ import annotations

import os

from lightning.pytorch.cli import SaveConfigCallback


def run_dir(trainer) -> str:
    """The directory that holds this run's ``checkpoints/`` (ModelCheckpoint's rule when its
    ``dirpath`` is not set; that ``dirpath`` when it is)."""
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and getattr(ckpt, "dirpath", None):
        path = str(ckpt.dirpath)
    elif trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        path = os.path.join(save_dir, str(logger.name), version)
    else:
        path = trainer.default_root_dir
    return trainer.strategy.broadcast(path)


def _plain(value):
    """A jsonargparse Namespace (or anything nested in one) as plain dicts/lists."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class RunConfigCallback(SaveConfigCallback):
    """``SaveConfigCallback`` that saves into :func:`run_dir` and logs the run's comparable settings."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        path = run_dir(trainer)
        if trainer.is_global_zero:
            os.makedirs(path, exist_ok=True)
            self.parser.save(self.config, os.path.join(path, self.config_filename), skip_none=False,
                             overwrite=self.overwrite, multifile=self.multifile)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)
        self._hparams_logged = False

    def run_hparams(self, pl_module) -> dict:
        cfg = _plain(self.config)
        vlm = getattr(pl_module, "model", None)
        out = {"stage": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
               "trainer": cfg.get("trainer"), "data_class": (cfg.get("data") or {}).get("class_path")}
        if hasattr(vlm, "layout") and hasattr(vlm, "config"):
            out["layout"] = "[" + ", ".join(vlm.layout) + "]"
            out["model_config"] = vlm.config.to_dict()
        return out

    def _log(self, trainer, pl_module) -> None:
        # After Lightning's own hparams logging (which runs after on_fit_start), so ``layout`` here
        # replaces the module's ``layout: null``.
        if getattr(self, "_hparams_logged", False) or not trainer.is_global_zero:
            return
        self._hparams_logged = True
        hp = self.run_hparams(pl_module)
        for logger in trainer.loggers:
            logger.log_hyperparams(hp)

    def on_train_start(self, trainer, pl_module):
        self._log(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module):
        self._log(trainer, pl_module)

    def on_test_start(self, trainer, pl_module):
        self._log(trainer, pl_module)

    def on_predict_start(self, trainer, pl_module):
        self._log(trainer, pl_module)
