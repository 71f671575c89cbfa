"""``VLTDataModule``: shards or an embedded synthetic set -> train/val loaders of packed VLM batches.

Resuming: the train order of epoch ``e`` is a function of (seed, e, world_size, num_workers), so a
restart at an epoch boundary replays it exactly; ``state_dict()`` (which Lightning stores in every
checkpoint) also records how many batches of the current epoch were consumed, and the first
iteration after ``load_state_dict`` skips exactly those, so a mid-epoch resume continues with the
batch an uninterrupted run would have produced next. Changing world size or worker count between
save and resume changes the order (logged).

An epoch is a fixed number of batches per rank (``samples_per_epoch``, default the manifest's
sample count, divided over ranks and batches; with packing, estimated from the mean sample
length), identical on every rank so DDP never hangs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

import lightning as L

from .image import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, ImageProcessor
from .pipeline import (BAD_REASONS, DEFAULT_MAX_IMAGE_PIXELS, OVERLONG, SampleProcessor, SampleStats, VLTLoader,
                       VLTStream)
from .shards import read_manifest, resolve_shards, write_synthetic
from .synthetic import TASKS, check_params
from .tokenizer import DEFAULT_SYSTEM, load_tokenizer

log = logging.getLogger(__name__)


_SYNTH_KEYS = ("task", "num_train", "num_val", "num_test", "seed", "cache_dir", "shard_size")


def synthetic_dirs(synthetic: dict) -> tuple[Path, Path]:
    """(train_dir, val_dir) for a synthetic spec, keyed by a hash of every parameter but cache_dir
    (``test`` is their sibling)."""
    params = {k: v for k, v in synthetic.items() if k != "cache_dir"}
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(synthetic.get("cache_dir") or "~/.cache/vlt/synthetic").expanduser() / f"{params.get('task')}-{digest}"
    return root / "train", root / "val"


def ensure_synthetic(synthetic: dict) -> tuple[Path, Optional[Path]]:
    """Generate the synthetic shards once (atomically: written aside, then renamed); returns
    (train_dir, val_dir or None); the test split (``num_test``, default 0) is ``train_dir``'s sibling
    ``test``."""
    spec = dict(synthetic)
    task = spec.pop("task", None)
    if task not in TASKS:
        raise ValueError(f"synthetic.task={task!r} is not one of {list(TASKS)}")
    n_train, n_val = int(spec.pop("num_train", 2000)), int(spec.pop("num_val", 200))
    n_test = int(spec.pop("num_test", 0))
    seed = int(spec.pop("seed", 0))
    maxcount = int(spec.pop("shard_size", 1000))
    spec.pop("cache_dir", None)
    train_dir, val_dir = synthetic_dirs(synthetic)
    for split, n, d in (("train", n_train, train_dir), ("val", n_val, val_dir),
                        ("test", n_test, train_dir.with_name("test"))):
        if n <= 0 or (d / "manifest.json").is_file():
            continue
        tmp = d.with_name(f"{d.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("writing synthetic %s/%s (%d samples) to %s", task, split, n, d)
        write_synthetic(str(tmp), task, n, seed=seed, split=split, maxcount=maxcount, **spec)
        try:
            os.replace(tmp, d)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return train_dir, (val_dir if n_val > 0 else None)


class VLTDataModule(L.LightningDataModule):
    """WebDataset shards (or an embedded synthetic task) as batches for ``forward(**batch)``."""

    def __init__(
        self,
        train_shards: Optional[str] = None,
        val_shards: Optional[str] = None,
        synthetic: Optional[dict] = None,
        test_shards: Optional[str] = None,
        tokenizer: str = "byte",
        max_length: int = 1024,
        pack: bool = True,
        batch_size: int = 8,
        num_workers: int = 2,
        patch_size: int = 14,
        merge_size: int = 2,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        overlong: str = "truncate",
        seed: int = 0,
        samples_per_epoch: Optional[int] = None,
        system_prompt: Optional[str] = DEFAULT_SYSTEM,
        shuffle_buffer: int = 1000,
        max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        """
        Args:
            train_shards: training shards: a directory of ``*.tar``, a brace pattern
                (``dir/shard-{000000..000009}.tar``) or ``a.tar::b.tar``. None with ``synthetic``
                set: the synthetic set's cache directory.
            val_shards: validation shards (same forms); None: the synthetic val split, or no validation.
            synthetic: embedded synthetic set, e.g. ``{"task": "color", "num_train": 2000, "num_val": 200,
                "num_test": 0, "image_size": 56, "seed": 0, "cache_dir": "~/.cache/vlt/synthetic"}``; other
                keys go to the generator (see ``vlt.data.synthetic``). Generated once in ``prepare_data``.
            test_shards: shards for ``vlt test`` (same forms); None: the synthetic test split when
                ``num_test`` > 0, else ``vlt test`` says it evaluates the validation shards.
            tokenizer: ``"byte"`` (built in) or a local directory holding a Hugging Face tokenizer.
            max_length: token budget per row (packed) or per sample.
            pack: pack several samples per row with ``cu_seqlens``; False: one right-padded sample per row.
            batch_size: rows per batch (per rank).
            num_workers: DataLoader worker processes per rank.
            patch_size: vision patch size in pixels.
            merge_size: patches merged per side into one LLM token.
            min_pixels: lower bound on resized image area.
            max_pixels: upper bound on resized image area.
            overlong: a sample longer than ``max_length``: ``"truncate"`` or ``"drop"``.
            seed: data-order seed (shard order, shuffle buffer).
            samples_per_epoch: samples per epoch over all ranks; None: the manifest's count.
            system_prompt: ChatML system prompt; empty or None omits the system turn.
            shuffle_buffer: samples in the shuffle buffer of each stream.
            max_image_pixels: images with more pixels are skipped before decoding (``image_too_large``);
                null: no limit.
        """
        super().__init__()
        if overlong not in OVERLONG:
            raise ValueError(f"overlong={overlong!r} is not one of {list(OVERLONG)}")
        for name, val in (("max_length", max_length), ("batch_size", batch_size), ("patch_size", patch_size),
                          ("merge_size", merge_size), ("shuffle_buffer", shuffle_buffer)):
            if int(val) < 1:
                raise ValueError(f"{name}={val} must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        if max_image_pixels is not None and int(max_image_pixels) < 1:
            raise ValueError(f"max_image_pixels={max_image_pixels} must be >= 1 (or null for no limit)")
        if train_shards is None and synthetic is None:
            raise ValueError("set train_shards (a shard dir or pattern) or synthetic (e.g. {task: color})")
        if synthetic is not None:
            gen = {k: v for k, v in synthetic.items() if k not in _SYNTH_KEYS}
            # ValueError naming the task or the unknown key; the allowed list includes num_train & co.
            check_params(synthetic.get("task"), gen, extra=_SYNTH_KEYS)
        self.save_hyperparameters()
        self.train_shards, self.val_shards, self.synthetic = train_shards, val_shards, synthetic
        self.test_shards = test_shards
        self.tokenizer_spec, self.max_length, self.pack = tokenizer, max_length, pack
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.overlong, self.samples_per_epoch, self.system_prompt = overlong, samples_per_epoch, system_prompt
        self.shuffle_buffer = shuffle_buffer
        self.max_image_pixels = max_image_pixels
        self.image_processor = ImageProcessor(patch_size, merge_size, min_pixels, max_pixels)
        self._tokenizer = None
        self._rank_world: Optional[tuple[int, int]] = None
        self._epoch = 0
        self._resume: Optional[dict] = None
        # train and eval (val/test/predict) counters apart: a bad validation shard must not show up
        # as training skips, and train counts only cover batches that reached a training step
        self._stats: Counter = Counter()
        self._val_stats: Counter = Counter()
        self._train_loader: Optional[VLTLoader] = None
        self._train_files: list[str] = []
        self._val_files: list[str] = []

    # ------------------------------------------------------------------ tokenizer / distributed
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Override rank/world size (tests, custom loops); by default they come from the trainer."""
        self._rank_world = (rank, world_size)

    def rank_world(self) -> tuple[int, int]:
        if self._rank_world is not None:
            return self._rank_world
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def set_epoch(self, epoch: int) -> None:
        """Epoch for loops without a trainer (with a trainer, ``trainer.current_epoch`` is used)."""
        self._epoch = epoch

    def current_epoch(self) -> int:
        if self.trainer is not None:
            return int(self.trainer.current_epoch)
        return self._epoch

    # ------------------------------------------------------------------ lifecycle
    def prepare_data(self) -> None:
        if self.synthetic is not None and (self.train_shards is None or self.val_shards is None):
            ensure_synthetic(self.synthetic)

    def _resolve(self) -> None:
        if self._train_files:
            return
        train, val = self.train_shards, self.val_shards
        if self.synthetic is not None and (train is None or val is None):
            tdir, vdir = ensure_synthetic(self.synthetic)  # no-op when prepare_data already ran
            train = train or str(tdir)
            val = val if val is not None else (str(vdir) if vdir else None)
        empty_train, empty_val = [], []
        self._train_files = resolve_shards(train, "train_shards", empty_train)
        self._val_files = resolve_shards(val, "val_shards", empty_val) if val else []
        # 0-byte files are never read; counted once here so they show in data/*/empty_shard, not only in the log
        self._stats["empty_shard"] = len(empty_train)
        self._val_stats["empty_shard"] = len(empty_val)
        for c in (self._stats, self._val_stats):
            if not c["empty_shard"]:
                del c["empty_shard"]

    def setup(self, stage: Optional[str] = None) -> None:
        self._resolve()

    def _processor(self) -> SampleProcessor:
        return SampleProcessor(self.tokenizer, self.image_processor, self.max_length, self.overlong,
                               self.system_prompt or None, max_image_pixels=self.max_image_pixels)

    def _count_samples(self, files: list[str]) -> int:
        man = read_manifest(files)
        if len(man) == len(files):
            return sum(int(e["num_samples"]) for e in man.values())
        import tarfile

        n = 0
        for f in files:  # no manifest: count .json members (headers only, no decoding)
            found = 0
            try:
                with tarfile.open(f) as t:
                    for m in t:  # member by member: a truncated tar still counts what precedes the damage
                        found += m.name.endswith(".json")
            except (tarfile.TarError, OSError, EOFError):
                log.warning("%s is damaged: counting the %d sample(s) before the damage", f, found)
            n += found
        return n

    def _mean_tokens(self, files: list[str], n: int = 64) -> float:
        """Mean processed length of up to n samples (the packed epoch length is estimated from it)."""
        stream = VLTStream(files, self._processor(), 1, self.max_length, False, self.tokenizer.pad_id,
                           shuffle=False, num_batches=None)
        lengths = []
        stats = SampleStats()
        for s in stream._samples(0, stats):
            lengths.append(len(s["input_ids"]))
            if len(lengths) >= n:
                break
        return sum(lengths) / max(1, len(lengths)) if lengths else float(self.max_length)

    def batches_per_epoch(self, files: list[str], world: int) -> int:
        n = self.samples_per_epoch or self._count_samples(files)
        if self.pack:
            per_row = max(1, self.max_length // max(1, math.ceil(self._mean_tokens(files))))
            return max(1, math.ceil(n / per_row / (world * self.batch_size)))
        return max(1, n // (world * self.batch_size))

    # ------------------------------------------------------------------ loaders
    def _on_stats(self, delta: dict, split: str = "val") -> None:
        """Add a loader's counts to the ``split`` counters (``val`` for the eval loaders, which pass no split)."""
        counts = self._stats if split == "train" else self._val_stats
        before = dict(counts)
        counts.update(delta)
        # log when a skip total reaches 1, 2, 4, 8, ...: visible without flooding the log
        crossed = [k for k in delta if k in BAD_REASONS and
                   (counts[k]).bit_length() > int(before.get(k, 0)).bit_length()]
        if crossed:
            log.warning("data: %s samples skipped so far on this rank: %s", split,
                        {k: v for k, v in counts.items() if k in BAD_REASONS})

    def _on_train_stats(self, delta: dict) -> None:
        self._on_stats(delta, "train")

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Under a trainer the train loader leaves each batch's counts in the batch (``_stats``) and they
        are added here, when the batch reaches its training step, so ``train/samples`` never includes
        the batch Lightning has prefetched."""
        if isinstance(batch, dict) and "_stats" in batch:
            self._on_train_stats(batch.pop("_stats"))
        return batch

    def _skip(self, epoch: int) -> int:
        r, self._resume = self._resume, None  # a resume position applies to one iteration only
        if r and int(r.get("epoch", -1)) == epoch:
            return int(r.get("batches_consumed", 0))
        return 0

    def train_dataloader(self) -> VLTLoader:
        self._resolve()
        rank, world = self.rank_world()
        nb = self.batches_per_epoch(self._train_files, world)
        ds = VLTStream(self._train_files, self._processor(), self.batch_size, self.max_length, self.pack,
                       self.tokenizer.pad_id, seed=self.seed, shuffle=True, shuffle_buffer=self.shuffle_buffer,
                       rank=rank, world_size=world, num_workers=self.num_workers, num_batches=nb)
        log.info("data: train %d shard(s), %d batches/epoch/rank, rank %d/%d, %d worker(s)",
                 len(self._train_files), nb, rank, world, self.num_workers)
        self._train_loader = VLTLoader(ds, self.num_workers, epoch_fn=self.current_epoch, skip_fn=self._skip,
                                       on_stats=self._on_train_stats, defer_stats=self.trainer is not None)
        return self._train_loader

    def val_dataloader(self):
        self._resolve()
        if not self._val_files:
            return []
        rank, world = self.rank_world()
        # one rank: a single exact pass; several: a fixed count per rank so no rank waits on another
        nb = None if world == 1 else self.batches_per_epoch(self._val_files, world)
        ds = VLTStream(self._val_files, self._processor(), self.batch_size, self.max_length, self.pack,
                       self.tokenizer.pad_id, seed=self.seed, shuffle=False, rank=rank, world_size=world,
                       num_workers=self.num_workers, num_batches=nb)
        return VLTLoader(ds, self.num_workers, epoch_fn=lambda: 0, on_stats=self._on_stats)

    def _test_files(self) -> tuple[list[str], str]:
        """(files, what they are) for ``vlt test`` / ``vlt predict``: the test split when there is
        one, else the validation shards, said out loud."""
        self._resolve()
        if self.test_shards:
            return resolve_shards(self.test_shards, "test_shards"), "test_shards"
        if self.synthetic is not None and int(self.synthetic.get("num_test", 0)) > 0:
            return resolve_shards(str(synthetic_dirs(self.synthetic)[0].with_name("test")), "synthetic test"), \
                "the synthetic test split"
        if not self._val_files:
            raise ValueError("no test data: set data.init_args.test_shards (or synthetic.num_test), or val_shards")
        msg = ("vlt: this data module has no test split (set data.init_args.test_shards or synthetic.num_test); "
               "evaluating on the VALIDATION shards")
        log.warning(msg)
        if self.rank_world()[0] == 0:
            print(msg, file=sys.stderr)
        return self._val_files, "the validation shards"

    def _eval_loader(self, files: list[str], batch_size: int, pack: bool):
        rank, world = self.rank_world()
        nb = None if world == 1 else self.batches_per_epoch(files, world)
        ds = VLTStream(files, self._processor(), batch_size, self.max_length, pack, self.tokenizer.pad_id,
                       seed=self.seed, shuffle=False, rank=rank, world_size=world, num_workers=self.num_workers,
                       num_batches=nb)
        return VLTLoader(ds, self.num_workers, epoch_fn=lambda: 0, on_stats=self._on_stats)

    def test_dataloader(self):
        files, self.test_source = self._test_files()
        return self._eval_loader(files, self.batch_size, self.pack)

    def predict_dataloader(self):
        """One unpacked sample per batch: ``vlt predict`` generates each sample's answer."""
        files, self.test_source = self._test_files()
        return self._eval_loader(files, 1, False)

    # ------------------------------------------------------------------ state / stats
    def stats(self, split: str | None = None) -> dict:
        """Counts aggregated over this rank's workers: ``samples``, ``batches``, ``tokens``,
        ``overlong_truncated`` and one key per skip reason (``pipeline.BAD_REASONS``); ``split``
        ``"train"`` (batches that reached a training step) or ``"val"`` (every eval loader), None: both summed."""
        if split not in (None, "train", "val"):
            raise ValueError(f"split={split!r}; allowed: None, 'train', 'val'")
        if split is None:
            return dict(self._stats + self._val_stats)
        return dict(self._stats if split == "train" else self._val_stats)

    def logged_stats(self) -> dict:
        """``{"train/samples": n, "val/corrupt_image": m, ...}``, what the training module logs under ``data/``."""
        return {f"{split}/{k}": v for split in ("train", "val") for k, v in self.stats(split).items()}

    def state_dict(self) -> dict:
        consumed = self._train_loader.yielded if self._train_loader else 0
        epoch = self._train_loader.epoch if self._train_loader else self.current_epoch()
        try:  # under a trainer, count batches trained on, not the one Lightning has prefetched
            consumed = int(self.trainer.fit_loop.epoch_loop.batch_progress.current.ready)
            epoch = int(self.trainer.current_epoch)
        except AttributeError:
            pass
        rank, world = self.rank_world()
        return {"epoch": epoch, "batches_consumed": consumed, "seed": self.seed, "world_size": world,
                "num_workers": self.num_workers, "stats": dict(self._stats), "val_stats": dict(self._val_stats)}

    def load_state_dict(self, state_dict: dict) -> None:
        rank, world = self.rank_world()
        if (state_dict.get("world_size"), state_dict.get("num_workers")) != (world, self.num_workers) or \
                state_dict.get("seed") != self.seed:
            log.warning("data: resuming with a different seed/world size/worker count than saved (%s); "
                        "the data order will differ from the uninterrupted run", state_dict)
        self._resume = dict(state_dict)
        self._epoch = int(state_dict.get("epoch", 0))
        self._stats = Counter(state_dict.get("stats", {}))
        self._val_stats = Counter(state_dict.get("val_stats", {}))
