"""Layout studies (``vlt compare``): layouts at an equal parameter budget, their eval rows pooled
over seeds, scores with bootstrap confidence intervals, and paired differences against a reference.

- ``read_layout_recipe`` / ``tile_layout``: a layout from ``recipes/layouts/<name>.yaml`` (or a
  pattern), repeated to a common depth, so a 1:7 hybrid and a 1:3 hybrid have the same number of layers.
- ``match_budget``: the MLP width (``decoder.intermediate_size``) per layout that brings its total
  parameter count closest to the budget; GDN layers hold more parameters than attention layers,
  so without this "full vs gdn" would also be "smaller vs larger".
- ``study_stats``: per layout and group (a task; a task at an evidence-distance bucket; a task with
  its evidence beyond the window), the mean over seeds of each seed's mean score, and a 95%
  interval from a bootstrap that resamples eval rows (shared by all layouts in a replicate, so
  differences are paired) and, with several seeds, the seeds of each layout. Deterministic in ``seed``.
"""
from __future__ import annotations

import math
import json
from pathlib import Path

import numpy as np

from vlt.evaluation.scoring import distance_bucket

from vlt.cli import RECIPES

LAYOUT_DIR = RECIPES / "layouts"
STUDY_LAYOUTS = ("full", "swa", "gdn", "hybrid_1to3", "hybrid_1to7", "intra_hybrid")
BEYOND = "beyond window"


def known_layouts() -> list[str]:
    return sorted(p.stem for p in LAYOUT_DIR.glob("*.yaml") if p.stem != "base")


def read_layout_recipe(spec: str) -> tuple[str, list[str], dict]:
    """(name, per-layer mixer names, mixer defaults) from ``NAME`` (recipes/layouts/NAME.yaml) or
    ``NAME=PATTERN`` (e.g. ``mine=[swa, gdn, gdn]``, mixer defaults from the base model)."""
    import yaml

    from vlt.layout import parse_pattern
    if "=" in spec:
        name, pattern = spec.split("=", 1)
        return name.strip(), parse_pattern(pattern), {}
    path = LAYOUT_DIR / f"{spec}.yaml"
    if not path.is_file():
        raise ValueError(f"--layouts: no layout recipe {spec!r} (allowed: {known_layouts()}, or NAME=PATTERN "
                         "such as 'mine=[swa, gdn, gdn]')")
    init = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("init_args") or {}
    layout = init.get("layout")
    if not isinstance(layout, str):
        raise ValueError(f"{path}: model.init_args.layout must be a pattern string for vlt compare (got {layout!r})")
    return spec, parse_pattern(layout), dict(init.get("mixers") or {})


def parse_json_option(flag: str, text: str):
    """The value of a JSON-valued command-line option; a ValueError naming ``flag`` when it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {text!r} is not JSON ({e.msg})") from None


def merge_mixer_options(mixers: dict, extra_json: str | None) -> dict:
    """A recipe's mixer options with ``--mixers JSON`` merged over them, mixer by mixer and key by key."""
    if not extra_json:
        return mixers
    extra = parse_json_option("--mixers", extra_json)
    if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
        raise ValueError("--mixers must map mixer names to option dicts, e.g. '{\"swa\": {\"window\": 32}}'")
    return {**mixers, **{k: {**mixers.get(k, {}), **v} for k, v in extra.items()}}


def tile_layout(name: str, layers: list[str], depth: int) -> list[str]:
    if depth % len(layers):
        raise ValueError(f"--depth {depth}: layout {name!r} has {len(layers)} layers per period, which does not "
                         f"divide {depth}; pick a multiple of it (allowed depths: multiples of {len(layers)})")
    return layers * (depth // len(layers))


def default_depth(periods: list[int]) -> int:
    return math.lcm(*periods)


def count_params(model_name: str, model: dict | None, layout: list[str], mixers: dict) -> int:
    """Total parameters of the model built as ``vlt fit`` builds it (on the meta device: no memory)."""
    import torch

    from vlt.model import VLM
    from vlt.training.base import build_config
    cfg = build_config(model_name, model, None, "[" + ", ".join(layout) + "]", mixers)
    with torch.device("meta"):
        return sum(p.numel() for p in VLM(cfg).parameters())


def match_budget(model_name: str, model: dict | None, layouts: dict, budget_of: str, multiple: int = 8,
                 tolerance: float = 0.03) -> dict:
    """{name: {"intermediate_size", "params", "deviation"}} with every layout's parameter count within
    ``tolerance`` (relative) of layout ``budget_of``'s at the base width. ``layouts``: {name: (layers,
    mixers)}. Parameters are linear in the MLP width, so two builds give the exact slope."""
    import copy

    from vlt.training.base import build_config
    base_i = build_config(model_name, model, None, None, None).decoder.intermediate_size

    def with_width(i):
        m = copy.deepcopy(model or {})
        m.setdefault("decoder", {})["intermediate_size"] = int(i)
        return m

    layers, mixers = layouts[budget_of]
    target = count_params(model_name, with_width(base_i), layers, mixers)
    out = {}
    for name, (layers, mixers) in layouts.items():
        p0 = count_params(model_name, with_width(base_i), layers, mixers)
        slope = count_params(model_name, with_width(base_i + multiple), layers, mixers) - p0
        width = max(multiple, base_i + multiple * round((target - p0) / slope))
        params = p0 + slope * ((width - base_i) // multiple)
        dev = (params - target) / target
        if abs(dev) > tolerance:
            raise ValueError(f"--budget-tolerance {tolerance}: layout {name!r} reaches {params:,} parameters at "
                             f"MLP width {width}, {100 * dev:+.1f}% from {budget_of!r}'s {target:,}; "
                             "use a shallower --depth, another --budget-layout, or --no-match-budget")
        out[name] = {"intermediate_size": int(width), "params": int(params), "deviation": round(dev, 5)}
    return out


def _groups(row: dict, window: int | None) -> list[str]:
    """The groups an eval row counts in: its task, and with a recorded evidence distance its
    distance bucket and, past the window, the pooled 'beyond window' group."""
    t = row["task"]
    out = [t]
    d = row.get("evidence_distance")
    if d is not None and window:
        out.append(f"{t} / {distance_bucket(d, window)}")
        if d > window:
            out.append(f"{t} / {BEYOND}")
    return out


_BUCKET_ORDER = {"in window": 1, "1-2x window": 2, "2-4x window": 3, ">4x window": 4, BEYOND: 5}


def _group_key(g: str):
    task, _, bucket = g.partition(" / ")
    return task, _BUCKET_ORDER.get(bucket, 0 if not bucket else 9)


def study_stats(runs: dict, window: int | None, reference: str | None = None, n_boot: int = 1000,
                seed: int = 0, level: float = 0.95) -> dict:
    """``runs``: {layout: [rows of one seed's predictions.jsonl, ...]}. Returns {"groups": {group:
    {layout: stats}}, "differences": {group: {layout: stats of layout - reference}}}; stats =
    {mean, lo, hi, n_rows, n_seeds, per_seed}. A group keeps the rows (by id) every run has."""
    rng = np.random.default_rng(seed)
    names = list(runs)
    by_group: dict = {}
    for name in names:
        for s, rows in enumerate(runs[name]):
            for r in rows:
                for g in _groups(r, window):
                    by_group.setdefault(g, {}).setdefault(name, [dict() for _ in runs[name]])[s][str(r["id"])] = \
                        float(r["score"])
    alpha = (1 - level) / 2
    groups, diffs = {}, {}
    for g, per_layout in sorted(by_group.items(), key=lambda kv: _group_key(kv[0])):
        if set(per_layout) != set(names):
            continue  # a group some layout never produced (e.g. a distance bucket) cannot be compared
        ids = sorted(set.intersection(*(set(d) for seeds in per_layout.values() for d in seeds)))
        if not ids:
            continue
        mats = {n: np.array([[d[i] for i in ids] for d in per_layout[n]]) for n in names}  # [seeds, rows]
        reps = {n: np.empty(n_boot) for n in names}
        for b in range(n_boot):
            idx = rng.integers(0, len(ids), len(ids))
            for n in names:
                m = mats[n]
                s = rng.integers(0, m.shape[0], m.shape[0]) if m.shape[0] > 1 else np.zeros(1, dtype=int)
                reps[n][b] = m[s][:, idx].mean()

        def stats(point: float, rep: np.ndarray, per_seed) -> dict:
            return {"mean": float(point), "lo": float(np.quantile(rep, alpha)),
                    "hi": float(np.quantile(rep, 1 - alpha)),
                    "n_rows": len(ids), "n_seeds": len(per_seed), "per_seed": [float(x) for x in per_seed]}
        groups[g] = {n: stats(mats[n].mean(), reps[n], mats[n].mean(axis=1)) for n in names}
        if reference is not None and reference in names:
            ref = mats[reference].mean()
            diffs[g] = {n: {k: v for k, v in stats(mats[n].mean() - ref, reps[n] - reps[reference], []).items()
                            if k not in ("per_seed", "n_seeds")}
                        for n in names if n != reference}
    return {"groups": groups, "differences": diffs, "window": window, "reference": reference, "bootstrap": n_boot,
            "level": level}


# ------------------------------------------------------------------------------------------ report
def _cell(st: dict | None, signed: bool = False) -> str:
    if not st:
        return "-"
    f = (lambda x: f"{100 * x + 0.0:+.1f}") if signed else (lambda x: f"{100 * x + 0.0:.1f}")  # no "-0.0"
    return f"{f(st['mean'])} [{f(st['lo'])}, {f(st['hi'])}]"


def markdown(result: dict) -> str:
    st, lay = result["stats"], result["layouts"]
    names = list(lay)
    level = int(round(100 * st["level"]))
    lines = ["# vlt compare", "", f"Score in percent, mean over seeds [{level}% bootstrap interval over eval rows"
             f"{' and seeds' if max(len(v['runs']) for v in lay.values()) > 1 else ''}, {st['bootstrap']} replicates]. "
             f"Evidence distances are bucketed by the study's SWA window: {st['window'] or 'none'} tokens.", "",
             "| layout | layers | params | MLP width | seeds | train s/run |", "|---|---|---:|---:|---:|---:|"]
    for n, v in lay.items():
        wall = sum(r["wall_s"] for r in v["runs"]) / max(1, len(v["runs"]))
        lines.append(f"| {n} | `{v['pattern']}` | {v['params']:,} | {v['intermediate_size'] or '-'} | "
                     f"{len(v['runs'])} | {wall:.0f} |")
    groups = list(st["groups"])
    lines += ["", "| group | n | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for g in groups:
        row = st["groups"][g]
        n_rows = next(iter(row.values()))["n_rows"]
        lines.append(f"| {g} | {n_rows} | " + " | ".join(_cell(row[n]) for n in names) + " |")
    others = [n for n in names if n != st["reference"]]
    if st["differences"] and others:   # a one-layout study has nothing to difference
        lines += ["", f"## Differences: layout - {st['reference']} (points, paired over eval rows)", "",
                  "| group | " + " | ".join(others) + " |", "|---|" + "---:|" * len(others)]
        for g, row in st["differences"].items():
            lines.append(f"| {g} | " + " | ".join(_cell(row.get(n), signed=True) for n in others) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st, names = result["stats"], list(result["layouts"])
    tasks = [g for g in st["groups"] if " / " not in g]
    dist = {}
    for g in st["groups"]:
        if " / " in g and not g.endswith(BEYOND):
            t, b = g.split(" / ", 1)
            dist.setdefault(t, []).append(b)
    panels = 1 + len(dist)
    fig, axes = plt.subplots(1, panels, figsize=(max(5.0, 1.2 * len(tasks) * len(names) / 3) + 4.5 * (panels - 1), 3.6),
                             squeeze=False)
    width = 0.8 / len(names)
    for k, n in enumerate(names):
        vals = [st["groups"][t][n] for t in tasks]
        axes[0][0].bar([i + k * width for i in range(len(tasks))], [100 * v["mean"] for v in vals], width,
                       yerr=[[100 * (v["mean"] - v["lo"]) for v in vals], [100 * (v["hi"] - v["mean"]) for v in vals]],
                       capsize=2, label=n)
    axes[0][0].set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, rotation=20, ha="right", fontsize=8)
    axes[0][0].set_ylim(0, 100)
    axes[0][0].set_ylabel("score (%)")
    axes[0][0].set_title("per task", fontsize=9)
    axes[0][0].legend(fontsize=7)
    for ax, (t, buckets) in zip(axes[0][1:], dist.items()):
        for n in names:
            vals = [st["groups"][f"{t} / {b}"][n] for b in buckets]
            ax.errorbar(range(len(buckets)), [100 * v["mean"] for v in vals], marker="o", capsize=2, label=n,
                        yerr=[[100 * (v["mean"] - v["lo"]) for v in vals], [100 * (v["hi"] - v["mean"]) for v in vals]])
        ax.set_xticks(range(len(buckets)), buckets, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(-2, 102)
        ax.set_title(f"{t}: by evidence distance (window {st['window']})", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_compare(out_dir, result: dict) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "markdown": out / "compare.md", "png": out / "compare.png"}
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["markdown"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths


# ----------------------------------------------------------------------------- the phenomenon table
def phenomenon_row(result: dict, title: str, group: str, layout: str, baseline: str, margin: float,
                   control: str | None = None, learned: float = 0.5) -> dict:
    """One row of issue 17's phenomenon table from a compare result: ``layout`` vs ``baseline`` on
    ``group``, expected ``layout >= baseline + margin`` (fractions). ``control``: a group both
    layouts should solve (e.g. the evidence inside the window); when the better of them scores
    below ``learned`` there, or on ``group`` itself without a control, the row is inconclusive."""
    st = result["stats"]["groups"]
    if group not in st:
        raise ValueError(f"group {group!r} is not in the compare result (groups: {list(st)})")
    for n in (layout, baseline):
        if n not in st[group]:
            raise ValueError(f"layout {n!r} is not in the compare result (layouts: {list(st[group])})")
    a, b = st[group][layout], st[group][baseline]
    ref = result["stats"]["reference"]
    diffs = result["stats"]["differences"].get(group, {})
    if ref == baseline:
        d = diffs[layout]
    elif ref == layout:  # the recorded difference is baseline - layout: the same replicates, negated
        x = diffs[baseline]
        d = {"mean": -x["mean"], "lo": -x["hi"], "hi": -x["lo"], "n_rows": x["n_rows"]}
    else:
        raise ValueError(f"the compare result's differences are against {ref!r}; run it with --reference {layout}")
    ctrl = {n: st[control][n] for n in (layout, baseline)} if control and control in st else None
    best = max(v["mean"] for v in (ctrl or {layout: a, baseline: b}).values())
    if best < learned:
        verdict = (f"inconclusive: neither layout learned the task in this budget (best {100 * best:.1f}% "
                   f"{'on ' + control if ctrl else 'overall'}, below {100 * learned:.0f}%)")
    elif d["mean"] >= margin:
        verdict = "reproduced" + (" (interval above the margin)" if d["lo"] >= margin else
                                  " (point estimate; the interval reaches below the margin)")
    else:
        verdict = "not reproduced" + (" (interval below the margin)" if d["hi"] < margin else
                                      " (point estimate; the interval reaches the margin)")
    return {"phenomenon": title, "group": group, "layout": layout, "baseline": baseline, "expected_margin": margin,
            "layout_score": a, "baseline_score": b, "difference": d, "control": control, "control_scores": ctrl,
            "verdict": verdict, "command": result["settings"].get("command"),
            "steps": result["settings"].get("steps"), "seeds": result["settings"].get("seeds"),
            "params": {n: result["layouts"][n]["params"] for n in (layout, baseline)}}


def phenomena_markdown(rows: list[dict]) -> str:
    lines = ["# Phenomenon table (issue 17)", "", "Scores in percent, mean over seeds [95% bootstrap interval]; "
             "difference in points, paired over the same eval rows.", "",
             "| # | phenomenon | group | layout | baseline | difference (expected) | control | verdict |",
             "|---|---|---|---:|---:|---:|---|---|"]
    for i, r in enumerate(rows, 1):
        ctrl = "-" if not r["control_scores"] else f"{r['control']}: " + ", ".join(
            f"{n} {_cell(v)}" for n, v in r["control_scores"].items())
        lines.append(f"| {i} | {r['phenomenon']} | {r['group']} | {r['layout']} {_cell(r['layout_score'])} | "
                     f"{r['baseline']} {_cell(r['baseline_score'])} | {_cell(r['difference'], signed=True)} "
                     f"(>= +{100 * r['expected_margin']:.0f}) | {ctrl} | {r['verdict']} |")
    lines += [""] + [f"{i}. `{r['command']}` ({r['steps']} steps, seeds {r['seeds']}, parameters "
                     + ", ".join(f"{n} {p:,}" for n, p in r["params"].items()) + ")" for i, r in enumerate(rows, 1)]
    return "\n".join(lines) + "\n"
