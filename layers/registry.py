"""The token-mixer registry, in the style of timm's ``register_model`` / ``create_model``.

    @register_mixer("my_mixer")
    class MyMixer(TokenMixer): ...

    create_mixer("gdn", hidden_size=2048, num_heads=16)
    create_mixer("mypkg.mixers.MyMixer", hidden_size=64)   # a class path needs no registration

Options are checked against the class's ``__init__`` signature before anything is allocated, so a
misspelt recipe key fails with the key and the allowed names instead of a TypeError deep inside.
"""
from __future__ import annotations

import importlib
import inspect

_REGISTRY: dict[str, type] = {}


def register_mixer(name: str):
    """Class decorator: make ``cls`` available as ``name`` in layouts and ``create_mixer``."""
    def wrap(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"mixer name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        _REGISTRY[name] = cls
        cls.mixer_name = name
        return cls
    return wrap


def list_mixers() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def get_mixer_class(name: str) -> type:
    """Registered name, or a ``module.Class`` path to any ``TokenMixer`` subclass."""
    _import_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if "." in name:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"mixer class path {name!r} cannot be imported ({e}); "
                             f"registered mixers: {list_mixers()}") from e
        from vlt.layers.base import TokenMixer
        if not (inspect.isclass(cls) and issubclass(cls, TokenMixer)):
            raise ValueError(f"mixer class path {name!r} is not a vlt.layers.TokenMixer subclass")
        return cls
    raise ValueError(f"unknown mixer {name!r}; registered mixers: {list_mixers()} "
                     "(or give a 'package.module.Class' path to your own TokenMixer)")


def mixer_options(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword options a mixer class accepts (its ``__init__`` parameters)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p for k, p in params.items() if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def check_mixer_options(name: str, options: dict, where: str = "") -> type:
    """Validate ``options`` for mixer ``name`` without building it; returns the class."""
    cls = get_mixer_class(name)
    allowed = mixer_options(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{where}unknown option(s) {unknown} for mixer {name!r}; allowed: {sorted(allowed)}")
    missing = [k for k, p in allowed.items() if p.default is inspect.Parameter.empty and k not in options]
    if missing:
        raise ValueError(f"{where}mixer {name!r} needs option(s) {missing}")
    cls.validate_options(**{k: options.get(k, p.default) for k, p in allowed.items()}, where=where)
    return cls


def create_mixer(name: str, **options):
    """Build mixer ``name`` with ``options`` (None values are dropped, as timm's factory does)."""
    options = {k: v for k, v in options.items() if v is not None}
    cls = check_mixer_options(name, options)
    return cls(**options)


def _import_builtin():
    # Importing the modules runs their @register_mixer decorators; done lazily so that
    # registry.py itself has no import cycle with the mixers.
    from vlt.layers import attention, gdn, hybrid, linear  # noqa: F401
