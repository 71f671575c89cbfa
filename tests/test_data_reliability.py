"""Data under faults: `vlt data pack` never destroys the old shards on bad input, bad rows are
counted with file:line, train and val counters stay apart (train = batches trained on), tar damage
is counted once per pass and empty tars are counted, huge images are refused before decoding."""
import argparse
import io
import json
import logging

import lightning as L
import pytest
import torch
import webdataset as wds
from PIL import Image

from vlt.data.cli import add_data_subcommands
from vlt.data.datamodule import VLTDataModule
from vlt.data.image import ImageProcessor
from vlt.data.shards import image_bytes, write_synthetic


def parse(argv):
    parser = argparse.ArgumentParser()
    add_data_subcommands(parser.add_subparsers(dest="cmd", required=True))
    return parser.parse_args(argv)


def turn(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture
def packed(tmp_path):
    """An existing 6-sample pack: the folder later packs must not destroy."""
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (56, 56), (255, 0, 0)).save(img / "a.png")
    rows = [{"id": f"r{i}", "image": "a.png", "conversations": turn("<image>\nColour?", "red")} for i in range(6)]
    (tmp_path / "good.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "shards"
    args = parse(["pack", "--json", str(tmp_path / "good.jsonl"), "--images", str(img), "--out", str(out), "--quiet"])
    assert args.func(args) == 0
    return tmp_path, img, out


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_pack_with_a_malformed_json_list_leaves_the_old_shards(packed, capsys):
    tmp_path, img, out = packed
    before = snapshot(out)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1, "conversations": []},\n {"id": 2, oops}]')
    args = parse(["pack", "--json", str(bad), "--images", str(img), "--out", str(out), "--quiet"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "malformed JSON list" in err and "unchanged" in err
    assert snapshot(out) == before and not list(out.glob(".staging-*"))
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[{"id": "caf\xe9", "conversations": []}]')
    args = parse(["pack", "--json", str(latin), "--images", str(img), "--out", str(out), "--quiet"])
    assert args.func(args) == 2 and "not UTF-8" in capsys.readouterr().err
    assert snapshot(out) == before


def test_pack_skips_undecodable_jsonl_lines_with_file_and_line(packed):
    tmp_path, img, out = packed
    good = json.dumps({"id": "ok", "image": "a.png", "conversations": turn("<image>\nColour?", "red")}).encode()
    jl = tmp_path / "mixed.jsonl"
    jl.write_bytes(good + b"\n" + b'{"id": "caf\xe9"}\n' + b"{broken\n" + good + b"\n")
    args = parse(["pack", "--json", str(jl), "--images", str(img), "--out", str(out), "--quiet",
                  "--json-out", str(tmp_path / "s.json")])
    assert args.func(args) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["written"] == 2 and s["skipped"] == {"not_utf8": 1, "bad_json": 1}
    assert s["examples"]["not_utf8"][0].startswith("mixed.jsonl:2: not UTF-8")
    assert s["examples"]["bad_json"][0].startswith("mixed.jsonl:3: malformed JSON")
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 2  # replaced as a whole


def test_pack_that_fails_halfway_keeps_the_old_shards(packed, monkeypatch):
    tmp_path, img, out = packed
    before = snapshot(out)
    from vlt.data import shards

    calls = []

    def failing_write(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return orig(self, *a, **k)

    orig = shards.ManifestShardWriter.write
    monkeypatch.setattr(shards.ManifestShardWriter, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        shards.pack_llava(str(tmp_path / "good.jsonl"), str(img), str(out), progress=False)
    assert snapshot(out) == before and not list(out.glob(".staging-*"))


def test_pack_reports_rows_that_can_never_train(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (56, 56), (0, 0, 255)).save(img / "a.png")
    Image.new("RGB", (1200, 1000), (0, 0, 255)).save(img / "huge.png")
    rows = [{"id": "ok", "image": "a.png", "conversations": turn("<image>\nColour?", "blue")},
            {"id": "noanswer", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nHi"}]},
            {"id": "long", "conversations": turn("x" * 400, "y")},
            {"id": "huge", "image": "huge.png", "conversations": turn("<image>\nColour?", "blue")}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = parse(["pack", "--json", str(tmp_path / "d.jsonl"), "--images", str(img), "--out", str(tmp_path / "o"),
                  "--quiet", "--max-length", "300", "--max-image-pixels", "1000000",
                  "--json-out", str(tmp_path / "s.json")])
    assert args.func(args) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["written"] == 2 and s["skipped"] == {"no_assistant_turn": 1, "image_too_large": 1}
    assert s["warnings"] == {"over_max_length": 1} and s["examples"]["over_max_length"][0].startswith("d.jsonl:3:")
    assert "1200x1000" in s["examples"]["image_too_large"][0]


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.trained = 0

    def training_step(self, batch, batch_idx):
        assert "_stats" not in batch  # the counts never reach the model
        self.trained += batch["num_samples"]
        return (self.w * batch["input_ids"].float().mean()).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _sample(i, png=None):
    meta = {"id": f"s{i}", "source": f"rows.jsonl:{i + 1}", "conversations": turn("<image>\nColour?", "red"),
            "num_images": 1}
    return {"__key__": f"{i:06d}", "json": json.dumps(meta).encode(),
            "img0.png": png if png is not None else image_bytes(Image.new("RGB", (56, 56), (255, 0, 0)))}


def test_train_and_val_counters_are_apart_and_train_counts_trained_samples(tmp_path):
    train = tmp_path / "train"
    write_synthetic(str(train), "color", 40, seed=0, image_size=28, maxcount=10)
    val = tmp_path / "val"
    val.mkdir()
    with wds.TarWriter(str(val / "v-000000.tar")) as w:
        for i in range(6):
            w.write(_sample(i, b"not a png" if i % 2 else None))
    dm = VLTDataModule(train_shards=str(train), val_shards=str(val), max_length=128, batch_size=2, num_workers=0,
                       pack=True)
    mod = Tiny()
    L.Trainer(max_steps=7, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, val_check_interval=3, num_sanity_val_steps=1).fit(mod, datamodule=dm)
    tr, va = dm.stats("train"), dm.stats("val")
    assert "corrupt_image" not in tr and va["corrupt_image"] >= 3  # sanity check + 2 validation passes
    assert tr["samples"] == mod.trained and tr["batches"] == 7  # nothing prefetched, nothing from validation
    logged = dm.logged_stats()
    assert logged["train/samples"] == mod.trained and logged["val/corrupt_image"] == va["corrupt_image"]
    with pytest.raises(ValueError, match="split='test'"):
        dm.stats("test")


def test_tar_damage_counted_once_per_pass_and_empty_tars_counted(tmp_path):
    good = tmp_path / "a-000000.tar"
    with wds.TarWriter(str(good)) as w:
        for i in range(6):
            w.write(_sample(i))
    data = good.read_bytes()
    (tmp_path / "b-000001.tar").write_bytes(data[: len(data) // 2 + 100])  # truncated
    with wds.TarWriter(str(tmp_path / "c-000002.tar")):
        pass  # a valid tar without samples
    (tmp_path / "d-000003.tar").write_bytes(b"")  # 0 bytes
    dm = VLTDataModule(train_shards=str(tmp_path), val_shards=str(tmp_path), max_length=256, batch_size=2,
                       num_workers=0, pack=False)
    dm.setup("fit")
    ids = [i for b in dm.val_dataloader() for i in b["sample_ids"]]
    st = dm.stats("val")
    assert st["tar_error"] == 1  # one truncated tar, one pass
    assert st["empty_shard"] == 2  # the tar without members and the 0-byte file
    assert st["samples"] == len(ids) >= 6 + 1
    # without a manifest the epoch length counts what the truncated tar holds before the damage
    n = dm._count_samples(dm._train_files)
    assert n == len(ids)


def test_huge_images_are_skipped_before_decoding_and_named_by_source_row(tmp_path, caplog):
    big = image_bytes(Image.new("RGB", (1500, 1000), (255, 0, 0)))
    with wds.TarWriter(str(tmp_path / "s-000000.tar")) as w:
        w.write(_sample(0))
        w.write(_sample(1, big))
    dm = VLTDataModule(train_shards=str(tmp_path), val_shards=str(tmp_path), max_length=2048, batch_size=2,
                       num_workers=0, max_image_pixels=1_000_000)
    with caplog.at_level(logging.WARNING):
        ids = [i for b in dm.val_dataloader() for i in b["sample_ids"]]
    assert ids == ["000000"] and dm.stats("val")["image_too_large"] == 1
    msg = " ".join(r.getMessage() for r in caplog.records if "image_too_large" in r.getMessage())
    assert "rows.jsonl:2" in msg and "1500x1000" in msg
    with pytest.raises(ValueError, match="max_image_pixels=0"):
        VLTDataModule(train_shards=str(tmp_path), max_image_pixels=0)


def test_large_jpeg_is_decoded_at_a_reduced_scale():
    buf = io.BytesIO()
    Image.new("RGB", (2400, 1600), (10, 200, 30)).save(buf, "JPEG")
    proc = ImageProcessor(max_pixels=28 * 28 * 64)  # target about 252x168
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        x = proc(im)
        decoded = im.size
    assert decoded[0] <= 2400 // 4 and decoded[1] <= 1600 // 4  # draft mode: 1/8 scale still >= target
    assert tuple(x.shape[1:]) == proc.target_size(1600, 2400)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        im.load()
        full = proc(im)  # the same picture decoded in full: a flat colour, so equal up to JPEG rounding
    torch.testing.assert_close(x, full, rtol=0, atol=0.05)
