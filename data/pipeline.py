"""Streaming reader: shards -> samples -> ChatML tokens + image tensors -> (packed) batches.

How the stream is cut, and why every rank sees the same number of batches:

- The shard list is permuted by ``(seed, epoch, cycle)`` and split by rank (like
  ``wds.split_by_node``, but with the rank given explicitly, so fake ranks are testable and
  Lightning's rank is used). If there are fewer shards than ``world_size * num_workers``
  streams, every stream reads all shards and keeps every n-th sample instead (logged), so no
  stream is empty and nothing is duplicated.
- Training streams repeat (next cycle = new permutation) and are cut at exactly ``num_batches``
  per rank per epoch (``with_epoch`` semantics), so DDP never waits on a rank that ran dry.
- Batches are split over DataLoader workers by *stream id*, not process id: batch ``j`` of an
  epoch always comes from stream ``j % num_workers``. On resume after ``k`` consumed batches,
  process ``w`` serves stream ``(w + k) % num_workers`` and skips that stream's first batches,
  so the DataLoader's round-robin reproduces the uninterrupted order exactly. (That is why this
  does not use ``wds.split_by_worker``, which ties data to the process id.)

Everything is a function of (shards, seed, epoch, world_size, rank, num_workers): the same
settings give the same batches, and resuming epoch e at batch k gives what an uninterrupted run
would have given from batch k on.

Bad input is counted per reason in ``SampleStats`` and logged (at the 1st, 2nd, 4th, 8th ...
occurrence per worker); counts travel with each batch (``_stats``, popped by ``VLTLoader``, plus one stats-only item at
the end of each stream, dropped by ``VLTLoader``) so the main process can aggregate them across
workers. Iterate streams through ``VLTLoader``, not directly.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from collections import Counter
from itertools import count, islice

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .image import ImageProcessor
from .tokenizer import DEFAULT_SYSTEM, IGNORE_INDEX, apply_chat_template

log = logging.getLogger(__name__)

_IMG_RE = re.compile(r"img(\d+)\.(jpg|jpeg|png|webp)$")
_FRM_RE = re.compile(r"frm(\d+)\.(jpg|jpeg|png|webp)$")
BAD_REASONS = ("tar_error", "empty_shard", "missing_json", "bad_json", "missing_image", "corrupt_image",
               "image_too_large", "image_count_mismatch", "overlong_dropped", "no_loss_tokens", "other_error")
OVERLONG = ("truncate", "drop")
# An image above this many pixels is skipped before decoding (``image_too_large``): a 8000x8000 PNG
# takes seconds to decode on every pass only to be resized to ~1M pixels. 6144^2 keeps 24-36 MP photos.
DEFAULT_MAX_IMAGE_PIXELS = 6144 * 6144


class ImageTooLarge(ValueError):
    pass


class SampleStats:
    """Per-reason counters plus a log line at power-of-two counts (so a flood stays readable)."""

    def __init__(self, where: str = "") -> None:
        self.c: Counter = Counter()
        self.where = where
        self._last_tar_error = None

    def bad(self, reason: str, detail: str) -> None:
        self.c[reason] += 1
        n = self.c[reason]
        if n & (n - 1) == 0:
            log.warning("data%s: skipped sample (%s, %d so far): %s", self.where, reason, n, detail[:300])

    def tar_handler(self, exn: Exception) -> bool:
        """webdataset handler: count, log, continue with the next member or shard.

        webdataset reports one read error twice: from the member iterator (``"msg @ stream"``) and
        again from the shard expander (``(msg, stream, url)``); the second is not counted."""
        a = exn.args
        if len(a) > 1:
            key = (type(exn), str(a[0]), repr(a[1]))
        else:
            msg, _, stream = str(a[0] if a else exn).partition(" @ ")
            key = (type(exn), msg, stream)
        if key == self._last_tar_error and key[2]:
            return True
        self._last_tar_error = key
        self.bad("tar_error", f"{type(exn).__name__}: {exn}")
        return True

    def read_shards(self, urls: list[str]):
        """Raw samples of ``urls`` in order; a shard that gives no sample and no error (a tar without
        members) is counted as ``empty_shard`` instead of passing silently."""
        for url in urls:
            n, errors = 0, self.c["tar_error"]
            pipeline = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=self.tar_handler))
            for sample in pipeline:
                n += 1
                self._last_tar_error = None  # a later error is a new one even on a recycled stream id
                yield sample
            if n == 0 and self.c["tar_error"] == errors:
                self.bad("empty_shard", f"{url}: a tar without samples")


class SampleProcessor:
    """Raw webdataset sample -> ``{"key", "input_ids", "labels", "images"}`` or None (counted)."""

    def __init__(self, tokenizer, image_processor: ImageProcessor, max_length: int, overlong: str = "truncate",
                 system: str | None = DEFAULT_SYSTEM, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        if overlong not in OVERLONG:
            raise ValueError(f"overlong={overlong!r} is not one of {list(OVERLONG)}")
        if max_image_pixels is not None and int(max_image_pixels) < 1:
            raise ValueError(f"max_image_pixels={max_image_pixels} must be >= 1 (or null for no limit)")
        self.max_image_pixels = max_image_pixels
        self.tok, self.proc, self.max_length, self.overlong, self.system = (
            tokenizer, image_processor, max_length, overlong, system)

    def __call__(self, sample: dict, stats: SampleStats):
        key = str(sample.get("__key__"))
        try:
            return self._process(sample, key, stats)
        except Exception as e:  # a bug or an unforeseen input must not end a long run
            stats.bad("other_error", f"{key}: {type(e).__name__}: {e}")
            return None

    def _process(self, sample: dict, key: str, stats: SampleStats):
        if "json" not in sample:  # e.g. the tail of a truncated shard: files without their .json
            stats.bad("missing_json", f"{key}: members {sorted(k for k in sample if not k.startswith('__'))}")
            return None
        try:
            meta = json.loads(sample["json"])
            conv = meta["conversations"]
            if not isinstance(conv, list) or not all(isinstance(t, dict) for t in conv):
                raise ValueError("conversations is not a list of turns")
        except (KeyError, ValueError, TypeError) as e:
            stats.bad("bad_json", f"{key}: {type(e).__name__}: {e}")
            return None
        # the source row (file:line for `vlt data pack` shards, else the id) makes a skip traceable
        src = meta.get("source") or meta.get("id") if isinstance(meta, dict) else None
        where = f"{key} ({src})" if src else key
        imgs = sorted((int(m.group(1)), k) for k in sample if (m := _IMG_RE.match(k)))
        frms = sorted((int(m.group(1)), k) for k in sample if (m := _FRM_RE.match(k)))
        if len(imgs) < int(meta.get("num_images", len(imgs))) or len(frms) < int(meta.get("num_frames", len(frms))):
            stats.bad("missing_image", f"{where}: json lists {meta.get('num_images')} images/{meta.get('num_frames')}"
                                       f" frames, shard has {len(imgs)}/{len(frms)}")
            return None
        order = re.findall(r"<image>|<video>", "".join(str(t.get("value", "")) for t in conv))
        if order.count("<image>") != len(imgs) or order.count("<video>") != (1 if frms else 0):
            stats.bad("image_count_mismatch",
                      f"{where}: placeholders {order} vs {len(imgs)} images, {len(frms)} frames")
            return None

        def load(k: str) -> torch.Tensor:
            with Image.open(io.BytesIO(sample[k])) as im:  # reads the header only
                if self.max_image_pixels and im.width * im.height > self.max_image_pixels:
                    raise ImageTooLarge(f"{k} is {im.width}x{im.height} = {im.width * im.height:,} pixels > "
                                        f"max_image_pixels={self.max_image_pixels:,}")
                return self.proc(im)

        try:
            stills = [load(k) for _, k in imgs]
            frames = [load(k) for _, k in frms]
        except ImageTooLarge as e:
            stats.bad("image_too_large", f"{where}: {e} (raise data.max_image_pixels to keep it)")
            return None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for damaged data
            stats.bad("corrupt_image", f"{where}: {type(e).__name__}: {e}")
            return None
        times = list(meta.get("timestamps") or [float(i) for i in range(len(frames))])
        media, tensors, it = [], [], iter(stills)
        for ph in order:  # tensors follow placeholder order, so they follow the text order
            if ph == "<image>":
                t = next(it)
                media.append(self.proc.num_tokens(t))
                tensors.append(t)
            else:
                media.append(("video", [(float(ts), self.proc.num_tokens(f)) for ts, f in zip(times, frames)]))
                tensors.extend(frames)
        try:
            ids, labels = apply_chat_template(self.tok, conv, media, system=self.system)
        except ValueError as e:
            stats.bad("bad_json", f"{where}: {e}")
            return None
        if len(ids) > self.max_length:
            if self.overlong == "drop":
                stats.bad("overlong_dropped", f"{where}: {len(ids)} > max_length {self.max_length}")
                return None
            ids, labels, tensors = self._truncate(ids, labels, tensors)
            stats.c["overlong_truncated"] += 1
        if all(x == IGNORE_INDEX for x in labels):
            stats.bad("no_loss_tokens", f"{where}: no assistant tokens (after truncation to {self.max_length})")
            return None
        return {"key": key, "input_ids": ids, "labels": labels, "images": tensors}

    def _truncate(self, ids, labels, tensors):
        """Cut at max_length; an image whose token run would be cut is removed whole (so the
        image-token count still equals the images handed to the model)."""
        cut = self.max_length
        vs, ve = self.tok.vision_start_id, self.tok.vision_end_id
        kept, start = 0, None
        for i, t in enumerate(ids):
            if t == vs:
                start = i
            elif t == ve:
                if i < cut:
                    kept += 1
                else:
                    cut = min(cut, start)
                    break
        return ids[:cut], labels[:cut], tensors[:kept]


def collate(samples: list[dict], pad_id: int) -> dict:
    """One sample per row, right-padded to the longest row; ``cu_seqlens`` is None."""
    L = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    for r, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[r, :n] = torch.tensor(s["input_ids"])
        labels[r, :n] = torch.tensor(s["labels"])
    return {"input_ids": input_ids, "labels": labels, "position_ids": torch.arange(L).repeat(B, 1),
            "cu_seqlens": None, "images": [t for s in samples for t in s["images"]],
            "sample_ids": [s["key"] for s in samples], "num_samples": B}


def collate_packed(rows: list[list[dict]], row_length: int, pad_id: int) -> dict:
    """Rows of whole samples -> one [1, B*row_length] sequence with exact ``cu_seqlens``.

    Each row's trailing padding is a segment of its own, so no sample shares a segment with
    padding or with a sample of another row; position ids restart at 0 in every segment.
    """
    ids, labels, pos, bounds, images, keys = [], [], [], [0], [], []
    for row in rows:
        used = 0
        for s in row:
            n = len(s["input_ids"])
            ids += s["input_ids"]
            labels += s["labels"]
            pos += range(n)
            used += n
            bounds.append(bounds[-1] + n)
            images += s["images"]
            keys.append(s["key"])
        pad = row_length - used
        assert pad >= 0, "packer overfilled a row"
        if pad:
            ids += [pad_id] * pad
            labels += [IGNORE_INDEX] * pad
            pos += range(pad)
            bounds.append(bounds[-1] + pad)
    return {"input_ids": torch.tensor([ids], dtype=torch.long), "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([pos], dtype=torch.long),
            "cu_seqlens": torch.tensor(bounds, dtype=torch.int32), "images": images, "sample_ids": keys,
            "num_samples": len(keys)}


def batch_samples(samples, batch_size: int, max_length: int, pack: bool, pad_id: int):
    """Group processed samples into batches. Packing is greedy and in stream order: a sample that
    does not fit closes the current row; samples are never split across rows."""
    if not pack:
        buf = []
        for s in samples:
            buf.append(s)
            if len(buf) == batch_size:
                yield collate(buf, pad_id)
                buf = []
        if buf:
            yield collate(buf, pad_id)
        return
    rows, row, used = [], [], 0
    for s in samples:
        n = len(s["input_ids"])
        if row and used + n > max_length:
            rows.append(row)
            row, used = [], 0
            if len(rows) == batch_size:
                yield collate_packed(rows, max_length, pad_id)
                rows = []
        row.append(s)
        used += n
    if row:
        rows.append(row)
    if rows:
        yield collate_packed(rows, max_length, pad_id)


class VLTStream(IterableDataset):
    """Iterable of ready batches for one rank (see the module docstring for the splitting rules).

    ``num_batches`` set: the stream repeats and is cut at exactly that many batches per epoch;
    None: one pass, partial last batch included (validation on one rank).
    """

    def __init__(self, shards: list[str], processor: SampleProcessor, batch_size: int, max_length: int,
                 pack: bool, pad_id: int, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, num_batches: int | None = None,
                 epoch: int = 0, skip_batches: int = 0) -> None:
        super().__init__()
        if not shards:
            raise ValueError("VLTStream: no shards")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.shards, self.processor = list(shards), processor
        self.batch_size, self.max_length, self.pack, self.pad_id = batch_size, max_length, pack, pad_id
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.num_batches, self.epoch, self.skip_batches = num_batches, epoch, skip_batches
        self.split_samples = len(self.shards) < self.world_size * self.num_workers
        if self.split_samples and rank == 0:
            log.info("data: %d shard(s) < %d ranks x %d workers: every stream reads all shards and keeps every "
                     "%d-th sample", len(self.shards), world_size, self.num_workers, world_size * self.num_workers)

    def _one_pass(self, stream: int, cycle: int, stats: SampleStats):
        urls = list(self.shards)
        if self.shuffle:
            random.Random(f"shards/{self.seed}/{self.epoch}/{cycle}").shuffle(urls)
        W = self.num_workers
        if not self.split_samples:
            urls = urls[self.rank::self.world_size][stream::W]
        stages = [lambda: stats.read_shards(urls)]
        if self.split_samples:
            slot, n = self.rank * W + stream, self.world_size * W
            stages.append(wds.select(_EveryNth(slot, n)))
        if self.shuffle:
            rng = random.Random(f"samples/{self.seed}/{self.epoch}/{self.rank}/{stream}/{cycle}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng))
        return wds.DataPipeline(*stages)

    def _samples(self, stream: int, stats: SampleStats):
        for cycle in count():
            raw = valid = 0
            # each pass has its own shuffle buffer, drained at its end, so these counts are exact
            for sample in self._one_pass(stream, cycle, stats):
                raw += 1
                out = self.processor(sample, stats)
                if out is None:
                    continue
                valid += 1
                yield out
            if raw == 0:
                raise RuntimeError(f"data: stream {stream} of rank {self.rank} read no samples from "
                                   f"{len(self.shards)} shard(s) {self.shards[:3]}... (all empty or unreadable?)")
            if valid == 0 and self.num_batches is not None:
                raise RuntimeError(f"data: a whole pass over {self.shards[:3]}... gave {raw} samples and no usable "
                                   f"one (reasons: {dict(stats.c)}); stopping instead of looping forever")
            if self.num_batches is None:
                return

    def __iter__(self):
        info = get_worker_info()
        proc, W = (info.id, info.num_workers) if info else (0, 1)
        if W != self.num_workers:
            self.num_workers = W
            self.split_samples = len(self.shards) < self.world_size * W
        k = self.skip_batches
        stream = (proc + k) % W
        skip = max(0, -(-(k - stream) // W))  # batches j < k with j % W == stream
        stop = None
        if self.num_batches is not None:
            stop = self.num_batches // W + (1 if stream < self.num_batches % W else 0)
        stats = SampleStats(f"[rank {self.rank} stream {stream}]")
        batches = batch_samples(self._samples(stream, stats), self.batch_size, self.max_length, self.pack, self.pad_id)
        sent = Counter()
        for i, batch in enumerate(islice(batches, stop)):
            if i < skip:
                sent = Counter(stats.c)  # counts from skipped batches were reported before the resume
                continue
            stats.c["batches"] += 1
            stats.c["samples"] += int(batch["num_samples"])  # per batch, not per sample read ahead
            stats.c["tokens"] += int((batch["input_ids"] != self.pad_id).sum())
            delta = Counter(stats.c)
            delta.subtract(sent)
            sent = Counter(stats.c)
            batch["_stats"] = {k: v for k, v in delta.items() if v}
            yield batch
        delta = Counter(stats.c)
        delta.subtract(sent)
        if any(delta.values()):  # counts after the last batch (or of a stream with no batch at all)
            yield {"_stats": {k: v for k, v in delta.items() if v}, "_stats_only": True}


class _EveryNth:
    """Picklable predicate keeping samples slot, slot+n, slot+2n, ... of a stream."""

    def __init__(self, slot: int, n: int) -> None:
        self.slot, self.n, self.i = slot, n, -1

    def __call__(self, _sample) -> bool:
        self.i += 1
        return self.i % self.n == self.slot


def _identity(x):
    return x


class VLTLoader:
    """Wraps a DataLoader over a :class:`VLTStream`: sets the epoch and resume skip before each
    iteration, pops the per-batch ``_stats`` into ``on_stats`` and counts yielded batches."""

    def __init__(self, dataset: VLTStream, num_workers: int, epoch_fn=None, skip_fn=None, on_stats=None,
                 pin_memory: bool = False, defer_stats: bool = False) -> None:
        """``defer_stats``: leave each batch's counts in it as ``_stats`` for the consumer (the data
        module adds them when the batch is trained on); counts after the last batch still go to on_stats."""
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory
        self.defer_stats = defer_stats
        self.epoch_fn, self.skip_fn, self.on_stats = epoch_fn, skip_fn, on_stats
        self.yielded = 0
        self.epoch = dataset.epoch

    def __len__(self) -> int:
        if self.dataset.num_batches is None:
            raise TypeError("single-pass stream has no length")
        return self.dataset.num_batches

    def state_dict(self) -> dict:
        """Informational; the resume position lives in ``VLTDataModule.state_dict`` (Lightning keeps
        both). Defining it tells Lightning this loader resumes mid-epoch, which it does."""
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state_dict: dict) -> None:
        pass

    def __iter__(self):
        ds = self.dataset
        self.epoch = ds.epoch = self.epoch_fn() if self.epoch_fn else ds.epoch
        ds.skip_batches = self.skip_fn(self.epoch) if self.skip_fn else 0
        ds.num_workers = max(1, self.num_workers)
        self.yielded = ds.skip_batches
        # persistent workers would keep a stale copy of the epoch/skip, hence a fresh DataLoader per epoch
        dl = DataLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                        pin_memory=self.pin_memory, persistent_workers=False)
        for batch in dl:
            if batch.get("_stats_only"):
                if self.on_stats:
                    self.on_stats(batch["_stats"])
                continue
            if not self.defer_stats:
                stats = batch.pop("_stats", None)
                if stats and self.on_stats:
                    self.on_stats(stats)
            self.yielded += 1
            yield batch
