"""``vlt data pack|synth|inspect``: argparse subcommands; the lead's CLI calls ``add_data_subcommands``.

Each handler takes the parsed args and returns an exit code (0 ok, 1 nothing written/read, 2 bad
input), printing a short human summary and, with ``--json``, a JSON one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .synthetic import TASKS


def parse_kv(items: list[str] | None) -> dict:
    """``key=value`` pairs; values parsed as JSON when they parse (numbers, bools, lists)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--param {item!r}: expected key=value")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def cmd_pack(args) -> int:
    from .shards import pack_llava

    try:
        summary = pack_llava(args.json, args.images, args.out, video_dir=args.video_frames, fps=args.fps,
                             maxcount=args.max_count, maxsize=args.max_size, progress=not args.quiet,
                             max_length=args.max_length or None, max_image_pixels=args.max_image_pixels or None)
    except (FileNotFoundError, ValueError) as e:  # bad input found before the old shards were replaced
        print(f"vlt data pack: {e}\nnothing was written; the shards already in {args.out} (if any) are unchanged",
              file=sys.stderr)
        return 2
    print(f"wrote {summary['written']} samples ({summary['num_tokens']} tokens) in {summary['shards']} shard(s) "
          f"to {summary['out']}")
    if summary["skipped"]:
        print("skipped:")
        for reason, n in sorted(summary["skipped"].items()):
            print(f"  {reason}: {n}  e.g. {summary['examples'][reason][0]}")
    if summary.get("warnings"):
        print("warnings (written anyway):")
        for reason, n in sorted(summary["warnings"].items()):
            print(f"  {reason}: {n}  e.g. {summary['examples'][reason][0]}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=1))
    return 0 if summary["written"] else 1


def cmd_synth(args) -> int:
    from .shards import write_synthetic
    from .synthetic import check_params

    try:
        params = parse_kv(args.param)
        check_params(args.task, params)  # unknown keys and wrong kinds of value, before anything is written
        for name, n in (("train", args.num_train), ("val", args.num_val)):
            if n <= 0:
                continue
            man = write_synthetic(str(Path(args.out) / name), args.task, n, seed=args.seed, split=name,
                                  maxcount=args.max_count, progress=not args.quiet, **params)
            print(f"{name}: {man['num_samples']} samples, {man['num_tokens']} tokens, {len(man['shards'])} shard(s) "
                  f"-> {Path(args.out) / name}")
    except ValueError as e:
        print(f"vlt data synth: {e}", file=sys.stderr)
        return 2
    return 0


def data_settings(config_path) -> dict:
    """The data module's init args from a recipe or a run's saved config.yaml (``data:`` with or
    without ``class_path`` / ``init_args``)."""
    import yaml
    p = Path(config_path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--config {str(p)!r} does not exist (a recipe YAML or a run's config.yaml)")
    cfg = yaml.safe_load(p.read_text()) or {}
    data = cfg.get("data") or {}
    return dict(data.get("init_args") or {}) if "class_path" in data or "init_args" in data else dict(data)


def cmd_inspect(args) -> int:
    from .image import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, ImageProcessor
    from .inspect import format_report, inspect_shards
    from .tokenizer import DEFAULT_SYSTEM

    try:
        cfg = data_settings(args.config) if args.config else {}

        def pick(flag, key, default):
            return flag if flag is not None else cfg.get(key) if cfg.get(key) is not None else default
        if args.system is not None:
            system = args.system
        else:  # the data module's (quickstart: none); DEFAULT_SYSTEM where the config says nothing
            system = (cfg["system_prompt"] or "") if "system_prompt" in cfg else DEFAULT_SYSTEM
        settings = dict(system=system, tokenizer=pick(args.tokenizer, "tokenizer", "byte"),
                        patch_size=pick(args.patch_size, "patch_size", 14),
                        merge_size=pick(args.merge_size, "merge_size", 2),
                        min_pixels=pick(args.min_pixels, "min_pixels", DEFAULT_MIN_PIXELS),
                        max_pixels=pick(args.max_pixels, "max_pixels", DEFAULT_MAX_PIXELS))
        proc = ImageProcessor(settings["patch_size"], settings["merge_size"], settings["min_pixels"],
                              settings["max_pixels"])
        report = inspect_shards(args.shards, out_png=args.png, num_render=args.num_render,
                                tokenizer=settings["tokenizer"], max_samples=args.max_samples, processor=proc,
                                system=settings["system"] or None)
        report["settings"] = settings
    except (FileNotFoundError, ValueError) as e:
        print(f"vlt data inspect: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return 0 if report["samples_read"] else 1


def add_data_subcommands(subparsers) -> None:
    """Register ``pack``, ``synth`` and ``inspect`` on an argparse ``_SubParsersAction``."""
    from .image import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
    from .pipeline import DEFAULT_MAX_IMAGE_PIXELS

    p = subparsers.add_parser("pack", help="LLaVA JSON/JSONL + images (+ video frames) -> WebDataset shards")
    p.add_argument("--json", required=True, help="LLaVA/ShareGPT JSON list or JSONL file")
    p.add_argument("--images", required=True, help="folder the rows' image paths are relative to")
    p.add_argument("--video-frames", default=None, help="folder of <video>/ frame folders (optional)")
    p.add_argument("--fps", type=float, default=1.0, help="frame rate when a video folder has no timestamps.json")
    p.add_argument("--out", required=True, help="output folder for shard-*.tar and manifest.json")
    p.add_argument("--shard-size", "--max-count", dest="max_count", type=int, default=1000,
                   help="samples per shard (--max-count: the old name)")
    p.add_argument("--max-size", type=float, default=1e9, help="bytes per shard")
    p.add_argument("--max-length", type=int, default=32768,
                   help="warn about rows longer than this many tokens (byte tokenizer); 0: no check")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="skip rows with an image above this many pixels (image_too_large); 0: no limit")
    p.add_argument("--json-out", default=None, help="also write the summary as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pack)

    s = subparsers.add_parser("synth", help="write an embedded synthetic dataset as shards (deterministic)")
    s.add_argument("--task", required=True, choices=list(TASKS))
    s.add_argument("--out", required=True, help="output folder; train/ and val/ are written inside")
    s.add_argument("--num-train", type=int, default=2000)
    s.add_argument("--num-val", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", "--max-count", dest="max_count", type=int, default=1000,
                   help="samples per shard (not the count task's max_count: that is --param max_count=N; "
                        "--max-count here is the old name of this option)")
    s.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="generator parameter, e.g. image_size=56, num_frames=64, length=6 (repeatable)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_synth)

    i = subparsers.add_parser("inspect", help="counts, token-length histogram, rendered samples to PNG")
    i.add_argument("shards", help="shard folder, brace pattern or a.tar::b.tar")
    i.add_argument("--png", default="inspect.png", help="where to render samples ('' for none)")
    i.add_argument("--num-render", type=int, default=6)
    i.add_argument("--max-samples", type=int, default=2000)
    i.add_argument("--config", default=None, metavar="YAML",
                   help="a recipe or a run's config.yaml: render with its data settings (system prompt, "
                        "tokenizer, image limits), as training sees the samples; flags below override it")
    i.add_argument("--system", default=None, help="system prompt (default: the config's, else Qwen's default)")
    i.add_argument("--tokenizer", default=None, help="'byte' or a local HF tokenizer folder (default: byte)")
    i.add_argument("--patch-size", type=int, default=None, help="default 14")
    i.add_argument("--merge-size", type=int, default=None, help="default 2")
    i.add_argument("--min-pixels", type=int, default=None, help=f"default {DEFAULT_MIN_PIXELS}")
    i.add_argument("--max-pixels", type=int, default=None, help=f"default {DEFAULT_MAX_PIXELS}")
    i.add_argument("--json-out", default=None)
    i.set_defaults(func=cmd_inspect)


def main(argv=None) -> int:
    """Standalone entry (``python -m vlt.data.cli synth ...``) until the lead wires ``vlt data``."""
    parser = argparse.ArgumentParser(prog="vlt data")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_data_subcommands(sub)
    from .bench import add_bench_data_args, bench_data

    b = sub.add_parser("bench", help="loader samples/s and tokens/s")
    add_bench_data_args(b)
    b.set_defaults(func=lambda a: 0 if bench_data(a) else 1)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
