"""vlt: vision-language models with pluggable token mixers, trained with PyTorch Lightning.

The public Python API (pinned by tests/test_public_api.py)::

    import vlt
    model = vlt.create_model("tiny-hybrid", decoder={"layout": "[swa, gdn]"})
    vlt.save_pretrained(model, "out/")
    model, tokenizer = vlt.load_pretrained("out/")

Kept light on purpose: ``import vlt`` imports nothing heavy (the CLI reads ``vlt.__version__`` and
must start fast), so every public name below is resolved on first access (PEP 562 ``__getattr__``)
and only then imports torch / transformers.
"""
from __future__ import annotations

from importlib import import_module as _import_module
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("vlt")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

# public name -> (module, attribute in it); resolved lazily by __getattr__
_LAZY = {
    "VLMConfig": ("vlt.config", "VLMConfig"),
    "NAMED_CONFIGS": ("vlt.config", "NAMED_CONFIGS"),
    "VLM": ("vlt.model", "VLM"),
    "TokenMixer": ("vlt.layers", "TokenMixer"),
    "register_mixer": ("vlt.layers", "register_mixer"),
    "create_mixer": ("vlt.layers", "create_mixer"),
    "list_mixers": ("vlt.layers", "list_mixers"),
    "convert_to_student": ("vlt.convert.student", "convert_to_student"),
    "import_qwen2_5_vl": ("vlt.convert.qwen", "import_qwen2_5_vl"),
    "InferenceEngine": ("vlt.inference", "InferenceEngine"),
    "generate": ("vlt.inference", "generate"),
    "VideoStream": ("vlt.inference", "VideoStream"),
    "ChatSession": ("vlt.inference", "ChatSession"),
}
# defined in this file, but importing torch only when called
_DEFINED = ["create_model", "save_pretrained", "load_pretrained"]

# a literal list so linters and IDEs read it; tests/test_public_api.py checks it matches the tables
__all__ = ["__version__", "VLMConfig", "NAMED_CONFIGS", "VLM", "TokenMixer", "register_mixer", "create_mixer",
           "list_mixers", "convert_to_student", "import_qwen2_5_vl", "InferenceEngine", "generate", "VideoStream",
           "ChatSession", "create_model", "save_pretrained", "load_pretrained"]


def create_model(name_or_config="tiny-hybrid", **overrides):
    """A freshly initialised ``VLM``.

    ``name_or_config``: a name in ``vlt.config.NAMED_CONFIGS`` (e.g. ``"tiny-hybrid"``), a
    ``VLMConfig``, or a dict of one (``VLMConfig.to_dict()`` form). ``overrides`` are merged as
    ``VLMConfig.from_name`` merges them: ``create_model("tiny-hybrid", decoder={"layout": "[swa, gdn]"})``
    changes the layout and keeps the other decoder keys. A given ``VLMConfig`` is not modified."""
    from vlt.config import VLMConfig
    from vlt.model import VLM
    if isinstance(name_or_config, str):
        cfg = VLMConfig.from_name(name_or_config, **overrides)
    elif isinstance(name_or_config, VLMConfig):
        cfg = name_or_config.with_overrides(**overrides)
    elif isinstance(name_or_config, dict):
        cfg = VLMConfig.from_dict(name_or_config).with_overrides(**overrides)
    else:
        raise TypeError(f"create_model takes a config name, a VLMConfig or a dict, not "
                        f"{type(name_or_config).__name__}")
    return VLM(cfg)


def save_pretrained(model, out_dir, tokenizer_dir=None, merge_lora: bool = False, prompt: dict | None = None):
    """Write ``model`` as a self-describing export directory; see ``vlt.checkpoint.export.save_pretrained_vlt``."""
    from vlt.checkpoint.export import save_pretrained_vlt
    return save_pretrained_vlt(model, out_dir, tokenizer_dir=tokenizer_dir, merge_lora=merge_lora, prompt=prompt)


def load_pretrained(path, dtype=None, device=None, load_adapter: bool = True):
    """(VLM in eval mode, tokenizer or None) from an export directory; see
    ``vlt.checkpoint.export.load_pretrained_vlt``."""
    from vlt.checkpoint.export import load_pretrained_vlt
    return load_pretrained_vlt(path, dtype=dtype, device=device, load_adapter=load_adapter)


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'vlt' has no attribute {name!r}") from None
    value = getattr(_import_module(module), attr)
    globals()[name] = value  # cached: later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
