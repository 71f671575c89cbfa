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
import os
import sys

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
    # fla-backed mixers (layers/fla_mixers.py: kda, mamba2, ..., fla:Class) are listed apart, by
    # fla_mixers.fla_mixer_names(): most need CUDA, and suites looping over this list run on CPU
    return sorted(n for n, c in _REGISTRY.items() if c.__module__ != "vlt.layers.fla_mixers")


def get_mixer_class(name: str) -> type:
    """Registered name, or a ``module.Class`` path to any ``TokenMixer`` subclass."""
    _import_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    from vlt.layers import fla_mixers
    if name in fla_mixers.SHORT_NAMES or name.startswith("fla:"):
        return fla_mixers.mixer_class(name)  # imports fla (seconds) only when a layout asks for it
    if "." in name:
        module, _, attr = name.rpartition(".")
        # a module that is not there is a ValueError naming it; an error inside it propagates as it is
        import_user_modules([module], where=f"mixer class path {name!r}")
        cls = getattr(importlib.import_module(module), attr, None)
        if cls is None:
            raise ValueError(f"mixer class path {name!r}: module {module!r} has no attribute {attr!r}; "
                             f"registered mixers: {list_mixers()}")
        from vlt.layers.base import TokenMixer
        if not (inspect.isclass(cls) and issubclass(cls, TokenMixer)):
            raise ValueError(f"mixer class path {name!r} is not a vlt.layers.TokenMixer subclass")
        return cls
    raise ValueError(f"unknown mixer {name!r}; registered mixers: {list_mixers()}; from fla: "
                     f"{sorted(fla_mixers.SHORT_NAMES)} or 'fla:ClassName' for any fla.layers class "
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


# ---- user modules ---------------------------------------------------------------------------
# User modules imported before a recipe is parsed (cf. mmengine's ``custom_imports``).
#
# A recipe's top-level ``imports: [mypkg.mixers]`` or ``vlt fit --import mypkg.mixers`` imports the
# module before the config is parsed, so the mixers it registers (``@register_mixer("token_shift")``)
# are known to layouts by name. The list is saved in the run's ``config.yaml`` (so ``vlt fit --config
# that/config.yaml`` re-runs it), and the model config records the module of every mixer class
# that is not vlt's own (``VLMConfig.imports``), so checkpoints and exports name what they need.
#
# The current directory is importable, as with ``python -m``: a ``my_mixers.py`` beside the recipe
# works without installing it.


def import_user_modules(modules, where: str = "imports") -> list[str]:
    """Import each dotted module name; a module that cannot be found is a ValueError naming it and
    ``where`` it was asked for. Errors raised *inside* the module propagate as they are (they are
    the user's own traceback to read)."""
    done = []
    for name in modules or []:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: expected dotted module names like 'mypkg.mixers', got {name!r}")
        name = name.strip()
        if name.endswith(".py"):
            raise ValueError(f"{where}: {name!r} is a file name; give the module name "
                             f"({name[:-3].replace(os.sep, '.')!r}) and run from the folder that holds it")
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise  # the module exists but one of *its* imports is missing: the user's traceback
            raise ValueError(f"{where}: cannot import {name!r} ({e}); put the folder that holds it on "
                             f"PYTHONPATH or run vlt from that folder") from None
        done.append(name)
    return done


def user_module_of(cls: type) -> str | None:
    """The module to import for ``cls`` to exist, or None for vlt's own classes."""
    mod = getattr(cls, "__module__", "") or ""
    if mod == "vlt" or mod.startswith("vlt.") or mod == "__main__":
        return None
    return mod
