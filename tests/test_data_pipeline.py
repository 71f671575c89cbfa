"""Reader, packing, determinism, resume, rank splitting, and bad-input accounting."""

import json
import os
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from vlt.data.datamodule import VLTDataModule
from vlt.data.shards import image_bytes, write_synthetic
from vlt.data.synthetic import COLORS, check_params, generate_record, make_sample, sample_rng


@pytest.fixture(scope="module")
def color_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("color")
    write_synthetic(str(d), "color", 96, seed=0, maxcount=24)  # 4 shards
    return str(d)


@pytest.fixture(scope="module")
def mix_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    write_synthetic(str(d), "mix", 24, seed=1, maxcount=12, weights={"color": 1, "count": 1, "ocr": 1, "needle": 1},
                    task_params={"needle": {"num_frames": 5}, "ocr": {"image_size": 84}})
    return str(d)


def make_dm(shards, **kw):
    args = dict(train_shards=shards, val_shards=shards, max_length=256, batch_size=2, num_workers=0, seed=0)
    args.update(kw)
    return VLTDataModule(**args)


def epoch_ids(loader):
    return [b["sample_ids"] for b in loader]


def check_batch(b, tok, proc, pack, L=None):
    n_img = int(((b["input_ids"] == tok.image_pad_id) | (b["input_ids"] == tok.video_pad_id)).sum())
    assert n_img == sum(proc.num_tokens(t) for t in b["images"])
    for t in b["images"]:
        assert t.shape[0] == 3 and t.shape[1] % 28 == 0 and t.shape[2] % 28 == 0
    # image runs in the order of images: run lengths match the tensors one by one
    ids = b["input_ids"].flatten().tolist()
    runs, cur = [], 0
    for t in ids:
        if t in (tok.image_pad_id, tok.video_pad_id):
            cur += 1
        elif cur:
            runs.append(cur)
            cur = 0
    assert runs == [proc.num_tokens(t) for t in b["images"]]
    assert (b["labels"][b["input_ids"] == tok.image_pad_id] == -100).all()
    assert b["num_samples"] == len(b["sample_ids"])
    if not pack:
        assert b["cu_seqlens"] is None
        return
    assert b["input_ids"].shape[0] == 1 and b["input_ids"].shape[1] % L == 0
    cu = b["cu_seqlens"].tolist()
    assert b["cu_seqlens"].dtype == torch.int32 and cu[0] == 0 and cu[-1] == b["input_ids"].shape[1]
    assert all(x < y for x, y in zip(cu, cu[1:]))
    for r in range(b["input_ids"].shape[1] // L + 1):  # every row end is a boundary: no sample crosses rows
        assert r * L in cu
    pos = b["position_ids"][0].tolist()
    n_real = 0
    for s, e in zip(cu, cu[1:]):
        assert pos[s:e] == list(range(e - s))
        seg = ids[s:e]
        if seg[0] == tok.pad_id:  # padding segment: all padding, no loss
            assert set(seg) == {tok.pad_id} and (b["labels"][0, s:e] == -100).all()
        else:
            assert seg[0] == tok.im_start_id and seg[-1] == ord("\n")
            n_real += 1
    assert n_real == b["num_samples"]


@pytest.mark.parametrize("pack", [True, False])
def test_batches_keep_contracts(mix_dir, pack):
    dm = make_dm(mix_dir, pack=pack, max_length=512, batch_size=3)
    dm.setup("fit")
    n = 0
    for b in dm.val_dataloader():
        check_batch(b, dm.tokenizer, dm.image_processor, pack, 512)
        n += b["num_samples"]
    assert n == 24 and dm.stats().get("samples") == 24


def test_truncate_keeps_invariant_and_drop_counts(tmp_path):
    d = tmp_path / "needle"
    write_synthetic(str(d), "needle", 6, seed=0, num_frames=30)
    dm = make_dm(str(d), max_length=200, overlong="truncate")
    got = list(dm.val_dataloader())
    for b in got:
        check_batch(b, dm.tokenizer, dm.image_processor, True, 200)
    # the answer is at the end, so truncation leaves no loss tokens: counted and skipped, never silent
    assert dm.stats()["overlong_truncated"] == 6 and dm.stats()["no_loss_tokens"] == 6
    dm2 = make_dm(str(d), max_length=200, overlong="drop")
    assert list(dm2.val_dataloader()) == [] and dm2.stats()["overlong_dropped"] == 6
    with pytest.raises(RuntimeError, match="no usable"):  # a clear error instead of an endless loop
        list(dm2.train_dataloader())
    dm3 = make_dm(str(d), max_length=100000, overlong="drop")
    assert sum(b["num_samples"] for b in dm3.val_dataloader()) == 6


def test_deterministic_for_seed_and_epoch(color_dir):
    a = epoch_ids(make_dm(color_dir, num_workers=2).train_dataloader())
    b = epoch_ids(make_dm(color_dir, num_workers=2).train_dataloader())
    assert a == b and len(a) > 3
    c = epoch_ids(make_dm(color_dir, num_workers=2, seed=1).train_dataloader())
    assert c != a
    dm = make_dm(color_dir, num_workers=2)
    dm.set_epoch(1)
    e1 = epoch_ids(dm.train_dataloader())
    assert e1 != a
    dm.set_epoch(1)
    assert epoch_ids(dm.train_dataloader()) == e1


@pytest.mark.parametrize("workers,k", [(0, 3), (2, 3), (2, 4)])
def test_mid_epoch_resume_gives_identical_batches(color_dir, workers, k):
    full_dm = make_dm(color_dir, num_workers=workers)
    full_dm.set_epoch(2)
    full = list(full_dm.train_dataloader())
    dm = make_dm(color_dir, num_workers=workers)
    dm.set_epoch(2)
    it = iter(dm.train_dataloader())
    for _ in range(k):
        next(it)
    state = dm.state_dict()
    assert state["epoch"] == 2 and state["batches_consumed"] == k
    del it
    resumed = make_dm(color_dir, num_workers=workers)
    resumed.load_state_dict(state)
    rest = list(resumed.train_dataloader())
    assert len(rest) == len(full) - k
    for x, y in zip(rest, full[k:]):
        assert x["sample_ids"] == y["sample_ids"]
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["cu_seqlens"], y["cu_seqlens"])
        assert all(torch.equal(p, q) for p, q in zip(x["images"], y["images"]))
    # the resume position applies once: the next iteration is a whole epoch again
    assert len(list(resumed.train_dataloader())) == len(full)


@pytest.mark.parametrize("workers,shards", [(0, "all"), (2, "all"), (2, "one")])
def test_two_fake_ranks_disjoint_and_equal_counts(color_dir, workers, shards):
    spec = color_dir if shards == "all" else os.path.join(color_dir, "shard-000000.tar")
    total = 96 if shards == "all" else 24
    bs = 4 if shards == "all" else 3  # so each worker's batch share equals its data share (else it cycles)
    per_rank = []
    for rank in (0, 1):
        dm = make_dm(spec, num_workers=workers, pack=False, batch_size=bs, samples_per_epoch=total)
        dm.set_distributed(rank, 2)
        loader = dm.train_dataloader()
        ids = [i for b in loader for i in b["sample_ids"]]
        assert len(ids) == len(loader) * bs
        per_rank.append(ids)
    assert len(per_rank[0]) == len(per_rank[1]) == total // 2
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0])) == len(per_rank[0])  # nothing duplicated within a rank's epoch


def test_fewer_shards_than_workers_single_pass_each_sample_once(color_dir):
    spec = os.path.join(color_dir, "shard-000001.tar")
    dm = make_dm(spec, num_workers=3, pack=False)
    ids = [i for b in dm.val_dataloader() for i in b["sample_ids"]]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 24


def _good(i, img_ext="png"):
    conv = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]
    meta = {"id": str(i), "conversations": conv, "num_images": 1, "num_frames": 0, "timestamps": []}
    return {"__key__": f"{i:06d}", "json": json.dumps(meta).encode(), f"img0.{img_ext}":
            image_bytes(Image.new("RGB", (56, 56), COLORS["red"]), img_ext)}


def test_bad_inputs_are_counted_and_good_samples_survive(tmp_path):
    shard = str(tmp_path / "bad-000000.tar")
    with wds.TarWriter(shard) as w:
        w.write(_good(0))
        s = _good(1, "jpg")
        s["img0.jpg"] = s["img0.jpg"][:200]  # corrupt jpg
        w.write(s)
        w.write(_good(2))
        s = _good(3)
        s["json"] = b"{not json"
        w.write(s)
        s = _good(4)
        del s["img0.png"]  # missing image
        w.write(s)
        s = _good(5)
        s["json"] = s["json"].replace(b"<image>", b"<image><image>")  # placeholder count mismatch
        w.write(s)
        w.write(_good(6))
    good2 = str(tmp_path / "good-000001.tar")
    with wds.TarWriter(good2) as w:
        for i in range(10, 16):
            w.write(_good(i))
    data = open(good2, "rb").read()
    trunc = str(tmp_path / "trunc-000002.tar")
    open(trunc, "wb").write(data[: len(data) // 2 + 100])  # truncated tar
    empty = str(tmp_path / "empty-000003.tar")
    open(empty, "wb").close()  # empty file: dropped (with a warning) when resolving shards
    with wds.TarWriter(str(tmp_path / "nomembers-000004.tar")):
        pass  # a valid tar without samples
    dm = make_dm(str(tmp_path), pack=False, batch_size=2)
    ids = sorted(i for b in dm.val_dataloader() for i in b["sample_ids"])
    st = dm.stats()
    assert {"000000", "000002", "000006", "000010", "000011", "000012", "000013", "000014", "000015"} >= set(ids)
    assert {"000000", "000002", "000006", "000010", "000011", "000012"} <= set(ids)
    assert st["corrupt_image"] == 1 and st["bad_json"] == 1 and st["image_count_mismatch"] == 1
    assert st["missing_image"] >= 1 and st["tar_error"] >= 1
    assert st["samples"] == len(ids)
    # the training stream keeps going through the same bad data
    dm_train = make_dm(str(tmp_path), pack=False, batch_size=2, samples_per_epoch=20, num_workers=2)
    assert len(list(dm_train.train_dataloader())) == 10


def test_clear_errors_for_paths_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="vlt data synth"):
        make_dm(str(tmp_path / "missing")).setup("fit")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_dm(str(tmp_path / "x-{000..003}.tar")).setup("fit")
    with pytest.raises(ValueError, match="overlong"):
        make_dm(str(tmp_path), overlong="cut")
    with pytest.raises(ValueError, match="synthetic.task"):
        VLTDataModule(synthetic={"task": "colour"})
    with pytest.raises(ValueError, match="imag_size"):
        check_params("color", {"imag_size": 3})


def test_synthetic_deterministic_and_has_signal():
    conv1, im1 = make_sample("color", sample_rng(0, "train", 5))
    conv2, im2 = make_sample("color", sample_rng(0, "train", 5))
    assert conv1 == conv2 and im1[0].tobytes() == im2[0].tobytes()
    for i in range(20):
        conv, ims = make_sample("color", sample_rng(0, "train", i))
        colour = conv[1]["value"]
        pixels = set(map(tuple, np.asarray(ims[0]).reshape(-1, 3).tolist()))
        assert COLORS[colour] in pixels and ims[0].size == (56, 56)
        conv, ims = make_sample("count", sample_rng(0, "train", i), max_count=4)
        assert conv[1]["value"] in {"1", "2", "3", "4"}
        rec = generate_record("needle", sample_rng(0, "t", i), num_frames=12)
        assert len(rec.frames) == 12 and len(rec.timestamps) == 12
        assert rec.conversations[1]["value"] == rec.meta["answer"]
        conv, ims = make_sample("ocr", random.Random(i), length=6)
        assert len(conv[1]["value"]) == 6


def test_datamodule_synthetic_cache_and_vocab(tmp_path):
    spec = {"task": "color", "num_train": 16, "num_val": 8, "seed": 0, "cache_dir": str(tmp_path)}
    dm = VLTDataModule(synthetic=spec, max_length=256, batch_size=4, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.vocab_size == 264
    assert sum(b["num_samples"] for b in dm.val_dataloader()) == 8
    made = sorted(os.listdir(tmp_path))
    dm2 = VLTDataModule(synthetic=spec, max_length=256, batch_size=4, num_workers=0)
    dm2.prepare_data()
    assert sorted(os.listdir(tmp_path)) == made  # cached, keyed by params
    assert len(list(dm.train_dataloader())) >= 1
