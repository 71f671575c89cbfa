"""Evaluation samples from vlt shards or a LLaVA-format JSON/JSONL file with its images.

A sample's reference answer is its last ``gpt`` turn (or a top-level ``"answer"`` beside a
conversation that ends with the question); the turns before it are the prompt. Media are kept as
loaders (bytes or paths) and decoded per batch, so a large eval set does not sit in memory as
tensors; only their sizes are read up front, for the prompt's image-token counts.

Rows that cannot be evaluated are skipped and counted per reason (``no_answer``,
``missing_image``, ``unreadable_image``, ``bad_json``, ``image_count_mismatch``, ...), the first
few with the row they came from; an eval set of which nothing is left is a ValueError.
"""
from __future__ import annotations

import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from vlt.data.shards import IMAGE_EXTS, load_rows, resolve_shards

_IMG_RE = re.compile(r"^img(\d+)\.(?:jpg|jpeg|png|webp)$")
_FRM_RE = re.compile(r"^frm(\d+)\.(?:jpg|jpeg|png|webp)$")
DEFAULT_TASK = "default"


@dataclass
class RawSample:
    """One evaluable sample before tokenisation: prompt turns, reference(s), media loaders."""

    id: str
    task: str
    conversations: list            # the prompt turns (the reference answer removed)
    reference: object              # str or list of acceptable strings
    images: list                   # callables -> PIL.Image, in <image> order
    frames: list = field(default_factory=list)       # callables -> PIL.Image, time order
    timestamps: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    source: str = ""


class Skips:
    """Skipped rows counted per reason, with the first few examples of each (for the report)."""

    def __init__(self, keep: int = 3):
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.keep = keep

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.keep:
            ex.append(detail)

    def as_dict(self) -> dict:
        return {"total": sum(self.counts.values()), "by_reason": dict(self.counts), "examples": self.examples}


def _split_answer(conv, row: dict):
    """(prompt turns, reference) or (None, reason)."""
    if not isinstance(conv, list) or not all(isinstance(t, dict) for t in conv):
        return None, "bad_json"
    turns = list(conv)
    if turns and turns[-1].get("from", turns[-1].get("role")) in ("gpt", "assistant"):
        last = turns.pop()
        ref = last.get("value", last.get("content"))
    else:
        ref = row.get("answer", row.get("answers"))
    if ref is None or (isinstance(ref, str) and not ref.strip()) or (isinstance(ref, list) and not ref):
        return None, "no_answer"
    if not turns:
        return None, "no_question"
    return (turns, ref), None


def _task_of(row: dict, meta: dict) -> str:
    return str(meta.get("task") or row.get("task") or DEFAULT_TASK)


def _placeholders_ok(turns, n_images: int, has_video: bool) -> bool:
    text = "".join(str(t.get("value", "")) for t in turns)
    return text.count("<image>") == n_images and text.count("<video>") == (1 if has_video else 0)


def _bytes_loader(data: bytes) -> Callable:
    return lambda: Image.open(io.BytesIO(data))


def _path_loader(path: Path) -> Callable:
    return lambda: Image.open(path)


def _members(sample: dict, pattern) -> list[bytes]:
    """The members matching ``img<i>.<ext>`` / ``frm<i>.<ext>`` in index order."""
    found = sorted((int(m.group(1)), k) for k in sample if (m := pattern.match(k)))
    return [sample[k] for _, k in found]


def read_shard_samples(spec: str, skips: Skips):
    """RawSamples from vlt shards (a directory, glob or brace pattern), in shard order."""
    from vlt.data.pipeline import SampleStats
    stats = SampleStats("eval")
    for s in stats.read_shards(resolve_shards(spec, "--data")):
        key = str(s.get("__key__"))
        if "json" not in s:
            skips.add("missing_json", key)
            continue
        try:
            rec = json.loads(s["json"])
        except (ValueError, TypeError) as e:
            skips.add("bad_json", f"{key}: {e}")
            continue
        split, why = _split_answer(rec.get("conversations"), rec)
        where = f"{key} ({rec.get('source') or rec.get('id')})"
        if why:
            skips.add(why, where)
            continue
        turns, ref = split
        imgs, frms = _members(s, _IMG_RE), _members(s, _FRM_RE)
        if not _placeholders_ok(turns, len(imgs), bool(frms)):
            skips.add("image_count_mismatch", f"{where}: {len(imgs)} images, {len(frms)} frames in the shard")
            continue
        meta = rec.get("meta") or {}
        yield RawSample(str(rec.get("id", key)), _task_of(rec, meta), turns, ref, [_bytes_loader(b) for b in imgs],
                        [_bytes_loader(b) for b in frms], list(rec.get("timestamps") or range(len(frms))), meta,
                        where)
    for reason, n in stats.c.items():  # unreadable tars etc., counted by the shard reader
        if n:
            skips.counts[reason] += n


def read_llava_samples(path: str, image_dir: str | None, skips: Skips, fps: float = 1.0):
    """RawSamples from a LLaVA JSON list or JSONL file: ``{"id", "image": "a.jpg" | "images": [...],
    "video": "frames_dir", "conversations": [...], "task"?, "meta"?}``; media paths are relative
    to ``image_dir`` (default: the file's folder)."""
    jp = Path(path).expanduser()
    if not jp.is_file():
        raise FileNotFoundError(f"--data {path!r} does not exist; give a LLaVA-format JSON/JSONL file or vlt shards "
                                "(a directory of .tar, a glob or brace pattern)")
    root = Path(image_dir).expanduser() if image_dir else jp.parent
    if image_dir and not root.is_dir():
        raise FileNotFoundError(f"--images {image_dir!r} is not a directory")
    for n, row, err in load_rows(jp):
        where = f"{jp.name}:{n}"
        if err is not None:
            skips.add(err[0], f"{where}: {err[1]}")
            continue
        if not isinstance(row, dict):
            skips.add("bad_json", f"{where}: a row is not a JSON object")
            continue
        split, why = _split_answer(row.get("conversations"), row)
        if why:
            skips.add(why, where)
            continue
        turns, ref = split
        names = row.get("images", row.get("image", []))
        names = [names] if isinstance(names, str) else list(names or [])
        missing = [str(root / x) for x in names if not (root / x).is_file()]
        if missing:
            skips.add("missing_image", f"{where}: {missing[0]}")
            continue
        frames, times = [], []
        if row.get("video"):
            vdir = root / str(row["video"])
            files = sorted(f for f in vdir.iterdir() if f.suffix.lower().lstrip(".") in IMAGE_EXTS) \
                if vdir.is_dir() else []
            if not files:
                skips.add("missing_video", f"{where}: {vdir} (a folder of frames)")
                continue
            tfile = vdir / "timestamps.json"
            times = json.loads(tfile.read_text()) if tfile.is_file() else [round(i / fps, 3) for i in range(len(files))]
            frames = [_path_loader(f) for f in files]
        if not _placeholders_ok(turns, len(names), bool(frames)):
            skips.add("image_count_mismatch", f"{where}: {len(names)} images, {'a' if frames else 'no'} video")
            continue
        meta = row.get("meta") or {}
        yield RawSample(str(row.get("id", n)), _task_of(row, meta), turns, ref,
                        [_path_loader(root / x) for x in names], frames, times, meta, where)


def read_samples(data: str, image_dir: str | None, skips: Skips, fps: float = 1.0):
    """Shards when ``data`` is a directory of .tar files or a shard pattern, else a JSON/JSONL file."""
    p = Path(data).expanduser()
    if p.suffix.lower() in (".json", ".jsonl"):  # a missing one is reported as a missing file, not as shards
        return read_llava_samples(data, image_dir, skips, fps)
    if p.is_dir() and not any(p.glob("*.tar")):
        raise FileNotFoundError(f"--data {data!r} is a directory without .tar shards; give vlt shards "
                                "(`vlt data synth ... --out DIR`) or a LLaVA JSON/JSONL file")
    return read_shard_samples(data, skips)
