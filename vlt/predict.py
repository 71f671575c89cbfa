"""``vlt predict``: each sample's last answer generated greedily from its prompt, written as JSONL.

One line per sample: ``{"id", "prompt", "prediction", "target"}`` (text decoded with the data
module's tokenizer; the prompt ends with ``<|im_start|>assistant\\n``, the target is the answer the
data holds, without its closing ``<|im_end|>``). By default the file is ``predictions.jsonl`` in the
run directory (beside ``config.yaml``); ``--predictions.path`` puts it elsewhere.

The loop below runs the model's own decode path (``use_cache=True`` with the carried state), the
same forward ``vlt generate``'s reference loop takes; samples come one per batch, unpacked, so a
sample's images are the batch's images.
"""
from __future__ import annotations

import json
import os

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

IGNORE_INDEX = -100


def split_last_answer(input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids, answer ids) of one unpacked sample: the answer is the last run of supervised
    positions, the prompt everything before it."""
    sup = (labels != IGNORE_INDEX).nonzero().flatten()
    if sup.numel() == 0:
        raise ValueError("sample has no supervised (answer) tokens")
    end = int(sup[-1]) + 1
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return input_ids[:start], input_ids[start:end]


@torch.no_grad()
def greedy_answer(model, prompt: torch.Tensor, images, eos_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt`` [T] until an EOS id or ``max_new_tokens`` (EOS not included)."""
    out = model(prompt[None], images=images or None, use_cache=True, logits_to_keep=1)
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        if nxt in eos_ids:
            break
        new.append(nxt)
        out = model(torch.tensor([[nxt]], device=prompt.device), state=out.state, use_cache=True)
    return new


def predict_sample(model, batch: dict, eos_ids: list[int], max_new_tokens: int) -> dict:
    """Token ids of one unpacked sample's prompt, target and greedy prediction."""
    if batch["input_ids"].shape[0] != 1 or batch.get("cu_seqlens") is not None:
        raise ValueError("predict expects one unpacked sample per batch (VLTDataModule.predict_dataloader)")
    prompt, target = split_last_answer(batch["input_ids"][0], batch["labels"][0])
    target = [t for t in target.tolist() if t not in eos_ids]
    pred = greedy_answer(model, prompt, batch.get("images"), eos_ids, max_new_tokens)
    ids = batch.get("sample_ids") or [None]
    return {"id": ids[0], "prompt_ids": prompt.tolist(), "prediction_ids": pred, "target_ids": target}


class PredictionWriter(BasePredictionWriter):
    """Writes ``vlt predict``'s outputs as JSONL (see the module docstring)."""

    def __init__(self, path: str | None = None, max_new_tokens: int = 64):
        """
        Args:
            path: the JSONL file; None: ``predictions.jsonl`` in the run directory.
            max_new_tokens: the longest answer generated per sample.
        """
        super().__init__(write_interval="batch")
        self.path, self.max_new_tokens = path, max_new_tokens
        self._file = None
        self.written_to: str | None = None

    def on_predict_start(self, trainer, pl_module):
        pl_module.predict_max_new_tokens = self.max_new_tokens
        from vlt.run_config import run_dir
        path = self.path or os.path.join(run_dir(trainer), "predictions.jsonl")
        if trainer.world_size > 1:
            root, ext = os.path.splitext(path)
            path = f"{root}.rank{trainer.global_rank}{ext}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, "w")
        self.written_to = path

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        tok = trainer.datamodule.tokenizer
        row = {"id": prediction["id"], "prompt": tok.decode(prediction["prompt_ids"]),
               "prediction": tok.decode(prediction["prediction_ids"]), "target": tok.decode(prediction["target_ids"])}
        self._file.write(json.dumps(row) + "\n")

    def on_predict_end(self, trainer, pl_module):
        if self._file is not None:
            self._file.close()
            self._file = None
            print(f"vlt predict: wrote {self.written_to}")
