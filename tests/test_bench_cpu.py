"""CPU smoke tests of ``vlt bench train|infer|stream`` at tiny shapes: the JSON each writes, the
inference engine's compiled pieces against the mixers' own eager path, and constant per-frame state."""
import argparse
import json

import pytest
import torch

from vlt.bench.common import add_common_args, build_model, setup, train_flops


def _tiny_args(*extra):
    a = add_common_args(argparse.ArgumentParser()).parse_args(["--tiny", "--device", "cpu", *extra])
    return a, *setup(a)


# "aot_eager": Dynamo traces the engine's small ops (RoPE tables, residual/MLP half) without
# Inductor's code generation, which takes a minute on CPU; Inductor runs in the GPU tests.
def test_engine_compiled_pieces_match_eager():
    from vlt.inference import InferenceEngine
    a, dev, dt = _tiny_args()
    model = build_model("hybrid", a, dev, dt).eval()
    ids = torch.randint(0, 400, (1, 40))
    eng = InferenceEngine(model, compile="aot_eager")
    eng.prefill(ids[0])
    with torch.no_grad():
        state = model(ids, use_cache=True).state
        for t in (5, 6, 7):
            ref = model(torch.tensor([[t]]), state=state, use_cache=True)
            state = ref.state
            got = eng.decode(torch.tensor([t]))
            assert float((got - ref.logits[:, -1]).norm() / ref.logits[:, -1].norm()) < 1e-5


def test_bench_stream_tiny(tmp_path):
    from vlt.bench.stream import main
    assert main(["--tiny", "--device", "cpu", "--frames", "12", "--eager-frames", "6", "--check-frames", "6",
                 "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "stream.json").read_text())
    assert (tmp_path / "stream.png").stat().st_size > 0
    assert rep["bench"] == "stream" and rep["command"].startswith("vlt bench stream") and rep["machine"]
    assert rep["tokens_per_frame"] == 8
    r = rep["results"][0]
    assert r["layout"] == "hybrid" and len(r["fps"]) == len(r["mem_bytes"]) == 12, r
    assert r["path"].startswith("vlt.inference.VideoStream")      # the user's path, not a copy
    assert r["check_engine_vs_eager_rel_err"] < 1e-5
    assert len(set(r["mem_bytes"])) == 1 and r["mem_change_steady"] == 0 and "goal_70fps" not in r  # CPU: no GPU goals


def test_bench_infer_tiny(tmp_path):
    from vlt.bench.infer import main
    assert main(["--tiny", "--device", "cpu", "--layouts", "full", "hybrid", "--prefill-lens", "64",
                 "--contexts", "16", "64", "--check-max", "64", "--rep-ms", "1", "--batch-sizes", "1", "2",
                 "--batch-contexts", "32", "--e2e-prompt", "24", "--e2e-new", "4", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "infer.json").read_text())
    assert {(r["layout"], r["T"]) for r in rep["prefill"]} == {("full", 64), ("hybrid", 64)}
    assert all(r["ms"] > 0 and r["tokens_per_s"] > 0 for r in rep["prefill"])
    for r in rep["prefill"]:   # achieved TFLOP/s is the row's model FLOPs over its time
        assert r["model_flops"] > 0
        assert r["tflops"] == pytest.approx(r["model_flops"] / r["ms"] / 1e9, rel=0.02, abs=2e-3)
    dec = {(r["layout"], r["context"]): r for r in rep["decode"]}
    assert set(dec) == {(lay, c) for lay in ("full", "hybrid") for c in (16, 64)}
    for r in dec.values():
        assert r["ms"] > 0 and r["check_rel_err"] < 1e-5 and r["state"].startswith("constructed")
        assert r["path"].startswith("InferenceEngine.decode") and r["graph"] is False
    # the full layout's KV grows with the context, the hybrid's state is capped by the window
    assert dec["full", 64]["state_bytes"] > dec["full", 16]["state_bytes"]
    s16, s64 = (dec["hybrid", c]["state_bytes"] for c in (16, 64))
    assert s64 >= s16 and rep["goals"] == []            # the targets are for the GPU; a CPU run says none
    expected = {(lay, b) for lay in ("full", "hybrid") for b in (1, 2)}
    assert {(r["layout"], r["batch"]) for r in rep["batched"]} == expected
    assert all(r["tokens_per_s"] > 0 for r in rep["batched"])
    e2e = {r["layout"]: r for r in rep["e2e"]}
    assert set(e2e) == {"full", "hybrid"} and all(r["ttft_ms"] > 0 and r["new_tokens"] == 4 for r in e2e.values())


def test_bench_train_tiny(tmp_path):
    from vlt.bench.train import main
    assert main(["--tiny", "--device", "cpu", "--layouts", "full", "hybrid", "--seq-lens", "64",
                 "--steps", "1", "--checkpointing", "on", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "train.json").read_text())
    rows = {r["layout"]: r for r in rep["results"]}
    assert set(rows) == {"full", "hybrid"}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["checkpointing"] is True and r["trainable"] == "all"
        assert r["model_tflop"] >= 0 and 0 <= r["mfu"] < 1


def test_train_flops_scale():
    a, dev, dt = _tiny_args()
    full, hybrid = (build_model(lay, a, "meta", dt) for lay in ("full", "hybrid"))
    # full attention is quadratic in T; the hybrid's window caps its attention term
    growth_full = train_flops(full, 4096) / train_flops(full, 1024)
    assert growth_full > train_flops(hybrid, 4096) / train_flops(hybrid, 1024) > 3.9


def test_cli_registers_bench_commands():
    from vlt.cli import tool_main
    for name in ("train", "infer", "stream"):
        with pytest.raises(SystemExit) as e:
            tool_main(["bench", name, "--help"])
        assert e.value.code == 0


def test_packed_projections_same_outputs_fewer_gemms(monkeypatch):
    from vlt.bench.common import token_ids
    from vlt.inference import pack_projections
    a, dev, dt = _tiny_args()
    model = build_model("hybrid", a, dev, dt).eval()      # [swa, gdn, gdn, gdn]
    ids = token_ids(model, (1, 12), dev)
    keys = list(model.state_dict())
    calls = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        ref = model(ids).logits
        before = len(calls)
        assert pack_projections(model) == 2 * len(model.layers)
        calls.clear()
        out = model(ids).logits
    # per block: swa q/k/v -> 1 GEMM, gdn q/k/v/g/a/b -> 1, every MLP gate/up -> 1
    assert before - len(calls) == 2 + 3 * 5 + 4 * 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert list(model.state_dict()) == keys                 # names and checkpoints unchanged
    m = model.layers[1].mixer
    assert m.q_proj.weight.data_ptr() == m.q_proj.packed_weight.data_ptr()  # a view: no second copy
    with torch.no_grad():
        m.q_proj.weight.zero_()                             # an update of the parameter is seen packed
    assert m.q_proj.packed_weight[: m.key_dim].abs().sum() == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_bench_decode_kernels_needs_cuda(tmp_path):
    from vlt.cli import main
    with pytest.raises(SystemExit, match="CUDA device"):
        main(["bench", "decode-kernels", "--out", str(tmp_path)])


def test_kernel_table_leaves_out_user_annotations(tmp_path):
    """A GPU-side record_function range (Lightning's optimizer-step annotation wraps forward and
    backward) spans kernels that are listed on their own: the table must not count it again."""
    from types import SimpleNamespace

    from vlt.bench.common import write_kernel_table

    def ev(name, start, end, annotation=False):
        tr = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
        return SimpleNamespace(name=name, time_range=tr, is_user_annotation=annotation,
                               device_type=torch.autograd.DeviceType.CUDA)

    events = [ev("Optimizer.step#AdamW.step", 0, 1000, annotation=True),
              ev("gemm", 0, 300), ev("gemm", 500, 800), ev("adamw", 900, 1000)]
    prof = SimpleNamespace(events=lambda: events)
    summary = write_kernel_table(prof, str(tmp_path / "table.txt"))
    assert summary["kernels_per_call"] == 3
    assert summary["device_ms_per_call"] == pytest.approx(0.7)
    assert summary["busy_fraction"] == pytest.approx(0.7)   # 700 us of kernels over a 1000 us span
    assert [row["kernel"] for row in summary["top"]] == ["gemm", "adamw"]
    assert "Optimizer.step" not in (tmp_path / "table.txt").read_text()


def test_prefill_flops_match_torchs_count_of_the_matmuls():
    """`vlt bench infer`'s prefill FLOPs: torch's FlopCounterMode, over a real prefill of the full layout
    (the LM head on the last token only), counts exactly the matmul part; the rest is the mixing term."""
    from torch.utils.flop_counter import FlopCounterMode
    from vlt.bench.common import build_model, mixer_flops_fwd, prefill_flops
    a, dev, dt = _tiny_args()
    model = build_model("full", a, dev, dt).eval()
    T = 48
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 100, (1, T)), use_cache=True, logits_to_keep=1)
    matmuls = sum(v for k, v in counter.get_flop_counts()["Global"].items() if str(k) in ("aten.mm", "aten.addmm"))
    mixing = sum(mixer_flops_fwd(b.mixer, T) for b in model.layers)
    assert mixing > 0 and prefill_flops(model, T) - mixing == pytest.approx(matmuls, rel=1e-9)
