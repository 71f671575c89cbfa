"""A non-finite step is skipped (weights and optimizer state untouched), counted and logged; K in a
row stop the run leaving the finite checkpoints; ranks agree (gloo, 2 processes); the CLI path."""
import copy
import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from vlt.checkpoint import AtomicCheckpointIO
from vlt.cli import main
from vlt.training import InstructionTuning
from vlt.training.nonfinite import NonFiniteGuard, NonFiniteLossError, _any_rank

TESTS = Path(__file__).parent
TINY = {"decoder": {"hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2}}


@pytest.fixture(scope="module")
def batches(color_batches):
    return color_batches


def poisoned(batch):
    b = copy.deepcopy(batch)
    for img in b["images"]:
        img.fill_(float("nan"))
    return b


def make_module(tokens, **kw):
    torch.manual_seed(0)
    return InstructionTuning(model_name="tiny-hybrid", model=TINY, tokens=tokens, lr=3e-3, schedule="constant", **kw)


def fit(module, data, precision="32-true", **kw):
    loader = torch.utils.data.DataLoader(data, batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(max_steps=len(data), accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        precision=precision, **kw)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_nonfinite_step_is_skipped_and_weights_equal_a_run_without_that_batch(batches, precision, caplog):
    data, tokens = batches
    a, b = make_module(tokens), make_module(tokens)
    for (_, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb)
    with caplog.at_level(logging.WARNING, logger="vlt"):
        fit(a, data[:2] + [poisoned(data[2])] + data[2:5], precision)  # nan images at step 2
    fit(b, data[:5], precision)  # the same batches without the poisoned one
    assert a._nonfinite.skipped == 1 and b._nonfinite.skipped == 0
    assert any("step 2: non-finite loss" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    # AdamW left the skipped step out entirely (no moment, weight-decay or step-count update), and the
    # constant schedule gives both runs the same lr: the same arithmetic, so tolerance zero
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.isfinite(pa).all(), name
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    sa, sb = a.trainer.optimizers[0].state, b.trainer.optimizers[0].state
    pa = [p for g in a.trainer.optimizers[0].param_groups for p in g["params"]]
    pb = [p for g in b.trainer.optimizers[0].param_groups for p in g["params"]]
    for x, y in zip(pa, pb):
        assert float(sa[x]["step"]) == float(sb[y]["step"]) == 5.0
        torch.testing.assert_close(sa[x]["exp_avg_sq"], sb[y]["exp_avg_sq"], rtol=0, atol=0)


def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_finite_checkpoint(batches, tmp_path):
    data, tokens = batches
    mod = make_module(tokens, max_nonfinite_skips=3)
    ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=2, save_last=True,
                                             save_top_k=-1)
    bad = data[:2] + [poisoned(d) for d in data[2:6]]
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps.*max_nonfinite_skips=3"):
        fit(mod, bad, callbacks=[ck], enable_checkpointing=True, plugins=[AtomicCheckpointIO()])
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4 and last["vlt_nonfinite"]["skipped"] == 2  # written after two skips
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    first = torch.load(tmp_path / "epoch=0-step=2.ckpt", weights_only=False)
    for k, v in first["state_dict"].items():  # the skipped steps 3 and 4 left the weights as at step 2
        torch.testing.assert_close(v, last["state_dict"][k], rtol=0, atol=0)
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_a_checkpoint_is_never_written_from_nonfinite_weights(batches):
    mod = make_module(batches[1])
    with torch.no_grad():
        next(mod.model.parameters())[0].fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="refusing to write a checkpoint"):
        mod.on_save_checkpoint({"state_dict": {}})
    with pytest.raises(ValueError, match="max_nonfinite_skips=0"):
        NonFiniteGuard(0)


def _two_rank_worker(rank, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), float("nan")) if rank == 1 else torch.ones(3)  # only rank 1 went bad
    guard = NonFiniteGuard(5)
    guard.record_loss(torch.tensor(1.0))
    skipped, _ = guard.check([p], step=7)
    result = {"any": _any_rank(rank == 1, torch.device("cpu")), "skipped": skipped, "grad_cleared": p.grad is None}
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def test_every_rank_agrees_to_skip_gloo(tmp_path):
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        assert json.loads((tmp_path / f"{r}.json").read_text()) == {"any": True, "skipped": True, "grad_cleared": True}


def _cli_args(tmp_path, steps):
    spec = {"task": "color", "num_train": 64, "num_val": 8, "image_size": 28, "seed": 0,
            "cache_dir": str(tmp_path / "s")}
    return ["fit", "--config", "quickstart", '--model.init_args.model={"decoder": {"hidden_size": 64, '
            '"intermediate_size": 128, "num_heads": 4, "num_kv_heads": 2}}', f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=1", "--trainer.val_check_interval=3", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1", "--trainer.accelerator=cpu",
            f"--data.init_args.synthetic={json.dumps(spec)}", "--data.init_args.max_length=96",
            "--data.init_args.batch_size=2", "--data.init_args.num_workers=0"]


def test_cli_run_with_a_nan_step_finishes_finite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS))
    main([*_cli_args(tmp_path, 5), "--trainer.callbacks+=faults.PoisonImages", "--trainer.callbacks.steps=[2]"])
    run = tmp_path / "lightning_logs" / "version_0"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    skipped = {int(r["step"]): float(r["train/skipped_nonfinite"]) for r in rows if r.get("train/skipped_nonfinite")}
    assert skipped[1] == 0 and skipped[2] == 1 and skipped[4] == 1
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    assert losses[2] != losses[2] and all(losses[s] == losses[s] for s in (3, 4))  # nan at 2 only
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_ddp_ranks_skip_together(tmp_path):
    """2 gloo processes, nan on rank 1 only: both skip the same step and keep equal, finite weights."""
    out = tmp_path / "faults"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vlt.cli", *_cli_args(tmp_path, 4), "--trainer.devices=2", "--trainer.strategy=ddp",
           "--trainer.callbacks+=faults.PoisonImages", "--trainer.callbacks.steps=[1]", "--trainer.callbacks.rank=1",
           f"--trainer.callbacks.out_dir={out}"]
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, timeout=600)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert [e["skipped"] for e in r0] == [e["skipped"] for e in r1] == [0, 1, 1, 1]
    assert all(e["finite"] for e in r0 + r1)
    for e0, e1 in zip(r0, r1):  # DDP replicas stay identical (same all-reduced gradients, same skips)
        assert e0["weights_sum"] == pytest.approx(e1["weights_sum"], rel=0, abs=0)


def test_under_a_grad_scaler_an_overflowing_gradient_is_left_to_the_scaler():
    p = torch.nn.Parameter(torch.ones(2))
    guard = NonFiniteGuard(3)
    for _ in range(5):  # fp16 scale calibration overflows several steps in a row: not a reason to stop
        p.grad = torch.tensor([float("inf"), 1.0])
        guard.record_loss(torch.tensor(2.0))
        assert guard.check([p], step=0, grad_scaler=True)[0] is False and p.grad is not None
    guard.record_loss(torch.tensor(float("nan")))  # a nan loss is still a skipped step
    assert guard.check([p], step=5, grad_scaler=True)[0] is True and p.grad is None and guard.skipped == 1
