"""Moved: student conversion lives in ``vlt.convert.student`` (``vlt.convert.convert_to_student``).

This alias keeps scripts and saved configs that name ``vlt.student.X`` working: every name resolves
to the new module's (``convert`` to ``convert_to_student``, whose first four arguments are the same),
with a ``FutureWarning`` naming the new path. It will be removed in a later release.
"""
import warnings

from vlt.convert import student as _new

warnings.warn("vlt.student moved to vlt.convert.student (vlt.student.convert is vlt.convert.convert_to_student); "
              "import from there", FutureWarning, stacklevel=2)


def __getattr__(name: str):
    return getattr(_new, "convert_to_student" if name == "convert" else name)
