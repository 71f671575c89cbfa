"""``vlt bench data``: loader throughput (samples/s, tokens/s) for the quickstart settings and 448x448.

Shards are generated first (not timed); the timed part is the full training loader: tar reading,
PNG decode, resize + normalise, tokenisation, packing and collation, through DataLoader workers.
Steady-state figures exclude the first batch (worker start-up), which is reported separately.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

PRESETS = {
    # the quickstart's data: colour task, 56x56 images (4 image tokens), byte tokenizer
    "quickstart": {"task": "color", "image_size": 56, "max_length": 256, "batch_size": 4},  # recipes/quickstart.yaml
    # realistic image size: 448x448 -> 16x16 = 256 image tokens per image
    "448": {"task": "color", "image_size": 448, "max_length": 2048, "batch_size": 4},
}


def add_bench_data_args(parser) -> None:
    parser.add_argument("--preset", default="all", choices=["all", *PRESETS], help="settings to measure")
    parser.add_argument("--num-samples", type=int, default=1024, help="samples generated per preset")
    parser.add_argument("--batches", type=int, default=60, help="batches timed per preset (after the first)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--no-pack", action="store_true", help="one padded sample per row instead of packing")
    parser.add_argument("--tokenizer", default="byte")
    parser.add_argument("--cache-dir", default=None, help="where shards are written (default: a temp dir)")
    parser.add_argument("--out", default="bench_data.json", help="JSON results file (the PNG goes beside it)")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke run: the quickstart preset, 64 samples, 5 batches, no workers")


def _run_preset(name: str, cfg: dict, args, root: Path) -> dict:
    from .datamodule import VLTDataModule

    synthetic = {"task": cfg["task"], "num_train": args.num_samples, "num_val": 0, "image_size": cfg["image_size"],
                 "seed": 0, "cache_dir": str(root)}
    dm = VLTDataModule(synthetic=synthetic, tokenizer=args.tokenizer, max_length=cfg["max_length"],
                       pack=not args.no_pack, batch_size=cfg["batch_size"], num_workers=args.num_workers,
                       samples_per_epoch=10**9)  # an epoch longer than the run: the loader never restarts
    t0 = time.perf_counter()
    dm.prepare_data()
    dm.setup("fit")
    gen_s = time.perf_counter() - t0
    it = iter(dm.train_dataloader())
    t0 = time.perf_counter()
    first = next(it)
    first_s = time.perf_counter() - t0
    samples = tokens = images = 0
    t0 = time.perf_counter()
    for _ in range(args.batches):
        b = next(it)
        samples += b["num_samples"]
        tokens += int((b["input_ids"] != dm.tokenizer.pad_id).sum())
        images += len(b["images"])
    dt = time.perf_counter() - t0
    del it
    return {
        "preset": name, **cfg, "pack": not args.no_pack, "num_workers": args.num_workers,
        "tokenizer": args.tokenizer, "batches": args.batches, "seconds": round(dt, 3),
        "samples_per_s": round(samples / dt, 1), "tokens_per_s": round(tokens / dt, 1),
        "images_per_s": round(images / dt, 1), "batches_per_s": round(args.batches / dt, 2),
        "tokens_per_batch": round(tokens / args.batches, 1), "first_batch_s": round(first_s, 3),
        "generate_s": round(gen_s, 2), "first_batch_samples": first["num_samples"], "skipped": {
            k: v for k, v in dm.stats().items() if k not in ("samples", "batches", "tokens")},
    }


def bench_data(args) -> dict:
    """Run the presets in ``args.preset``; print a table, write ``args.out`` (JSON), return the dict."""
    if getattr(args, "tiny", False):
        args.preset, args.num_samples, args.batches, args.num_workers = "quickstart", 64, 5, 0
    names = list(PRESETS) if args.preset == "all" else [args.preset]
    tmp = None
    if args.cache_dir:
        root = Path(args.cache_dir).expanduser()
    else:
        tmp = tempfile.TemporaryDirectory(prefix="vlt-bench-data-")
        root = Path(tmp.name)
    try:
        results = [_run_preset(n, PRESETS[n], args, root) for n in names]
    finally:
        if tmp is not None:
            tmp.cleanup()
    out = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "results": results,
    }
    for r in results:
        print(f"{r['preset']:>10}: {r['samples_per_s']:8.1f} samples/s {r['tokens_per_s']:10.1f} tokens/s "
              f"{r['images_per_s']:8.1f} images/s  ({r['image_size']}px, L={r['max_length']}, B={r['batch_size']}, "
              f"workers={r['num_workers']}, first batch {r['first_batch_s']} s)")
    if getattr(args, "tiny", False):
        out["tiny"] = "smoke run (64 samples, 5 batches, no workers): checks the loader runs, not its speed"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
        png = str(Path(args.out).with_suffix(".png"))
        plot(out, png)
        print(f"wrote {args.out} and {png}")
    return out


def plot(out: dict, path: str) -> None:
    """Samples/s and tokens/s per preset, one bar each, with the machine in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = out["results"]
    labels = [f"{r['preset']}\n{r['image_size']}px, L={r['max_length']}\nworkers={r['num_workers']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, unit in zip(axes, ("samples_per_s", "tokens_per_s"), ("samples/s", "tokens/s")):
        bars = ax.bar(labels, [r[key] for r in rows], color="tab:blue")
        ax.bar_label(bars, fmt="%.0f")
        ax.set(ylabel=unit, title=f"data loader {unit}")
        ax.grid(True, axis="y", alpha=0.3)
    m = out["machine"]
    fig.suptitle(f"vlt bench data: {m['processor']}, {m['affinity']} cores, torch threads {m['torch_threads']}"
                 + (" - smoke run" if out.get("tiny") else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
