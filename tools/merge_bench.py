"""Merge several `vlt bench mixers` or `vlt bench train` JSON files (runs on the same kind of machine)
into one, recompute the goals and redraw.

    python tools/merge_bench.py OUT_DIR run1/mixers.json run2/mixers.json ...   -> OUT_DIR/mixers_<gpu>.json
    python tools/merge_bench.py OUT_DIR run1/train.json run2/train.json ...     -> OUT_DIR/train_<gpu>.json
Later files win for the same row (mixers: mixer, kind, op, mode, T; train: layout, T). Each row keeps
the run it came from; ``runs`` lists each run's command, date and measured ceilings.
"""
import argparse
import json
import os
import sys

ROW_KEYS = {"mixers": ("mixer", "kind", "op", "mode", "T"), "train": ("layout", "T")}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("files", nargs="+")
    a = p.parse_args(argv)
    merged, rows = None, {}
    for i, path in enumerate(a.files):
        rep = json.load(open(path))
        rep.setdefault("bench", "mixers")  # mixers reports before 2026-11-24 12:00 carry no "bench" key
        if merged is None:
            merged = {k: v for k, v in rep.items() if k not in ("results", "goals", "command", "date", "ceilings")}
            merged["runs"] = []
        elif rep["machine"] != merged["machine"] or rep["bench"] != merged["bench"]:
            sys.exit(f"{path}: {rep['bench']} on {rep['machine']!r}, not {merged['bench']} on {merged['machine']!r}")
        merged["runs"].append({"run": i, **{k: rep.get(k) for k in ("command", "date", "ceilings", "versions", "note")
                                            if rep.get(k) is not None}})
        merged.setdefault("matmul_params", {}).update(rep.get("matmul_params", {}))
        for r in rep["results"]:
            rows[tuple(r[k] for k in ROW_KEYS[rep["bench"]])] = {**r, "run": i}
    merged["results"] = list(rows.values())
    os.makedirs(a.out, exist_ok=True)
    # named by the GPU it ran on: mixers_h100.json, mixers_h200.json, ...
    gpu = next((g for g in ("h100", "h200", "a100", "b200") if g in merged["machine"].lower()), "gpu")
    stem = os.path.join(a.out, f"{merged['bench']}_{gpu}")
    if merged["bench"] == "mixers":
        from vlt.bench.mixers import goals, plot, print_table
        ns = argparse.Namespace(seq_lens=sorted({r["T"] for r in merged["results"]}))
        merged["goals"] = goals(merged["results"], ns)
    else:
        from vlt.bench.train import goals, plot, print_table
        merged["results"].sort(key=lambda r: (["hybrid", "full", "swa", "gdn"].index(r["layout"]), r["T"]))
        merged["goals"] = goals(merged["results"])
    json.dump(merged, open(stem + ".json", "w"), indent=1)
    plot(merged, stem + ".png")
    print_table(merged)


if __name__ == "__main__":
    main()
