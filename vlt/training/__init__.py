"""vlt.training: the LightningModules of the three stages (distillation, instruction tuning,
long-sequence SFT) on one shared base."""
from vlt.training.base import VLTModule, answer_accuracy
from vlt.training.distill import Distillation, kl_distill_loss, layer_mse_loss
from vlt.training.sft import InstructionTuning, LongSequenceSFT

__all__ = ["VLTModule", "answer_accuracy", "Distillation", "kl_distill_loss", "layer_mse_loss",
           "InstructionTuning", "LongSequenceSFT"]
