"""``vlt export``: a training checkpoint (.ckpt) -> a self-describing model directory that
``vlt generate`` and ``init_from`` read (safetensors + vlt_config.json + tokenizer files).

Adapter-only LoRA checkpoints are rebuilt on the base weights their run started from
(``init_from`` in the checkpoint's hyper-parameters); ``--merge-lora`` folds the adapters in.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_export_args(p: argparse.ArgumentParser):
    p.add_argument("--ckpt", required=True, help="a .ckpt written by vlt fit")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default=None,
                   help="'byte' or a local HF tokenizer dir (default: the run's data.tokenizer)")
    p.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights")


def export_checkpoint(ckpt_path, out_dir, tokenizer=None, merge_lora=False) -> Path:
    import torch

    from vlt.checkpoint.export import save_pretrained_vlt
    from vlt.checkpoint.lightning import load_model_state
    from vlt.config import VLMConfig
    from vlt.model import VLM

    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt {str(path)!r} does not exist (look in lightning_logs/version_N/checkpoints/)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "vlt_config" not in ckpt:
        raise ValueError(f"{path} was not written by vlt fit (no 'vlt_config'); its layout is unknown")
    hp = ckpt.get("hyper_parameters", {})
    model = VLM(VLMConfig.from_dict(ckpt["vlt_config"]))
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    lora = hp.get("lora")
    if lora and lora.get("adapter_only_checkpoint", True):  # the base weights are not in this file
        if not hp.get("init_from"):
            raise ValueError(f"{path} holds LoRA adapters only and records no init_from to rebuild the base from")
        _, base = load_model_state(hp["init_from"])
        model.load_state_dict(base)
    if lora:
        from vlt.lora import apply_lora
        apply_lora(model, **{k: v for k, v in lora.items() if k != "adapter_only_checkpoint"})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path}: tensors the model does not have: {unexpected[:5]}")
    data_hp = ckpt.get("datamodule_hyper_parameters") or {}
    if tokenizer is None:
        tokenizer = data_hp.get("tokenizer", None)
    return save_pretrained_vlt(model, out_dir, tokenizer_dir=tokenizer, merge_lora=merge_lora,
                               prompt=prompt_settings(data_hp))


def prompt_settings(data_hp: dict) -> dict | None:
    """The data module's templating (system prompt, image resize limits) from its saved
    hyper-parameters, as ``save_pretrained_vlt(prompt=...)`` records it; None when the run had no
    vlt data module (its defaults then apply)."""
    if "system_prompt" not in data_hp:
        return None
    return {"system": data_hp.get("system_prompt") or "", "min_pixels": data_hp.get("min_pixels"),
            "max_pixels": data_hp.get("max_pixels")}


def run_export(args) -> int:
    try:
        out = export_checkpoint(args.ckpt, args.out, args.tokenizer, args.merge_lora)
    except (FileNotFoundError, ValueError) as e:
        print(f"vlt export: {e}", file=sys.stderr)
        return 2
    print(f"vlt export: wrote {out}")
    return 0
