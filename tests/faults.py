"""Faults the reliability tests inject through `--trainer.callbacks+=faults.X`: nan images at given
steps (a non-finite loss, as a corrupt input or an overflow gives), and kill -9 at a step or in the
middle of a checkpoint write (deterministic: the process kills itself at a known point)."""
import json
import os
import signal

import torch
from lightning.pytorch.callbacks import Callback


class PoisonImages(Callback):
    """Fill the batch's images with nan at the given global steps (on one rank, or all with rank=-1)."""

    def __init__(self, steps: list[int], rank: int = -1, out_dir: str | None = None):
        self.steps, self.rank, self.out_dir = set(steps), rank, out_dir
        self.records = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps and self.rank in (-1, trainer.global_rank):
            for img in batch["images"]:
                img.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        w = torch.cat([p.detach().float().flatten() for p in pl_module.model.parameters()])
        self.records.append({"step": trainer.global_step, "skipped": pl_module._nonfinite.skipped,
                         "weights_sum": float(w.double().sum()), "finite": bool(torch.isfinite(w).all())})

    def on_train_end(self, trainer, pl_module):
        if self.out_dir:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
                json.dump(self.records, f)


class KillDuringSave(Callback):
    """SIGKILL this process halfway through the checkpoint write that follows global step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return

        def torn_save(obj, f, *args, **kwargs):  # half a file on disk, then the process is gone
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04" + b"\0" * 4096)
                fh.flush()
                os.fsync(fh.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = torn_save  # ModelCheckpoint saves after the user callbacks' on_train_batch_end


class KillAt(Callback):
    """SIGKILL this process after global step ``step`` (after that step's checkpoint, if any, is written
    by ModelCheckpoint, which runs after user callbacks: so the kill comes at the next batch start)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
