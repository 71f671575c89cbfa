"""Shard writers (synthetic sets, LLaVA JSON -> WebDataset) and shard-path resolution.

Sample format (one sample = tar members sharing a basename, written by ``webdataset.ShardWriter``):

- ``<key>.json``: ``{"id", "conversations": [{"from": "human"|"gpt", "value": ...}], "num_images",
  "num_frames", "timestamps", "image_sizes": [[h, w], ...], "source", "meta"}``; ``<image>`` /
  ``<video>`` placeholders in human turns mark where media go;
- ``<key>.img0.png``, ``<key>.img1.jpg`` ...: still images in placeholder order (jpg/png/webp);
- ``<key>.frm000.jpg`` ...: video frames in time order, their times in ``timestamps`` (seconds).

``manifest.json`` beside the shards lists per shard its sample count and token count (counted
with the byte tokenizer and the default image processor; other tokenizers differ, but the
manifest is only used for epoch-length estimates and ``inspect``).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import braceexpand
import webdataset as wds
from PIL import Image

from .image import ImageProcessor
from .pipeline import DEFAULT_MAX_IMAGE_PIXELS
from .tokenizer import IGNORE_INDEX, ByteTokenizer, apply_chat_template, count_placeholders

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-%06d.tar"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
HOW_TO_MAKE = ("create shards with `vlt data synth --task color --out DIR` or "
               "`vlt data pack --json data.jsonl --images IMG_DIR --out DIR`")


def image_bytes(img: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(fmt, fmt.upper()))
    return buf.getvalue()


def manifest_counts(conversations, image_sizes, frame_sizes=(), timestamps=(), _cache={}) -> tuple[int, int]:
    """(tokens, supervised tokens) of one sample with the byte tokenizer and default ImageProcessor."""
    tok = _cache.setdefault("tok", ByteTokenizer())
    proc = _cache.setdefault("proc", ImageProcessor())
    media: list = [proc.tokens_for_size(h, w) for h, w in image_sizes]
    if frame_sizes:
        media.append(("video", [(t, proc.tokens_for_size(h, w)) for t, (h, w) in zip(timestamps, frame_sizes)]))
    ids, labels = apply_chat_template(tok, conversations, media)
    return len(ids), sum(1 for x in labels if x != IGNORE_INDEX)


def manifest_tokens(conversations, image_sizes, frame_sizes=(), timestamps=()) -> int:
    """Token count of one sample with the byte tokenizer and default ImageProcessor."""
    return manifest_counts(conversations, image_sizes, frame_sizes, timestamps)[0]


class ManifestShardWriter:
    """``wds.ShardWriter`` plus the per-shard manifest. Use as a context manager.

    Shards are written into a staging folder inside ``out_dir`` (``.staging-<pid>``, which shard
    readers never glob); only ``close()`` replaces the old shards and manifest with them, so a pack
    that fails halfway (bad input, a crash, a full disk) leaves the previous shards as they were.
    ``abort()`` (or leaving the ``with`` block on an exception) drops the staging folder."""

    def __init__(self, out_dir: str, maxcount: int = 1000, maxsize: float = 1e9, meta: dict | None = None):
        self.out = Path(out_dir).expanduser()
        self.out.mkdir(parents=True, exist_ok=True)
        for old in self.out.glob(".staging-*"):  # left by a killed writer
            pid = old.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        self.stage = self.out / f".staging-{os.getpid()}"
        shutil.rmtree(self.stage, ignore_errors=True)
        self.stage.mkdir()
        self.writer = wds.ShardWriter(str(self.stage / SHARD_PATTERN), maxcount=maxcount, maxsize=maxsize, verbose=0)
        self.shards: dict[str, dict] = {}
        self.meta = meta or {}

    def write(self, key: str, record: dict, images: list[tuple[str, bytes]], frames: list[tuple[str, bytes]],
              tokens: int) -> None:
        sample = {"__key__": key, "json": json.dumps(record).encode("utf-8")}
        for i, (ext, data) in enumerate(images):
            sample[f"img{i}.{ext}"] = data
        for i, (ext, data) in enumerate(frames):
            sample[f"frm{i:03d}.{ext}"] = data
        self.writer.write(sample)
        entry = self.shards.setdefault(os.path.basename(self.writer.fname), {"num_samples": 0, "num_tokens": 0})
        entry["num_samples"] += 1
        entry["num_tokens"] += tokens

    def abort(self) -> None:
        """Drop what was written; the old shards stay."""
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass
            self.writer = None
        shutil.rmtree(self.stage, ignore_errors=True)

    def close(self) -> dict:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        manifest = {
            "format": "vlt-wds-1",
            "shards": [{"name": k, **v} for k, v in sorted(self.shards.items())],
            "num_samples": sum(v["num_samples"] for v in self.shards.values()),
            "num_tokens": sum(v["num_tokens"] for v in self.shards.values()),
            **self.meta,
        }
        self.manifest = manifest
        (self.stage / MANIFEST).write_text(json.dumps(manifest, indent=1))
        # swap: the old manifest goes first and the new one comes last, so a folder caught in between
        # has no manifest claiming counts its shards do not hold
        (self.out / MANIFEST).unlink(missing_ok=True)
        for old in self.out.glob("shard-*.tar"):  # stale shards from a bigger earlier run would mix in
            old.unlink()
        for new in sorted(self.stage.glob("shard-*.tar")):
            os.replace(new, self.out / new.name)
        os.replace(self.stage / MANIFEST, self.out / MANIFEST)
        shutil.rmtree(self.stage, ignore_errors=True)
        return manifest

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------- synth
def write_synthetic(out_dir: str, task: str, num_samples: int, seed: int = 0, split: str = "train",
                    maxcount: int = 1000, progress: bool = False, **params) -> dict:
    """Write ``num_samples`` samples of a synthetic task as shards; deterministic in (seed, split)."""
    from tqdm import tqdm

    from .synthetic import check_params, generate_record, sample_rng

    check_params(task, params)
    meta = {"source": "synthetic", "task": task, "seed": seed, "split": split, "params": params}
    w = ManifestShardWriter(out_dir, maxcount=maxcount, meta=meta)
    for i in tqdm(range(num_samples), disable=not progress, desc=f"synth {task}/{split}"):
        rec = generate_record(task, sample_rng(seed, split, i), **params)
        sizes = [(im.height, im.width) for im in rec.images]
        fsizes = [(im.height, im.width) for im in rec.frames]
        record = {"id": f"{task}-{split}-{i}", "conversations": rec.conversations, "num_images": len(rec.images),
                  "num_frames": len(rec.frames), "timestamps": rec.timestamps, "image_sizes": sizes,
                  "source": f"synthetic/{task}", "meta": rec.meta}
        toks = manifest_tokens(rec.conversations, sizes, fsizes, rec.timestamps)
        w.write(f"{i:09d}", record, [("png", image_bytes(im)) for im in rec.images],
                [("png", image_bytes(im)) for im in rec.frames], toks)
    return w.close()


# ------------------------------------------------------------------------------------------ pack
def load_rows(path: Path):
    """Yield (line_no, row or None, (reason, message) or None) from a JSON list or JSONL file.

    JSONL: a line that is not UTF-8 (``not_utf8``) or not JSON (``bad_json``) is skipped and
    reported with its line. A JSON list is one document, so a broken one is a ValueError naming the
    file, line and column (raised before anything is written)."""
    data = path.read_bytes()
    if path.suffix == ".jsonl" or not data.lstrip().startswith(b"["):
        for n, raw in enumerate(data.splitlines(), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, None, ("not_utf8", f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                yield n, json.loads(line), None
            except json.JSONDecodeError as e:
                yield n, None, ("bad_json", f"malformed JSON ({e.msg} at column {e.colno})")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); a JSON list must be UTF-8 "
                         "as a whole (re-encode it, or write one row per line as JSONL to skip bad rows)") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:  # a broken JSON list is one bad document: nothing to skip to
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: malformed JSON list ({e.msg}); fix the file, or write one "
                         "row per line as JSONL so bad rows are skipped and counted") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows (or JSONL), got {type(rows).__name__}")
    for n, row in enumerate(rows, 1):
        yield n, row, None


class ImageTooLarge(ValueError):
    pass




def _read_image(path: Path, max_pixels: int | None = None) -> tuple[str, bytes, tuple[int, int]]:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        if max_pixels and im.width * im.height > max_pixels:  # from the header, before decoding
            raise ImageTooLarge(f"{im.width}x{im.height} = {im.width * im.height:,} pixels > {max_pixels:,}")
        im.verify()  # cheap structural check; a truncated file fails here or in load below
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        size = (im.height, im.width)
        fmt = (im.format or "").lower()
    ext = path.suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTS:  # store under the decoded format so readers can find it
        ext = {"jpeg": "jpg"}.get(fmt, fmt)
        if ext not in IMAGE_EXTS:
            data, ext = image_bytes(Image.open(io.BytesIO(data)).convert("RGB"), "png"), "png"
    return ("jpg" if ext == "jpeg" else ext), data, size


def pack_llava(json_path: str, image_dir: str, out_dir: str, video_dir: str | None = None, fps: float = 1.0,
               maxcount: int = 1000, maxsize: float = 1e9, progress: bool = True, max_length: int | None = 32768,
               max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> dict:
    """Convert LLaVA/ShareGPT JSON or JSONL (+ images, + extracted video frames) into shards.

    Rows: ``{"id", "conversations", "image": "a.jpg" | [..], "images": [..], "video": "clip_dir"}``;
    a video is a folder under ``video_dir`` of frame images (sorted by name), with times from its
    ``timestamps.json`` if present, else ``i / fps``. Returns a summary with skip counts by reason
    (rows that can never train: no assistant turn, an image above ``max_image_pixels``) and warning
    counts (``over_max_length``: written, but longer than ``max_length`` tokens with the byte
    tokenizer, so training truncates or drops them). The old shards in ``out_dir`` are replaced
    only when the pack completes.
    """
    jp, img_root = Path(json_path).expanduser(), Path(image_dir).expanduser()
    if not jp.is_file():
        raise FileNotFoundError(f"pack: JSON file {json_path!r} does not exist")
    if not img_root.is_dir():
        raise FileNotFoundError(f"pack: image folder {image_dir!r} does not exist")
    vid_root = Path(video_dir).expanduser() if video_dir else None
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}

    warnings: Counter = Counter()

    def skip(reason: str, what: str, counter: Counter = skipped) -> None:
        counter[reason] += 1
        examples.setdefault(reason, [])
        if len(examples[reason]) < 5:
            examples[reason].append(what)

    written = 0
    meta = {"source": str(jp)}
    w = ManifestShardWriter(out_dir, maxcount=maxcount, maxsize=maxsize, meta=meta)
    with w:  # an exception (a broken JSON list, a full disk) leaves the old shards as they were
        written = _pack_rows(jp, img_root, vid_root, fps, w, skip, warnings, progress, max_length, max_image_pixels)
    manifest = w.manifest
    return {"written": written, "shards": len(manifest["shards"]), "num_tokens": manifest["num_tokens"],
            "skipped": dict(skipped), "warnings": dict(warnings), "examples": examples,
            "out": str(Path(out_dir).expanduser())}


def _pack_rows(jp, img_root, vid_root, fps, w, skip, warnings, progress, max_length, max_image_pixels) -> int:
    from tqdm import tqdm

    written = 0
    for n, row, err in tqdm(load_rows(jp), disable=not progress, desc="pack", unit="rows"):
        where = f"{jp.name}:{n}"
        if err is not None:
            skip(err[0], f"{where}: {err[1]}")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
            skip("bad_json", f"{where}: no conversations list")
            continue
        conv = row["conversations"]
        if not all(isinstance(t, dict) and "value" in t for t in conv):
            skip("bad_json", f"{where}: turn without 'value'")
            continue
        names = row.get("images", row.get("image", []))
        names = [names] if isinstance(names, str) else list(names or [])
        images, sizes, ok = [], [], True
        for name in names:
            p = img_root / name
            if not p.is_file():
                skip("missing_image", f"{where}: {p}")
                ok = False
                break
            try:
                ext, data, size = _read_image(p, max_image_pixels)
            except ImageTooLarge as e:
                skip("image_too_large", f"{where}: {p}: {e} (--max-image-pixels)")
                ok = False
                break
            except Exception as e:  # PIL raises many types for damaged files
                skip("unreadable_image", f"{where}: {p}: {e}")
                ok = False
                break
            images.append((ext, data))
            sizes.append(size)
        if not ok:
            continue
        frames, fsizes, times = [], [], []
        if row.get("video"):
            vdir = (vid_root / str(row["video"])) if vid_root else None
            files = (sorted(f for f in vdir.iterdir() if f.suffix.lower().lstrip(".") in IMAGE_EXTS)
                     if vdir and vdir.is_dir() else [])
            if not files:
                skip("missing_video", f"{where}: {vdir}")
                continue
            try:
                for f in files:
                    ext, data, size = _read_image(f, max_image_pixels)
                    frames.append((ext, data))
                    fsizes.append(size)
            except Exception as e:
                skip("unreadable_image", f"{where}: {e}")
                continue
            tfile = vdir / "timestamps.json"
            times = json.loads(tfile.read_text()) if tfile.is_file() else [round(i / fps, 3) for i in range(len(files))]
            if len(times) != len(files):
                skip("bad_json", f"{where}: {len(times)} timestamps for {len(files)} frames")
                continue
        n_img, n_vid = count_placeholders(conv)
        if n_img != len(images) or n_vid != (1 if frames else 0):
            skip("image_count_mismatch", f"{where}: {n_img} <image>/{n_vid} <video> for {len(images)} images/"
                                         f"{'1' if frames else '0'} videos")
            continue
        record = {"id": str(row.get("id", n)), "conversations": conv, "num_images": len(images),
                  "num_frames": len(frames), "timestamps": times, "image_sizes": sizes, "source": where}
        try:
            toks, loss_toks = manifest_counts(conv, sizes, fsizes, times)
        except ValueError as e:
            skip("bad_json", f"{where}: {e}")
            continue
        if loss_toks == 0:  # nothing to learn from: every training pass would drop it as no_loss_tokens
            skip("no_assistant_turn", f"{where}: no assistant ('gpt') turn with text")
            continue
        if max_length and toks > max_length:
            skip("over_max_length", f"{where}: {toks} tokens > {max_length} (written; training truncates or drops it)",
                 warnings)
        w.write(f"{written:09d}", record, images, frames, toks)
        written += 1
    return written


# --------------------------------------------------------------------------------------- reading
def resolve_shards(spec: str, what: str = "shards", dropped: list | None = None) -> list[str]:
    """A directory (all ``*.tar`` in it), a brace pattern, a glob, or ``a.tar::b.tar`` -> sorted paths.

    Raises FileNotFoundError naming the path and how to create shards. Empty (0-byte) files are
    dropped with a warning (a tar reader would fail on them anyway) and appended to ``dropped``
    when given, so the caller can count them.
    """
    if not spec:
        raise ValueError(f"{what}: empty shard spec ({HOW_TO_MAKE})")
    paths: list[str] = []
    for part in str(spec).split("::"):
        part = os.path.expanduser(part)
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise FileNotFoundError(f"{what}: directory {part!r} holds no .tar shards; {HOW_TO_MAKE}")
            paths += found
            continue
        expanded = list(braceexpand.braceexpand(part))
        for p in expanded:
            hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
            if not hits or not all(os.path.isfile(h) for h in hits):
                missing = [h for h in hits if not os.path.isfile(h)] or [p]
                raise FileNotFoundError(f"{what}: {missing[0]!r} does not exist (from {spec!r}); {HOW_TO_MAKE}")
            paths += hits
    nonempty = [p for p in paths if os.path.getsize(p) > 0]
    if dropped is not None:
        dropped += [p for p in paths if os.path.getsize(p) == 0]
    if len(nonempty) < len(paths):
        log.warning("%s: skipping %d empty shard file(s): %s", what, len(paths) - len(nonempty),
                    [p for p in paths if os.path.getsize(p) == 0][:5])
    if not nonempty:
        raise FileNotFoundError(f"{what}: every shard in {spec!r} is empty; {HOW_TO_MAKE}")
    return nonempty


def read_manifest(shards: list[str]) -> dict[str, dict]:
    """Per-shard manifest entries (by absolute path) for the shards that have one."""
    out: dict[str, dict] = {}
    for d in sorted({os.path.dirname(os.path.abspath(s)) for s in shards}):
        f = os.path.join(d, MANIFEST)
        if os.path.isfile(f):
            try:
                for e in json.loads(Path(f).read_text()).get("shards", []):
                    out[os.path.join(d, e["name"])] = e
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("ignoring unreadable manifest %s", f)
    return {os.path.abspath(s): out[os.path.abspath(s)] for s in shards if os.path.abspath(s) in out}
