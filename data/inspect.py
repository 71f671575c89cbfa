"""``vlt data inspect``: counts, a token-length histogram, and a PNG of a few rendered samples.

Samples go through the same reader and template as training (so what you see is what the model
gets: resized images, expanded image tokens, skip reasons), with no length limit.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np

from .image import ImageProcessor
from .pipeline import SampleProcessor, SampleStats, VLTStream
from .shards import read_manifest, resolve_shards
from .tokenizer import DEFAULT_SYSTEM, load_tokenizer


def _text_histogram(lengths: list[int], bins: int = 10) -> list[str]:
    """At most ``bins`` rows of whole-token ranges (inclusive), none narrower than one token, so
    lengths that span a few values give one row per value instead of empty fractional bins."""
    lo, hi = int(min(lengths)), int(max(lengths))
    width = -(-(hi - lo + 1) // bins)  # ceil
    edges = np.arange(lo, hi + width + 1, width)
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(1, counts.max())
    rows = []
    for i, c in enumerate(counts):
        a, b = int(edges[i]), int(edges[i + 1]) - 1
        label = f"{a}" if a == b else f"{a}-{b}"
        rows.append(f"{label:>15} {c:>6d} {'#' * int(40 * c / top)}")
    return rows


def inspect_shards(shards: str, out_png: str | None = None, num_render: int = 6, tokenizer: str = "byte",
                   max_samples: int = 2000, processor: ImageProcessor | None = None,
                   system: str | None = DEFAULT_SYSTEM) -> dict:
    """Read up to ``max_samples`` samples; return counts, length stats and skip reasons; render
    ``num_render`` samples (image + conversation) and the histogram to ``out_png``."""
    files = resolve_shards(shards, "shards")
    tok = load_tokenizer(tokenizer)
    proc = processor or ImageProcessor()
    sp = SampleProcessor(tok, proc, max_length=10**9, system=system)
    stream = VLTStream(files, sp, 1, 10**9, False, tok.pad_id, shuffle=False)
    stats = SampleStats()
    lengths, image_tokens, rendered = [], [], []
    for s in stream._samples(0, stats):
        lengths.append(len(s["input_ids"]))
        image_tokens.append(sum(int(t in (tok.image_pad_id, tok.video_pad_id)) for t in s["input_ids"]))
        if len(rendered) < num_render:
            rendered.append(s)
        if len(lengths) >= max_samples:
            break
    manifest = read_manifest(files)
    report = {
        "shards": len(files),
        "manifest_samples": sum(int(e["num_samples"]) for e in manifest.values()) if manifest else None,
        "samples_read": len(lengths),
        "tokens_read": int(sum(lengths)),
        "length_min": int(min(lengths)) if lengths else 0,
        "length_mean": float(np.mean(lengths)) if lengths else 0.0,
        "length_max": int(max(lengths)) if lengths else 0,
        "image_tokens_mean": float(np.mean(image_tokens)) if image_tokens else 0.0,
        "skipped": {k: v for k, v in stats.c.items() if k != "samples"},
        "histogram": _text_histogram(lengths) if lengths else [],
    }
    if out_png:
        render_png(rendered, lengths, tok, proc, out_png)
        report["png"] = out_png
    return report


def render_png(samples: list[dict], lengths: list[int], tok, proc: ImageProcessor, out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(samples)
    fig, axes = plt.subplots(n + 1, 2, figsize=(11, 2.6 * (n + 1)), gridspec_kw={"width_ratios": [1, 2.2]},
                             squeeze=False)
    for i, s in enumerate(samples):
        ax_img, ax_txt = axes[i]
        ims = s["images"][:8]  # a long video shows its first 8 frames side by side
        if ims:
            arrs = [proc.unnormalise(t) for t in ims]
            h = max(a.shape[0] for a in arrs)
            arrs = [np.pad(a, ((0, h - a.shape[0]), (0, 2), (0, 0)), constant_values=255) for a in arrs]
            ax_img.imshow(np.concatenate(arrs, axis=1))
        ax_img.set_title(f"{s['key']}  ({len(s['images'])} image(s))", fontsize=8)
        ax_img.axis("off")
        text = tok.decode(s["input_ids"])
        # collapse image-token runs so the text stays readable
        for pad in ("<|image_pad|>", "<|video_pad|>"):
            while pad * 2 in text:
                text = text.replace(pad * 2, pad)
            text = text.replace(pad, f"{pad}xN")
        answer = tok.decode([t for t, lab in zip(s["input_ids"], s["labels"]) if lab != -100])
        body = "\n".join(textwrap.fill(line, 110) for line in text.splitlines()[-12:])
        ax_txt.text(0, 1, body + f"\n\n[loss on]: {answer!r}", va="top", family="monospace", fontsize=6.5,
                    transform=ax_txt.transAxes)
        ax_txt.axis("off")
    ax_h, ax_blank = axes[n]
    if lengths:
        ax_h.hist(lengths, bins=20)
    ax_h.set_title("tokens per sample", fontsize=8)
    ax_blank.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def format_report(report: dict) -> str:
    lines = [f"{k}: {v}" for k, v in report.items() if k not in ("histogram",)]
    return "\n".join(lines + ["token-length histogram:"] + report.get("histogram", []))


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(json.dumps(inspect_shards(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None), indent=1))
