"""Reading model weights + config from what vlt writes: Lightning ``.ckpt`` files (which carry the
model config and layout) and exported directories (``vlt_config.json`` + ``model.safetensors``).
Checkpoint writes go through ``AtomicCheckpointIO``: written beside the target, then renamed, so a
crash mid-write never replaces a good checkpoint with a torn one."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path: _PATH, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def load_model_state(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(VLMConfig dict, model state dict) from a vlt .ckpt or an exported directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"init_from checkpoint {str(p)!r} does not exist; give a .ckpt written by "
                                "`vlt fit` (lightning_logs/version_N/checkpoints/) or a directory saved by vlt export")
    if p.is_dir():  # an export directory (vlt.export): tied weights restored, format checked there
        from vlt.export import read_state
        meta, state = read_state(p)
        return meta["model"], state
    ckpt = torch.load(p, map_location="cpu", weights_only=False)
    if "vlt_config" not in ckpt:
        raise ValueError(f"{str(p)!r} was not written by vlt (no 'vlt_config' entry): its layout is unknown")
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    return ckpt["vlt_config"], state


def describe_mismatch(expected: dict, found: dict) -> str | None:
    """A readable reason why two model configs cannot share weights, or None."""
    from vlt.config import VLMConfig
    a, b = VLMConfig.from_dict(expected), VLMConfig.from_dict(found)
    la, lb = [n for n, _ in a.layers()], [n for n, _ in b.layers()]
    if la != lb:
        return f"layout differs: this recipe has {la}, the checkpoint has {lb}"
    for key in ("hidden_size", "intermediate_size", "vocab_size", "num_heads", "num_kv_heads", "head_dim"):
        if getattr(a.decoder, key) != getattr(b.decoder, key):
            return f"decoder.{key} differs: recipe {getattr(a.decoder, key)}, checkpoint {getattr(b.decoder, key)}"
    for i, ((_, oa), (_, ob)) in enumerate(zip(a.layers(), b.layers())):
        if oa != ob:
            diff = {k: (oa.get(k), ob.get(k)) for k in set(oa) | set(ob) if oa.get(k) != ob.get(k)}
            return f"layer {i} options differ (recipe, checkpoint): {diff}"
    return None
