"""`vlt bench fit --tiny`: every InfiniteVL stage through the real `vlt fit` (recipe, module, data
module) on the CPU, and the JSON + PNG it writes. GPU: the fused losses of Liger-Kernel against
vlt's torch path, and the torch path in bf16 against fp32 (``-m gpu``)."""
import json

import pytest
import torch

from vlt.cli import main


def test_bench_fit_tiny_runs_every_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "fit", "--tiny", "--out", str(tmp_path / "out")])
    rep = json.loads((tmp_path / "out" / "fit.json").read_text())
    assert rc == 0 and (tmp_path / "out" / "fit.png").stat().st_size > 0
    rows = {r["stage"]: r for r in rep["results"]}
    assert sorted(rows) == sorted(["stage1_layer", "stage1_kl", "stage2_sft", "stage3_long_lora"])
    for stage, r in rows.items():
        assert "error" not in r, (stage, r.get("error"))
        assert r["tokens_per_s"] > 0 and r["first_step_s"] > 0 and r["step_tflop"] > 0, stage
        assert r["first_step_since_build_s"] >= r["first_step_s"]
        assert 0 < r["build_s"] <= r["first_step_since_build_s"] - r["first_step_s"], stage
    parts = rows["stage1_kl"]["flops_parts"]
    assert parts["teacher/lm_head"]["bwd"] == 0 and parts["lm_head"]["bwd"] > 0  # the teacher: forward only
    # the student's frozen tower holds the teacher's weights: the images go through one tower, once
    assert parts["teacher/vision"]["fwd"] > 0 and "vision" not in parts
    assert "lm_head" not in rows["stage1_layer"]["flops_parts"]  # the layer phase never runs a head
    assert rows["stage3_long_lora"]["length"] == 512


def test_summary_leaves_out_the_warm_up_and_the_profiled_step():
    from vlt.bench.fit import summarise
    steps = [{"perf/tokens_per_s": t, "perf/first_step_s": 9.0} for t in (1.0, 10.0, 12.0, 11.0, 3.0)]
    plain = summarise("stage2_sft", {"steps": steps, "flops_parts": {}}, wall=1.0)
    profiled = summarise("stage2_sft", {"steps": steps, "flops_parts": {}, "profile": {"kernels_per_call": 5}}, 1.0)
    assert plain["tokens_per_s"] == 10.5 and "profile" not in plain          # median of 10, 12, 11, 3
    assert profiled["tokens_per_s"] == 11.0 and profiled["profile"]["kernels_per_call"] == 5
    fast_tail = [dict(s, **{"perf/tokens_per_s": t}) for s, t in zip(steps, (1.0, 10.0, 12.0, 11.0, 99.0))]
    assert summarise("s", {"steps": fast_tail, "flops_parts": {}, "profile": {"x": 1}}, 1.0)["tokens_per_s"] == 11.0
    assert summarise("s", {"steps": fast_tail, "flops_parts": {}}, 1.0)["tokens_per_s"] == 11.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_liger_matches_torch_path_cuda(kind):
    pytest.importorskip("liger_kernel")
    from vlt.training.losses import linear_cross_entropy, linear_kl_distill
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, v = 3000, 256, 32000
    h = (torch.randn(n, d, device="cuda", generator=g)).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device="cuda", generator=g) * 0.05).bfloat16().requires_grad_()
    ht, wt = torch.randn(n, d, device="cuda", generator=g).bfloat16(), (w.detach() * 1.1).bfloat16()
    target = torch.randint(0, v, (n,), device="cuda", generator=g)
    out = {}
    for impl in ("torch", "liger"):
        loss = linear_cross_entropy(h, w, target, impl=impl) if kind == "ce" else \
            linear_kl_distill(h, w, ht, wt, 2.0, impl=impl)
        out[impl] = (loss.float(), *torch.autograd.grad(loss, (h, w)))
    for a, b in zip(out["torch"], out["liger"]):  # bf16 matmuls on both sides, fp32 softmax
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_path_bf16_autocast_close_to_fp32_cuda():
    from vlt.training.losses import cross_entropy_reference, linear_cross_entropy
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, v = 4096, 512, 151936
    h = torch.randn(n, d, device="cuda", generator=g).requires_grad_()
    w = (torch.randn(v, d, device="cuda", generator=g) * 0.05).requires_grad_()
    target = torch.randint(0, v, (n,), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, target, impl="torch")
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = cross_entropy_reference(h @ w.T, target)
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gh, rh, rtol=5e-2, atol=1e-4)
    torch.testing.assert_close(gw, rw, rtol=5e-2, atol=1e-4)


def test_first_step_trace_prints_each_phase_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "fit", "--tiny", "--stages", "stage2_sft", "--trace-first-step", "30", "--out", str(tmp_path)])
    phases = [line.split(" at ")[0][len("FIT-PHASE "):] for line in capsys.readouterr().out.splitlines()
              if line.startswith("FIT-PHASE ")]
    assert rc == 0 and phases == ["fit start (model built)", "train start (model on device)", "first batch loaded",
                                  "forward done", "backward done", "first optimizer step done"]
