"""Layouts: which mixer each decoder layer uses.

A layout is either a compact pattern string, a list expression with ``*`` (repeat) and ``+``
(concatenate) over mixer names::

    "[swa, gdn, gdn, gdn] * 9"           # InfiniteVL: 1:3 interleaved, 36 layers
    "[full] * 2 + [gdn] * 6"
    "gdn * 4"

or an explicit per-layer list whose entries are names or ``{"mixer": name, **options}``::

    ["swa", "gdn", {"mixer": "swa", "window": 512}, "gdn"]

``resolve_layout`` turns either into one ``(name, options)`` per layer and validates every entry
against the registry before any parameter is allocated.
"""
from __future__ import annotations

import ast
import difflib
import re

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:]*")  # ":" for fla:ClassName


def parse_pattern(pattern: str) -> list:
    """Expand a pattern string into a list of names (safely: only lists, names, ints, * and +)."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"decoder.layout: empty pattern {pattern!r}; e.g. '[swa, gdn, gdn, gdn] * 9'")
    quoted = _NAME.sub(lambda m: repr(m.group(0)), pattern)
    try:
        tree = ast.parse(quoted, mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"decoder.layout: cannot parse pattern {pattern!r} ({e.msg}); "
                         "write e.g. '[swa, gdn, gdn, gdn] * 9' or '[full] * 2 + [gdn] * 6'") from None

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List):
            out = []
            for elt in node.elts:
                v = ev(elt)
                if not isinstance(v, list):
                    raise ValueError(f"decoder.layout: list items must be mixer names, in {pattern!r}")
                out.extend(v)
            return out
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Add)):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add) and isinstance(a, list) and isinstance(b, list):
                return a + b
            if isinstance(node.op, ast.Mult) and isinstance(a, list) != isinstance(b, list):
                seq, n = (a, b) if isinstance(a, list) else (b, a)
                if n < 1:
                    raise ValueError(f"decoder.layout: repeat count must be >= 1 in {pattern!r}")
                return seq * n
        raise ValueError(f"decoder.layout: unsupported expression in {pattern!r}; "
                         "use mixer names, [ ], * (repeat) and + (concatenate)")

    out = ev(tree)
    if not isinstance(out, list):
        raise ValueError(f"decoder.layout: pattern {pattern!r} does not describe a list of layers")
    return out


def resolve_layout(layout, num_layers: int | None, mixer_defaults: dict, shared: dict) -> list[tuple[str, dict]]:
    """One ``(mixer name, full options)`` per layer; raises ValueError naming the bad key."""
    from vlt.layers.registry import check_mixer_options, get_mixer_class, mixer_options
    entries = parse_pattern(layout) if isinstance(layout, str) else list(layout)
    if not entries:
        raise ValueError("decoder.layout is empty; give at least one layer")
    if num_layers is not None and num_layers != len(entries):
        raise ValueError(f"decoder.num_layers={num_layers} but decoder.layout describes {len(entries)} layers; "
                         "make them agree (or leave num_layers unset to take it from the layout)")
    for name, opts in (mixer_defaults or {}).items():
        if not isinstance(opts, dict):
            raise ValueError(f"decoder.mixers.{name} must be a mapping of options, got {opts!r}")
        check_default_options(name, opts)
    resolved = []
    for i, entry in enumerate(entries):
        where = f"decoder.layout[{i}]: "
        if isinstance(entry, str):
            name, own = entry, {}
        elif isinstance(entry, dict) and isinstance(entry.get("mixer"), str):
            own = dict(entry)
            name = own.pop("mixer")
        else:
            raise ValueError(f"{where}expected a mixer name or {{'mixer': name, ...}}, got {entry!r}")
        try:
            cls = get_mixer_class(name)
        except ValueError as e:  # the registry's message: unknown name, or why a class path did not import
            raise ValueError(f"{where}{e}") from None
        allowed = mixer_options(cls)
        opts = {k: v for k, v in shared.items() if k in allowed and v is not None}
        defaults = (mixer_defaults or {}).get(name, {})
        opts.update(defaults)
        opts.update(own)
        if "layer_idx" in allowed:
            opts["layer_idx"] = i
        check_mixer_options(name, opts, where)
        resolved.append((name, opts))
    return resolved


def check_default_options(name: str, opts: dict) -> None:
    """``decoder.mixers.<name>``: a known mixer, and only options it takes, reported at that key path
    (the per-layer check would name the first layer using it instead of the key the user wrote)."""
    from vlt.layers.registry import get_mixer_class, list_mixers, mixer_options
    try:
        cls = get_mixer_class(name)
    except ValueError as e:
        if "." in name:
            raise ValueError(f"decoder.mixers.{name}: {e}") from None
        raise ValueError(f"decoder.mixers has options for unknown mixer {name!r}; "
                         f"registered mixers: {list_mixers()}") from None
    allowed = sorted(mixer_options(cls))
    for key in opts:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"decoder.mixers.{name}.{key}: mixer {name!r} has no option {key!r}; {hint}"
                             f"allowed: {allowed}")


def check_backends(layers: list[tuple[str, dict]], device) -> None:
    """Every explicitly chosen kernel ``backend`` can run on ``device``: checked once the device is
    known and before any step, instead of failing at the first forward."""
    from vlt.kernels.backends import PREFERENCE, resolve_backend
    known = sorted({b for names in PREFERENCE.values() for b in names})
    for i, (name, opts) in enumerate(layers):
        backend = opts.get("backend")
        if backend in (None, "auto"):
            continue
        ops = [op for op, names in PREFERENCE.items() if backend in names]
        if not ops:
            raise ValueError(f"decoder.layout[{i}] ({name}): backend={backend!r} is not a kernel backend; "
                             f"allowed: {['auto', *known]}")
        try:
            resolve_backend(ops[0], backend, device)
        except ValueError as e:
            raise ValueError(f"decoder layer {i} ({name}): backend={backend!r} cannot run on this machine: {e}. "
                             f"Set model.init_args.mixers.{name}.backend to one of those, "
                             "or drop it for 'auto'") from None
