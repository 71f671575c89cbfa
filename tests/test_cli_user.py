"""Day one as a user (issue 21 items 2-4, 6-8; issue 16 item 10): what the CLI lists, how a config
mistake is reported, a user's own mixer module through `imports:`, the config and hyperparameters
every logger gets, and what `vlt predict` / `vlt test` read and write."""
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import vlt
from vlt.cli import main

TINY_MODEL = '{"decoder": {"hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "num_kv_heads": 2}}'


def tiny_args(tmp_path, steps=2, **synth):
    spec = {"task": "color", "num_train": 48, "num_val": 8, "image_size": 28, "seed": 0,
            "cache_dir": str(tmp_path / "synth"), **synth}
    return ["--config", "quickstart", f"--model.init_args.model={TINY_MODEL}", f"--trainer.max_steps={steps}",
            "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1", "--trainer.accelerator=cpu",
            f"--data.init_args.synthetic={json.dumps(spec)}", "--data.init_args.max_length=96",
            "--data.init_args.batch_size=2", "--data.init_args.num_workers=0"]


def run_dirs(root):
    return sorted(Path(root).glob("**/version_*"))


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VLT_DEBUG", raising=False)


def config_error(capsys, argv) -> list[str]:
    """stderr lines from vlt's error line on, of a run that must stop with exit code 2 (Lightning's
    own log lines, e.g. 'Seed set to 0', may come before it)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    first = next(i for i, ln in enumerate(lines) if ln.startswith("vlt: error:"))
    return lines[first:]


# ---- item 6: what the CLI can do --------------------------------------------------------------

def test_help_lists_every_subcommand_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict", "data", "bench", "generate", "export", "mixers", "recipes"):
        assert f"\n    {sub} " in out, sub
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"vlt {vlt.__version__}"
    assert vlt.__version__ == importlib.metadata.version("vlt")


def test_mixers_and_recipes_are_listed(capsys):
    from vlt.layers import list_mixers
    assert main(["mixers"]) == 0
    out = capsys.readouterr().out
    for name in list_mixers():
        assert any(line.startswith(f"{name} ") for line in out.splitlines()), name
    assert "window=4096" in out  # swa's option and its default
    assert main(["recipes"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line and not line.startswith(" ")]
    assert {"quickstart", "layouts/hybrid_1to3", "infinitevl/stage2_sft"} <= set(names)


# ---- item 3 + issue 16 item 10: config mistakes in one short line -------------------------------

def test_typo_under_mixers_names_the_users_key_path(tmp_path, capsys):
    err = config_error(capsys, ["fit", *tiny_args(tmp_path), "--model.init_args.mixers={swa: {windw: 3}}"])
    assert err[0].startswith("vlt: error: model.init_args.mixers.swa.windw: ")
    assert "did you mean 'window'" in err[0] and "allowed:" in err[0]
    assert len(err) <= 3 and "Namespace(" not in "\n".join(err) and "Traceback" not in "\n".join(err)
    assert run_dirs(tmp_path) == []  # a failed start leaves no empty version_N folder


def test_option_abbreviation_is_refused_with_the_right_name(tmp_path, capsys):
    err = config_error(capsys, ["fit", *tiny_args(tmp_path), "--trainer.max_step", "10"])
    assert err[0].startswith("vlt: error: unknown option --trainer.max_step ")
    assert "did you mean --trainer.max_steps?" in err[0] and len(err) <= 3


def test_synthetic_typo_lists_num_train_as_allowed(tmp_path, capsys):
    err = config_error(capsys, ["fit", *tiny_args(tmp_path, num_trian=5)])
    assert err[0].startswith("vlt: error: data.init_args.synthetic parameter(s) ['num_trian']")
    assert "did you mean 'num_train'" in err[0] and "'num_val'" in err[0]


def test_unavailable_backend_fails_before_any_step(tmp_path, capsys):
    err = config_error(capsys, ["fit", *tiny_args(tmp_path), "--model.init_args.mixers={swa: {backend: flash_attn}}"])
    msg = err[0]
    assert "backend='flash_attn' cannot run on this machine" in msg and "Available here: ['torch']" in msg
    assert "model.init_args.mixers.swa.backend" in msg
    assert run_dirs(tmp_path) == []


def test_class_path_that_cannot_import_says_why(tmp_path, capsys):
    err = config_error(capsys, ["fit", *tiny_args(tmp_path), "--model.init_args.layout=[swa, nopkg_x.mixers.Shift]"])
    assert err[0].startswith("vlt: error: model.init_args.layout[1]: ")
    assert "cannot import 'nopkg_x.mixers'" in err[0] and "No module named 'nopkg_x'" in err[0]


# ---- item 2: a user's own mixer module --------------------------------------------------------

USER_MIXER = '''
import torch
from torch import nn
from vlt.layers import TokenMixer, register_mixer


@register_mixer("{name}")
class TokenShift(TokenMixer):
    """Each token plus a fraction of the previous one (within its packed segment)."""
    def __init__(self, hidden_size: int, num_heads: int, mix: float = 0.5, layer_idx=None):
        super().__init__()
        self.mix = mix
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x, *, state=None, cu_seqlens=None, position_ids=None, use_cache=False):
        prev = torch.cat([x.new_zeros(x[:, :1].shape) if state is None else state, x[:, :-1]], 1)
        if cu_seqlens is not None:
            prev[:, cu_seqlens[:-1].long()] = 0
        return self.o_proj(self.q_proj(x + self.mix * prev)), (x[:, -1:] if use_cache else None)
'''


def test_user_mixer_module_trains_reruns_and_exports(tmp_path, capsys):
    mod = f"user_mixers_{os.getpid()}"  # unique: a module of this name must not be imported yet
    (tmp_path / f"{mod}.py").write_text(USER_MIXER.format(name=f"shift_{os.getpid()}"))
    (tmp_path / "mine.yaml").write_text(f"imports: [{mod}]\n")
    layout = f"--model.init_args.layout=[swa, shift_{os.getpid()}]"
    main(["fit", *tiny_args(tmp_path), "--config", "mine.yaml", layout])
    run = run_dirs(tmp_path)[0]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["imports"] == [mod]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["vlt_config"]["imports"] == [mod] and ckpt["vlt_layout"] == ["swa", f"shift_{os.getpid()}"]
    # the saved config re-runs with plain `vlt`, in a fresh process that has never imported the module
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rerun = subprocess.run([sys.executable, "-m", "vlt.cli", "fit", "--config", str(run / "config.yaml"),
                            "--trainer.max_steps=1"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len(run_dirs(tmp_path)) == 2
    # the export names the module, and loads in a fresh process
    assert main(["export", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", "exp"]) == 0
    meta = json.loads((tmp_path / "exp" / "vlt_config.json").read_text())
    assert meta["imports"] == [mod] and meta["model"]["imports"] == [mod]
    load = subprocess.run([sys.executable, "-c", "from vlt.checkpoint.export import load_pretrained_vlt; "
                           "print(load_pretrained_vlt('exp')[0].layout)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert load.returncode == 0 and f"shift_{os.getpid()}" in load.stdout, load.stderr[-2000:]


def test_import_flag_and_missing_module(tmp_path, capsys):
    mod = f"flag_mixers_{os.getpid()}"
    (tmp_path / f"{mod}.py").write_text(USER_MIXER.format(name=f"flagshift_{os.getpid()}"))
    assert main(["mixers", "--import", mod]) == 0
    assert f"flagshift_{os.getpid()} " in capsys.readouterr().out
    main(["fit", *tiny_args(tmp_path, steps=1), "--import", mod, f"--model.init_args.layout=[flagshift_{os.getpid()}]"])
    assert yaml.safe_load((run_dirs(tmp_path)[0] / "config.yaml").read_text())["imports"] == [mod]
    err = config_error(capsys, ["fit", *tiny_args(tmp_path), "--import", "no_such_mixers_mod"])
    assert err[0].startswith("vlt: error: imports: cannot import 'no_such_mixers_mod'")


# ---- item 4: config per run and comparable hyperparameters whatever the logger -----------------

def test_wandb_offline_keeps_config_per_run_and_logs_the_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = ['--trainer.logger={"class_path": "lightning.pytorch.loggers.WandbLogger", '
              '"init_args": {"project": "vlt", "save_dir": "lightning_logs"}}']
    seen = []

    def spy(self, params, *a, **k):
        seen.append(dict(params))
    from lightning.pytorch.loggers import WandbLogger
    orig = WandbLogger.log_hyperparams
    monkeypatch.setattr(WandbLogger, "log_hyperparams",
                        lambda self, params, *a, **k: (spy(self, params), orig(self, params))[1])
    import wandb
    for _ in range(2):  # two runs, as two `vlt fit` commands would be
        main(["fit", *tiny_args(tmp_path, steps=1), *logger])
        wandb.finish()
    assert not (tmp_path / "lightning_logs" / "config.yaml").exists()
    ckpts = sorted((tmp_path / "lightning_logs").glob("vlt/*/checkpoints"))
    assert len(ckpts) == 2  # two runs, each with its own directory ...
    for c in ckpts:  # ... holding the config beside the checkpoints
        assert yaml.safe_load((c.parent / "config.yaml").read_text())["trainer"]["max_steps"] == 1
    extra = [p for p in seen if "stage" in p]
    assert len(extra) == 2
    assert extra[0]["layout"] == "[swa, gdn, gdn, gdn]" and extra[0]["stage"] == "vlt.training.sft.InstructionTuning"
    assert extra[0]["trainer"]["max_steps"] == 1 and extra[0]["model_config"]["decoder"]["hidden_size"] == 64


def test_csv_hparams_hold_expanded_layout_stage_and_trainer(tmp_path):
    main(["fit", *tiny_args(tmp_path, steps=1)])
    hp = yaml.safe_load((run_dirs(tmp_path)[0] / "hparams.yaml").read_text())
    assert hp["layout"] == "[swa, gdn, gdn, gdn]"  # the module's own hparam was null (named model)
    assert hp["stage"] == "vlt.training.sft.InstructionTuning" and hp["trainer"]["max_steps"] == 1


# ---- item 7: predict writes JSONL; test names its split -----------------------------------------

def test_predict_writes_jsonl_and_test_uses_its_own_split(tmp_path, capsys):
    main(["fit", *tiny_args(tmp_path, steps=2, num_test=4)])
    run = run_dirs(tmp_path)[0]
    ckpt = ["--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    main(["predict", "--config", str(run / "config.yaml"), "--predictions.path=preds.jsonl", *ckpt])
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["id"] for r in rows} == {f"{i:09d}" for i in range(4)}  # the 4 test samples' keys
    for r in rows:
        assert set(r) == {"id", "prompt", "prediction", "target"}
        assert r["prompt"].endswith("<|im_start|>assistant\n") and "What colour" in r["prompt"]
        assert r["target"] and "<|im_end|>" not in r["target"]
    capsys.readouterr()
    main(["test", "--config", str(run / "config.yaml"), *ckpt])
    assert "VALIDATION" not in capsys.readouterr().err


def test_test_without_a_test_split_says_it_is_the_validation_set(tmp_path, capsys):
    main(["fit", *tiny_args(tmp_path, steps=1)])
    run = run_dirs(tmp_path)[0]
    capsys.readouterr()
    main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert "no test split" in capsys.readouterr().err


def test_predict_greedy_loop_matches_full_forward_argmax():
    """The cached decode loop predicts what argmax over a full forward of the grown sequence does."""
    from vlt.config import VLMConfig
    from vlt.model import VLM
    from vlt.predict import greedy_answer, split_last_answer
    torch.manual_seed(0)
    model = VLM(VLMConfig.from_name("tiny-hybrid", decoder={"hidden_size": 64, "intermediate_size": 128})).eval()
    ids = torch.randint(0, 250, (20,))
    labels = torch.full((20,), -100)
    labels[15:18] = ids[15:18]
    prompt, target = split_last_answer(ids, labels)
    assert prompt.tolist() == ids[:15].tolist() and target.tolist() == ids[15:18].tolist()
    got = greedy_answer(model, prompt, None, eos_ids=[], max_new_tokens=4)
    seq = prompt.tolist()
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[15:]


# ---- item 8: the smaller ones -------------------------------------------------------------------

def test_inspect_histogram_has_whole_token_bins_without_empty_duplicates():
    from vlt.data.inspect import _text_histogram
    rows = _text_histogram([94] * 5 + [95] * 3 + [96])
    assert [r.split()[:2] for r in rows] == [["94", "5"], ["95", "3"], ["96", "1"]]
    wide = _text_histogram(list(range(10, 300)))
    assert len(wide) == 10 and sum(int(r.split()[1]) for r in wide) == 290
    assert wide[0].split()[0] == "10-38" and wide[-1].split()[0] == "271-299"


def test_synth_param_of_the_wrong_kind_and_shard_size(tmp_path, capsys):
    assert main(["data", "synth", "--task", "ocr", "--out", "o", "--param", "length=abc", "--quiet"]) == 2
    assert "length='abc' for task 'ocr': expected int" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["data", "synth", "--task", "count", "--out", "c", "--num-train", "3", "--num-val", "0",
                 "--shard-size", "2", "--param", "max_count=2", "--quiet"]) == 0
    assert len(list((tmp_path / "c" / "train").glob("*.tar"))) == 2  # --shard-size is samples per shard


def test_quickstart_validates_within_a_50_step_run():
    from vlt.cli import RECIPES
    trainer = yaml.safe_load((RECIPES / "quickstart.yaml").read_text())["trainer"]
    assert trainer["val_check_interval"] <= 50 and trainer["max_steps"] % trainer["val_check_interval"] == 0


def test_init_from_says_what_it_loaded(tmp_path, caplog):
    import logging
    main(["fit", *tiny_args(tmp_path, steps=1)])
    ckpt = run_dirs(tmp_path)[0] / "checkpoints" / "last.ckpt"
    with caplog.at_level(logging.INFO):
        main(["fit", *tiny_args(tmp_path, steps=1), f"--model.init_args.init_from={ckpt}"])
    assert any("init_from: loaded all" in r.getMessage() and str(ckpt) in r.getMessage() for r in caplog.records)


def test_a_model_tool_imports_only_its_own_module():
    """`vlt generate` (and the other model tools) build only their own parser: the training stack
    (Lightning) and the benchmarks are not imported before the command runs (seconds of start-up)."""
    import subprocess
    import sys
    code = ("import sys\nfrom vlt.cli import tool_main\ntry:\n    tool_main(['generate', '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning' "
            "or m.startswith('vlt.bench') or m == 'vlt.generate_cli'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "['vlt.generate_cli']", out[-500:]
