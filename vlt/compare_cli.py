"""``vlt compare``: train several layouts at an equal parameter budget on the same data for the same
steps, evaluate each with ``vlt eval``, and write one table + plot with confidence intervals.

    vlt compare --layouts full swa gdn hybrid_1to3 hybrid_1to7 intra_hybrid --task mix --steps 1000 \\
        --seeds 0 1 2 --out compare_out
    vlt compare --layouts hybrid_1to3 swa --task needle --param num_frames=64 \\
        --param 'distances=[32, 512, 768]' --steps 600 --set=--trainer.accelerator=gpu --out needle_study
    vlt compare --tiny --out /tmp/cmp          # CPU smoke: two layouts, two seeds, a few steps

Each layout is ``recipes/layouts/NAME.yaml`` (or ``NAME=PATTERN``), repeated to ``--depth`` layers
(default: the least common multiple of the layouts' periods, so the 1:7 hybrid sets 8), with the
MLP width of each chosen so that its parameter count is within ``--budget-tolerance`` of
``--budget-layout``'s (``--no-match-budget``: the recipes' shapes as they are). Every run is
``vlt fit --config BASE`` with the layout, the width, ``--seed_everything SEED``, ``--trainer.max_steps``
and the synthetic set (``--task``, ``--param`` as ``vlt data synth``; generated once into
``OUT/data``: train, val and a test split that only evaluation reads); ``--set ARG`` passes any other
``vlt fit`` argument to every run, and ``--model-options JSON`` is merged over the base recipe's model
dict for every layout (e.g. ``{"vision": {"weights_file": "vit.pth"}}``: a tower that can already read,
from tools/ocr_probe.py). Each final checkpoint is exported and scored by ``vlt eval`` (greedy, batched)
on the test split. Results: ``OUT/compare.json``, ``compare.md``, ``compare.png``;
per run ``OUT/runs/LAYOUT-sSEED/`` (``lightning_logs/version_N`` with metrics and checkpoints, ``export``,
``eval``). A run whose eval is already there
with the same arguments is reused, and one cut before its end resumes from its last checkpoint (one every
<= 100 steps, ``vlt.evaluation.resume``), so an interrupted study continues where it stopped.
"""
from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import json
import shlex
import sys
import time
import warnings
from pathlib import Path

TINY = {"layouts": ["swa", "hybrid_1to3"], "task": "needle", "params": {"num_frames": 6, "distances": [24, 90],
                                                                         "code_length": 2},
        "steps": 3, "seeds": [0, 1], "num_train": 24, "num_val": 0, "num_eval": 6, "bootstrap": 200,
        "max_new_tokens": 3,
        "fit": ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.limit_val_batches=0",
                "--data.init_args.num_workers=0", "--data.init_args.batch_size=2", "--data.init_args.max_length=256",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                "--trainer.log_every_n_steps=1"]}


def add_compare_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from vlt.data.synthetic import TASKS
    from vlt.evaluation.compare import STUDY_LAYOUTS
    p.add_argument("--layouts", nargs="+", default=None, metavar="NAME",
                   help="layout recipes (recipes/layouts/NAME.yaml) or NAME=PATTERN; "
                        f"default: {' '.join(STUDY_LAYOUTS)}")
    p.add_argument("--config", default="layouts/base", help="the base recipe every run trains with")
    p.add_argument("--task", default=None, choices=list(TASKS), help="synthetic task (default: mix)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="generator parameter, as vlt data synth")
    p.add_argument("--num-train", type=int, default=None, help="training samples (default 20000)")
    p.add_argument("--num-val", type=int, default=None, help="validation samples for vlt fit (default 128)")
    p.add_argument("--num-eval", type=int, default=None, help="test samples every layout is scored on (default 400)")
    p.add_argument("--data-seed", type=int, default=0, help="the synthetic set's seed (the same for every run)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 1000)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="model seeds per layout (default 0)")
    p.add_argument("--mixers", default=None, metavar="JSON",
                   help="mixer options merged over every layout's recipe, e.g. '{\"swa\": {\"window\": 32}, "
                        "\"swa_gdn\": {\"window\": 32}}' (a smaller window puts far evidence within cheaper videos)")
    p.add_argument("--model-options", default=None, metavar="JSON",
                   help="model config merged key by key over the base recipe's model dict for every layout (before "
                        "the budget matching, so the counts include it), e.g. "
                        "'{\"vision\": {\"weights_file\": \"vit.pth\"}}' (a pretrained tower, tools/ocr_probe.py)")
    p.add_argument("--depth", type=int, default=None, help="layers per model (default: LCM of the layouts' periods)")
    p.add_argument("--budget-layout", default=None, help="whose parameter count is the budget (default: hybrid_1to3 "
                   "when studied, else the first layout)")
    p.add_argument("--budget-tolerance", type=float, default=0.03, help="largest relative parameter difference")
    p.add_argument("--no-match-budget", action="store_true", help="keep the recipe's MLP width for every layout")
    p.add_argument("--reference", default=None, help="differences are layout - this one (default: the budget layout)")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 16")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap replicates (default 1000)")
    p.add_argument("--set", action="append", default=[], metavar="ARG",
                   help="an argument for every vlt fit run, e.g. --set=--trainer.accelerator=gpu (repeatable)")
    p.add_argument("--device", default="auto", help="device of the evaluations (auto, cpu, cuda)")
    p.add_argument("--eval-arg", action="append", default=[], metavar="ARG",
                   help="an argument for every vlt eval, e.g. --eval-arg=--engine-option=graphs=false (repeatable)")
    p.add_argument("--out", default="compare_out")
    p.add_argument("--tiny", action="store_true", help="CPU smoke: 2 layouts x 2 seeds, a few steps, tiny data")
    return p


def _settings(args) -> dict:
    from vlt.data.cli import parse_kv
    from vlt.evaluation.compare import STUDY_LAYOUTS
    t = TINY if args.tiny else {}
    s = {"layouts": args.layouts or t.get("layouts") or list(STUDY_LAYOUTS),
         "task": args.task or t.get("task") or "mix",
         "params": {**(t.get("params", {}) if not args.task else {}), **parse_kv(args.param)},
         "num_train": args.num_train or t.get("num_train", 20000),
         "num_val": args.num_val if args.num_val is not None else t.get("num_val", 128),
         "num_eval": args.num_eval or t.get("num_eval", 400), "steps": args.steps or t.get("steps", 1000),
         "seeds": args.seeds or t.get("seeds", [0]), "bootstrap": args.bootstrap or t.get("bootstrap", 1000),
         "max_new_tokens": args.max_new_tokens or t.get("max_new_tokens", 16), "fit": t.get("fit", []) + args.set}
    for key in ("num_train", "num_eval", "steps", "bootstrap", "max_new_tokens"):
        if s[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1 (got {s[key]})")
    if len(set(s["layouts"])) != len(s["layouts"]):
        raise ValueError(f"--layouts names a layout twice: {s['layouts']}")
    return s


def base_model(config: str) -> tuple[str | None, dict | None]:
    """The base recipe's model_name and model overrides (the shape every layout starts from)."""
    import yaml

    from vlt.cli import find_recipe
    path = Path(find_recipe(config))
    if not path.is_file():
        raise FileNotFoundError(f"--config {config!r}: no such recipe or file")
    init = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("init_args") or {}
    if init.get("model_name") is None and init.get("model") is None:
        raise ValueError(f"--config {config!r} sets neither model.init_args.model_name nor model.init_args.model")
    return init.get("model_name"), init.get("model")


def _merged(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def merge_model_options(model: dict | None, extra_json: str | None) -> dict | None:
    """The base recipe's model dict with ``--model-options JSON`` merged over it, key by key at every level."""
    from vlt.evaluation.compare import parse_json_option
    if not extra_json:
        return model
    extra = parse_json_option("--model-options", extra_json)
    if not isinstance(extra, dict):
        raise ValueError(f"--model-options must be a JSON object of model config keys, e.g. "
                         f"'{{\"vision\": {{\"weights_file\": \"vit.pth\"}}}}' (got {extra_json!r})")
    return _merged(model or {}, extra)


def plan(args, s: dict) -> dict:
    """{layout: {pattern, mixers, model, intermediate_size, params, deviation}} at the common depth and budget
    (``model``: the base recipe's model dict, ``--model-options`` and the layout's MLP width)."""
    from vlt.evaluation.compare import (count_params, default_depth, match_budget, merge_mixer_options,
                                        read_layout_recipe, tile_layout)
    model_name, model = base_model(args.config)
    options = getattr(args, "model_options", None)
    model = merge_model_options(model, options)
    recipes = [read_layout_recipe(x) for x in s["layouts"]]
    recipes = [(n, ls, merge_mixer_options(m, args.mixers)) for n, ls, m in recipes]
    depth = args.depth or default_depth([len(layers) for _, layers, _ in recipes])
    layouts = {name: (tile_layout(name, layers, depth), mixers) for name, layers, mixers in recipes}
    budget = args.budget_layout or ("hybrid_1to3" if "hybrid_1to3" in layouts else next(iter(layouts)))
    if budget not in layouts:
        raise ValueError(f"--budget-layout {budget!r} is not among --layouts {list(layouts)}")
    with warnings.catch_warnings():   # a vision.weights_file loads into the meta-device count builds: a no-op
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter", category=UserWarning)
        if args.no_match_budget:
            sizes = {n: {"intermediate_size": None, "params": count_params(model_name, model, ls, m),
                         "deviation": None} for n, (ls, m) in layouts.items()}
        else:
            sizes = match_budget(model_name, model, layouts, budget, tolerance=args.budget_tolerance)
    out = {}
    for n, (layers, mixers) in layouts.items():
        m = copy.deepcopy(model or {})
        if sizes[n]["intermediate_size"] is not None:
            m.setdefault("decoder", {})["intermediate_size"] = sizes[n]["intermediate_size"]
        out[n] = {"pattern": "[" + ", ".join(layers) + "]", "mixers": mixers, "model": m, **sizes[n]}
    return {"depth": depth, "budget_layout": budget, "model_name": model_name,
            "model_options": json.loads(options) if options else None, "layouts": out}


def _fit_argv(args, s: dict, spec: dict, lay: dict, seed: int, run: Path) -> list[str]:
    from vlt.evaluation.resume import checkpoint_every
    return ["fit", "--config", args.config, f"--model.init_args.layout={lay['pattern']}",
            f"--model.init_args.mixers={json.dumps(lay['mixers'])}",
            f"--model.init_args.model={json.dumps(lay['model'])}",
            f"--seed_everything={seed}", f"--trainer.max_steps={s['steps']}",
            "--data.init_args.train_shards=null", "--data.init_args.val_shards=null",
            f"--data.init_args.synthetic={json.dumps(spec)}", f"--trainer.default_root_dir={run}",
            f"--trainer.logger.init_args.save_dir={run}",
            f"--checkpoint.every_n_train_steps={checkpoint_every(s['steps'])}", *s["fit"]]


def _last_loss(run: Path) -> float | None:
    import csv
    files = sorted(glob.glob(str(run / "lightning_logs" / "version_*" / "metrics.csv")))
    if not files:
        return None
    vals = [r["train/loss"] for r in csv.DictReader(open(files[-1])) if r.get("train/loss")]
    return float(vals[-1]) if vals else None


def train_and_eval(args, s: dict, spec: dict, test_dir: Path, name: str, lay: dict, seed: int) -> dict:
    from vlt.cli import main as vlt_main
    from vlt.eval_cli import main as eval_main
    from vlt.checkpoint.cli import export_checkpoint
    from vlt.evaluation.resume import start_or_resume
    run = Path(args.out) / "runs" / f"{name}-s{seed}"
    argv = _fit_argv(args, s, spec, lay, seed, run)
    key = hashlib.sha1(json.dumps([argv, s["max_new_tokens"], str(test_dir), args.eval_arg]).encode()).hexdigest()
    record = run / "run.json"
    if record.is_file() and json.loads(record.read_text()).get("key") == key and (run / "eval" / "eval.json").is_file():
        print(f"[vlt compare] {name} seed {seed}: reusing {run}", file=sys.stderr)
        return json.loads(record.read_text())
    resume = start_or_resume(run, key, "vlt compare")   # a run cut by a timeout continues, not restarts
    print(f"[vlt compare] {name} seed {seed}: vlt {' '.join(argv + resume)}", file=sys.stderr)
    t0 = time.perf_counter()
    rc = vlt_main(argv + resume)
    wall = time.perf_counter() - t0
    ckpts = sorted(glob.glob(str(run / "lightning_logs" / "version_*" / "checkpoints" / "*.ckpt")),
                   key=lambda p: Path(p).stat().st_mtime)
    if rc not in (0, None) or not ckpts:
        raise RuntimeError(f"vlt fit for layout {name!r} seed {seed} failed (exit {rc}; checkpoints: {ckpts})")
    last = next((c for c in ckpts if Path(c).name == "last.ckpt"), ckpts[-1])
    import torch
    step = torch.load(last, map_location="cpu", weights_only=False, mmap=True).get("global_step")
    if step != s["steps"]:  # e.g. an interrupted fit that Lightning ended gracefully: not the study's model
        raise RuntimeError(f"vlt fit for layout {name!r} seed {seed} stopped at step {step} of {s['steps']} ({last})")
    export = export_checkpoint(last, run / "export")
    t1 = time.perf_counter()
    rc = eval_main(["--ckpt", str(export), "--data", str(test_dir), "--out", str(run / "eval"), "--batch-size",
                    str(args.eval_batch_size), "--max-new-tokens", str(s["max_new_tokens"]), "--no-progress",
                    "--device", args.device, *args.eval_arg])
    if rc != 0:
        raise RuntimeError(f"vlt eval for layout {name!r} seed {seed} failed (exit {rc}); see the message above")
    info = {"key": key, "seed": seed, "wall_s": round(wall, 2), "eval_s": round(time.perf_counter() - t1, 2),
            "final_train_loss": _last_loss(run), "run_dir": str(run), "argv": argv}
    record.write_text(json.dumps(info, indent=1))
    return info


def _rows(run_dir: str) -> tuple[list[dict], int | None]:
    ev = Path(run_dir) / "eval"
    rows = [json.loads(line) for line in (ev / "predictions.jsonl").read_text().splitlines() if line.strip()]
    return rows, json.loads((ev / "eval.json").read_text())["settings"].get("window")


_REPEATED = ("param", "set", "eval_arg")  # append options: one flag per value


def _command(args) -> str:
    """The study as one shell command, from the parsed arguments (every option spelled out, defaults
    too), whichever way it was started."""
    parts = ["vlt", "compare"]
    for key, v in vars(args).items():
        if key in ("func", "tool") or v is None or v is False or v == []:
            continue
        flag = "--" + key.replace("_", "-")
        if v is True:
            parts.append(flag)
        elif key in _REPEATED:
            parts += [f"{flag}={x}" for x in v]
        elif isinstance(v, list):
            parts += [flag, *map(str, v)]
        else:
            parts += [flag, str(v)]
    return shlex.join(parts)


def run_compare(args) -> int:
    try:
        return _run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"vlt compare: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from vlt.data.datamodule import ensure_synthetic, synthetic_dirs
    from vlt.data.synthetic import check_params
    from vlt.evaluation.compare import study_stats, write_compare
    command = _command(args)
    s = _settings(args)
    check_params(s["task"], s["params"])
    p = plan(args, s)
    reference = args.reference or p["budget_layout"]
    if reference not in p["layouts"]:
        raise ValueError(f"--reference {reference!r} is not among --layouts {list(p['layouts'])}")
    out = Path(args.out)
    spec = {"task": s["task"], **s["params"], "num_train": s["num_train"], "num_val": s["num_val"],
            "num_test": s["num_eval"], "seed": args.data_seed, "cache_dir": str((out / "data").resolve())}
    ensure_synthetic(spec)  # once, before the first run, so no run's time includes it
    test_dir = synthetic_dirs(spec)[0].with_name("test")
    for n, lay in p["layouts"].items():
        print(f"[vlt compare] {n}: {lay['pattern']}, {lay['params']:,} parameters"
              + (f", MLP width {lay['intermediate_size']}" if lay["intermediate_size"] else ""), file=sys.stderr)
    runs, rows, windows = {}, {}, []
    for n, lay in p["layouts"].items():
        for seed in s["seeds"]:
            info = train_and_eval(args, s, spec, test_dir, n, lay, seed)
            runs.setdefault(n, []).append(info)
            r, w = _rows(info["run_dir"])
            rows.setdefault(n, []).append(r)
            if w:
                windows.append(w)
    window = min(windows) if windows else None  # one bucketing for all layouts: the study's smallest window
    stats = study_stats(rows, window, reference, n_boot=s["bootstrap"])
    result = {"settings": {**s, "config": args.config, "depth": p["depth"], "budget_layout": p["budget_layout"],
                           "model_name": p["model_name"], "model_options": p["model_options"], "data": spec,
                           "command": command},
              "layouts": {n: {**lay, "runs": runs[n]} for n, lay in p["layouts"].items()}, "stats": stats}
    paths = write_compare(out, result)
    print(paths["markdown"].read_text())
    print(f"[vlt compare] wrote {', '.join(str(x) for x in paths.values())}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser("vlt compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return run_compare(add_compare_args(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
