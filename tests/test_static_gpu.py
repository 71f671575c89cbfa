"""GPU: the Inductor-compiled static step (vlt.bench.static, what `vlt bench infer|stream` time)
against the model's own eager path on CUDA. The eager path runs fla's kernels (fused recurrent GDN,
fla short conv); the static one runs vlt's fused Triton GDN decode step (vlt.kernels.gdn_decode) or
the torch recurrence and conv taps fused by Inductor, so this also pins both to fla; with stacked
projections (pack_projections) too. Decode steps (T = 1) and frames (T = 8, state carried)."""
import argparse
import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from vlt.bench.common import add_common_args, build_model, graphed, setup  # noqa: E402
from vlt.bench.static import StaticStepper, eager_step, frame_positions, pack_projections, rel_err  # noqa: E402

# fp32: fla's GDN kernels use tf32 inside (about 1.5e-3 measured in test_kernels_gpu); bf16 rounding
# through 4 layers. A dropped state or a wrong slot gives errors near 1.
TOL = {"float32": 3e-3, "bfloat16": 5e-2}


@pytest.mark.parametrize("dtype,packed", [("float32", False), ("bfloat16", False), ("bfloat16", True)])
def test_compiled_static_step_matches_eager_cuda(dtype, packed):
    a = add_common_args(argparse.ArgumentParser()).parse_args(["--tiny", "--device", "cuda", "--dtype", dtype])
    dev, dt = setup(a)
    torch.manual_seed(0)
    ref_model = build_model("hybrid", a, dev, dt).eval()    # the reference stays unpacked
    model = copy.deepcopy(ref_model)
    if packed:
        assert pack_projections(model) == 2 * len(model.layers)
    # SWA ring (window 32) not yet full, then wrapped; GDN decode through the fused Triton step and the
    # projections through the GEMV kernel, SWA through vlt's split decode attention (all the default on
    # CUDA), then the compiled torch recurrence, cuBLAS and index_copy + SDPA
    for ctx, fused in ((20, True), (50, True), (50, False)):
        st = StaticStepper(model, 1, dense=True, advance=False, fill="random", context=ctx, compile="inductor",
                           fused_gdn=fused, gemv=fused, decode_attention=fused)
        x, pos = torch.randn(1, 1, 64, device=dev, dtype=dt), frame_positions(1, ctx, dev)
        ref, _ = eager_step(ref_model, x, pos, st.eager_state(ctx))
        st.x.copy_(x)
        st.pos.copy_(pos)
        snap = st.snapshot()
        assert st.fused_gdn == st.gemv == st.decode_attention == fused
        assert rel_err(st.step(), ref) < TOL[dtype], ctx
        replay = graphed(st.step)          # captured after three warm-up steps: restore, then replay once
        st.restore(snap)
        replay()
        assert rel_err(st.out, ref) < TOL[dtype], ctx
    st, state = StaticStepper(model, 8, capacity=128, compile="inductor"), None
    for f in range(6):                     # 48 tokens: the ring wraps
        x, pos = torch.randn(1, 8, 64, device=dev, dtype=dt), frame_positions(8, 4 * f, dev, (2, 4))
        ref, state = eager_step(ref_model, x, pos, state)
        st.x.copy_(x)
        st.pos.copy_(pos)
        assert rel_err(st.step(), ref) < TOL[dtype], f


def test_pdl_step_gives_the_same_bits():
    """The graphed decode step of a packed bf16 hybrid with programmatic dependent launch (its GEMV
    and GDN kernels start early, vlt.kernels.pdl) against the same step launched one kernel after
    another: same logits and GDN states, bit for bit, over 4 replays that carry the states."""
    from vlt.kernels import pdl
    a = add_common_args(argparse.ArgumentParser()).parse_args(["--tiny", "--device", "cuda", "--dtype", "bfloat16"])
    dev, dt = setup(a)
    if not pdl.enabled(torch.empty(0, device=dev)):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+ (Hopper)")
    torch.manual_seed(1)
    model = build_model("hybrid", a, dev, dt).eval()
    pack_projections(model)
    st = StaticStepper(model, 1, dense=True, advance=False, fill="random", context=50, compile="inductor")
    st.x.copy_(torch.randn(1, 1, 64, device=dev, dtype=dt))
    st.pos.copy_(frame_positions(1, 50, dev))
    snap = st.snapshot()
    runs = {}
    for on in (False, True):
        st.pdl = on
        replay = graphed(st.step)
        st.restore(snap)
        outs = []
        for _ in range(4):
            replay()
            outs.append(st.out.clone())
        runs[on] = outs + [t.clone() for s in st.snapshot() if s is not None for t in (*s[0], s[1])]
    assert st.fused_gdn and st.gemv and st.decode_attention
    assert len(runs[True]) == len(runs[False]) > 4
    for i, (x, y) in enumerate(zip(runs[True], runs[False])):
        assert torch.equal(x, y), f"tensor {i} differs with PDL"
