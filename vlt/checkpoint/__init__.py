"""What vlt writes and reads back: Lightning checkpoints, export directories, and ``vlt export``.

- ``vlt.checkpoint.lightning``: ``.ckpt`` files of ``vlt fit`` - ``AtomicCheckpointIO`` (atomic writes,
  a free-space check, ``CheckpointSpaceError``), ``load_model_state`` (model config + weights from a
  ``.ckpt`` or an export directory), ``describe_mismatch``, ``newest_checkpoint`` (``--ckpt_path last``).
- ``vlt.checkpoint.export``: self-describing model directories (``vlt_config.json`` +
  ``model.safetensors`` + tokenizer files) - ``save_pretrained_vlt``, ``load_pretrained_vlt``,
  ``read_state``, ``read_vlt_config``, ``load_tokenizer_from``.
- ``vlt.checkpoint.cli``: ``vlt export`` (a ``.ckpt`` -> an export directory): ``export_checkpoint``.

The names resolve on first use, so ``vlt generate`` (which reads export directories) does not import
Lightning. Every name of the former single module ``vlt/checkpoint.py`` still resolves here (saved
run configs may name ``vlt.checkpoint.AtomicCheckpointIO`` as a ``class_path``).
"""
from __future__ import annotations

from importlib import import_module as _import_module

_MODULES = {
    "vlt.checkpoint.lightning": ("AtomicCheckpointIO", "CheckpointSpaceError", "load_model_state", "describe_mismatch",
                                 "newest_checkpoint", "checkpoint_step", "remove_torn_temporaries", "tensor_bytes",
                                 "space_message", "SPACE_MARGIN_BYTES", "SPACE_MARGIN_FRACTION"),
    "vlt.checkpoint.export": ("save_pretrained_vlt", "load_pretrained_vlt", "read_state", "read_vlt_config",
                              "load_tokenizer_from", "merge_lora_", "DTYPES", "FORMAT", "FORMAT_VERSION",
                              "CONFIG_FILE", "WEIGHTS_FILE", "ADAPTER_DIR", "TOKENIZER_FILES", "PROCESSOR_FILES"),
    "vlt.checkpoint.cli": ("export_checkpoint", "add_export_args", "run_export", "prompt_settings"),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    # anything else the old vlt/checkpoint.py held (its private helpers, its module imports) comes from
    # vlt.checkpoint.lightning, which is that file moved
    module = _LAZY.get(name, "vlt.checkpoint.lightning")
    try:
        value = getattr(_import_module(module), name)
    except AttributeError:
        raise AttributeError(f"module 'vlt.checkpoint' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
