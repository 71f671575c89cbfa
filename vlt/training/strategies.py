"""``--trainer.strategy fsdp`` in vlt means FSDP wrapped per decoder block (the vision tower stays in the root unit),
with original parameters kept so frozen base weights and LoRA adapters can share a unit, and
sharded checkpoints. Registered over Lightning's own "fsdp" name so the documented flag does it."""
from __future__ import annotations


def register_strategies():
    from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry

    from vlt.model import DecoderBlock
    StrategyRegistry.register("fsdp", FSDPStrategy, description="FSDP, one unit per vlt DecoderBlock",
                              auto_wrap_policy={DecoderBlock}, use_orig_params=True,
                              state_dict_type="sharded", override=True)
