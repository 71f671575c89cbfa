"""Checkpoints under faults: a disk without room (checked before writing, and a write that fails),
torn temporaries of killed writers, `--ckpt_path last` across version folders, `last_or_none`,
a resumed run continuing in its checkpoint folder, kill -9 during a checkpoint write, and errors
that name a missing teacher or a corrupt init_from file."""
import errno
import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import vlt.checkpoint.lightning as ckpt_mod
from vlt.checkpoint import AtomicCheckpointIO, CheckpointSpaceError, load_model_state, newest_checkpoint
from vlt.cli import _rewrite_argv, find_last_checkpoint, main

TESTS = Path(__file__).parent
Usage = namedtuple("Usage", "total used free")
TINY_MODEL = '{"decoder": {"hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "num_kv_heads": 2}}'


def _ckpt(mb=1):
    return {"state_dict": {"model.w": torch.zeros(mb * 2**18)}, "optimizer_states": [{"m": torch.zeros(mb * 2**18)}],
            "global_step": 3}


def test_space_precheck_refuses_before_writing_and_names_the_fixes(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    calls = []
    monkeypatch.setattr(torch, "save", lambda *a, **k: calls.append(a))
    with pytest.raises(CheckpointSpaceError) as e:
        io.save_checkpoint(_ckpt(2), path)
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC and not calls  # refused before a byte was written
    assert "no space left" in msg and str(tmp_path) in msg and "1,000 bytes" in msg
    needed = int(msg.split("needs about ")[1].split(" bytes")[0].replace(",", ""))
    assert needed >= 2 * 2**20 * 2  # two 2 MiB float32 tensors at least
    for fix in ("--trainer.default_root_dir", "save_weights_only", "adapter_only_checkpoint"):
        assert fix in msg, fix
    assert path.read_bytes() == before and not list(tmp_path.glob(".*tmp*"))


def test_a_write_that_runs_out_of_space_says_so_and_leaves_no_torn_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    before = path.read_bytes()
    free = iter([10**12, 12345])  # room by the pre-check; the disk fills during the write (another writer)

    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: Usage(10**12, 0, next(free)))

    def full_disk(obj, f, *a, **k):  # what torch's zip writer raises on ENOSPC
        open(f, "wb").write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointSpaceError, match=r"no space left.*12,345 bytes .* free.*save_weights_only") as e:
        io.save_checkpoint(_ckpt(), path)
    assert "unexpected pos" in str(e.value.__cause__)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*tmp*"))


def test_torn_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    torn = tmp_path / f".last.ckpt.tmp-{int(dead.stdout)}"
    torn.write_bytes(b"torn")
    live = tmp_path / f".other.ckpt.tmp-{os.getppid()}"  # a live process (this one's parent) may still be writing
    live.write_bytes(b"writing")
    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    assert not torn.exists() and live.exists() and (tmp_path / "last.ckpt").is_file()


def test_last_is_the_highest_step_of_the_newest_run_folder(tmp_path):
    v0, v1 = (tmp_path / "lightning_logs" / f"version_{i}" / "checkpoints" for i in (0, 1))
    v0.mkdir(parents=True)
    v1.mkdir(parents=True)
    torch.save({"global_step": 20}, v0 / "last.ckpt")
    torch.save({"global_step": 21}, v1 / "epoch=0-step=21.ckpt")
    (v1 / ".last.ckpt.tmp-999999").write_bytes(b"torn by a kill")  # the newer run's last.ckpt never landed
    torch.save({"global_step": 10}, v1 / "epoch=0-step=10.ckpt")  # written last, lower step
    path, step = newest_checkpoint(tmp_path)
    assert (path, step) == (v1 / "epoch=0-step=21.ckpt", 21)
    args = find_last_checkpoint(["fit", f"--trainer.default_root_dir={tmp_path}", "--ckpt_path", "last"])
    assert args == ["--ckpt_path", str(v1 / "epoch=0-step=21.ckpt"), "--checkpoint.dirpath", str(v1.resolve()),
                    "--checkpoint.enable_version_counter", "false"]
    (v1 / "epoch=0-step=21.ckpt").write_bytes(b"not a zip")  # unreadable files are passed over
    os.rename(v1 / "epoch=0-step=21.ckpt", v1 / "last-v1.ckpt")
    assert newest_checkpoint(tmp_path) == (v1 / "epoch=0-step=10.ckpt", 10)


def test_last_or_none_starts_fresh_and_last_without_checkpoint_says_what_to_do(tmp_path, capsys):
    argv = ["fit", "--config", "x.yaml", f"--trainer.default_root_dir={tmp_path}", "--ckpt_path", "last_or_none"]
    assert "--ckpt_path" not in _rewrite_argv(argv)
    assert "starting fresh" in capsys.readouterr().err
    assert "--ckpt_path" not in _rewrite_argv([*argv[:-2], "--ckpt_path=last_or_none"])
    with pytest.raises(SystemExit, match="no checkpoint under .*last_or_none"):
        _rewrite_argv([*argv[:-1], "last"])


def _fit_args(tmp_path, steps, *extra):
    spec = {"task": "color", "num_train": 64, "num_val": 8, "image_size": 28, "seed": 0,
            "cache_dir": str(tmp_path / "s")}
    return ["fit", "--config", "quickstart", f"--model.init_args.model={TINY_MODEL}", f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=1", "--trainer.val_check_interval=4", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1", "--trainer.accelerator=cpu",
            "--checkpoint.every_n_train_steps=2", f"--data.init_args.synthetic={json.dumps(spec)}",
            "--data.init_args.max_length=96", "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", *extra]


def test_the_same_restart_command_starts_then_resumes_in_the_same_checkpoint_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(_fit_args(tmp_path, 2, "--ckpt_path", "last_or_none"))  # first launch: nothing to resume
    main(_fit_args(tmp_path, 4, "--ckpt_path", "last_or_none"))  # relaunch: resumes step 2
    logs = tmp_path / "lightning_logs"
    # the resumed run rotated the first run's files (step 2's replaced by step 4's) instead of adding
    # a second pair in its own version folder
    assert sorted(str(p.relative_to(logs)) for p in logs.glob("version_*/checkpoints/*.ckpt")) == \
        ["version_0/checkpoints/epoch=0-step=4.ckpt", "version_0/checkpoints/last.ckpt"]
    assert (logs / "version_1" / "metrics.csv").is_file()  # its logs still go to a version of their own
    assert torch.load(logs / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


def _run(cmd, tmp_path, check=True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "vlt.cli", *cmd], cwd=tmp_path, env=env, check=check, timeout=600,
                          capture_output=True, text=True)


def _weights(path):
    c = torch.load(path, weights_only=False)
    return c["state_dict"], c["optimizer_states"][0]["state"], c["global_step"]


def test_kill_9_during_a_checkpoint_write_then_resume_equals_the_uninterrupted_run(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    _run(_fit_args(tmp_path, 6), ref)
    # killed in the middle of writing step 4's checkpoint: step 2's files are the newest complete ones
    p = _run(_fit_args(tmp_path, 6, "--trainer.callbacks+=faults.KillDuringSave", "--trainer.callbacks.step=4"),
             run, check=False)
    assert p.returncode == -9, p.stderr[-2000:]
    ck = run / "lightning_logs" / "version_0" / "checkpoints"
    assert list(ck.glob(".*.tmp-*")), "the kill left a torn temporary"
    # then a plain kill -9 right after step 5 of the resumed run, and a final resume
    p = _run(_fit_args(tmp_path, 6, "--ckpt_path", "last", "--trainer.callbacks+=faults.KillAt",
                       "--trainer.callbacks.step=5"), run, check=False)
    assert p.returncode == -9 and "resuming from" in p.stderr and "step 2)" in p.stderr, p.stderr[-2000:]
    _run(_fit_args(tmp_path, 6, "--ckpt_path", "last"), run)
    assert not list(ck.glob(".*.tmp-*"))  # cleaned at the next write
    a_state, a_opt, a_step = _weights(ref / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    b_state, b_opt, b_step = _weights(ck / "last.ckpt")
    assert a_step == b_step == 6
    for k in a_state:  # same batches, same arithmetic: bit-for-bit (tolerance zero)
        torch.testing.assert_close(b_state[k], a_state[k], rtol=0, atol=0, msg=k)
    for i in a_opt:
        for k in a_opt[i]:
            torch.testing.assert_close(b_opt[i][k], a_opt[i][k], rtol=0, atol=0)


def test_missing_teacher_and_corrupt_init_from_are_named(tmp_path):
    from vlt.training import Distillation, InstructionTuning
    with pytest.raises(FileNotFoundError, match=r"teacher '.*nope' does not exist.*Qwen2.5-VL directory"):
        Distillation(teacher=str(tmp_path / "nope"), student_layout="[swa, gdn]")
    with pytest.raises(FileNotFoundError, match=r"init_from '.*gone.ckpt' does not exist") as e:
        load_model_state(tmp_path / "gone.ckpt")
    assert "Qwen2.5-VL" not in str(e.value)
    bad = tmp_path / "torn.ckpt"
    bad.write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(ValueError, match=r"init_from '.*torn.ckpt' could not be read as a checkpoint.*truncated"):
        InstructionTuning(model_name="tiny-hybrid", init_from=str(bad))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match="without vlt_config.json"):
        load_model_state(tmp_path / "emptydir")
