"""``vlt eval --ckpt DIR --data SHARDS_OR_JSONL``: generate answers with a saved model and score them.

    vlt data synth --task mix --num-samples 200 --split val --out eval_shards
    vlt eval --ckpt my-model --data eval_shards --batch-size 8 --out eval_out
    vlt eval --ckpt my-model --data my_eval.jsonl --images img_dir --tasks ocr count --limit 100

``--data`` is a directory of vlt shards (or a shard pattern) or a LLaVA-format JSON/JSONL file
whose images live in ``--images`` (default: the file's folder). The reference answer is each
sample's last ``gpt`` turn (or a top-level ``"answer"``); the prompt is built the way the model was
trained (the export's system prompt and image limits, as ``vlt generate``; ``--system`` /
``--max-pixels`` override). Answers are decoded greedily through the inference engine,
``--batch-size`` prompts at a time.

Scores (vlt.evaluation.scoring): the synthetic tasks use their own metric (color: exact, count:
numeric, ocr / needle: ANLS); any other task is scored numerically when its answers are numbers,
else by exact match (``--metric`` forces one). Writes eval.json, predictions.jsonl, eval.md and
eval.png into ``--out`` and prints the per-task table. Rows that cannot be evaluated (no answer, a
missing image) are skipped, counted and listed; nothing left to evaluate is an error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_eval_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--ckpt", required=True, help="directory written by vlt export / save_pretrained_vlt (or a "
                   "Qwen2.5-VL checkpoint directory, run as the full-attention teacher)")
    p.add_argument("--data", required=True, help="vlt shards (a directory of .tar, a glob or brace pattern) or a "
                   "LLaVA-format .json / .jsonl file")
    p.add_argument("--images", default=None, help="folder the JSONL's image (and video frame folder) paths are "
                   "relative to (default: the JSONL's folder)")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="evaluate only these tasks (a sample's meta.task / task; rows without one are 'default')")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together by the engine")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N samples (after --tasks)")
    p.add_argument("--metric", default="auto", choices=["auto", "exact", "numeric", "anls"],
                   help="auto: each task's own metric (see vlt eval --help's description)")
    p.add_argument("--out", default="eval_out", help="folder for eval.json, predictions.jsonl, eval.md, eval.png")
    p.add_argument("--system", default=None, help="system prompt (default: the one the model was trained with); "
                   "'' for none")
    p.add_argument("--max-pixels", type=int, default=None, help="resize limit per image (default: the checkpoint's)")
    p.add_argument("--fps", type=float, default=1.0, help="frame rate of JSONL video frame folders without a "
                   "timestamps.json")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: the dtype the model was saved in")
    add_engine_option_arg(p, "graphs=false compile=none: the eager torch path, no capture or compile time "
                             "for small models")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


_ENGINE_BOOLS = ("graphs", "fused", "pack", "pdl", "chunk_attention")
ENGINE_KEYS = (*_ENGINE_BOOLS, "compile")   # every InferenceEngine option the command lines pass through


def add_engine_option_arg(p: argparse.ArgumentParser, example: str) -> None:
    """``--engine-option KEY=VALUE`` (repeatable; parsed by :func:`engine_options`), as vlt eval, generate,
    chat and stream take it; ``example`` ends the help text."""
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help=f"an InferenceEngine option ({', '.join(ENGINE_KEYS)}), e.g. {example}")


def engine_options(items) -> dict:
    """``["graphs=false", "compile=none"]`` -> ``{"graphs": False, "compile": None}``: booleans take
    true/false (graphs, fused, pack also none: the engine's choice), compile takes none or a backend."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        v = value.strip().lower()
        if not sep or key not in ENGINE_KEYS:
            raise ValueError(f"--engine-option {item!r}: expected KEY=VALUE, KEY one of {list(ENGINE_KEYS)}")
        if key == "compile":
            out[key] = None if v == "none" else value.strip()
        elif v in ("true", "false"):
            out[key] = v == "true"
        elif v == "none" and key != "pdl":
            out[key] = None
        else:
            raise ValueError(f"--engine-option {item!r}: {key} takes true or false"
                             + (" or none" if key != "pdl" else ""))
    return out


def run_eval(args) -> int:
    try:
        return _run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"vlt eval: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch

    from vlt.evaluation.report import table, write_report
    from vlt.evaluation.runner import check_vocabulary, cut_answers_warning, evaluate, summarise, swa_window
    from vlt.evaluation.samples import Skips, read_samples
    from vlt.generate_cli import image_processor, load_for_inference, prompt_record, system_prompt
    from vlt.inference import compile_in_this_process
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1 (got {args.limit})")
    engine_kwargs = engine_options(args.engine_option)
    compile_in_this_process()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    ckpt = Path(args.ckpt).expanduser()
    model, tok = load_for_inference(args.ckpt, device, args.dtype)
    check_vocabulary(model, tok, str(ckpt))
    proc = image_processor(ckpt, model, args.max_pixels) if model.vision is not None else None
    system = system_prompt(args, prompt_record(ckpt))
    skips = Skips()
    samples = read_samples(args.data, args.images, skips, fps=args.fps)
    results, skips = evaluate(model, tok, samples, image_processor=proc, system=system, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, metric=args.metric, tasks=args.tasks,
                              limit=args.limit, progress=not args.no_progress, skips=skips,
                              engine_kwargs=engine_kwargs)
    window = swa_window(model)
    summary = summarise(results, skips, window)
    settings = {"ckpt": str(ckpt), "data": args.data, "images": args.images, "tasks": args.tasks,
                "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "limit": args.limit,
                "metric": args.metric, "system": system, "device": device, "layout": getattr(model, "layout", None),
                "window": window, "decoding": "greedy", "engine_options": engine_kwargs}
    paths = write_report(args.out, summary, results, settings)
    sk = summary["skipped"]
    if sk["total"]:
        print(f"vlt eval: skipped {sk['total']} rows: " + "; ".join(
            f"{k} {v} (e.g. {sk['examples'].get(k, ['?'])[0]})" for k, v in sk["by_reason"].items()), file=sys.stderr)
    warning = cut_answers_warning(summary, args.max_new_tokens)
    if warning:
        print(f"vlt eval: warning: {warning}", file=sys.stderr)
    print(table(summary))
    print(f"[vlt eval] wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run_eval(add_eval_args(argparse.ArgumentParser("vlt eval", description=__doc__,
                                                          formatter_class=argparse.RawDescriptionHelpFormatter))
                    .parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
