#!/usr/bin/env python
"""Chaos test of resuming (not in the default suite; issue 16): kill -9 a quickstart run N times at
random moments and check that the run finished by the same restart command (`--ckpt_path
last_or_none`) ends with the weights and optimizer state of an uninterrupted run, bit for bit.

    OMP_NUM_THREADS=1 python tools/chaos_resume.py --kills 5 --steps 150 --every 10 --seed 0

Launches are repeated until the run completes; after the first, each of the next ``--kills`` is
killed 0.05-0.35 x the reference run's wall time after it starts (so some die at startup, most
mid-training; a run that finishes first ends the chaos early: the JSON says how many kills landed).
The first launch is killed in the middle of a checkpoint write (tests/faults.py's
KillDuringSave at a random checkpoint step), so torn temporaries are part of every run. Prints one
JSON line (launches, kill times, steps resumed from, max |difference|) and exits 1 on a mismatch.
The model is the quickstart's own (tiny-hybrid) on its synthetic colour task, with fewer steps.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def fit_args(steps: int, every: int, cache: Path) -> list[str]:
    synth = {"task": "color", "num_train": 2000, "num_val": 32, "image_size": 56, "seed": 0, "cache_dir": str(cache)}
    return ["fit", "--config", "quickstart", f"--trainer.max_steps={steps}", "--trainer.accelerator=cpu",
            "--trainer.val_check_interval=25", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--checkpoint.every_n_train_steps={every}",
            f"--data.init_args.synthetic={json.dumps(synth)}", "--ckpt_path", "last_or_none"]


def launch(args: list[str], cwd: Path, log) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "vlt.cli", *args], cwd=cwd, env=env, stdout=log, stderr=log)


def final_state(run: Path) -> dict:
    from vlt.checkpoint.lightning import newest_checkpoint
    path, step = newest_checkpoint(run)
    c = torch.load(path, weights_only=False, map_location="cpu")
    return {"step": step, "path": str(path), "state": c["state_dict"], "opt": c["optimizer_states"][0]["state"]}


def max_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for k in a["state"]:
        worst = max(worst, float((a["state"][k].double() - b["state"][k].double()).abs().max()))
    for i in a["opt"]:
        for k, v in a["opt"][i].items():
            if torch.is_tensor(v):
                worst = max(worst, float((v.double() - b["opt"][i][k].double()).abs().max()))
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="vlt-chaos-"))
    ref, run, cache = work / "ref", work / "run", work / "synth"
    ref.mkdir(parents=True, exist_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    args = fit_args(a.steps, a.every, cache)

    t0 = time.monotonic()
    with open(work / "reference.log", "w") as f:
        if launch(args, ref, f).wait() != 0:
            print(f"reference run failed; see {work / 'reference.log'}", file=sys.stderr)
            return 2
    ref_wall = time.monotonic() - t0

    kills, resumed_from, launches, done = [], [], 0, False
    # the first launch dies inside a checkpoint write in the first third, leaving the rest to the random kills
    torn_step = rng.randrange(a.every, max(a.every + 1, a.steps // 3), a.every)
    while not done:
        extra = ["--trainer.callbacks+=faults.KillDuringSave", f"--trainer.callbacks.step={torn_step}"] \
            if launches == 0 else []
        out = work / f"launch{launches}.log"
        with open(out, "w") as f:
            p = launch(args + extra, run, f)
            launches += 1
            if launches == 1 or len(kills) >= a.kills:
                p.wait()
            else:  # a random moment: startup, a step, a validation pass, or a checkpoint write
                delay = rng.uniform(0.05, 0.35) * ref_wall
                try:
                    p.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)
                    p.wait()
                    kills.append(round(delay, 1))
        m = re.search(r"resuming from \S+ \(step (\d+)\)", out.read_text())
        resumed_from.append(int(m.group(1)) if m else None)
        done = p.returncode == 0
        if p.returncode not in (0, -signal.SIGKILL):
            print(f"launch {launches} failed (rc {p.returncode}); see {out}", file=sys.stderr)
            return 2
    a_state, b_state = final_state(ref), final_state(run)
    diff = max_diff(a_state, b_state) if a_state["step"] == b_state["step"] else float("inf")
    torn = [str(p) for p in run.glob("**/checkpoints/.*.tmp-*")]
    ok = diff == 0.0 and b_state["step"] == a_state["step"] == a.steps and not torn
    print(json.dumps({"ok": ok, "steps": a.steps, "launches": launches, "random_kills": len(kills),
                      "kill_after_s": kills, "killed_in_checkpoint_write_at_step": torn_step,
                      "resumed_from_steps": resumed_from, "reference_wall_s": round(ref_wall, 1),
                      "final_step": b_state["step"], "max_abs_diff": diff, "torn_files_left": torn,
                      "ckpt_files": sorted(str(p.relative_to(run)) for p in run.glob("**/checkpoints/*.ckpt")),
                      "workdir": str(work)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
