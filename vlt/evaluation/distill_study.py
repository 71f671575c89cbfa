"""Issue 17's phenomenon row 3 at small scale: a hybrid converted from a full-attention teacher vs the
same hybrid trained from scratch, in optimizer steps to reach a fraction of the teacher's accuracy.

    python -m vlt.evaluation.distill_study --out /tmp/distill --teacher-steps 500 --eval-every 25 \\
        --set=--trainer.accelerator=gpu          # tools/gpu-phenomena.sh (ROWS=3) runs it this way

Runs, every one ``vlt fit --config BASE`` on the same synthetic set (``--task``, default ``mix``,
generated once into ``OUT/data``; the test split is only ever evaluated), model seed ``--seed``:

1. ``teacher``: the base recipe's shapes with full attention in every layer, ``--teacher-steps``;
2. ``layer``, ``kl``: the teacher converted to ``--layout`` (``vlt.training.Distillation``, mimic init,
   as recipes/infinitevl/stage1_layer.yaml and stage1_kl.yaml), ``--layer-steps`` then ``--kl-steps``;
3. ``student``: SFT (``InstructionTuning``) from the KL checkpoint, at most ``--student-steps``;
4. ``scratch``: the same layout and shapes from random init, the same SFT, at most ``--scratch-steps``.

Each run's generation accuracy (``GenerationEval``: greedy answers scored as ``vlt eval`` scores them)
on the first ``--num-eval`` test samples every ``--eval-every`` steps (``kl``: at its end) is appended to
``runs/NAME/curve.jsonl``. The teacher's accuracy is its last point; the bar is ``--fraction`` of it;
``student`` and ``scratch`` stop at their first point at or above the bar. The student's steps count
the stage I steps too. ``row()`` turns the curves into the table row (``verdict()``); it reads only
what is on disk, so a study cut by a timeout still gives a row from the runs it finished.
A run whose record (``run.json``) matches its arguments and those of the runs it starts from is reused; one
cut before its end (a timeout, a job limit) resumes from its last checkpoint (``vlt.evaluation.resume``).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

from vlt.evaluation.resume import checkpoint_every, resumed_step, start_or_resume
from vlt.training.generation_eval import GenerationEval

VERDICTS = ("reproduced", "not reproduced", "inconclusive")
TOL = 1e-9  # accuracies are means of per-sample scores: "at the bar" allows float rounding of fraction * acc
RUNS = ("teacher", "layer", "kl", "student", "scratch")
TITLE = "a converted student reaches the teacher's accuracy in a fraction of the from-scratch steps"


class AccuracyCurve(GenerationEval):
    """GenerationEval that appends each evaluation to ``out_file`` (JSON lines: step, acc, per task)
    and, with ``stop_at``, ends the fit at the first evaluation whose ``val/gen/acc`` reaches it."""

    def __init__(self, out_file: str, stop_at: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.out_file, self.stop_at = out_file, stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        before = self._ran_at
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._ran_at == before:  # no evaluation at this step
            return
        acc = self.last["val/gen/acc"]
        with open(self.out_file, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "acc": acc, "tasks": {
                k.split("/")[1]: v for k, v in self.last.items() if k != "val/gen/acc"}}) + "\n")
        if self.stop_at is not None and acc >= self.stop_at - TOL:
            trainer.should_stop = True


# ------------------------------------------------------------------------------------ the verdict
def steps_to_bar(curve: list[dict], bar: float, offset: int = 0) -> int | None:
    """The first ``offset + step`` of ``curve`` (points {step, acc}, in step order) with acc >= bar (within
    TOL), or None when no point reaches it."""
    return next((offset + p["step"] for p in curve if p["acc"] >= bar - TOL), None)


def verdict(teacher_acc: float, baseline: float, student: int | None, student_seen: int, scratch: int | None,
            scratch_seen: int, expected_ratio: float = 0.10, min_gain: float = 0.20) -> dict:
    """The row's verdict from steps to the bar (None: not reached by the last evaluation, at ``*_seen``).

    The ratio is student / scratch steps. A run that never reached the bar bounds it: scratch unseen
    up to S gives ratio < student / S, the student unseen up to S gives ratio > S / scratch; a bound
    decides when it is on the right side of ``expected_ratio``, else the row is inconclusive, as it
    is when the teacher is not ``min_gain`` above the majority-answer baseline (nothing to distil)."""
    if teacher_acc < baseline + min_gain - TOL:
        return {"kind": "inconclusive", "ratio": None, "ratio_bound": None, "text": (
            f"inconclusive: the teacher ({100 * teacher_acc:.1f}%) is not {100 * min_gain:.0f} points above the "
            f"majority-answer baseline ({100 * baseline:.1f}%)")}
    want = f"<= {100 * expected_ratio:.0f}%"
    if student is not None and scratch is not None:
        r = student / scratch
        ok = r <= expected_ratio + TOL
        return {"kind": VERDICTS[0] if ok else VERDICTS[1], "ratio": r, "ratio_bound": "=", "text": (
            f"{'reproduced' if ok else 'not reproduced'}: {student} / {scratch} steps = {100 * r:.1f}% ({want})")}
    if student is not None and scratch_seen > 0:  # scratch needs more than scratch_seen steps
        r = student / scratch_seen
        if r <= expected_ratio + TOL:
            return {"kind": "reproduced", "ratio": r, "ratio_bound": "<", "text": (
                f"reproduced (a bound): scratch did not reach the bar in {scratch_seen} steps, so the ratio is "
                f"< {student} / {scratch_seen} = {100 * r:.1f}% ({want})")}
        return {"kind": "inconclusive", "ratio": r, "ratio_bound": "<", "text": (
            f"inconclusive: scratch did not reach the bar in {scratch_seen} steps; ratio < {100 * r:.1f}% does not "
            f"decide {want} (more scratch steps would)")}
    if student is None and scratch is not None:
        r = student_seen / scratch
        if r > expected_ratio + TOL:
            return {"kind": "not reproduced", "ratio": r, "ratio_bound": ">", "text": (
                f"not reproduced: the student did not reach the bar in {student_seen} steps, scratch did in "
                f"{scratch}: ratio > {100 * r:.1f}% ({want})")}
        return {"kind": "inconclusive", "ratio": r, "ratio_bound": ">", "text": (
            f"inconclusive: the student did not reach the bar in its {student_seen} steps, which is within "
            f"{want} of scratch's {scratch}")}
    if student is not None:   # scratch has no evaluation yet (its run was cut or not started)
        return {"kind": "inconclusive", "ratio": None, "ratio_bound": None, "text": (
            f"inconclusive: the student reached the bar in {student} steps; scratch has no evaluation yet "
            f"({scratch_seen} steps), so there is no ratio")}
    return {"kind": "inconclusive", "ratio": None, "ratio_bound": None, "text": (
        f"inconclusive: neither the student ({student_seen} steps) nor scratch ({scratch_seen} steps) reached "
        "the bar")}


def majority_baseline(test_dir: str, n: int) -> float:
    """Mean score of answering every sample of a task with that task's most common reference, on the
    first ``n`` test samples (those GenerationEval scores), each with its task's metric (ANLS gives near
    misses partial credit, so this is the floor a model that ignores the image reaches)."""
    from vlt.evaluation.samples import Skips, read_samples
    from vlt.evaluation.scoring import metric_for, score
    rows = []
    for s in read_samples(test_dir, None, Skips()):
        rows.append((s.task, s.reference if isinstance(s.reference, str) else s.reference[0], s.reference))
        if len(rows) >= n:
            break
    common = {t: Counter(a for u, a, _ in rows if u == t).most_common(1)[0][0] for t in {t for t, _, _ in rows}}
    return sum(score(common[t], ref, metric_for(t, ref)) for t, _, ref in rows) / len(rows)


# ---------------------------------------------------------------------------------------- the runs
def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", required=True, help="the study's folder (data, runs, distill.json)")
    p.add_argument("--config", default="layouts/base", help="the base recipe every run trains with")
    p.add_argument("--layout", default="hybrid_1to3", help="the student's layout recipe, or NAME=PATTERN")
    p.add_argument("--task", default="mix", help="synthetic task (as vlt data synth)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="generator parameter")
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--num-eval", type=int, default=300, help="test samples every evaluation scores")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="the model seed of every run")
    for name, default in (("teacher", 500), ("layer", 25), ("kl", 25), ("student", 500), ("scratch", 1000)):
        p.add_argument(f"--{name}-steps", type=int, default=default)
    p.add_argument("--eval-every", type=int, default=25, help="steps between evaluations of teacher, student, scratch")
    p.add_argument("--layer-lr", type=float, default=1e-3)
    p.add_argument("--kl-lr", type=float, default=1e-3)
    p.add_argument("--student-lr", type=float, default=None, help="the student's SFT lr (default: the recipe's)")
    p.add_argument("--fraction", type=float, default=0.95, help="the bar: this fraction of the teacher's accuracy")
    p.add_argument("--expected-ratio", type=float, default=0.10, help="expected student / scratch steps at most")
    p.add_argument("--min-gain", type=float, default=0.20, help="inconclusive unless the teacher is this far above "
                   "the majority-answer baseline")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--mixers", default=None, metavar="JSON",
                   help="mixer options merged over the layout recipe's, for the teacher's layers too, e.g. "
                        "'{\"full\": {\"backend\": \"torch\"}, \"gdn\": {\"backend\": \"torch\"}}'")
    p.add_argument("--set", action="append", default=[], metavar="ARG", help="an argument for every vlt fit")
    p.add_argument("--check", action="store_true", help="check the arguments and stop")
    return p


def check(args) -> None:
    """ValueError naming the option for settings the study cannot run with."""
    from vlt.data.cli import parse_kv
    from vlt.data.synthetic import check_params
    for key in ("num_train", "num_eval", "teacher_steps", "layer_steps", "kl_steps", "student_steps", "scratch_steps",
                "eval_every", "eval_batch_size", "max_new_tokens"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1 (got {getattr(args, key)})")
    for key in ("teacher_steps", "student_steps", "scratch_steps"):  # the last step is an evaluation
        if getattr(args, key) % args.eval_every:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(args, key)} is not a multiple of --eval-every "
                             f"{args.eval_every}")
    for key in ("fraction", "expected_ratio"):
        if not 0 < getattr(args, key) <= 1:
            raise ValueError(f"--{key.replace('_', '-')} must be in (0, 1] (got {getattr(args, key)})")
    check_params(args.task, parse_kv(args.param))
    _layouts(args)
    warning = short_teacher_warning(args)
    if warning:
        print(f"[distill] warning: {warning}", file=sys.stderr)


def short_teacher_warning(args) -> str | None:
    """The student's steps include stage I, and a from-scratch run usually gets to 95% of a teacher in
    fewer steps than the teacher itself trained; so with stage I >= expected_ratio x teacher steps the ratio
    can hardly come out at or below expected_ratio (on a CPU, 2026-12-02: teacher 500 steps, stage I 50,
    scratch at the bar after 125-500 steps)."""
    stage1 = args.layer_steps + args.kl_steps
    if stage1 < args.expected_ratio * args.teacher_steps:
        return None
    return (f"stage I ({args.layer_steps} + {args.kl_steps} steps, counted in the student's) is at least "
            f"--expected-ratio {args.expected_ratio:g} x --teacher-steps {args.teacher_steps}, and a from-scratch run "
            f"usually reaches the bar in fewer steps than the teacher had, so a ratio <= {args.expected_ratio:.0%} "
            f"can hardly show; train the teacher longer (e.g. --teacher-steps "
            f"{int(3 * stage1 / args.expected_ratio)}) or shorten stage I")


def _layouts(args) -> tuple[list[str], list[str], dict]:
    """(teacher layers, student layers, student mixer options): the student's recipe at its period's depth."""
    from vlt.evaluation.compare import merge_mixer_options, read_layout_recipe
    try:
        name, layers, mixers = read_layout_recipe(args.layout)
    except ValueError as e:  # vlt compare's message, which names its own --layouts
        raise ValueError(str(e).replace("--layouts:", "--layout:", 1)) from None
    if all(x in ("full", "swa") for x in layers):
        raise ValueError(f"--layout {args.layout!r} has no layer to convert (only attention: {layers})")
    return ["full"] * len(layers), layers, merge_mixer_options(mixers, args.mixers)


def _params(config: str, teacher_layers: list[str], layers: list[str], mixers: dict) -> dict:
    """Parameter counts as vlt fit builds the models (the student keeps the teacher's MLP width)."""
    from vlt.compare_cli import base_model
    from vlt.evaluation.compare import count_params
    model_name, model = base_model(config)
    return {"teacher": count_params(model_name, model, teacher_layers, {}),
            "student": count_params(model_name, model, layers, mixers)}


def _pattern(layers: list[str]) -> str:
    return "[" + ", ".join(layers) + "]"


def _curve_args(args, run: Path, every: int, stop_at: float | None, test_dir: Path) -> list[str]:
    a = ["--trainer.callbacks+=vlt.evaluation.distill_study.AccuracyCurve", f"--trainer.callbacks.out_file={run}/"
         "curve.jsonl", f"--trainer.callbacks.data={test_dir}", f"--trainer.callbacks.every_n_steps={every}",
         f"--trainer.callbacks.limit={args.num_eval}", f"--trainer.callbacks.max_new_tokens={args.max_new_tokens}",
         f"--trainer.callbacks.batch_size={args.eval_batch_size}"]
    return a + ([f"--trainer.callbacks.stop_at={stop_at!r}"] if stop_at is not None else [])


def _fit(args, name: str, argv: list[str], upstream: str, steps: int | None, study_key: str) -> dict:
    """Run (or reuse) one vlt fit in ``OUT/runs/NAME``; ``steps``: the step its last.ckpt must be at;
    ``study_key`` marks the run as this study's (row() reads no run left by a study with other settings)."""
    from vlt.cli import main as vlt_main
    run = Path(args.out) / "runs" / name
    key = hashlib.sha1(json.dumps([argv, upstream]).encode()).hexdigest()
    record = run / "run.json"
    if record.is_file() and json.loads(record.read_text()).get("key") == key:
        print(f"[distill] {name}: reusing {run}", file=sys.stderr)
        (run / "study.key").write_text(study_key)
        return json.loads(record.read_text())
    resume = start_or_resume(run, key, f"distill {name}")   # a run cut short continues from its checkpoint
    if resume:
        _keep_curve_until(run / "curve.jsonl", resumed_step(run))
    (run / "study.key").write_text(study_key)
    print(f"[distill] {name}: vlt {shlex.join(argv + resume)}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        rc = vlt_main(argv + resume)
    except SystemExit as e:  # a configuration error, already reported by the CLI
        rc = e.code
    if rc not in (0, None):
        raise RuntimeError(f"vlt fit for {name!r} failed (exit {rc}); see the message above")
    info = {"key": key, "wall_s": round(time.perf_counter() - t0, 2), "argv": argv}
    if steps is not None:  # a checkpoint the next run starts from: it must be the whole run's
        import torch
        last = glob.glob(str(run / "lightning_logs" / "version_*" / "checkpoints" / "last.ckpt"))
        got = torch.load(last[0], map_location="cpu", weights_only=False, mmap=True)["global_step"] if last else None
        if got != steps:
            raise RuntimeError(f"vlt fit for {name!r} stopped at step {got} of {steps} ({last})")
        info["ckpt"] = last[0]
    record.write_text(json.dumps(info, indent=1))
    return info


def _keep_curve_until(f: Path, step: int | None) -> None:
    """A resumed run re-evaluates the steps after its checkpoint: drop the cut attempt's points past it
    (all of them when it wrote no checkpoint and starts over)."""
    if not f.is_file():
        return
    pts = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    f.write_text("".join(json.dumps(p) + "\n" for p in pts if step is not None and p["step"] <= step))


def _ours(study: Path, name: str) -> bool:
    """Whether run ``name`` was started (or reused) by the study that study.json describes."""
    f = study / "runs" / name / "study.key"
    return f.is_file() and f.read_text() == json.loads((study / "study.json").read_text())["key"]


def curve(study: Path, name: str) -> list[dict]:
    """The run's evaluations so far ([] for a run not (yet) of this study)."""
    f = study / "runs" / name / "curve.jsonl"
    if not f.is_file() or not _ours(study, name):
        return []
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]


def run_study(args) -> Path:
    from vlt.data.cli import parse_kv
    from vlt.data.datamodule import ensure_synthetic, synthetic_dirs
    check(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_layers, layers, mixers = _layouts(args)
    spec = {"task": args.task, **parse_kv(args.param), "num_train": args.num_train, "num_val": 0,
            "num_test": args.num_eval, "seed": args.data_seed, "cache_dir": str((out / "data").resolve())}
    ensure_synthetic(spec)
    test_dir = synthetic_dirs(spec)[0].with_name("test")
    settings = {**{k: v for k, v in vars(args).items() if k != "check"}, "command": command(args),
                "teacher_layout": _pattern(teacher_layers), "student_layout": _pattern(layers), "mixers": mixers,
                "baseline": majority_baseline(str(test_dir), args.num_eval), "data": spec,
                "params": _params(args.config, teacher_layers, layers, mixers)}
    settings["key"] = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    (out / "study.json").write_text(json.dumps(settings, indent=1))
    runs = out / "runs"

    def fit(name, steps, model_args, upstream="", keep_ckpt=True, every=args.eval_every, stop_at=None, curve=True):
        """One run: the base recipe on the study's data, ``model_args``, its accuracy curve; ``keep_ckpt``:
        its last.ckpt must be at ``steps`` (the next stage starts from it). Every run checkpoints on the
        evaluation grid (at most 100 steps apart) so that a cut run resumes (vlt.evaluation.resume)."""
        ckpt = [f"--checkpoint.every_n_train_steps={checkpoint_every(steps, grid=every)}"]
        argv = ["fit", "--config", args.config, f"--seed_everything={args.seed}", f"--trainer.max_steps={steps}",
                "--data.init_args.train_shards=null", "--data.init_args.val_shards=null",
                f"--data.init_args.synthetic={json.dumps(spec)}", f"--trainer.default_root_dir={runs / name}",
                f"--trainer.logger.init_args.save_dir={runs / name}", "--trainer.enable_model_summary=false",
                *ckpt, *args.set, *model_args,
                *(_curve_args(args, runs / name, every, stop_at, test_dir) if curve else [])]
        return _fit(args, name, argv, upstream, steps if keep_ckpt else None, settings["key"])

    hybrid = [f"--model.init_args.layout={_pattern(layers)}", f"--model.init_args.mixers={json.dumps(mixers)}"]
    # the teacher gets the same options (its full layers read only theirs: options of other mixers are unused)
    t = fit("teacher", args.teacher_steps, [f"--model.init_args.layout={_pattern(teacher_layers)}",
                                            f"--model.init_args.mixers={json.dumps(mixers)}"])
    bar = args.fraction * curve(out, "teacher")[-1]["acc"]
    # stage I as its recipes run it, with this study's teacher; a warm-up of a fifth of the phase (the
    # base recipe's 50 steps would outlast it); the teacher in fp32, as it was trained and evaluated
    distill = ["--model=vlt.training.Distillation", f"--model.init_args.teacher={t['ckpt']}",
               f"--model.init_args.student_layout={_pattern(layers)}",
               f"--model.init_args.student_mixers={json.dumps(mixers)}", "--model.init_args.init=mimic",
               "--model.init_args.teacher_dtype=float32"]
    def stage1(phase, steps, lr):
        return [*distill, f"--model.init_args.phase={phase}", f"--model.init_args.lr={lr}",
                f"--model.init_args.warmup_steps={steps // 5}"]
    lay = fit("layer", args.layer_steps, stage1("layer", args.layer_steps, args.layer_lr), t["key"], curve=False)
    kl = fit("kl", args.kl_steps, [*stage1("kl", args.kl_steps, args.kl_lr),
                                   f"--model.init_args.init_from={lay['ckpt']}"], lay["key"], every=args.kl_steps)
    # the student's SFT runs even when stage I already reached the bar (it then stops at its first
    # evaluation): its steps count from the KL run's point, and every study has the same runs
    lr = [f"--model.init_args.lr={args.student_lr}"] if args.student_lr is not None else []
    fit("student", args.student_steps, [*hybrid, f"--model.init_args.init_from={kl['ckpt']}", *lr], kl["key"],
        keep_ckpt=False, stop_at=bar)
    fit("scratch", args.scratch_steps, hybrid, keep_ckpt=False, stop_at=bar)
    return write(out)


def command(args) -> str:
    """The study as one shell command, every option spelled out."""
    parts = [sys.executable.rsplit("/", 1)[-1], "-m", "vlt.evaluation.distill_study"]
    for key, v in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if key == "check" or v is None or v == []:
            continue
        parts += [f"{flag}={x}" for x in v] if isinstance(v, list) else [flag, str(v)]
    return shlex.join(parts)


# ------------------------------------------------------------------------------------------ the row
def row(study) -> dict:
    """Row 3 of the phenomenon table from what the study left on disk (ValueError when the teacher
    did not finish: no bar without it). Runs cut short count as not reaching the bar by their last point."""
    study = Path(study)
    done = {n: (study / "runs" / n / "run.json").is_file() and _ours(study, n) for n in RUNS} \
        if (study / "study.json").is_file() else {}
    if not done.get("teacher"):
        raise ValueError(f"no finished teacher in {study}: nothing to measure against")
    s = json.loads((study / "study.json").read_text())
    teacher = curve(study, "teacher")
    teacher_acc = teacher[-1]["acc"]
    bar = s["fraction"] * teacher_acc
    stage1 = s["layer_steps"] + s["kl_steps"]
    kl, sft, scratch = curve(study, "kl"), curve(study, "student"), curve(study, "scratch")
    # the student's curve in total steps: after stage I (the KL run's last point), then its SFT
    student = [{**p, "step": s["layer_steps"] + p["step"]} for p in kl] + [{**p, "step": stage1 + p["step"]}
                                                                            for p in sft]
    st, sc = steps_to_bar(student, bar), steps_to_bar(scratch, bar)
    seen = {n: (c[-1]["step"] if c else 0) for n, c in (("student", student), ("scratch", scratch))}
    v = verdict(teacher_acc, s["baseline"], st, seen["student"], sc, seen["scratch"], s["expected_ratio"],
                s["min_gain"])
    return {"row": 3, "kind": "distillation", "phenomenon": TITLE, "group": s["task"], "layout": s["layout"],
            "student_layout": s["student_layout"], "teacher_layout": s["teacher_layout"],
            "teacher_accuracy": teacher_acc, "teacher_steps": s["teacher_steps"],
            "teacher_steps_to_bar": steps_to_bar(teacher, bar), "baseline_accuracy": s["baseline"],
            "fraction": s["fraction"], "bar": bar, "eval_every": s["eval_every"], "stage1_steps": stage1,
            "student": {"steps_to_bar": st, "evaluated_until": seen["student"], "curve": student,
                        "finished": done["kl"] and done["student"]},
            "scratch": {"steps_to_bar": sc, "evaluated_until": seen["scratch"], "curve": scratch,
                        "finished": done["scratch"]},
            "expected_ratio": s["expected_ratio"], "ratio": v["ratio"], "ratio_bound": v["ratio_bound"],
            "verdict_kind": v["kind"], "verdict": v["text"] + ("" if all(done.values()) else
                                                               " [a run was cut short: its curve up to there]"),
            "command": s["command"], "steps": s["teacher_steps"], "seeds": [s["seed"]], "num_eval": s["num_eval"],
            "params": s["params"]}


def write(study: Path) -> Path:
    r = row(study)
    (study / "distill.json").write_text(json.dumps(r, indent=2))
    plot(r, study / "distill.png")
    return study / "distill.json"


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    study = path.parent
    for name, pts in (("teacher (full)", curve(study, "teacher")), ("student (converted)", r["student"]["curve"]),
                      ("scratch", r["scratch"]["curve"])):
        if pts:
            ax.plot([p["step"] for p in pts], [100 * p["acc"] for p in pts], marker=".", label=name)
    ax.axhline(100 * r["bar"], color="grey", ls="--", lw=1, label=f"bar ({100 * r['fraction']:.0f}% of teacher)")
    ax.axvline(r["stage1_steps"], color="grey", ls=":", lw=1)
    ax.set(xlabel="optimizer steps (student: stage I included)", ylabel="generation accuracy (%)",
           title=f"{r['student_layout']} on {r['group']}", ylim=(-2, 102))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser("python -m vlt.evaluation.distill_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = add_args(parser).parse_args(argv)
    try:
        if args.check:
            check(args)
            return 0
        path = run_study(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"distill_study: error: {e}", file=sys.stderr)
        return 2
    print(f"[distill] wrote {path}: {json.loads(path.read_text())['verdict']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
