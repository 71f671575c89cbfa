"""The dependency direction of the design card, checked on the source: kernels <- layers <- models
<- training/CLI, data apart (it imports none of the model code and no model code is needed to read
shards). Every ``import`` / ``from ... import`` in every module is read with ``ast`` (imports inside
functions included: a lazy import is still a dependency), relative imports resolved.

Levels: ``vlt.kernels`` (kernels/), ``vlt.layers`` (layers/), ``vlt.data`` (data/); in vlt/ the
training/CLI level is the modules that drive runs or parse command lines (TRAINING_CLI below), every
other module of vlt/ is a model-level one (config, model, vision towers, conversion (vlt.convert),
checkpoints and exports (vlt.checkpoint), inference engine, vlt.testing).

Also here: every package directory is one the installed wheel ships (pyproject's packages), and the
module paths that moved (vlt.export, vlt.export_cli, vlt.student, the single-file vlt.checkpoint and
vlt.convert) still resolve, as old scripts, saved configs and pickles name them.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"vlt": "vlt", "layers": "vlt.layers", "kernels": "vlt.kernels", "data": "vlt.data"}
# vlt/ modules (and packages) at the training/CLI level: they may import anything
TRAINING_CLI = ("vlt.training", "vlt.cli", "vlt.cli_errors", "vlt.bench", "vlt.evaluation", "vlt.catalog",
                "vlt.predict", "vlt.run_config")


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def level(module: str) -> str | None:
    """'kernels', 'layers', 'data', 'models', 'training' or None (the package root ``vlt`` itself,
    whose lazy public API resolves names by string, and modules outside vlt)."""
    for lvl in ("kernels", "layers", "data"):
        if _within(module, f"vlt.{lvl}"):
            return lvl
    if module == "vlt" or not module.startswith("vlt."):
        return None
    top = ".".join(module.split(".")[:2])
    if top in TRAINING_CLI or top.endswith("_cli"):
        return "training"
    return "models"


# level -> the levels it must not import
FORBIDDEN = {
    "kernels": {"layers", "models", "training", "data"},
    "layers": {"models", "training", "data"},
    "data": {"kernels", "layers", "models", "training"},
    "models": {"training"},
}


def modules():
    """(dotted module name, path, is a package __init__) for every .py of vlt/, layers/, kernels/, data/."""
    for folder, pkg in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            yield ".".join([pkg, *parts]), path, path.name == "__init__.py"


def imported_names(module: str, path: Path, is_package: bool):
    """(line, dotted name) for each import; ``from a import b`` gives ``a`` and ``a.b`` (b may be a module)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module
            yield node.lineno, src
            for alias in node.names:
                yield node.lineno, f"{src}.{alias.name}"


def violations():
    found = []
    for module, path, is_package in modules():
        own = level(module)
        for line, name in imported_names(module, path, is_package):
            target = level(name)
            if own in FORBIDDEN and target in FORBIDDEN[own] and not _within(name, module):
                found.append(f"{path.relative_to(ROOT)}:{line}: {module} ({own}) imports {name} ({target})")
    return sorted(set(found))


def test_levels_are_classified():
    assert level("vlt.kernels.gemv") == "kernels" and level("vlt.layers.norm") == "layers"
    assert level("vlt.data.shards") == "data" and level("vlt.model") == "models"
    assert level("vlt.inference.engine") == "models" and level("vlt.training.base") == "training"
    assert level("vlt.generate_cli") == "training" and level("vlt.bench.infer") == "training"
    assert level("torch") is None and level("vlt") is None


def test_the_scan_sees_imports():
    """Guards the test itself: lazy and relative imports are found."""
    names = {n for m, p, pkg in modules() if m == "vlt.data.cli" for _, n in imported_names(m, p, pkg)}
    assert "vlt.data.synthetic" in names                       # `from .synthetic import TASKS`
    names = {n for m, p, pkg in modules() if m == "vlt.model" for _, n in imported_names(m, p, pkg)}
    assert "vlt.layers" in names and "vlt.config" in names
    assert len(list(modules())) > 80


def test_dependencies_run_one_way():
    """kernels <- layers <- models <- training/CLI; data apart. A failure names the file and line."""
    bad = violations()
    assert not bad, "imports against the dependency direction:\n" + "\n".join(bad)


def test_moved_names_resolve_at_their_old_paths():
    """Names moved to keep the direction still import from where user code (and pickles of whole
    modules) found them: RMSNorm from vlt.vision, apply_rope from vlt.layers.rotary."""
    from vlt.kernels.rotary import apply_rope
    from vlt.layers import RMSNorm
    from vlt.layers.rotary import apply_rope as old_apply_rope
    from vlt.vision import RMSNorm as OldRMSNorm
    assert OldRMSNorm is RMSNorm and RMSNorm.__module__ == "vlt.layers.norm"
    assert old_apply_rope is apply_rope


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_directory_is_installed():
    """A package folder missing from ``[tool.setuptools] packages`` works in an editable install and
    is silently absent from a wheel (ImportError on a user's machine only)."""
    st = _pyproject()["tool"]["setuptools"]
    listed, dirs = set(st["packages"]), st["package-dir"]
    found = {}
    for pkg, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            name = ".".join([pkg, *rel])
            if any(_within(name, other) and len(other) > len(pkg) for other in dirs if other != pkg):
                continue  # served by a more specific package-dir entry (vlt.layers lives in layers/)
            found[name] = init.parent.relative_to(ROOT)
    missing = sorted(f"{name} ({path})" for name, path in found.items() if name not in listed)
    assert not missing, f"package directories not in pyproject's [tool.setuptools] packages: {missing}"
    assert {"vlt.convert", "vlt.checkpoint", "vlt.inference"} <= set(found)  # guards the scan itself


def _fresh_import(name):
    import importlib
    import sys
    sys.modules.pop(name, None)
    return importlib.import_module(name)


@pytest.mark.parametrize("old, new", [("vlt.export", "vlt.checkpoint.export"), ("vlt.export_cli", "vlt.checkpoint.cli"),
                                      ("vlt.student", "vlt.convert.student")])
def test_moved_modules_still_resolve_and_name_their_new_path(old, new):
    import importlib
    with pytest.warns(FutureWarning, match=new.replace(".", r"\.")):
        mod = _fresh_import(old)
    target = importlib.import_module(new)
    public = [n for n in dir(target) if not n.startswith("__")]
    assert public and all(getattr(mod, n) is getattr(target, n) for n in public)


def test_old_names_resolve_in_the_new_packages():
    import pickle

    import vlt.checkpoint
    import vlt.convert
    from vlt.checkpoint.cli import export_checkpoint
    from vlt.checkpoint.export import load_pretrained_vlt, save_pretrained_vlt
    from vlt.checkpoint.lightning import AtomicCheckpointIO, load_model_state, newest_checkpoint
    from vlt.convert.qwen import import_qwen2_5_vl, load_hf_teacher
    from vlt.convert.student import convert_to_student
    from vlt.testing import make_tiny_teacher
    assert vlt.checkpoint.AtomicCheckpointIO is AtomicCheckpointIO
    assert vlt.checkpoint.load_model_state is load_model_state and vlt.checkpoint.newest_checkpoint is newest_checkpoint
    assert vlt.checkpoint.save_pretrained_vlt is save_pretrained_vlt
    assert vlt.checkpoint.load_pretrained_vlt is load_pretrained_vlt
    assert vlt.checkpoint.export_checkpoint is export_checkpoint
    assert vlt.checkpoint._looks_like_disk_full  # the old module's private helpers too
    assert vlt.convert.load_teacher is load_hf_teacher and vlt.convert.make_tiny_teacher is make_tiny_teacher
    assert vlt.convert.convert_to_student is convert_to_student and vlt.convert.import_qwen2_5_vl is import_qwen2_5_vl
    with pytest.raises(AttributeError, match="no_such_name"):
        vlt.checkpoint.no_such_name  # noqa: B018
    # pickles of the old layout name module globals by their old paths (protocol 0 GLOBAL opcodes)
    assert pickle.loads(b"cvlt.checkpoint\nAtomicCheckpointIO\n.") is AtomicCheckpointIO
    assert pickle.loads(b"cvlt.convert\nconvert_to_student\n.") is convert_to_student


def test_saved_config_class_path_of_the_old_checkpoint_module_instantiates():
    """A run config naming ``vlt.checkpoint.AtomicCheckpointIO`` (e.g. ``--trainer.plugins``) as jsonargparse
    resolves it."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.plugins.io import CheckpointIO

    from vlt.checkpoint.lightning import AtomicCheckpointIO
    parser = ArgumentParser()
    parser.add_argument("--io", type=CheckpointIO)
    cfg = parser.parse_args(["--io", '{"class_path": "vlt.checkpoint.AtomicCheckpointIO"}'])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    assert type(instantiate(cfg).io) is AtomicCheckpointIO
