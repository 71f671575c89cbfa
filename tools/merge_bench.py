"""Merge several `vlt bench mixers` JSON files (runs on the same kind of machine) into one, redraw.

    python tools/merge_bench.py OUT_DIR run1/mixers.json run2/mixers.json ...
Later files win for the same (mixer, kind, op, mode, T). Each row keeps the run it came from.
"""
import argparse
import json
import os
import sys

from vlt.bench.mixers import goals, plot, print_table


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("files", nargs="+")
    a = p.parse_args(argv)
    merged, rows = None, {}
    for i, path in enumerate(a.files):
        rep = json.load(open(path))
        if merged is None:
            merged = {k: v for k, v in rep.items() if k not in ("results", "goals", "command")}
            merged["runs"] = []
        elif rep["machine"] != merged["machine"]:
            sys.exit(f"{path}: machine {rep['machine']!r} differs from {merged['machine']!r}")
        merged["runs"].append({"run": i, "command": rep["command"], "versions": rep["versions"]})
        for r in rep["results"]:
            rows[(r["mixer"], r["kind"], r["op"], r["mode"], r["T"])] = {**r, "run": i}
    merged["results"] = list(rows.values())
    ns = argparse.Namespace(seq_lens=sorted({r["T"] for r in merged["results"]}))
    merged["goals"] = goals(merged["results"], ns)
    os.makedirs(a.out, exist_ok=True)
    json.dump(merged, open(os.path.join(a.out, "mixers_h100.json"), "w"), indent=1)
    plot(merged, os.path.join(a.out, "mixers_h100.png"))
    print_table(merged)


if __name__ == "__main__":
    main()
