"""LoRA through peft on plain nn.Modules: one target list serves every layout because every mixer
uses the same projection names (q_proj, k_proj, v_proj, o_proj, g_proj, ...)."""
from __future__ import annotations

import torch
from torch import nn


def apply_lora(model: nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.0,
               target_modules: list[str] | None = None, modules_to_save: list[str] | None = None) -> nn.Module:
    """Inject peft LoRA adapters (rank ``r``, scale ``alpha / r``) into ``model`` in place and return it.

    ``target_modules`` default to the attention projections every mixer names alike
    (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), so one list serves every layout; a name that
    matches no module is a ValueError listing the projection names present. Only the adapters are
    new parameters; freezing the rest is the caller's (``trainable: [lora]``).
    """
    from peft import LoraConfig, inject_adapter_in_model
    targets = target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(f"lora.target_modules {missing} match no module of this model; "
                         f"projection names present include {sorted(p for p in present if p.endswith('_proj'))}")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                     modules_to_save=modules_to_save)
    return inject_adapter_in_model(cfg, model)


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight and put the plain layer back."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model
