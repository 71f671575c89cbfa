"""A callback the CLI tests add with --trainer.callbacks+=recorder.RecordBatches: it writes which
samples each rank trained on, so the tests can check rank splitting and resume order."""
import json
import os

from lightning.pytorch.callbacks import Callback


class RecordBatches(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.batches = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append({"step": trainer.global_step, "ids": list(batch["sample_ids"]),
                             "loss": float(outputs["loss"])})

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.out_dir, exist_ok=True)
        n = len(os.listdir(self.out_dir))  # runs in one process (resume tests) each get their own file
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}-{n:02d}.json"), "w") as f:
            json.dump(self.batches, f)
