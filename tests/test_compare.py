"""Layout studies (``vlt compare``, vlt.evaluation.compare): the statistics on hand-made eval rows, the
equal-parameter budget against real model builds, the layout recipes' errors, and ``vlt compare
--tiny`` end to end (two layouts x two seeds, trained, exported and scored by vlt eval on the CPU)."""
import json
import shutil

import numpy as np
import pytest
import torch

from vlt.evaluation.compare import (BEYOND, count_params, default_depth, match_budget, read_layout_recipe,
                                    study_stats, tile_layout)


def _rows(scores, distances=None, task="t"):
    return [{"id": i, "task": task, "score": s, "evidence_distance": None if distances is None else distances[i]}
            for i, s in enumerate(scores)]


# --------------------------------------------------------------------------------------- statistics
def test_means_differences_and_intervals_on_hand_made_rows():
    a = [1.0, 1.0, 0.0, 1.0]            # mean 0.75
    b = [0.0, 1.0, 0.0, 0.0]            # mean 0.25
    st = study_stats({"A": [_rows(a)], "B": [_rows(b)]}, window=None, reference="B", n_boot=500, seed=0)
    ga, gb = st["groups"]["t"]["A"], st["groups"]["t"]["B"]
    assert ga["mean"] == pytest.approx(0.75, abs=1e-12) and gb["mean"] == pytest.approx(0.25, abs=1e-12)
    assert ga["n_rows"] == 4 and ga["n_seeds"] == 1
    assert 0.0 <= ga["lo"] <= ga["mean"] <= ga["hi"] <= 1.0 and ga["hi"] - ga["lo"] > 0.1  # 4 rows: a wide interval
    d = st["differences"]["t"]["A"]
    assert d["mean"] == pytest.approx(0.5, abs=1e-12)
    # paired: rows 0, 2, 3 differ by +1, 0, +1 and row 1 by 0, so no replicate can go below 0 or above 1
    assert 0.0 <= d["lo"] <= 0.5 <= d["hi"] <= 1.0
    # deterministic in the seed
    assert study_stats({"A": [_rows(a)], "B": [_rows(b)]}, None, "B", n_boot=500, seed=0) == st


def test_identical_layouts_differ_by_exactly_zero_and_seeds_are_pooled():
    rows = _rows([1.0, 0.0, 0.5, 1.0, 0.0])
    st = study_stats({"A": [rows], "B": [rows]}, window=None, reference="A", n_boot=200)
    d = st["differences"]["t"]["B"]
    assert d["mean"] == 0.0 and d["lo"] == 0.0 and d["hi"] == 0.0   # the same resampled rows on both sides
    two = study_stats({"A": [_rows([1, 1, 1, 1]), _rows([0, 0, 1, 1])]}, window=None, n_boot=300)
    g = two["groups"]["t"]["A"]
    assert g["per_seed"] == [1.0, 0.5] and g["mean"] == pytest.approx(0.75, abs=1e-12) and g["n_seeds"] == 2
    # with two seeds the interval also spans the seed-to-seed spread: it reaches a seed's own mean
    assert g["lo"] <= 0.5 + 1e-9 and g["hi"] == pytest.approx(1.0, abs=1e-12)


def test_distance_groups_use_one_window_and_pool_beyond_it():
    dist = [10, 40, 70, 300]             # window 32: in window, 1-2x, 2-4x, >4x
    st = study_stats({"A": [_rows([1, 0, 1, 0], dist)], "B": [_rows([1, 1, 0, 0], dist)]}, window=32, reference="A",
                     n_boot=100)
    g = st["groups"]
    assert list(g) == ["t", "t / in window", "t / 1-2x window", "t / 2-4x window", "t / >4x window", f"t / {BEYOND}"]
    assert g[f"t / {BEYOND}"]["A"]["n_rows"] == 3
    assert g[f"t / {BEYOND}"]["A"]["mean"] == pytest.approx(1 / 3, abs=1e-12)
    assert g[f"t / {BEYOND}"]["B"]["mean"] == pytest.approx(1 / 3, abs=1e-12)
    assert g["t / 1-2x window"]["B"]["mean"] == 1.0 and g["t / 1-2x window"]["A"]["mean"] == 0.0
    # only rows every run has are compared
    st = study_stats({"A": [_rows([1, 1, 1])], "B": [_rows([0, 0])]}, window=None, reference="A", n_boot=50)
    assert st["groups"]["t"]["A"]["n_rows"] == 2 and st["groups"]["t"]["A"]["mean"] == 1.0


# ------------------------------------------------------------------------------------------ budget
def test_layout_recipes_depth_and_errors():
    name, layers, mixers = read_layout_recipe("hybrid_1to7")
    assert layers == ["swa"] + ["gdn"] * 7 and mixers == {"swa": {"window": 64}}
    assert read_layout_recipe("mine=[swa, gdn] * 2")[1] == ["swa", "gdn", "swa", "gdn"]
    assert default_depth([4, 8, 4]) == 8 and tile_layout("full", ["full"] * 4, 8) == ["full"] * 8
    with pytest.raises(ValueError, match=r"no layout recipe 'hybird'.*hybrid_1to3"):
        read_layout_recipe("hybird")
    with pytest.raises(ValueError, match="--depth 6"):
        tile_layout("hybrid_1to7", ["swa"] + ["gdn"] * 7, 6)


def test_budget_matching_against_real_builds():
    from vlt.model import VLM
    from vlt.training.base import build_config
    names = ["full", "gdn", "hybrid_1to3", "hybrid_1to7", "intra_hybrid"]
    layouts = {n: (tile_layout(n, ls, 8), m) for n, ls, m in map(read_layout_recipe, names)}
    sizes = match_budget("tiny-hybrid", None, layouts, "hybrid_1to3", tolerance=0.03)
    target = sizes["hybrid_1to3"]["params"]
    assert sizes["hybrid_1to3"]["intermediate_size"] == 384 and sizes["hybrid_1to3"]["deviation"] == 0.0
    assert sizes["full"]["intermediate_size"] > 384 > sizes["intra_hybrid"]["intermediate_size"]
    for n, (layers, mixers) in layouts.items():
        width = sizes[n]["intermediate_size"]
        cfg = build_config("tiny-hybrid", {"decoder": {"intermediate_size": width}}, None,
                           "[" + ", ".join(layers) + "]", mixers)
        real = sum(p.numel() for p in VLM(cfg).parameters())   # a real build, not the meta-device count
        assert real == sizes[n]["params"], n
        assert abs(real - target) / target <= 0.03, n
    assert count_params("tiny-hybrid", None, ["full"] * 4, {}) == 1059968
    with pytest.raises(ValueError, match="--budget-tolerance"):
        match_budget("tiny-hybrid", None, layouts, "hybrid_1to3", tolerance=1e-6)


# --------------------------------------------------------------------------------------- end to end
def test_vlt_compare_tiny_end_to_end(tmp_path, capsys):
    from vlt.cli import main
    out = tmp_path / "cmp"
    assert main(["compare", "--tiny", "--out", str(out)]) == 0
    res = json.loads((out / "compare.json").read_text())
    assert (out / "compare.md").read_text().startswith("# vlt compare")
    assert (out / "compare.png").stat().st_size > 1000
    lay = res["layouts"]
    assert list(lay) == ["swa", "hybrid_1to3"] and res["settings"]["depth"] == 4
    assert lay["swa"]["pattern"] == "[swa, swa, swa, swa]" and lay["swa"]["intermediate_size"] > 384
    assert abs(lay["swa"]["params"] - lay["hybrid_1to3"]["params"]) / lay["hybrid_1to3"]["params"] <= 0.03
    st = res["stats"]
    assert st["window"] == 64 and st["reference"] == "hybrid_1to3"
    assert "needle / in window" in st["groups"] and "needle / 1-2x window" in st["groups"]
    for n, v in lay.items():
        assert [r["seed"] for r in v["runs"]] == [0, 1]
        per_seed = st["groups"]["needle"][n]["per_seed"]
        for r, mine in zip(v["runs"], per_seed):
            # what compare pooled is what each run's own vlt eval reported
            ev = json.loads((out / "runs" / f"{n}-s{r['seed']}" / "eval" / "eval.json").read_text())
            assert ev["summary"]["tasks"]["needle"]["score"] == pytest.approx(mine, abs=1e-12)
            assert ev["summary"]["n"] == 6 and r["final_train_loss"] is not None and np.isfinite(r["final_train_loss"])
            [last] = (out / "runs" / f"{n}-s{r['seed']}").glob("lightning_logs/version_*/checkpoints/last.ckpt")
            ckpt = torch.load(last, map_location="cpu", weights_only=False)
            assert ckpt["global_step"] == 3 and ckpt["vlt_config"]["decoder"]["intermediate_size"] == \
                v["intermediate_size"]
    # the same study again reuses every run (nothing retrained)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/lightning_logs/*/checkpoints/last.ckpt")}
    capsys.readouterr()
    assert main(["compare", "--tiny", "--out", str(out)]) == 0
    assert capsys.readouterr().err.count("reusing") == 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/lightning_logs/*/checkpoints/last.ckpt")} == stamps
    assert json.loads((out / "compare.json").read_text())["stats"] == st
    # a run cut after its last checkpoint, before its evaluation: resumed from that checkpoint, not trained again
    cut = out / "runs" / "swa-s0"
    shutil.rmtree(cut / "eval")
    (cut / "run.json").unlink()
    capsys.readouterr()
    assert main(["compare", "--tiny", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("reusing") == 3 and "resuming the cut run in" in err and "(step 3)" in err, err
    assert json.loads((out / "compare.json").read_text())["stats"] == st


def test_vlt_compare_bad_arguments(tmp_path, capsys):
    from vlt.cli import main
    assert main(["compare", "--tiny", "--layouts", "swa", "nope", "--out", str(tmp_path)]) == 2
    assert "no layout recipe 'nope'" in capsys.readouterr().err
    assert main(["compare", "--tiny", "--reference", "gdn", "--out", str(tmp_path)]) == 2
    assert "--reference 'gdn' is not among --layouts" in capsys.readouterr().err
    assert main(["compare", "--tiny", "--param", "num_framez=3", "--out", str(tmp_path)]) == 2
    assert "num_framez" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")   # the weights into count_params' meta build
def test_model_options_reach_the_budget_the_plan_and_every_fit(tmp_path, capsys):
    """--model-options: merged over the base recipe's model dict before the budget matching (the counts are of
    the model each run trains), recorded in the plan and passed to every vlt fit; no training."""
    import argparse

    from vlt.cli import main
    from vlt.compare_cli import _fit_argv, _settings, add_compare_args, plan
    from vlt.model import VLM
    from vlt.training.base import build_config
    deeper = {"vision": {"timm_kwargs": {"depth": 3}}}   # one ViT block more than tiny-hybrid's
    vit = tmp_path / "vit.pth"
    torch.save(VLM(build_config("tiny-hybrid", deeper, None)).vision.vit.state_dict(), vit)
    options = {"vision": {"weights_file": str(vit), **deeper["vision"]}}

    def planned(*extra):
        args = add_compare_args(argparse.ArgumentParser()).parse_args(["--tiny", "--out", str(tmp_path), *extra])
        s = _settings(args)
        return args, s, plan(args, s)
    _, _, base = planned()
    args, s, p = planned("--model-options", json.dumps(options))
    assert base["model_options"] is None and p["model_options"] == options
    for n, lay in p["layouts"].items():
        assert lay["model"]["vision"] == options["vision"]
        layers = lay["pattern"].strip("[]").split(", ")
        assert lay["params"] == count_params("tiny-hybrid", lay["model"], layers, lay["mixers"])
        assert lay["params"] > base["layouts"][n]["params"]        # the third block is counted
        argv = _fit_argv(args, s, {}, lay, 0, tmp_path / n)
        [arg] = [a for a in argv if a.startswith("--model.init_args.model=")]
        assert json.loads(arg.split("=", 1)[1]) == lay["model"]
    # the same widths balance the deeper tower: both layouts still within the tolerance of each other
    a, b = (v["params"] for v in p["layouts"].values())
    assert abs(a - b) / b <= 0.03
    with pytest.raises(ValueError, match="--model-options '{vision: 1}' is not JSON"):
        planned("--model-options", "{vision: 1}")
    with pytest.raises(ValueError, match="--model-options must be a JSON object"):
        planned("--model-options", '["vision"]')
    # a missing weights file fails at the plan, before any data or training
    assert main(["compare", "--tiny", "--out", str(tmp_path / "x"), "--model-options",
                 json.dumps({"vision": {"weights_file": str(tmp_path / "nope.pth")}})]) == 2
    assert "vision.weights_file" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ the phenomenon table
def _result(a_scores, b_scores, dist, reference="A"):
    st = study_stats({"A": [_rows(a_scores, dist, "needle")], "B": [_rows(b_scores, dist, "needle")]}, window=10,
                     reference=reference, n_boot=200)
    return {"stats": st, "settings": {"command": "vlt compare ...", "steps": 5, "seeds": [0]},
            "layouts": {"A": {"params": 100}, "B": {"params": 101}}}


def test_phenomenon_rows_and_their_verdicts():
    from vlt.evaluation.compare import phenomena_markdown, phenomenon_row
    dist = [5, 5, 5, 5, 80, 80, 80, 80]   # window 10: four rows in the window, four far beyond it
    res = _result([1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0], dist)
    row = phenomenon_row(res, "recall", "needle / >4x window", "A", "B", 0.2, control="needle / in window")
    assert row["difference"]["mean"] == pytest.approx(0.75, abs=1e-12)
    assert row["control_scores"]["B"]["mean"] == 1.0 and row["verdict"].startswith("reproduced")
    # the result's differences are B - A: the row negates them (the same replicates)
    flipped = phenomenon_row(_result([1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0], dist, reference="B"),
                             "recall", "needle / >4x window", "A", "B", 0.2)
    assert flipped["difference"]["mean"] == pytest.approx(0.75, abs=1e-12)
    assert flipped["difference"]["lo"] <= 0.75 <= flipped["difference"]["hi"]
    same = phenomenon_row(_result([1] * 8, [1] * 8, dist), "recall", "needle / >4x window", "A", "B", 0.2)
    assert same["verdict"] == "not reproduced (interval below the margin)"
    # nothing learned where both should succeed: no evidence either way
    none = phenomenon_row(_result([0] * 8, [0] * 8, dist), "recall", "needle / >4x window", "A", "B", 0.2,
                          control="needle / in window")
    assert none["verdict"].startswith("inconclusive")
    md = phenomena_markdown([row, none])
    assert "+75.0 [" in md and "(>= +20)" in md and "`vlt compare ...`" in md and "A 100, B 101" in md
    with pytest.raises(ValueError, match="group 'ocr' is not in the compare result"):
        phenomenon_row(res, "x", "ocr", "A", "B", 0.1)


def test_gpu_phenomena_script_in_its_cpu_mode(tmp_path):
    """tools/gpu-phenomena.sh with PHENOMENA_TINY=1 ROWS="1 2": both studies, the table and the copied files
    (row 3, the distillation study: tests/test_distill_study.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PHENOMENA_TINY": "1", "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "ROWS": "1 2"}
    proc = subprocess.run(["bash", str(root / "tools" / "gpu-phenomena.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    table = json.loads((out / "phenomena.json").read_text())
    assert table["missing"] == [] and [r["group"] for r in table["rows"]] == ["needle / >4x window", "dense_ocr"]
    assert [r["row"] for r in table["rows"]] == [1, 2] and not (out / "distillation").exists()
    assert [(r["layout"], r["baseline"]) for r in table["rows"]] == [("hybrid_1to3", "swa"), ("hybrid_1to3", "gdn")]
    assert all(r["command"].startswith("vlt compare") and r["steps"] == 3 for r in table["rows"])
    assert "| 2 | linear attention alone underperforms on dense OCR |" in (out / "phenomena.md").read_text()
    for study, runs in (("needle_beyond_window", {"hybrid_1to3-s0", "swa-s0"}),
                        ("dense_ocr", {"hybrid_1to3-s0", "gdn-s0"})):
        assert (out / study / "compare.json").is_file() and (out / study / "compare.png").is_file()
        assert {p.name for p in (out / study / "runs").iterdir()} == runs
        assert all((out / study / "runs" / r / "eval.json").is_file() for r in runs)
        assert not list((out / study).rglob("*.ckpt"))      # checkpoints stay in WORK
    # row 2 (OCR_TOWER=probe): both layouts start from the one tower the probe trained, on the glyph grid
    for r in ("hybrid_1to3-s0", "gdn-s0"):
        argv = " ".join(json.loads((out / "dense_ocr" / "runs" / r / "run.json").read_text())["argv"])
        assert str(tmp_path / "work" / "ocr_vit28.pth") in argv and '"cell": 28' in argv


def test_mixer_options_merge_key_by_key_and_bad_json_is_an_error():
    from vlt.evaluation.compare import merge_mixer_options
    recipe = {"swa": {"window": 64, "num_heads": 4}}
    assert merge_mixer_options(recipe, None) is recipe
    assert merge_mixer_options(recipe, '{"swa": {"window": 16}, "gdn": {"backend": "torch"}}') == \
        {"swa": {"window": 16, "num_heads": 4}, "gdn": {"backend": "torch"}}
    assert recipe == {"swa": {"window": 64, "num_heads": 4}}   # the recipe's dict is not changed
    with pytest.raises(ValueError, match=r"--mixers .* is not JSON"):
        merge_mixer_options(recipe, "{swa: 1}")
    with pytest.raises(ValueError, match=r"--mixers must map mixer names to option dicts"):
        merge_mixer_options(recipe, '{"swa": 16}')


def test_markdown_of_a_one_layout_study_has_no_differences_table():
    """A study of one layout (e.g. checking that a setting learns at all) has nothing to difference: its
    table printed an empty header and a row per group."""
    from vlt.evaluation.compare import markdown
    cell = {"mean": 0.25, "lo": 0.2, "hi": 0.3, "n_rows": 100, "n_seeds": 1, "per_seed": [0.25]}
    result = {"layouts": {"hybrid_1to3": {"pattern": "[swa, gdn, gdn, gdn]", "params": 1000, "intermediate_size": 384,
                                          "runs": [{"wall_s": 10.0}]}},
              "stats": {"groups": {"dense_ocr": {"hybrid_1to3": cell}}, "differences": {"dense_ocr": {}},
                        "window": 16, "reference": "hybrid_1to3", "bootstrap": 1000, "level": 0.95}}
    text = markdown(result)
    assert "| dense_ocr | 100 | 25.0 [20.0, 30.0] |" in text
    assert "Differences" not in text and text.count("dense_ocr") == 1
