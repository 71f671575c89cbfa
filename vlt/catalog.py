"""``vlt mixers`` and ``vlt recipes``: what a layout can name and what ``--config NAME`` can find."""
from __future__ import annotations

import inspect
from pathlib import Path


def mixer_rows() -> list[dict]:
    """One row per registered mixer: name, class path, options with defaults, first docstring line."""
    from vlt.layers.registry import get_mixer_class, list_mixers, mixer_options
    shared = {"hidden_size", "num_heads", "num_kv_heads", "head_dim", "rope_theta", "mrope_section", "norm_eps",
              "layer_idx"}  # filled in from decoder.* for every layer
    rows = []
    for name in list_mixers():
        cls = get_mixer_class(name)
        opts = {k: (None if p.default is inspect.Parameter.empty else p.default)
                for k, p in mixer_options(cls).items() if k not in shared}
        own = cls.__dict__.get("__doc__") or ""  # not nn.Module's, which every class would inherit
        doc = inspect.cleandoc(own).splitlines() if own.strip() else []
        rows.append({"name": name, "class": f"{cls.__module__}.{cls.__qualname__}", "options": opts,
                     "doc": doc[0] if doc else "", "state": "grows with the sequence" if cls.state_grows
                     else "constant size"})
    return rows


def print_mixers(args) -> int:
    for r in mixer_rows():
        opts = ", ".join(f"{k}={v!r}" for k, v in r["options"].items())
        print(f"{r['name']:10} {r['class']}  (decode state: {r['state']})")
        if r["doc"]:
            print(f"{'':10} {r['doc']}")
        print(f"{'':10} options: {opts or '-'}")
    print("\nuse one in a layout by name (layout: \"[swa, gdn, gdn, gdn]\"), set defaults per name "
          "(mixers: {swa: {window: 512}}); your own: @register_mixer in a module named by `imports:` / --import")
    return 0


def recipe_rows(root: Path) -> list[dict]:
    """Shipped recipes as ``--config`` names, each with the first line of its leading comment."""
    rows = []
    for path in sorted(root.rglob("*.yaml")):
        name = path.relative_to(root).with_suffix("").as_posix()
        about = ""
        for line in path.read_text().splitlines():
            if line.startswith("#"):
                about = line.lstrip("# ").strip()
                break
            if line.strip():
                break
        rows.append({"name": name, "path": str(path), "about": about})
    return rows


def print_recipes(args) -> int:
    from vlt.cli import RECIPES
    rows = recipe_rows(RECIPES)
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:{width}}  {r['about']}")
    print(f"\n{len(rows)} recipes in {RECIPES}; run one with `vlt fit --config NAME`, "
          "see it resolved with `vlt fit --config NAME --print_config`")
    return 0
