"""The dependency direction of the design card, checked on the source: kernels <- layers <- models
<- training/CLI, data apart (it imports none of the model code and no model code is needed to read
shards). Every ``import`` / ``from ... import`` in every module is read with ``ast`` (imports inside
functions included: a lazy import is still a dependency), relative imports resolved.

Levels: ``vlt.kernels`` (kernels/), ``vlt.layers`` (layers/), ``vlt.data`` (data/); in vlt/ the
training/CLI level is the modules that drive runs or parse command lines (TRAINING_CLI below), every
other module of vlt/ is a model-level one (config, model, vision towers, conversion, export,
inference engine).
"""
from __future__ import annotations

import ast
from pathlib import Path

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
