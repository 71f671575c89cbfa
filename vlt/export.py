"""Moved: export directories live in ``vlt.checkpoint.export`` (also ``vlt.save_pretrained`` /
``vlt.load_pretrained``).

This alias keeps scripts and saved configs that name ``vlt.export.X`` working: every name resolves to
the new module's, with a ``FutureWarning`` naming the new path. It will be removed in a later release.
"""
import warnings

from vlt.checkpoint import export as _new

warnings.warn("vlt.export moved to vlt.checkpoint.export; import from there", FutureWarning, stacklevel=2)


def __getattr__(name: str):
    return getattr(_new, name)
