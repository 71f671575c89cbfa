"""Issue 17's row 3 (vlt.evaluation.distill_study, vlt.evaluation.phenomena): steps to the bar and the
verdict on hand-made curves, the row from a hand-made study folder (stage I counted, cut and stale runs),
the majority-answer baseline, the table merge keeping rows 1-2, and tools/gpu-phenomena.sh ROWS=3 on
the CPU end to end (teacher, stage I, student and scratch trained; rerun reuses every run)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlt.evaluation.distill_study import VERDICTS, majority_baseline, row, steps_to_bar, verdict
from vlt.evaluation.phenomena import assemble, table_markdown

ROOT = Path(__file__).resolve().parent.parent


def _curve(*points):
    return [{"step": s, "acc": a, "tasks": {}} for s, a in points]


# ------------------------------------------------------------------------------- steps and verdict
def test_steps_to_bar_on_hand_made_curves():
    c = _curve((25, 0.1), (50, 0.5), (75, 0.8), (100, 0.7))
    assert steps_to_bar(c, 0.5) == 50                  # at the bar counts
    assert steps_to_bar(c, 0.75) == 75 and steps_to_bar(c, 0.75, offset=40) == 115
    assert steps_to_bar(c, 0.81) is None and steps_to_bar([], 0.1) is None
    # 0.95 * 0.8 is 0.76000000000000001 in floats: a run scoring 0.76 reaches it (tolerance 1e-9)
    assert steps_to_bar(_curve((10, 0.76)), 0.95 * 0.8) == 10
    assert steps_to_bar(_curve((10, 0.76 - 1e-6)), 0.95 * 0.8) is None


def test_verdict_branches():
    v = verdict(0.8, 0.2, 50, 50, 600, 600)
    assert (v["kind"], v["ratio_bound"]) == ("reproduced", "=") and v["ratio"] == pytest.approx(50 / 600, abs=1e-12)
    assert verdict(0.8, 0.2, 50, 50, 500, 500)["kind"] == "reproduced"       # exactly 10% (within 1e-9)
    v = verdict(0.8, 0.2, 100, 100, 500, 500)
    assert v["kind"] == "not reproduced" and v["ratio"] == pytest.approx(0.2, abs=1e-12)
    # the teacher learned nothing beyond the majority answer: nothing to distil, whatever the steps
    v = verdict(0.35, 0.2, 50, 50, 600, 600)
    assert v["kind"] == "inconclusive" and v["ratio"] is None and "majority-answer baseline" in v["text"]
    # scratch never at the bar: a bound, deciding only when below the expectation
    v = verdict(0.8, 0.2, 50, 50, None, 1000)
    assert (v["kind"], v["ratio_bound"]) == ("reproduced", "<") and v["ratio"] == pytest.approx(0.05, abs=1e-12)
    v = verdict(0.8, 0.2, 200, 200, None, 1000)
    assert (v["kind"], v["ratio_bound"]) == ("inconclusive", "<") and "more scratch steps" in v["text"]
    # the student never at the bar
    v = verdict(0.8, 0.2, None, 550, 500, 500)
    assert (v["kind"], v["ratio_bound"]) == ("not reproduced", ">") and v["ratio"] == pytest.approx(1.1, abs=1e-12)
    assert verdict(0.8, 0.2, None, 25, 500, 500)["kind"] == "inconclusive"     # seen too briefly to decide
    assert verdict(0.8, 0.2, None, 550, None, 1000)["kind"] == "inconclusive"
    v = verdict(0.8, 0.2, 50, 50, None, 0)                                      # scratch never evaluated
    assert v["kind"] == "inconclusive" and "student reached the bar in 50 steps; scratch has no evaluation" in v["text"]
    for args in [(0.8, 0.2, 50, 50, 600, 600), (0.1, 0.2, None, 0, None, 0), (0.8, 0.2, None, 550, 500, 500)]:
        assert verdict(*args)["kind"] in VERDICTS


# ----------------------------------------------------------------------------- row from the folder
def _study(tmp, curves: dict, finished=("teacher", "layer", "kl", "student", "scratch"), **settings):
    s = {"fraction": 0.95, "layer_steps": 25, "kl_steps": 25, "expected_ratio": 0.1, "min_gain": 0.2,
         "baseline": 0.2, "task": "mix", "layout": "hybrid_1to3", "student_layout": "[swa, gdn, gdn, gdn]",
         "teacher_layout": "[full, full, full, full]", "teacher_steps": 100, "eval_every": 25, "seed": 0,
         "num_eval": 10, "command": "python -m vlt.evaluation.distill_study ...",
         "params": {"teacher": 100, "student": 120}, "key": "k1", **settings}
    (tmp / "runs").mkdir(parents=True, exist_ok=True)
    (tmp / "study.json").write_text(json.dumps(s))
    for name in ("teacher", "layer", "kl", "student", "scratch"):
        d = tmp / "runs" / name
        d.mkdir(exist_ok=True)
        (d / "study.key").write_text("k1")
        if name in curves:
            (d / "curve.jsonl").write_text("".join(json.dumps(p) + "\n" for p in curves[name]))
        if name in finished:
            (d / "run.json").write_text("{}")
    return tmp


def test_row_counts_stage1_and_reads_cut_and_stale_runs(tmp_path):
    curves = {"teacher": _curve((50, 0.6), (100, 0.8)), "kl": _curve((25, 0.5)),
              "student": _curve((25, 0.7), (50, 0.79)), "scratch": _curve((25, 0.3), (200, 0.5), (400, 0.77))}
    r = row(_study(tmp_path / "a", curves))
    assert r["teacher_accuracy"] == 0.8 and r["bar"] == pytest.approx(0.76, abs=1e-12)
    assert r["stage1_steps"] == 50 and [p["step"] for p in r["student"]["curve"]] == [50, 75, 100]
    assert r["student"]["steps_to_bar"] == 100 and r["scratch"]["steps_to_bar"] == 400   # 50 of them stage I
    assert r["ratio"] == pytest.approx(0.25, abs=1e-12) and r["verdict_kind"] == "not reproduced"
    assert r["teacher_steps_to_bar"] == 100 and r["student"]["finished"] and "cut short" not in r["verdict"]
    # scratch cut by the timeout at step 200 before the bar: a bound from what it ran
    cut = dict(curves, scratch=_curve((25, 0.3), (200, 0.5)))
    r = row(_study(tmp_path / "b", cut, finished=("teacher", "layer", "kl", "student")))
    assert r["scratch"] == {"steps_to_bar": None, "evaluated_until": 200, "curve": cut["scratch"], "finished": False}
    assert r["verdict_kind"] == "inconclusive" and r["verdict"].endswith("[a run was cut short: its curve up to there]")
    # a run left by a study with other settings is not this study's
    (tmp_path / "b" / "runs" / "scratch" / "study.key").write_text("k0")
    assert row(tmp_path / "b")["scratch"]["curve"] == []
    (tmp_path / "b" / "runs" / "teacher" / "study.key").write_text("k0")
    with pytest.raises(ValueError, match="no finished teacher"):
        row(tmp_path / "b")


def test_majority_baseline_scores_with_each_tasks_metric(tmp_path):
    rows = [("color", "red"), ("color", "red"), ("color", "blue"), ("count", "3"), ("count", "4"), ("count", "3"),
            ("ocr", "ABCD"), ("ocr", "ABCE"), ("ocr", "ABCD"), ("color", "green")]
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({"id": str(i), "task": t, "conversations": [
        {"from": "human", "value": "q?"}, {"from": "gpt", "value": a}]}) + "\n" for i, (t, a) in enumerate(rows)))
    # first 9 rows: colour 'red' 2/3, count '3' 2/3, OCR 'ABCD' scores 1 + ANLS 0.75 (one edit in 4) + 1
    assert majority_baseline(str(f), 9) == pytest.approx((2 + 2 + 2.75) / 9, abs=1e-12)


# -------------------------------------------------------------------------------------- the table
def _compare_rows():
    """Rows 1-2 as phenomenon_row makes them, from hand-made eval rows (as in test_compare)."""
    from vlt.evaluation.compare import phenomenon_row, study_stats
    dist = [5, 5, 5, 5, 80, 80, 80, 80]
    evals = {n: [[{"id": i, "task": "needle", "score": x, "evidence_distance": dist[i]} for i, x in enumerate(sc)]]
             for n, sc in (("A", [1, 1, 1, 1, 1, 1, 1, 0]), ("B", [1, 1, 1, 1, 0, 0, 0, 0]))}
    res = {"stats": study_stats(evals, window=10, reference="A", n_boot=200),
           "settings": {"command": "vlt compare ...", "steps": 5, "seeds": [0]},
           "layouts": {"A": {"params": 100}, "B": {"params": 101}}}
    return [{**phenomenon_row(res, "recall", "needle / >4x window", "A", "B", 0.2), "row": 1},
            {**phenomenon_row(res, "ocr", "needle", "A", "B", 0.1), "row": 2}]


def test_table_keeps_other_rows_and_numbers_each(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    old = _compare_rows()
    (out / "phenomena.json").write_text(json.dumps({"rows": old, "missing": []}))
    curves = {"teacher": _curve((100, 0.8)), "kl": _curve((25, 0.77)), "student": _curve((25, 0.8)),
              "scratch": _curve((25, 0.2), (600, 0.78))}
    _study(work / "distillation", curves)
    md = assemble(out, work, [3])
    table = json.loads((out / "phenomena.json").read_text())
    assert table["rows"][:2] == old and table["rows"][2]["row"] == 3 and table["missing"] == []
    r = table["rows"][2]
    assert r["student"]["steps_to_bar"] == 50 and r["verdict_kind"] == "reproduced"   # 50 / 600
    assert "| 3 | a converted student" in md and "steps ratio 8.3% (<= 10%)" in md and "\n3. `python -m" in md
    assert "| 1 | recall |" in md and "| 2 | ocr |" in md and "\n2. `vlt compare" in md
    # rows 1-2 render as phenomena_markdown renders them
    from vlt.evaluation.compare import phenomena_markdown
    assert table_markdown(old, []) == phenomena_markdown(old)
    # a selected row without its study is listed as missing; the kept rows stay
    md = assemble(out, tmp_path / "empty", [3])
    table = json.loads((out / "phenomena.json").read_text())
    assert table["rows"] == old and table["missing"][0]["row"] == 3 and "No row 3 (distillation)" in md
    with pytest.raises(ValueError, match=r"rows \[4\]: allowed \[1, 2, 3\]"):
        assemble(out, work, [4])


# ------------------------------------------------------------------------------- the script (CPU)
def _script(tmp_path, **env):
    env = {**os.environ, "PHENOMENA_TINY": "1", "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu-phenomena.sh")], env=env, capture_output=True,
                          text=True, timeout=600)


def test_gpu_phenomena_row3_in_its_cpu_mode(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = _compare_rows()
    (out / "phenomena.json").write_text(json.dumps({"rows": old, "missing": []}))   # rows 1-2 of an earlier command
    proc = _script(tmp_path, ROWS="3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = json.loads((out / "phenomena.json").read_text())
    assert table["rows"][:2] == old and table["missing"] == [] and [r["row"] for r in table["rows"]] == [1, 2, 3]
    r = table["rows"][2]
    k = r["eval_every"]
    assert (r["kind"], r["stage1_steps"], k, r["teacher_steps"]) == ("distillation", 4, 2, 4)
    assert r["verdict_kind"] in VERDICTS and r["verdict"].startswith(r["verdict_kind"])
    assert r["command"].startswith(Path(sys.executable).name + " -m vlt.evaluation.distill_study")
    assert 0 <= r["teacher_accuracy"] <= 1 and r["bar"] == pytest.approx(0.95 * r["teacher_accuracy"], abs=1e-12)
    st, sc = r["student"], r["scratch"]
    assert st["finished"] and sc["finished"]
    # the student's points: after stage I, then every K SFT steps; scratch's every K steps
    assert st["curve"][0]["step"] == 4 and all((p["step"] - 4) % k == 0 for p in st["curve"])
    assert all(p["step"] % k == 0 for p in sc["curve"])
    for run, first, cap in ((st, 4, 4 + 4), (sc, k, 4)):   # STUDENT_STEPS, SCRATCH_STEPS: 4
        assert run["steps_to_bar"] is None or (run["steps_to_bar"] - first) % k == 0
        # each SFT ran to its first point at the bar (the stop) or to its last step
        assert run["curve"][-1]["acc"] >= r["bar"] - 1e-9 or run["evaluated_until"] == cap
    assert sc["steps_to_bar"] is None or sc["evaluated_until"] == sc["steps_to_bar"]
    if st["steps_to_bar"] and sc["steps_to_bar"] and r["ratio_bound"] == "=":
        assert r["ratio"] == pytest.approx(st["steps_to_bar"] / sc["steps_to_bar"], abs=1e-12)
    md = (out / "phenomena.md").read_text()
    assert "| 3 | a converted student" in md and "| 1 | recall |" in md
    d = out / "distillation"
    assert json.loads((d / "distill.json").read_text())["verdict"] == r["verdict"] and (d / "distill.png").is_file()
    assert {p.name for p in (d / "runs").iterdir()} == {"teacher", "layer", "kl", "student", "scratch"}
    assert all((d / "runs" / n / "curve.jsonl").is_file() for n in ("teacher", "kl", "student", "scratch"))
    for n in ("teacher", "scratch"):   # STUDY_BACKEND's default reaches the teacher's and the hybrid's layers
        mixers = [a for a in json.loads((d / "runs" / n / "run.json").read_text())["argv"]
                  if a.startswith("--model.init_args.mixers=")]
        assert len(mixers) == 1 and json.loads(mixers[0].split("=", 1)[1])["full"] == {"backend": "torch"}, mixers
    assert not list(out.rglob("*.ckpt"))
    # again with the same settings: every run reused, the same row
    proc = _script(tmp_path, ROWS="3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "distillation.log").read_text().count("reusing") == 5
    assert json.loads((out / "phenomena.json").read_text())["rows"][2] == r
    # the teacher cut after its last checkpoint, before it recorded itself: the next command resumes it from that
    # checkpoint (nothing trained again, its curve kept) and still reuses the runs after it
    teacher = tmp_path / "work" / "distillation" / "runs" / "teacher"
    (teacher / "run.json").unlink()
    proc = _script(tmp_path, ROWS="3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "distillation.log").read_text()
    assert "[distill teacher] resuming the cut run" in log and "(step 4)" in log and log.count("reusing") == 4, log
    assert json.loads((out / "phenomena.json").read_text())["rows"][2] == r


def test_cut_runs_resume_only_their_own_attempt(tmp_path):
    from vlt.evaluation.distill_study import _keep_curve_until
    from vlt.evaluation.resume import RESUME_ARGS, checkpoint_every, start_or_resume
    assert [checkpoint_every(n) for n in (500, 1000, 3, 101, 40)] == [100, 100, 3, 101, 40]
    assert checkpoint_every(1000, grid=25) == 100 and checkpoint_every(60, grid=25) == 60   # 25 does not divide 60
    with pytest.raises(ValueError, match="must be positive"):
        checkpoint_every(0)
    run = tmp_path / "run"
    assert start_or_resume(run, "a", "t") == [] and (run / "attempt.key").read_text() == "a"
    (run / "ckpt").write_text("x")
    assert start_or_resume(run, "a", "t") == RESUME_ARGS and (run / "ckpt").is_file()      # the same attempt
    assert start_or_resume(run, "b", "t") == [] and not (run / "ckpt").exists()            # other settings: cleared
    curve = run / "curve.jsonl"
    curve.write_text("".join(json.dumps({"step": s, "acc": s / 10}) + "\n" for s in (25, 50, 75)))
    _keep_curve_until(curve, 50)
    assert [json.loads(x)["step"] for x in curve.read_text().splitlines()] == [25, 50]
    _keep_curve_until(curve, None)   # no checkpoint: the run starts over, so none of its points stay
    assert curve.read_text() == ""


def test_gpu_phenomena_bad_knobs(tmp_path):
    proc = _script(tmp_path, ROWS="3 4")
    assert proc.returncode == 2 and "ROWS='3 4': '4' is not a row (allowed: 1 2 3" in proc.stderr
    proc = _script(tmp_path, ROWS="3", TEACHER_STEPS="ten")
    assert proc.returncode == 2 and "TEACHER_STEPS='ten' must be a positive whole number" in proc.stderr
    proc = _script(tmp_path, ROWS="3", TEACHER_STEPS="5")
    assert proc.returncode == 2 and "--teacher-steps 5 is not a multiple of --eval-every 2" in proc.stderr
    assert not (tmp_path / "out" / "phenomena.json").exists()     # nothing ran


def test_a_teacher_too_short_for_the_ratio_is_warned_about():
    from types import SimpleNamespace
    from vlt.evaluation.distill_study import short_teacher_warning
    args = SimpleNamespace(layer_steps=25, kl_steps=25, teacher_steps=500, expected_ratio=0.1)
    w = short_teacher_warning(args)   # the phenomena script's defaults: stage I alone is 10% of the teacher's steps
    assert w is not None and "--teacher-steps 1500" in w and "25 + 25" in w
    assert short_teacher_warning(SimpleNamespace(**{**vars(args), "teacher_steps": 2000})) is None
    assert short_teacher_warning(SimpleNamespace(**{**vars(args), "expected_ratio": 0.5})) is None
