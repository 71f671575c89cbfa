"""`vlt bench train|data|mixers --tiny` are CPU smoke runs (issue 21 item 5): tiny shapes and
lengths, JSON + PNG written, CPU output labelled as such, and well under a minute each on 2 cores
(the budget is checked loosely: 120 s, for slow shared machines)."""
import json
import time

import pytest

from vlt.cli import main

BUDGET_S = 120


def timed(argv):
    t0 = time.perf_counter()
    rc = main(argv)
    return rc, time.perf_counter() - t0


@pytest.mark.slow
def test_bench_train_tiny_defaults_to_tiny_lengths(tmp_path):
    rc, wall = timed(["bench", "train", "--tiny", "--device", "cpu", "--layouts", "full", "hybrid",
                      "--steps", "1", "--out", str(tmp_path)])
    assert rc == 0 and wall < BUDGET_S
    rows = json.loads((tmp_path / "train.json").read_text())["results"]
    assert sorted({r["T"] for r in rows}) == [64, 256]  # not 8K/32K/128K
    assert all(r.get("tokens_per_s") for r in rows) and (tmp_path / "train.png").is_file()


@pytest.mark.slow
def test_bench_data_tiny_writes_json_and_png(tmp_path):
    out = tmp_path / "bench_data.json"
    rc, wall = timed(["bench", "data", "--tiny", "--out", str(out), "--cache-dir", str(tmp_path / "c")])
    assert rc == 0 and wall < BUDGET_S
    rep = json.loads(out.read_text())
    assert [r["preset"] for r in rep["results"]] == ["quickstart"] and rep["results"][0]["batches"] == 5
    assert "smoke run" in rep["tiny"] and (tmp_path / "bench_data.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_mixers_tiny_runs_every_mixer_on_the_cpu(tmp_path, capsys):
    from vlt.bench.mixers import MIXERS
    rc, wall = timed(["bench", "mixers", "--tiny", "--rep-ms", "20", "--out", str(tmp_path)])
    assert rc == 0 and wall < BUDGET_S
    rep = json.loads((tmp_path / "mixers.json").read_text())
    assert rep["machine"].startswith("CPU") and "not a speed measurement" in rep["timer"] and rep["goals"] == []
    got = {(r["mixer"], r["mode"], r["T"]) for r in rep["results"] if r["ms"] > 0}
    assert got == {(m, mode, T) for m in MIXERS for mode in ("fwd+bwd", "decode") for T in (64, 256)}
    assert (tmp_path / "mixers.png").is_file() and "CPU smoke run" in capsys.readouterr().out
