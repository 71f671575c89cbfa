"""GPU tests of the fla-backed mixers (layers/fla_mixers.py): fla's CUDA layers against the naive
references the CPU paths run (layers/fla_cpu.py), output, final state and gradients, fp32 and bf16,
plain and packed; the mixer contract on CUDA for every short name (prefill + decode == one forward,
packed == one by one, split prefill); the cache conversion both ways (a state from one path
continues on the other).

References: kda, deltanet, gdn2, gla, rwkv7 - the same module's CPU path (fla's naive recurrences, pure
torch) run on the GPU in fp32 (for bf16: an fp32 copy of the bf16 weights and input); mamba2 - the
module on the CPU in float64 (vlt's torch kernels) against vlt's path on CUDA (fla's simple-GLA,
conv and gated-norm kernels); nsa, moba (no CPU path) - the contract only. Errors are relative norms
||x - ref|| / ||ref||; bounds: 3e-3 fp32 (tf32 inside fla's kernels), 3e-2 bf16 (projections and norms
in bf16 too), gradients x2 (VLT_GPU_ERRLOG=path appends every measured error to a file). deltanet's
float32 cases check vlt's error instead (fla's chunk kernel refuses float32); without flash-attn nsa runs
with window_size 0 and moba checks its error (both call flash-attn).
"""
import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from numerics import check, perturb_fla_init  # noqa: E402
from vlt.layers import create_mixer  # noqa: E402
from vlt.layers.fla_cpu import CPU_PATHS  # noqa: E402
from vlt.layers.fla_mixers import flash_attn_installed  # noqa: E402

DEV = "cuda"
D, H = 256, 4
TOL = {torch.float32: 3e-3, torch.bfloat16: 3e-2}
CASES = {"kda": dict(num_v_heads=8), "deltanet": dict(use_gate=True), "gdn2": dict(num_v_heads=8),
         "gla": dict(num_kv_heads=2, use_short_conv=True), "mamba2": dict(state_size=64),
         # fla's NSA kernels want 16 query heads per KV head; its sliding-window branch runs on flash-attn
         "rwkv7": {}, "nsa": dict(num_heads=16, num_kv_heads=1, head_dim=64, block_size=64, block_counts=4,
                                window_size=128 if flash_attn_installed() else 0),
         "moba": dict(num_kv_heads=2, moba_chunk_size=64, moba_topk=2)}
NAIVE = ("kda", "deltanet", "gdn2", "gla", "rwkv7")
# fla's chunk DeltaNet kernel refuses float32 (an assert; vlt says so first): its float32 checks run in bf16
WORK_DTYPE = {"deltanet": torch.bfloat16}
CU = [0, 700, 701, 2048]                       # packed: a 1-token sequence among longer ones


def make(name, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = create_mixer(name, **{"hidden_size": D, "num_heads": H, **CASES[name]})
    perturb_fla_init(m)
    return m.to(DEV, dtype)


def grads(m, x, y, dy):
    gs = torch.autograd.grad(y, [x, *m.parameters()], dy, allow_unused=True)
    names = ["x", *(n for n, _ in m.named_parameters())]
    return {f"d{n}": g for n, g in zip(names, gs) if g is not None}


# two of the four dtype x packing cases: on a fresh H200 each case compiles its own specialisation of every
# fla kernel (IS_VARLEN and the dtypes are compile-time), ~50 s for one KDA backward; the pair covers both
# dtypes and both paths in half the compile time (2026-12-01: 58 s per mixer did not finish the four)
@pytest.mark.parametrize("packed,dtype", [(False, torch.float32), (True, torch.bfloat16)],
                         ids=["plain-fp32", "packed-bf16"])
@pytest.mark.parametrize("name", NAIVE)
def test_fla_layer_matches_naive_reference(name, packed, dtype):
    if WORK_DTYPE.get(name, dtype) != dtype:   # deltanet fp32: vlt's error, then the case in bf16
        with pytest.raises(ValueError, match=r"mixer 'deltanet'.*refuses float32.*bf16-mixed"):
            make(name, dtype)(torch.randn(1, 1024, D, device=DEV, dtype=dtype))
        dtype = WORK_DTYPE[name]
    m = make(name, dtype)
    ref_m = copy.deepcopy(m).float()
    B, T = (1, CU[-1]) if packed else (2, 1024)
    cu = torch.tensor(CU, device=DEV, dtype=torch.int32) if packed else None
    x = torch.randn(B, T, D, device=DEV, dtype=dtype, requires_grad=True)
    xr = x.detach().float().requires_grad_()
    y, state = m(x, cu_seqlens=cu, use_cache=True)                # fla's CUDA layer
    yr, state_r = CPU_PATHS[name](ref_m, xr, None, cu, True)      # fla's naive reference, on the GPU
    dy = torch.randn_like(yr)
    tol = TOL[dtype]
    check(f"{name} {dtype} {'packed' if packed else 'plain'} fwd", {"y": y, "ssm": state["ssm"]},
          {"y": yr, "ssm": state_r["ssm"]}, tol)
    check(f"{name} {dtype} {'packed' if packed else 'plain'} bwd", grads(m, x, y, dy.to(dtype)),
          grads(ref_m, xr, yr, dy), 2 * tol)


@pytest.mark.parametrize("name", NAIVE)
def test_states_cross_between_fla_and_naive_paths(name):
    """A prefill state from fla's kernels decodes on the naive path and the other way round (the
    [K, V] / [V, K] layout and conv-window conversions in layers/fla_mixers.py)."""
    dtype = WORK_DTYPE.get(name, torch.float32)
    m = make(name, dtype).eval()
    x, x1 = torch.randn(2, 300, D, device=DEV, dtype=dtype), torch.randn(2, 1, D, device=DEV, dtype=dtype)
    with torch.no_grad():
        _, s_fla = m(x, use_cache=True)
        _, s_ref = CPU_PATHS[name](m, x, None, None, True)
        y_fla_from_ref, _ = m(x1, state=s_ref, use_cache=True)
        y_ref_from_fla, _ = CPU_PATHS[name](m, x1, s_fla, None, True)
        y_ref, _ = CPU_PATHS[name](m, x1, s_ref, None, True)
    check(f"{name} cross states", {"fla<-naive": y_fla_from_ref, "naive<-fla": y_ref_from_fla},
          {"fla<-naive": y_ref, "naive<-fla": y_ref}, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mamba2_cuda_matches_float64_torch_path(dtype):
    m = make("mamba2", dtype)
    ref_m = copy.deepcopy(m).to("cpu", torch.float64)
    cu = torch.tensor(CU, device=DEV, dtype=torch.int32)
    x = torch.randn(1, CU[-1], D, device=DEV, dtype=dtype, requires_grad=True)
    xr = x.detach().cpu().double().requires_grad_()
    y, s = m(x, cu_seqlens=cu, use_cache=True)
    yr, sr = ref_m(xr, cu_seqlens=cu.cpu(), use_cache=True)
    dy = torch.randn_like(yr)
    check(f"mamba2 {dtype} fwd", {"y": y.cpu(), "ssm": s["ssm"].cpu()}, {"y": yr, "ssm": sr["ssm"]}, TOL[dtype])
    check(f"mamba2 {dtype} bwd", {k: v.cpu() for k, v in grads(m, x, y, dy.to(DEV, dtype)).items()},
          grads(ref_m, xr, yr, dy), 2 * TOL[dtype])


@pytest.mark.parametrize("name", sorted(CASES))
def test_contract_on_cuda(name):
    """Prefill of 200 tokens then 8 decode steps == one forward over all 208; split prefill; packed
    == one by one. MoBA's decode attends densely (fla's choice), so for moba only the packed check
    and that decode runs (or says it needs flash-attn)."""
    dtype = WORK_DTYPE.get(name, torch.float32)
    tol = TOL[dtype]
    m = make(name, dtype).eval()
    x = torch.randn(2, 208, D, device=DEV, dtype=dtype)
    if name == "moba" and not flash_attn_installed():   # all of fla's MoBA runs on flash-attn
        with pytest.raises(ValueError, match=r"mixer 'moba'.*flash-attn is not installed"):
            m(x)
        return
    with torch.no_grad():
        y, _ = m(x)
        seqs = [torch.randn(1, n, D, device=DEV, dtype=dtype) for n in (150, 1, 90)]
        cu = torch.tensor([0, 150, 151, 241], device=DEV, dtype=torch.int32)
        packed, _ = m(torch.cat(seqs, 1), cu_seqlens=cu)
        alone = torch.cat([m(s)[0] for s in seqs], 1)
        check(f"{name} packed", {"y": packed}, {"y": alone}, tol)
        if name == "moba":
            _, s = m(x[:, :200], use_cache=True)
            m(x[:, 200:201], state=s, use_cache=True)   # runs (attends densely: no equality to check)
            return
        _, s = m(x[:, :200], use_cache=True)
        steps = []
        for t in range(200, 208):
            yt, s = m(x[:, t:t + 1], state=s, use_cache=True)
            steps.append(yt)
        _, sa = m(x[:, :120], use_cache=True)
        yb, _ = m(x[:, 120:], state=sa, use_cache=True)
    check(f"{name} decode", {"y": torch.cat(steps, 1)}, {"y": y[:, 200:]}, tol)
    check(f"{name} split prefill", {"y": yb}, {"y": y[:, 120:]}, tol)
    from vlt.layers import state_nbytes   # what each declares (state_spec) is what it carries
    assert state_nbytes(s) == m.state_size(2, 208, dtype)


@pytest.mark.parametrize("name", ["kda", "gdn2", "deltanet", "gla"])
def test_engine_decode_on_fla_kernels(name):
    """`vlt generate`'s path on CUDA: the engine (vlt.inference.fla_step: fla's cache layout updated in place
    by fla's kernels, CUDA graphs) greedy-decodes what the model's eager loop decodes, two prompts of
    different lengths, the fla mixer between attention layers."""
    from vlt.config import VLMConfig
    from vlt.inference import InferenceEngine, generate, generate_eager
    from vlt.model import VLM
    torch.manual_seed(0)
    opts = {k: v for k, v in CASES[name].items()}
    dec = {"layout": f"[{name}, swa, {name}]", "mixers": {name: opts, "swa": {"window": 6}}}
    model = VLM(VLMConfig.from_name("tiny-hybrid", decoder=dec)).to(DEV).eval()
    prompts = [torch.tensor([3, 4, 5, 6, 7, 8, 9, 10, 11], device=DEV), torch.tensor([12, 13, 14, 15], device=DEV)]
    refs = [generate_eager(model, ids[None], max_new_tokens=8) for ids in prompts]
    engine = InferenceEngine(model, batch_size=2, capacity=32)
    assert engine.graphs
    out = generate(engine, [(ids, None) for ids in prompts], max_new_tokens=8)
    assert torch.equal(out, torch.cat(refs))
