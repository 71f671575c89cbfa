"""Issue 17's phenomenon table from the studies tools/gpu-phenomena.sh runs in WORK: rows 1 and 2 from a
``vlt compare`` result each (vlt.evaluation.compare.phenomenon_row), row 3 from the distillation study
(vlt.evaluation.distill_study.row). Writes OUT/phenomena.json ({"rows", "missing"}) and phenomena.md.

    python -m vlt.evaluation.phenomena --out OUT --work WORK --rows 1 2 3 [--control GROUP]

Only ``--rows`` are (re)built; the other rows of an existing OUT/phenomena.json are kept as they are,
so rows measured by separate commands (rows 1-2 in one, row 3 in another) end in one table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STUDIES = {1: "needle_beyond_window", 2: "dense_ocr", 3: "distillation"}
COMPARE_ROWS = {  # phenomenon_row's arguments; row 1's control group comes from the command line
    1: dict(title="window attention loses evidence beyond the window", group="needle / >4x window",
            layout="hybrid_1to3", baseline="swa", margin=0.20),
    2: dict(title="linear attention alone underperforms on dense OCR", group="dense_ocr", layout="hybrid_1to3",
            baseline="gdn", margin=0.10),
}


def build_row(n: int, work: Path, control: str | None = None) -> dict:
    """Row ``n`` from its study's folder in ``work``; ValueError saying why there is none."""
    from vlt.evaluation.compare import phenomenon_row
    from vlt.evaluation.distill_study import write
    name = STUDIES[n]
    if n == 3:  # from the runs on disk (a study cut by its timeout included); distill.json + .png beside them
        return json.loads(write(work / name).read_text())
    f = work / name / "compare.json"
    if not f.is_file():
        raise ValueError(f"the study did not finish (no {f.name}): see {name}.log")
    args = {**COMPARE_ROWS[n], **({"control": control} if n == 1 and control else {})}
    return {**phenomenon_row(json.loads(f.read_text()), **args), "row": n}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _steps(run: dict) -> str:
    return f"{run['steps_to_bar']} steps" if run["steps_to_bar"] is not None else \
        f"not reached in {run['evaluated_until']} steps"


def distill_line(r: dict) -> tuple[str, str]:
    """Row 3 in the table's columns (layout: the student, baseline: scratch, difference: the steps
    ratio, control: the teacher and the bar), and its note."""
    ratio = "-" if r["ratio"] is None else f"{'' if r['ratio_bound'] == '=' else r['ratio_bound'] + ' '}" \
                                           f"{100 * r['ratio']:.1f}%"
    line = (f"| {r['row']} | {r['phenomenon']} | {r['group']} | student {r['layout']}: {_steps(r['student'])} | "
            f"scratch {r['layout']}: {_steps(r['scratch'])} | steps ratio {ratio} "
            f"(<= {100 * r['expected_ratio']:.0f}%) | teacher {r['teacher_layout']} {_pct(r['teacher_accuracy'])}, "
            f"bar {_pct(r['bar'])}, majority answer {_pct(r['baseline_accuracy'])} | {r['verdict']} |")
    note = (f"{r['row']}. `{r['command']}` (teacher {r['teacher_steps']} steps, stage I {r['stage1_steps']} steps "
            f"counted in the student's, accuracy every {r['eval_every']} steps on {r['num_eval']} test samples, "
            f"seeds {r['seeds']}, parameters " + ", ".join(f"{k} {v:,}" for k, v in r["params"].items()) + ")")
    return line, note


def table_markdown(rows: list[dict], missing: list[dict]) -> str:
    """phenomena_markdown's table (its header, its line for rows 1-2), each row under its own number."""
    from vlt.evaluation.compare import phenomena_markdown
    header = phenomena_markdown([]).rstrip("\n").split("\n")
    lines, notes = [], []
    for r in sorted(rows, key=lambda r: r["row"]):
        if r.get("kind") == "distillation":
            line, note = distill_line(r)
        else:  # phenomena_markdown numbers its rows 1..n: render each alone, then renumber
            one = phenomena_markdown([r]).rstrip("\n").split("\n")
            line, note = f"| {r['row']} |" + one[len(header)][len("| 1 |"):], f"{r['row']}." + one[-1][len("1."):]
        lines.append(line)
        notes.append(note)
    md = "\n".join(header + lines + [""] + notes) + "\n"
    return md + "".join(f"\nNo row {m['row']} ({m['study']}): {m['why']}\n" for m in missing)


def assemble(out: Path, work: Path, rows: list[int], control: str | None = None) -> str:
    """Rebuild ``rows`` from ``work`` over ``out``/phenomena.json's others; writes both files, returns the markdown."""
    bad = [n for n in rows if n not in STUDIES]
    if bad:
        raise ValueError(f"rows {bad}: allowed {sorted(STUDIES)}")
    old = json.loads((out / "phenomena.json").read_text()) if (out / "phenomena.json").is_file() else {}
    # a row written before rows carried their number is numbered by its place
    kept = [{"row": i, **r} for i, r in enumerate(old.get("rows", []), 1) if r.get("row", i) not in rows]
    missing = [m for m in old.get("missing", []) if m.get("row") not in rows and m.get("row") is not None]
    new = []
    for n in rows:
        try:
            new.append(build_row(n, work, control))
        except ValueError as e:
            missing.append({"row": n, "study": STUDIES[n], "why": str(e)})
    table = sorted(kept + new, key=lambda r: r["row"])
    missing = sorted(missing, key=lambda m: m["row"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "phenomena.json").write_text(json.dumps({"rows": table, "missing": missing}, indent=2))
    md = table_markdown(table, missing)
    (out / "phenomena.md").write_text(md)
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser("python -m vlt.evaluation.phenomena", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--rows", type=int, nargs="+", default=sorted(STUDIES))
    p.add_argument("--control", default=None, help="row 1's control group (both layouts should solve it)")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    args = p.parse_args(argv)
    try:
        md = assemble(Path(args.out), Path(args.work), args.rows, args.control)
    except ValueError as e:
        print(f"phenomena: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
