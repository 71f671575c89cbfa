"""Instruction tuning and long-sequence SFT: next-token loss on assistant tokens only (the data
module puts -100 everywhere else)."""
from __future__ import annotations

from vlt.training.base import VLTModule


class InstructionTuning(VLTModule):
    """Stage II: chat samples, loss on assistant turns; ``trainable`` picks the parts that train."""


class LongSequenceSFT(VLTModule):
    """Stage III: packed 32K+ sequences with activation checkpointing and LoRA by default."""

    def __init__(self, lora: dict | None = None, activation_checkpointing: bool | float = True, **kwargs):
        if lora is None:
            lora = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
        super().__init__(lora=lora or None, activation_checkpointing=activation_checkpointing, **kwargs)
