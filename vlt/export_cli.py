"""Moved: ``vlt export`` lives in ``vlt.checkpoint.cli``.

This alias keeps scripts that name ``vlt.export_cli.X`` working: every name resolves to the new
module's, with a ``FutureWarning`` naming the new path. It will be removed in a later release.
"""
import warnings

from vlt.checkpoint import cli as _new

warnings.warn("vlt.export_cli moved to vlt.checkpoint.cli; import from there", FutureWarning, stacklevel=2)


def __getattr__(name: str):
    return getattr(_new, name)
