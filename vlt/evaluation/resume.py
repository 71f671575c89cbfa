"""Study runs that survive being cut: a ``vlt fit`` of ``vlt compare`` or the distillation study that a
timeout, a preemption or a 10-minute job limit killed resumes from its last checkpoint when the study is run
again with the same settings, instead of starting over (on an H200 a 500-step needle run took ~450 s, so
runs of a study cut every 10 minutes never finished while they restarted: 2026-12-02).

A run directory holds ``attempt.key``, the hash of the run's arguments, written before its fit starts.
Running it again with the same key passes ``--ckpt_path last_or_none`` (vlt fit resumes the newest
checkpoint under the run's root, or starts fresh when none was written yet); another key means other
settings, so the directory is cleared first and nothing of the old run is resumed."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

RESUME_ARGS = ["--ckpt_path", "last_or_none"]


def checkpoint_every(steps: int, grid: int = 1, target: int = 100) -> int:
    """Steps between a run's checkpoints: the largest multiple of ``grid`` that divides ``steps`` and is at
    most ``target`` (so the final step always gets one and at most ``target`` steps are redone after a cut);
    ``steps`` itself when no such divisor is at least steps / 20 (a checkpoint every step or two costs more
    than it saves)."""
    if steps <= 0 or grid <= 0:
        raise ValueError(f"checkpoint_every: steps and grid must be positive (got {steps}, {grid})")
    best = max((d for d in range(grid, min(steps, target) + 1, grid) if steps % d == 0), default=steps)
    return best if best * 20 >= steps else steps


def start_or_resume(run: Path, key: str, label: str) -> list[str]:
    """Prepare ``run`` for a fit with arguments hashed to ``key``: the extra ``vlt fit`` arguments (resume
    when the directory holds an attempt with this key, else none, after clearing what another attempt left)."""
    marker = run / "attempt.key"
    if marker.is_file() and marker.read_text().strip() == key:
        print(f"[{label}] resuming the cut run in {run} from its last checkpoint (if it wrote one)", file=sys.stderr)
        return list(RESUME_ARGS)
    shutil.rmtree(run, ignore_errors=True)   # another attempt's checkpoints must not be resumed into this one
    run.mkdir(parents=True)
    marker.write_text(key)
    return []


def resumed_step(run: Path) -> int | None:
    """The step a resumed fit of ``run`` continues from (its newest checkpoint), None when it has none."""
    from vlt.checkpoint.lightning import newest_checkpoint
    found = newest_checkpoint(str(run))
    return None if found is None else found[1]
