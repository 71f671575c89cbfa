"""Writing an evaluation: ``eval.json`` (summary + run settings), ``predictions.jsonl`` (one line
per sample), ``eval.md`` (the tables) and ``eval.png`` (score per task, per length bucket and, when
samples record their evidence, per distance from the SWA window)."""
from __future__ import annotations

import json
import math
from pathlib import Path


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def markdown(summary: dict, title: str = "vlt eval") -> str:
    lines = [f"# {title}", "", f"{summary['n']} samples; overall score {_pct(summary['score'])}, "
             f"exact match {_pct(summary['exact'])} (percent)", "",
             "| task | metric | n | score | exact |", "|---|---|---:|---:|---:|"]
    for t, r in summary["tasks"].items():
        lines.append(f"| {t} | {r['metric']} | {r['n']} | {_pct(r['score'])} | {_pct(r['exact'])} |")
    lines += ["", "## By prompt length (tokens)", "", "| task | length | n | score | exact |",
              "|---|---|---:|---:|---:|"]
    for t, buckets in summary["by_length"].items():
        for b, r in buckets.items():
            lines.append(f"| {t} | {b} | {r['n']} | {_pct(r['score'])} | {_pct(r['exact'])} |")
    if summary["by_distance"]:
        w = summary["window"]
        lines += ["", f"## By evidence distance (SWA window: {w if w else 'none'} tokens)", "",
                  "| task | distance | n | mean distance (tokens) | score | exact |", "|---|---|---:|---:|---:|---:|"]
        for t, buckets in summary["by_distance"].items():
            for b, r in buckets.items():
                lines.append(f"| {t} | {b} | {r['n']} | {r['mean_distance']:.0f} | {_pct(r['score'])} | "
                             f"{_pct(r['exact'])} |")
    sk = summary["skipped"]
    if sk["total"]:
        lines += ["", f"Skipped {sk['total']} rows: " + ", ".join(f"{k} {v}" for k, v in sk["by_reason"].items())]
    return "\n".join(lines) + "\n"


def table(summary: dict) -> str:
    """The per-task table as plain text, for the terminal."""
    rows = [("task", "metric", "n", "score", "exact")]
    rows += [(t, r["metric"], str(r["n"]), _pct(r["score"]), _pct(r["exact"])) for t, r in summary["tasks"].items()]
    rows.append(("all", "", str(summary["n"]), _pct(summary["score"]), _pct(summary["exact"])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]])


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("score per task", {t: r["score"] for t, r in summary["tasks"].items()})]
    panels += [(f"{t}: by prompt length", {b: r["score"] for b, r in bs.items()})
               for t, bs in summary["by_length"].items() if len(bs) > 1]
    panels += [(f"{t}: by evidence distance", {b: r["score"] for b, r in bs.items()})
               for t, bs in summary["by_distance"].items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, values) in zip(axes[0], panels):
        keys = list(values)
        ax.bar(range(len(keys)), [100 * (0 if math.isnan(v) else v) for v in values.values()], color="#4c72b0")
        ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("score (%)")
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir, summary: dict, results: list[dict], settings: dict) -> dict:
    """Write the four files; returns their paths."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f for k, f in (("json", "eval.json"), ("predictions", "predictions.jsonl"),
                                     ("markdown", "eval.md"), ("png", "eval.png"))}
    # NaN is not JSON: an empty bucket cannot occur, but a task without samples would give one
    clean = json.loads(json.dumps(summary, default=str).replace("NaN", "null"))
    paths["json"].write_text(json.dumps({"settings": settings, "summary": clean}, indent=2))
    with paths["predictions"].open("w") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    paths["markdown"].write_text(markdown(summary, f"vlt eval: {settings.get('ckpt', '')}"))
    plot(summary, paths["png"])
    return paths
