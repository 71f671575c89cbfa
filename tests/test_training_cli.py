"""Every stage end to end through the `vlt` CLI (argument lists, as a user types them) on tiny
configs: quickstart + saved-config re-run, resume equality, distillation (layer, kl), SFT chained
with init_from, long-sequence LoRA with adapter-only checkpoints, and DDP over 2 CPU processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlt.cli import main

TESTS = Path(__file__).parent
TINY_MODEL = '{"decoder": {"hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "num_kv_heads": 2}}'


def data_args(tmp_path, **synth):
    spec = {"task": "color", "num_train": 96, "num_val": 16, "image_size": 28, "seed": 0,
            "cache_dir": str(tmp_path / "synth"), **synth}
    return [f"--data.init_args.synthetic={json.dumps(spec)}", "--data.init_args.max_length=96",
            "--data.init_args.batch_size=2", "--data.init_args.num_workers=0"]


def common(tmp_path, steps, every=None):
    args = [f"--trainer.max_steps={steps}", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.log_every_n_steps=1", "--trainer.accelerator=cpu", *data_args(tmp_path)]
    if every:
        args.append(f"--checkpoint.every_n_train_steps={every}")
    return args


def fit(tmp_path, *args, steps=4, every=None, config="quickstart"):
    argv = ["fit", "--config", config, f"--model.init_args.model={TINY_MODEL}", *common(tmp_path, steps, every), *args]
    main(argv)


def versions(tmp_path):
    return sorted((tmp_path / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def losses(version_dir):
    import csv
    rows = list(csv.DictReader(open(version_dir / "metrics.csv")))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS))


def test_quickstart_cli_saves_config_that_reruns(tmp_path):
    fit(tmp_path, steps=4)
    run = versions(tmp_path)[0]
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["vlt_layout"] == ["swa", "gdn", "gdn", "gdn"]
    assert ckpt["vlt_config"]["decoder"]["hidden_size"] == 64
    metrics = open(run / "metrics.csv").read()
    for key in ("train/loss", "train/grad_norm", "perf/tokens_per_s", "val/answer_acc", "lr-AdamW"):
        assert key in metrics, key
    main(["fit", "--config", str(run / "config.yaml"), "--trainer.max_steps=2"])  # the saved config re-runs
    assert len(versions(tmp_path)) == 2
    ckpt_args = ["--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    main(["test", "--config", str(run / "config.yaml"), "--trainer.limit_test_batches=2", *ckpt_args])
    assert "test/answer_acc" in open(versions(tmp_path)[-1] / "metrics.csv").read()
    main(["predict", "--config", str(run / "config.yaml"), "--trainer.limit_predict_batches=1", *ckpt_args])


def test_resume_continues_the_uninterrupted_loss_curve(tmp_path):
    rec = ["--trainer.callbacks+=recorder.RecordBatches", f"--trainer.callbacks.out_dir={tmp_path}/rec-a"]
    fit(tmp_path, *rec, steps=8, every=4)
    straight = losses(versions(tmp_path)[0])
    # interrupted at step 4, then resumed from `last`
    rec_b = ["--trainer.callbacks+=recorder.RecordBatches", f"--trainer.callbacks.out_dir={tmp_path}/rec-b"]
    fit(tmp_path, *rec_b, steps=4, every=4)
    fit(tmp_path, "--ckpt_path", "last", *rec_b, steps=8, every=4)
    resumed = losses(versions(tmp_path)[-1])
    assert sorted(resumed) == [4, 5, 6, 7]
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), step
    a = [b["ids"] for f in sorted((tmp_path / "rec-a").glob("*.json")) for b in json.load(open(f))]
    b = [b["ids"] for f in sorted((tmp_path / "rec-b").glob("*.json")) for b in json.load(open(f))]
    assert len(a) == len(b) == 8 and a == b  # same samples in the same order across the interruption


def test_distillation_layer_then_kl_then_sft(tmp_path):
    teacher = json.dumps({"model_name": "tiny-hybrid", "layout": "[full] * 2",
                          "decoder": {"hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "num_kv_heads": 2}})
    distill = ["--model=vlt.training.Distillation", f"--model.init_args.teacher={teacher}",
               "--model.init_args.student_layout=[swa, gdn]", "--model.init_args.model=null"]
    main(["fit", "--config", "quickstart", *distill, "--model.init_args.phase=layer", *common(tmp_path, 3)])
    layer_run = versions(tmp_path)[-1]
    m = open(layer_run / "metrics.csv").read()
    assert "train/loss/mse" in m
    main(["fit", "--config", "quickstart", *distill, "--model.init_args.phase=kl",
          f"--model.init_args.init_from={layer_run}/checkpoints/last.ckpt", *common(tmp_path, 3)])
    kl_run = versions(tmp_path)[-1]
    assert "train/loss/kl" in open(kl_run / "metrics.csv").read()
    # stage II takes the student (layout included) from stage I's checkpoint
    main(["fit", "--config", "quickstart", "--model.init_args.model_name=null",
          f"--model.init_args.init_from={kl_run}/checkpoints/last.ckpt", *common(tmp_path, 2)])
    sft = torch.load(versions(tmp_path)[-1] / "checkpoints" / "last.ckpt", weights_only=False)
    assert sft["vlt_layout"] == ["swa", "gdn"]


def test_long_lora_saves_adapters_only_and_checks_layout(tmp_path, capsys):
    fit(tmp_path, steps=2)
    base = versions(tmp_path)[-1] / "checkpoints" / "last.ckpt"
    lora = ["--model=vlt.training.LongSequenceSFT", "--model.init_args.model_name=null", "--model.init_args.model=null",
            f"--model.init_args.init_from={base}", "--model.init_args.lora={r: 4, alpha: 8}"]
    main(["fit", "--config", "quickstart", *lora, *common(tmp_path, 2)])
    ckpt = torch.load(versions(tmp_path)[-1] / "checkpoints" / "last.ckpt", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k for k in keys)
    # export: adapters rebuilt on the init_from base; merged and unmerged exports compute the same
    from vlt.checkpoint.export import load_pretrained_vlt
    last = versions(tmp_path)[-1] / "checkpoints" / "last.ckpt"
    assert main(["export", "--ckpt", str(last), "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert main(["export", "--ckpt", str(last), "--out", str(tmp_path / "adapters")]) == 0
    merged, tok = load_pretrained_vlt(tmp_path / "merged")
    with_adapters, _ = load_pretrained_vlt(tmp_path / "adapters")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert any("lora_" in n for n, _ in with_adapters.named_parameters())
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapters(ids).logits, rtol=1e-4, atol=1e-5)
    assert tok is not None and tok.vocab_size == 264
    # the export records how the run templated its data (the quickstart trains without a system
    # prompt), which vlt generate / stream / chat then use by default
    from vlt.generate_cli import prompt_record
    rec = prompt_record(tmp_path / "merged")
    assert rec["system"] == "" and rec["max_pixels"] > 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a config error: one line on stderr, exit code 2
        fit(tmp_path, f"--model.init_args.init_from={base}", "--model.init_args.layout=[gdn] * 4", steps=1)
    assert e.value.code == 2 and "vlt: error: model.init_args.init_from " in capsys.readouterr().err


def test_ddp_two_cpu_processes_split_samples_evenly(tmp_path):
    """Real DDP (gloo) over 2 processes started by Lightning, as `vlt fit` would on 2 devices."""
    out = tmp_path / "rec"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "vlt.cli", "fit", "--config", "quickstart", f"--model.init_args.model={TINY_MODEL}",
           *common(tmp_path, 3), "--trainer.devices=2", "--trainer.strategy=ddp",
           "--trainer.callbacks+=recorder.RecordBatches", f"--trainer.callbacks.out_dir={out}"]
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, timeout=600)
    ranks = [json.load(open(f)) for f in sorted(out.glob("rank*.json"))]
    assert len(ranks) == 2 and len(ranks[0]) == len(ranks[1]) == 3
    ids = [{i for b in r for i in b["ids"]} for r in ranks]
    assert ids[0] and ids[1] and not (ids[0] & ids[1])


def test_distillation_from_a_qwen2_5_vl_checkpoint_directory(tmp_path):
    """Stage I from a real (tiny, random) Qwen2.5-VL saved by transformers: its tokenizer feeds the
    data module, the student keeps its vision tower, and both phases run through the CLI."""
    from vlt.testing import make_tiny_teacher
    teacher = make_tiny_teacher(tmp_path / "qwen", num_layers=4)
    distill = ["--model=vlt.training.Distillation", f"--model.init_args.teacher={teacher}",
               "--model.init_args.student_layout=[swa, gdn, gdn, gdn]",
               "--model.init_args.student_mixers={swa: {window: 64}}", f"--data.init_args.tokenizer={teacher}"]
    main(["fit", "--config", "quickstart", *distill, "--model.init_args.phase=layer", *common(tmp_path, 2)])
    layer = versions(tmp_path)[-1]
    ckpt = torch.load(layer / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["vlt_layout"] == ["swa", "gdn", "gdn", "gdn"]
    assert ckpt["vlt_config"]["vision"]["kind"] == "qwen2_5_vl"
    assert ckpt["vlt_config"]["decoder"]["mixers"]["swa"] == {"qkv_bias": True, "window": 64}
    main(["fit", "--config", "quickstart", *distill, "--model.init_args.phase=kl",
          f"--model.init_args.init_from={layer}/checkpoints/last.ckpt", *common(tmp_path, 2)])
    assert "train/loss/kl" in open(versions(tmp_path)[-1] / "metrics.csv").read()
