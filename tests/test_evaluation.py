"""Evaluation (vlt.evaluation, ``vlt eval``): the scoring functions on hand-computed cases, ``vlt eval``
end to end on a tiny export over synthetic shards and over a LLaVA JSONL with images written here
(a random model scores ~0, so the tests check structure, counts and that every prediction is the
eager reference's greedy output for that prompt), and the bad inputs users hit."""
import json

import pytest
import torch
from PIL import Image

from vlt.config import VLMConfig
from vlt.evaluation.scoring import (anls, distance_bucket, exact_match, length_bucket, levenshtein, metric_for,
                                    normalise_answer, numeric_match, parse_number)
from vlt.model import VLM

WINDOW = 16


# ------------------------------------------------------------------------------------------ scoring
def test_normalisation_and_exact_match():
    assert normalise_answer("  The shape is   Blue. ") == "shape is blue"
    assert exact_match("Blue!", "blue") == 1.0
    assert exact_match("a blue", "Blue") == 1.0           # articles dropped
    assert exact_match("blue circle", "blue") == 0.0      # an extra word is a different answer
    assert exact_match("red", ["blue", "red"]) == 1.0     # any acceptable reference
    with pytest.raises(ValueError, match="empty"):
        exact_match("x", [])


def test_numeric_match():
    assert parse_number("There are 3 shapes") == 3.0
    assert parse_number("three") == 3.0 and parse_number("1,000 dots") == 1000.0 and parse_number("3,5") == 3.5
    assert parse_number("none") is None
    assert numeric_match("I count 3.", "3") == 1.0
    assert numeric_match("three", "3") == 1.0
    assert numeric_match("3.0", "3") == 1.0
    assert numeric_match("4", "3") == 0.0
    assert numeric_match("many", "3") == 0.0
    assert numeric_match("3 or 4", "4") == 0.0            # the first number is the answer


def test_anls_hand_computed():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert anls("AB3D", "AB3E") == pytest.approx(0.75, abs=1e-12)     # 1 - 1/4
    assert anls("ab3d", "AB3D") == 1.0                                 # case-insensitive
    assert anls("ABCD", "WXYZ") == 0.0                                 # NLD 1 >= 0.5
    assert anls("AB", "ABCD") == 0.0                                   # NLD exactly 0.5: below threshold only counts
    assert anls("ABCDEFG", "ABCDEFGH") == pytest.approx(1 - 1 / 8, abs=1e-12)
    assert anls("HELLO", ["WORLD", "HELL0"]) == pytest.approx(0.8, abs=1e-12)  # best reference


def test_metric_choice_and_buckets():
    assert metric_for("count", "3") == "numeric" and metric_for("ocr", "AB") == "anls"
    assert metric_for("color", "red") == "exact" and metric_for("needle", "X1") == "anls"
    assert metric_for("default", "12") == "numeric" and metric_for("default", "a cat") == "exact"
    assert metric_for("count", "3", "exact") == "exact"
    with pytest.raises(ValueError, match="metric='bleu'"):
        metric_for("x", "y", "bleu")
    assert [length_bucket(n) for n in (1, 128, 129, 4096, 200_000)] == ["<=128", "<=128", "129-256", "2049-4096",
                                                                         ">131072"]
    assert [distance_bucket(d, 16) for d in (16, 17, 33, 65)] == ["in window", "1-2x window", "2-4x window",
                                                                  ">4x window"]
    assert distance_bucket(5, None) == "no window"


# --------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from vlt.checkpoint.export import save_pretrained_vlt
    torch.manual_seed(0)
    model = VLM(VLMConfig.from_name("tiny-hybrid", decoder={"mrope_section": [4, 6, 6], "head_dim": 32,
                                                              "mixers": {"swa": {"window": WINDOW}}})).eval()
    with torch.no_grad():  # at init every prompt ends in the same "\n" prediction; larger weights make the
        for name, p in model.named_parameters():  # output depend on the image and text, so equality has teeth
            if p.dim() >= 2 and "embed" not in name:
                p.mul_(3)
    return save_pretrained_vlt(model, tmp_path_factory.mktemp("eval") / "export", tokenizer_dir="byte",
                               prompt={"system": "", "min_pixels": 56 * 56, "max_pixels": 56 * 56})


def _vlt(*argv):
    from vlt.cli import main
    return main(["eval", *[str(a) for a in argv], "--device", "cpu", "--no-progress"])


def _eager_tokens(export, data, images=None):
    """Each evaluable sample's greedy tokens from the eager reference loop, prompt by prompt."""
    from vlt.evaluation.runner import media_inputs, prepare
    from vlt.evaluation.samples import Skips, read_samples
    from vlt.checkpoint.export import load_pretrained_vlt
    from vlt.generate_cli import image_processor
    from vlt.inference import generate_eager
    model, tok = load_pretrained_vlt(export)
    proc = image_processor(export, model, None)
    out = {}
    for raw in read_samples(str(data), images, Skips()):
        p = prepare(raw, tok, proc, "", True, Skips())
        if p is None:
            continue
        media = media_inputs(p, proc, "cpu", torch.float32)
        new = generate_eager(model, torch.tensor([p.ids]), media, max_new_tokens=5,
                             eos_token_id=[tok.eos_id, tok.pad_id])[0].tolist()
        cut = next((i for i, t in enumerate(new) if t in (tok.eos_id, tok.pad_id)), len(new))
        out[raw.id] = (new[:cut], p.ids)
    return out


def test_eval_on_synthetic_shards(export, tmp_path, capsys):
    from vlt.data.shards import write_synthetic
    from vlt.data.tokenizer import ByteTokenizer, build_prompt_ids
    shards = tmp_path / "shards"
    write_synthetic(str(shards), "mix", 7, seed=0, split="val", weights={"color": 1, "count": 1, "needle": 1},
                    task_params={"needle": {"num_frames": 3}})
    out = tmp_path / "out"
    # batch 3 over 7 prompts of different lengths (stills, 3-frame videos): a last, partial batch too
    assert _vlt("--ckpt", export, "--data", shards, "--max-new-tokens", 5, "--batch-size", 3, "--out", out) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert printed.splitlines()[0].split() == ["task", "metric", "n", "score", "exact"] and "all" in printed
    report = json.loads((out / "eval.json").read_text())
    s = report["summary"]
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert s["n"] == len(preds) == 7 and s["skipped"]["total"] == 0
    assert sum(t["n"] for t in s["tasks"].values()) == 7
    assert {t: r["metric"] for t, r in s["tasks"].items()} == {t: {"color": "exact", "count": "numeric",
                                                                   "needle": "anls"}[t] for t in s["tasks"]}
    assert report["settings"]["window"] == WINDOW and report["settings"]["batch_size"] == 3
    for name in ("eval.md", "eval.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG" and "| task | metric |" in (out / "eval.md").read_text()
    # the batched engine's output is the eager loop's greedy output, for every prompt
    eager = _eager_tokens(export, shards)
    assert {p["id"]: p["tokens"] for p in preds} == {k: v[0] for k, v in eager.items()}
    assert len({tuple(p["tokens"]) for p in preds}) >= 3  # the outputs depend on the prompt
    # answers with no end token within --max-new-tokens are flagged, counted and warned about (scores of cut answers)
    cut = [p["id"] for p in preds if len(p["tokens"]) == 5]
    assert [p["id"] for p in preds if p["cut_at_max_new_tokens"]] == cut and s["cut_at_max_new_tokens"] == len(cut)
    assert (f"{len(cut)} of 7 answers reached --max-new-tokens 5 without an end token" in captured.err) == bool(cut)
    tok = ByteTokenizer()
    for p in preds:
        assert p["prediction"] == tok.decode(p["tokens"]).strip()
        if p["task"] == "color":  # a 56x56 image is 2x2 merged tokens; system '' as the export records
            conv = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}]
            assert p["prompt_tokens"] == len(build_prompt_ids(tok, conv, [4], system=""))
    # evidence distance of a needle: from frame k's <|vision_start|> to the prompt's end. A frame is
    # "<t=0.0s>" (8) + start + 4 pads + end = 14 tokens; frame k's block is 6 tokens, then 2 - k frames,
    # then "\nWhat code appeared?" (20) + <|im_end|> + "\n" + <|im_start|> + "assistant\n" (10) = 33
    needles = [p for p in preds if p["task"] == "needle"]
    assert needles and "needle" in s["by_distance"]
    from vlt.evaluation.samples import Skips, read_samples
    frame = {r.id: r.meta["needle_frame"] for r in read_samples(str(shards), None, Skips()) if r.task == "needle"}
    for p in needles:
        assert p["evidence_distance"] == 6 + 14 * (2 - frame[p["id"]]) + 33
    assert sum(b["n"] for b in s["by_distance"]["needle"].values()) == len(needles)


def test_a_model_the_engine_cannot_hold_is_evaluated_by_the_eager_loop(tmp_path, caplog):
    """A layer whose growing state the engine cannot hold (its state_spec does not follow the capacity;
    a test mixer) makes the engine refuse the model: `vlt eval` says so and decodes each sample with
    the eager loop, giving the eager loop's greedy answers."""
    import growing_mixer  # noqa: F401  (registers test_growing_unsized)
    from vlt.checkpoint.export import save_pretrained_vlt
    from vlt.data.shards import write_synthetic
    torch.manual_seed(0)
    model = VLM(VLMConfig.from_name("tiny-hybrid", decoder={"layout": "[swa, test_growing_unsized]",
                                                              "mrope_section": [4, 6, 6], "head_dim": 32})).eval()
    export = save_pretrained_vlt(model, tmp_path / "export", tokenizer_dir="byte",
                                 prompt={"system": "", "min_pixels": 56 * 56, "max_pixels": 56 * 56})
    shards = tmp_path / "shards"
    write_synthetic(str(shards), "mix", 3, seed=0, split="val", weights={"color": 1, "count": 1})
    with caplog.at_level("WARNING", logger="vlt"):
        assert _vlt("--ckpt", export, "--data", shards, "--max-new-tokens", 5, "--batch-size", 3,
                    "--out", tmp_path / "out") == 0
    assert "test_growing_unsized" in caplog.text and "eager path" in caplog.text
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3
    assert {p["id"]: p["tokens"] for p in preds} == {k: v[0] for k, v in _eager_tokens(export, shards).items()}


def test_eval_on_the_layout_tasks_measures_each_evidence_distance(export, tmp_path):
    """needle at planned token distances, dense OCR, multi-image: vlt eval's measured distance of a needle
    is the distance the generator planned (both count the byte tokenizer's tokens, 4 per 56x56 frame),
    and a multi-image question's is counted from the named image's block."""
    from vlt.data.shards import write_synthetic
    from vlt.evaluation.samples import Skips, read_samples
    shards = tmp_path / "shards"
    write_synthetic(str(shards), "mix", 12, seed=0, split="val",
                    weights={"needle": 2, "dense_ocr": 1, "multi_image": 1},
                    task_params={"needle": {"num_frames": 8, "distances": [20, 40, 100]},
                                 "multi_image": {"mode": "which", "num_images": 3}})
    out = tmp_path / "out"
    assert _vlt("--ckpt", export, "--data", shards, "--max-new-tokens", 4, "--batch-size", 4, "--out", out) == 0
    s = json.loads((out / "eval.json").read_text())["summary"]
    preds = {p["id"]: p for p in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    raws = {r.id: r for r in read_samples(str(shards), None, Skips())}
    assert {p["task"] for p in preds.values()} == {"needle", "dense_ocr", "multi_image"}
    assert s["tasks"]["dense_ocr"]["metric"] == "anls" and s["tasks"]["multi_image"]["metric"] == "exact"
    tail = len("\nWhich image shows the red shape?") + 3 + len("assistant\n")  # no colour name is longer than 7
    for k, p in preds.items():
        meta = raws[k].meta
        if p["task"] == "needle":
            assert p["evidence_distance"] == meta["planned_distance"]
        elif p["task"] == "multi_image":
            # image j's block (6 tokens), then "\nImage i: " (10) + block (6) for each image after it, the question
            q = raws[k].conversations[0]["value"].rsplit("\n", 1)[1]
            after = 2 - meta["evidence_image"]
            assert p["evidence_distance"] == 6 + 16 * after + tail - len("Which image shows the red shape?") + len(q)
        else:
            assert p["evidence_distance"] is None
    assert {"needle", "multi_image"} <= set(s["by_distance"])
    n_needle = sum(p["task"] == "needle" for p in preds.values())
    assert sum(b["n"] for b in s["by_distance"]["needle"].values()) == n_needle
    # window 16: 20 and 40 tokens are 1-4x the window, 100 beyond 4x
    assert set(s["by_distance"]["needle"]) <= {"1-2x window", "2-4x window", ">4x window"}


def test_layout_task_generators_are_exact_and_checked():
    """Answers follow from what is drawn, distances are where they were asked for, bad parameters name
    the parameter."""
    from vlt.data.synthetic import COLORS, check_params, generate_record, sample_rng
    for i in range(6):
        r = generate_record("dense_ocr", sample_rng(0, "t", i), num_strings=5, length=3)
        key = r.conversations[0]["value"].split("after ")[1].rstrip("?")
        assert len(r.conversations[1]["value"]) == 3 and r.conversations[1]["value"].isdigit() and len(key) == 1
        assert r.meta["codes"][r.meta["keys"].index(key)] == r.conversations[1]["value"] and len(r.meta["keys"]) == 5
        r = generate_record("multi_image", sample_rng(0, "t", i), mode="which", num_images=3)
        colour = r.conversations[0]["value"].split("the ")[-1].split(" shape")[0]
        j = int(r.conversations[1]["value"]) - 1
        has = [COLORS[colour] in set(im.getdata()) for im in r.images]
        assert has == [k == j for k in range(3)] and r.meta["evidence_image"] == j
        r = generate_record("multi_image", sample_rng(0, "t", i), mode="same")
        colours = [{c for c in im.getdata() if c != (128, 128, 128)} for im in r.images]
        assert r.conversations[1]["value"] == ("yes" if colours[0] == colours[1] else "no")
        r = generate_record("needle", sample_rng(0, "t", i), num_frames=10, code_kind="color", distances=[60, 120])
        assert r.conversations[1]["value"] in COLORS and r.meta["planned_distance"] >= 60
        shape = r.frames[r.meta["needle_frame"]]
        assert COLORS[r.conversations[1]["value"]] in set(shape.getdata())
    # the latest frame at least the asked distance back: one frame later would be nearer than asked
    r = generate_record("needle", sample_rng(0, "t", 0), num_frames=10, distances=[100])
    assert 100 <= r.meta["planned_distance"] < 100 + 15
    with pytest.raises(ValueError, match="needle.num_frames=4"):
        generate_record("needle", sample_rng(0, "t", 0), num_frames=4, distances=[500])
    with pytest.raises(ValueError, match=r"multi_image.mode='pick'.*'which'"):
        generate_record("multi_image", sample_rng(0, "t", 0), mode="pick")
    with pytest.raises(ValueError, match="code_kind"):
        generate_record("needle", sample_rng(0, "t", 0), code_kind="audio")
    with pytest.raises(ValueError, match="num_string"):
        check_params("dense_ocr", {"num_string": 3})
    check_params("needle", {"distances": [10], "code_kind": "color"})


def test_layout_tasks_from_vlt_data_and_recipes(tmp_path):
    from vlt.data.cli import main as data_main
    from vlt.data.datamodule import VLTDataModule
    for task in ("dense_ocr", "multi_image"):
        assert data_main(["synth", "--task", task, "--out", str(tmp_path / task), "--num-train", "3", "--num-val", "0",
                          "--quiet"]) == 0
        assert json.loads((tmp_path / task / "train" / "manifest.json").read_text())["num_samples"] == 3
    assert data_main(["synth", "--task", "needle", "--out", str(tmp_path / "n"), "--num-train", "2", "--num-val", "0",
                      "--param", "num_frames=6", "--param", "distances=[30]", "--quiet"]) == 0
    dm = VLTDataModule(synthetic={"task": "multi_image", "num_train": 4, "num_val": 0, "mode": "more",
                                  "cache_dir": str(tmp_path / "c")}, batch_size=2, num_workers=0, max_length=256)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] >= 1 and len(batch["images"]) >= 2


def _jsonl(tmp_path, rows):
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (56, 56), (230, 25, 25)).save(img / "red.png")
    Image.new("RGB", (84, 56), (30, 60, 235)).save(img / "blue.jpg")
    f = tmp_path / "eval.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f, img


def q(text, answer=None):
    conv = [{"from": "human", "value": text}]
    return conv + ([{"from": "gpt", "value": answer}] if answer is not None else [])


def test_eval_on_a_llava_jsonl_counts_skips(export, tmp_path, capsys):
    f, img = _jsonl(tmp_path, [
        {"id": "a", "image": "red.png", "conversations": q("<image>\nWhat colour?", "red")},
        {"id": "b", "images": ["blue.jpg"], "task": "count", "conversations": q("<image>\nHow many?", "1")},
        {"id": "c", "conversations": q("Say hi."), "answer": "hi"},                # top-level answer
        {"id": "d", "image": "red.png", "conversations": q("<image>\nWhat colour?")},   # no answer
        {"id": "e", "image": "gone.png", "conversations": q("<image>\nWhat colour?", "red")},  # missing image
        {"id": "f", "conversations": q("Two words?", "two words")},
    ])
    out = tmp_path / "out"
    assert _vlt("--ckpt", export, "--data", f, "--images", img, "--max-new-tokens", 5, "--batch-size", 2,
                "--out", out) == 0
    err = capsys.readouterr().err
    s = json.loads((out / "eval.json").read_text())["summary"]
    assert s["n"] == 4 and s["skipped"]["by_reason"] == {"no_answer": 1, "missing_image": 1}
    assert "skipped 2 rows" in err and "gone.png" in err and "eval.jsonl:4" in err
    assert s["tasks"]["count"] == {"n": 1, "score": s["tasks"]["count"]["score"], "exact": s["tasks"]["count"]["exact"],
                                   "metric": "numeric"}
    assert s["tasks"]["default"]["n"] == 3 and s["tasks"]["default"]["metric"] == "exact"
    preds = {json.loads(line)["id"]: json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()}
    assert preds["c"]["reference"] == "hi"
    eager = _eager_tokens(export, f, str(img))
    assert {k: p["tokens"] for k, p in preds.items()} == {k: v[0] for k, v in eager.items()}
    # --tasks and --limit select before generation
    assert _vlt("--ckpt", export, "--data", f, "--images", img, "--tasks", "default", "--limit", 2,
                "--max-new-tokens", 2, "--out", out) == 0
    assert json.loads((out / "eval.json").read_text())["summary"]["n"] == 2


def test_bad_inputs_are_clear_errors(export, tmp_path, capsys):
    f, img = _jsonl(tmp_path, [{"id": "d", "image": "red.png", "conversations": q("<image>\nWhat colour?")},
                               {"id": "e", "image": "gone.png", "conversations": q("<image>\nWhat?", "red")}])
    assert _vlt("--ckpt", export, "--data", f, "--out", tmp_path / "o") == 2   # images are in img/, not beside
    err = capsys.readouterr().err
    assert "no sample left to evaluate" in err and "missing_image" in err and "no_answer" in err
    assert _vlt("--ckpt", export, "--data", tmp_path / "nope.jsonl", "--out", tmp_path / "o") == 2
    assert "nope.jsonl' does not exist; give a LLaVA-format JSON/JSONL file" in capsys.readouterr().err
    assert _vlt("--ckpt", export, "--data", f, "--images", img, "--tasks", "ocr", "--out", tmp_path / "o") == 2
    assert "--tasks ['ocr']" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    # a model whose embedding is smaller than the tokenizer's ids
    (dict(vision={"kind": "none"}, decoder={"vocab_size": 200}, image_token_id=None, video_token_id=None,
          vision_start_token_id=None), "the tokenizer has 264 ids but the model's vocabulary"),
    # same size, but its image token is another id than the tokenizer's <|image_pad|>
    (dict(image_token_id=250), "image_token_id=250 but its tokenizer's id is 261")])
def test_a_checkpoint_of_another_vocabulary(tmp_path, capsys, overrides, message):
    from vlt.checkpoint.export import save_pretrained_vlt
    torch.manual_seed(0)
    model = VLM(VLMConfig.from_name("tiny-hybrid", **overrides)).eval()
    ckpt = save_pretrained_vlt(model, tmp_path / "other", tokenizer_dir="byte")
    f, img = _jsonl(tmp_path, [{"id": "f", "conversations": q("Two words?", "two words")}])
    assert _vlt("--ckpt", ckpt, "--data", f, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert message in err and "export it with the tokenizer it was trained with" in err


def test_eval_is_a_registered_subcommand(capsys):
    from vlt.cli import TOOLS, main
    assert "eval" in TOOLS
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0 and "--max-new-tokens" in capsys.readouterr().out


# ------------------------------------------------------------------------- validation during training
def test_generation_eval_callback_logs_per_task_keys_and_leaves_training_alone(tmp_path, monkeypatch):
    """vlt fit with the callback every 2 steps: val/<task>/acc and val/gen/acc land in metrics.csv at
    steps 2 and 4, and the loss curve is the one of the same run without the callback."""
    import csv
    from test_training_cli import common  # the CLI tests' tiny fit arguments
    from vlt.cli import main
    from vlt.data.shards import write_synthetic
    monkeypatch.chdir(tmp_path)
    held_out = tmp_path / "held_out"
    write_synthetic(str(held_out), "mix", 4, seed=1, split="val", image_size=28, weights={"color": 1, "count": 1})
    tiny = '{"decoder": {"hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "num_kv_heads": 2}}'
    cb = json.dumps([{"class_path": "vlt.training.generation_eval.GenerationEval",
                      "init_args": {"data": str(held_out), "every_n_steps": 2, "limit": 4, "max_new_tokens": 3}}])

    def run(root, *extra):
        main(["fit", "--config", "quickstart", f"--model.init_args.model={tiny}", *common(tmp_path, 4),
              f"--trainer.default_root_dir={root}", "--trainer.logger.init_args.save_dir=" + str(root), *extra])
        return list(csv.DictReader(open(next((tmp_path / root).glob("lightning_logs/version_*/metrics.csv")))))

    with_cb, without = run("a", f"--trainer.callbacks={cb}"), run("b")
    keys = {"val/color/acc", "val/count/acc", "val/gen/acc"}
    logged = [r for r in with_cb if r.get("val/gen/acc")]
    assert keys <= set(with_cb[0]) and [int(r["step"]) for r in logged] == [2, 4]
    for r in logged:
        assert all(0.0 <= float(r[k]) <= 1.0 for k in keys if r[k])
    loss = lambda rows: {r["step"]: r["train/loss"] for r in rows if r.get("train/loss")}  # noqa: E731
    assert loss(with_cb) == loss(without) and len(loss(without)) == 4


def test_engine_options_parse_and_name_the_bad_key():
    from vlt.eval_cli import engine_options
    assert engine_options(["graphs=false", "compile=none", "fused=none", "pdl=true"]) == \
        {"graphs": False, "compile": None, "fused": None, "pdl": True}
    assert engine_options(["compile=inductor"]) == {"compile": "inductor"}
    keys = r"\['graphs', 'fused', 'pack', 'pdl', 'chunk_attention', 'compile'\]"
    with pytest.raises(ValueError, match=r"'graph=false'.*" + keys):
        engine_options(["graph=false"])
    with pytest.raises(ValueError, match="pdl takes true or false$"):
        engine_options(["pdl=none"])


def test_dense_ocr_grid_puts_one_glyph_per_cell():
    """dense_ocr cell=C: a row per string, one character per C x C square (key, blank, code), so with C =
    patch x merge each image token holds one glyph; the asked row's code is the answer."""
    import numpy as np
    from vlt.data.synthetic import generate_record, sample_rng
    r = generate_record("dense_ocr", sample_rng(0, "t", 3), num_strings=4, length=2, cell=28)
    img = np.asarray(r.images[0].convert("L"))
    assert img.shape == (4 * 28, 4 * 28)
    cells = img.reshape(4, 28, 4, 28).min(axis=(1, 3))            # darkest pixel per cell
    assert (cells[:, 1] == 255).all() and (cells[:, [0, 2, 3]] < 128).all()
    assert r.conversations[1]["value"] == r.meta["answer"] and len(r.meta["answer"]) == 2
    # glyphs stay inside their cells: no ink on the cell borders
    grid = img.reshape(4, 28, 4, 28)
    assert grid[:, [0, 27]].min() > 128 and grid[:, :, :, [0, 27]].min() > 128
    with pytest.raises(ValueError, match="dense_ocr.cell"):
        generate_record("dense_ocr", sample_rng(0, "t", 0), cell=4)
