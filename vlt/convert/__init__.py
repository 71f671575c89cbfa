"""Conversion: Qwen2.5-VL checkpoints into vlt, and full-attention teachers into students.

- ``vlt.convert.student``: ``convert_to_student(teacher, layout, mixers, init, window)``, the one entry
  point (a vlt ``VLM`` or a Qwen2.5-VL teacher), and the ``mimic`` / ``transfer`` initialisations.
- ``vlt.convert.qwen``: a local Qwen2.5-VL directory loaded with transformers (``load_hf_teacher``),
  its config mapped (``vlm_from_teacher_config``), imported whole (``import_qwen2_5_vl``), run on a vlt
  batch (``teacher_forward``).

The names below resolve on first use (so ``import vlt.convert.student`` does not import transformers).
``load_teacher`` (the old name of ``load_hf_teacher``) and ``make_tiny_teacher`` (now in
``vlt.testing``) still resolve here, for code written against the single-module ``vlt/convert.py``.
"""
from __future__ import annotations

from importlib import import_module as _import_module

_LAZY = {
    "convert_to_student": "vlt.convert.student",
    "student_config": "vlt.convert.student",
    "teacher_like": "vlt.convert.student",
    "INITS": "vlt.convert.student",
    "ATTENTION": "vlt.convert.student",
    "recording_copy": "vlt.convert.student",
    "attention_weights": "vlt.convert.student",
    "init_mixer_from_attention": "vlt.convert.student",
    "ARCH": "vlt.convert.qwen",
    "check_teacher_dir": "vlt.convert.qwen",
    "load_hf_teacher": "vlt.convert.qwen",
    "vlm_from_teacher_config": "vlt.convert.qwen",
    "convert_hf_teacher": "vlt.convert.qwen",
    "import_qwen2_5_vl": "vlt.convert.qwen",
    "teacher_forward": "vlt.convert.qwen",
    "QWEN_SPECIAL_TOKENS": "vlt.convert.qwen",
    "QWEN_CHAT_TEMPLATE": "vlt.convert.qwen",
}
# old names -> (module, name there)
_ALIASES = {"load_teacher": ("vlt.convert.qwen", "load_hf_teacher"),
            "make_tiny_teacher": ("vlt.testing", "make_tiny_teacher")}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name], name
    elif name in _ALIASES:
        module, attr = _ALIASES[name]
    else:
        raise AttributeError(f"module 'vlt.convert' has no attribute {name!r}")
    value = getattr(_import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_ALIASES))
