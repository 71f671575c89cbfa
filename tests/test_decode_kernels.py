"""The decode kernels - the fused GDN step (vlt.kernels.gdn_decode) and the batch-1 GEMV
(vlt.kernels.gemv) - on the CPU, through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before the kernel module is imported (Triton decides at
``@triton.jit`` time), so each check runs in a fresh Python process. References: the torch version
of the same GDN step (``gdn_decode_reference``), the GDN mixer's own forward over several carried
decode steps, the inference engine's fused path against the model's eager blocks, and a float64
matrix-vector product. The GPU compiles the same kernels for real: tests/test_kernels_gpu.py and
tests/test_inference_gpu.py.
"""
import pytest
from triton_interpreter import TINY_ENGINE
from triton_interpreter import interpret as _interpret

pytest.importorskip("triton")


def test_kernel_matches_torch_step():
    out = _interpret("""
        import torch
        from vlt.kernels.gdn_decode import gdn_decode_reference, gdn_decode_step
        torch.manual_seed(0)
        # (B, H, HV, K, V, W, dtype, block_v): GVA (HV = 2H), V not a power of two and not a multiple of
        # the block, a width-3 conv, bf16
        for B, H, HV, K, V, W, dt, bv in [(1, 2, 2, 16, 32, 4, torch.float32, 16),
                                          (2, 2, 4, 16, 24, 4, torch.float32, 16),
                                          (1, 1, 1, 8, 40, 3, torch.float32, 32),
                                          (2, 2, 2, 32, 64, 4, torch.bfloat16, 64)]:
            Ck, Cv = H * K, HV * V
            proj = torch.randn(B, 2 * Ck + 2 * Cv + 2 * HV, dtype=dt)
            ins = proj.split([Ck, Ck, Cv, Cv, HV, HV], -1)           # strided views, as a stacked projection
            ws = [(torch.randn(c, W) * 0.5).to(dt) for c in (Ck, Ck, Cv)]
            convs = [torch.randn(B, c, W - 1, dtype=dt) for c in (Ck, Ck, Cv)]
            A_log, dt_bias, nw = torch.rand(HV).log(), torch.randn(HV), (torch.rand(V) + 0.5).to(dt)
            ssm = torch.randn(B, HV, K, V) * 0.1
            convs2, ssm2 = [c.clone() for c in convs], ssm.clone()
            for step in range(3):                                    # states carried across steps
                o = gdn_decode_step(*ins, ws, convs, A_log, dt_bias, ssm, nw, 1e-6, block_v=bv)
                r = gdn_decode_reference(*ins, ws, convs2, A_log, dt_bias, ssm2, nw, 1e-6)
                rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
                conv_err = max(rel(a, b) for a, b in zip(convs, convs2))
                print(dt, V, step, rel(o, r), rel(ssm, ssm2), conv_err)
                tol = 1e-6 if dt == torch.float32 else 1e-2
                assert o.shape == (B, Cv) and o.dtype == dt
                assert rel(o, r) < tol and rel(ssm, ssm2) < tol and conv_err == 0, (dt, V, step)
                ins = [x + 0.1 * torch.randn_like(x) for x in ins]
        print("OK")
    """)
    assert out.strip().endswith("OK")


def test_kernel_matches_gdn_mixer_over_decode_steps():
    """The mixer's forward (torch backend, state carried out of place) is the model's definition."""
    out = _interpret("""
        import torch
        from vlt.layers.gdn import GatedDeltaNet
        from vlt.layers import project
        from vlt.kernels.gdn_decode import gdn_decode_step
        torch.manual_seed(0)
        for nv in (None, 4):                                         # plain, and grouped value heads
            m = GatedDeltaNet(32, num_heads=2, head_dim=16, num_v_heads=nv, backend="torch").eval()
            with torch.no_grad():
                for conv in (m.q_conv1d, m.k_conv1d, m.v_conv1d):
                    conv.weight.normal_(0, 0.5)
            x = torch.randn(1, 5, 32)
            with torch.no_grad():
                _, state = m(x, use_cache=True)                      # a prefilled state
                conv = [c.clone() for c in state["conv"]]
                ssm = state["ssm"].clone()
                for t in range(4):
                    xt = torch.randn(1, 1, 32)
                    y_ref, state = m(xt, state=state, use_cache=True)
                    rows = [p[:, 0] for p in project(xt, m.q_proj, m.k_proj, m.v_proj, m.g_proj, m.a_proj, m.b_proj)]
                    w = (m.q_conv1d.weight[:, 0], m.k_conv1d.weight[:, 0], m.v_conv1d.weight[:, 0])
                    o = gdn_decode_step(*rows, w, conv, m.A_log, m.dt_bias, ssm, m.o_norm_weight, m.norm_eps)
                    y = m.o_proj(o)[:, None]
                    rel = float((y - y_ref).norm() / y_ref.norm())
                    srel = float((ssm - state["ssm"]).norm() / state["ssm"].norm())
                    print(nv, t, rel, srel)
                    assert rel < 1e-5 and srel < 1e-5, (nv, t, rel, srel)
                    # conv windows hold projected inputs; the stacked projection and the mixer's own
                    # differ in summation order, so fp32 round-off of the rows' scale, not bits
                    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
                               for a, b in zip(conv, state["conv"]))
        print("OK")
    """)
    assert out.strip().endswith("OK")


def test_engine_fused_gdn_with_separate_and_stacked_projections():
    """The engine's batch-1 decode with the fused GDN step and every projection through the GEMV
    kernel (norm / SwiGLU / residual fused in), with the projections left apart and stacked."""
    out = _interpret("""
        import copy
        from vlt.inference import pack_projections
        packed = copy.deepcopy(model)
        assert pack_projections(packed) == 2 * len(packed.layers)
        ids, toks = prompts[1], [5, 6, 7, 8]
        refs = eager_logits(ids, toks)
        for stepped, pack in ((model, False), (packed, True)):
            eng = InferenceEngine(stepped, capacity=32, fused=True, graphs=False, compile=None, pack=pack)
            eng.prefill(ids)
            for i, t in enumerate(toks):
                err = rel_err(eng.decode(torch.tensor([t]))[0], refs[i])
                print(pack, i, err)
                assert err < 1e-5, (pack, i, err)
        print("OK")
    """, prelude=TINY_ENGINE)
    assert out.strip().endswith("OK")


def test_gemv_kernel_matches_float64():
    out = _interpret("""
        import torch
        from vlt.kernels.gemv import gemv_into
        torch.manual_seed(0)
        # rows not a multiple of BN, K not a multiple of BK, a bias, a strided weight (rows of a wider
        # matrix); both accumulator layouts
        for N, K, bias, dt, cfg in [(37, 300, False, torch.float32, dict(BN=8, BK=128, ACC1D=False)),
                                    (64, 256, True, torch.float32, dict(BN=16, BK=64, ACC1D=True)),
                                    (50, 1000, True, torch.bfloat16, dict(BN=4, BK=256, ACC1D=False))]:
            w = torch.randn(N, K + 8).to(dt)[:, :K]
            x, b = torch.randn(K).to(dt), (torch.randn(N).to(dt) if bias else None)
            y = torch.empty(N, dtype=dt)
            gemv_into(y, x, w, b, config=cfg)
            ref = w.double() @ x.double() + (b.double() if bias else 0)
            err = float((y.double() - ref).norm() / ref.norm())
            print(N, K, dt, err)
            assert err < (1e-6 if dt == torch.float32 else 5e-3), (N, K, dt, err)
        print("OK")
    """)
    assert out.strip().endswith("OK")


def test_gemv_fused_prologues_match_torch_ops():
    """RMSNorm prologue, SwiGLU prologue, bias + residual epilogue and the SwiGLU epilogue (two
    weights) against the unfused torch ops
    (vlt.kernels.rms_norm, F.silu, F.linear, +) with the same roundings; CPU tensors take the kernel
    path under the interpreter."""
    out = _interpret("""
        import torch
        import torch.nn.functional as F
        from vlt.kernels import rms_norm
        from vlt.kernels.gemv import linear, norm_linear, norm_swiglu, swiglu_linear, _one_row
        torch.manual_seed(0)
        for dt, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
            N, K = 40, 96
            w, b = torch.randn(N, K).to(dt) * K ** -0.5, torch.randn(N).to(dt)
            x, up, res = torch.randn(1, 1, K).to(dt), torch.randn(1, 1, K).to(dt), torch.randn(1, 1, N).to(dt)
            nw = (torch.rand(K) + 0.5).to(dt)
            assert _one_row(x, w)
            rel = lambda a, r: float((a.double() - r.double()).norm() / r.double().norm())
            pairs = {
                "rmsnorm+bias": (norm_linear(x, nw, 1e-6, w, b), F.linear(rms_norm(x, nw, 1e-6, "torch"), w, b)),
                "swiglu+res": (swiglu_linear(x, up, w, residual=res), res + F.linear(F.silu(x) * up, w)),
                "bias+res": (linear(x, w, b, residual=res), res + F.linear(x, w, b)),
            }
            # the MLP's first half: gate and up as the halves of one stacked weight (as the stepper packs
            # them), SwiGLU in the epilogue
            wgu = torch.randn(2 * N, K).to(dt) * K ** -0.5
            n = rms_norm(x, nw, 1e-6, "torch")
            pairs["rmsnorm+swiglu"] = (norm_swiglu(x, nw, 1e-6, wgu[:N], wgu[N:]),
                                       F.silu(F.linear(n, wgu[:N])) * F.linear(n, wgu[N:]))
            for name, (y, ref) in pairs.items():
                print(dt, name, rel(y, ref))
                # the interpreter rounds fp32 -> bf16 toward zero (the GPU to nearest even), a bias that
                # adds up over SwiGLU's four roundings: a wider bound for that one here, 1e-2 on the GPU
                bound = 3 * tol if name == "rmsnorm+swiglu" else tol
                assert y.shape == ref.shape and y.dtype == dt and rel(y, ref) < bound, (dt, name)
        print("OK")
    """)
    assert out.strip().endswith("OK")


def test_gemv_tile_tables_are_valid(monkeypatch):
    """Every committed tile table (kernels/gemv_configs/<GPU>.json, from ``vlt bench decode-kernels
    --tune-gemv``) names tiles the kernel is tuned over, under keys ``tuned_key`` produces; the GEMV
    takes them for that GPU only, and ``VLT_GEMV_TUNED=0`` turns them off."""
    import glob
    import json
    import os
    import re
    from vlt.kernels import gemv
    paths = glob.glob(os.path.join(gemv.TUNED_DIR, "*.json"))
    assert paths, "no tile table committed"
    tiles = {(bn, bk, acc, w) for bn, bk, acc, w in gemv.TILES}
    for path in paths:
        table = json.load(open(path))
        assert gemv.tuned_table_path(table["device"]) == path
        for key, cfg in table["configs"].items():
            n, k, pro, bias, res, glu = map(int, re.fullmatch(
                r"N=(\d+) K=(\d+) prologue=(\d) bias=(\d) residual=(\d) glu=(\d)", key).groups())
            assert gemv.tuned_key(n, k, pro, bias, res, glu) == key
            assert (cfg["BN"], cfg["BK"], cfg["ACC1D"], cfg["num_warps"]) in tiles, (path, key, cfg)
            assert gemv.tuned_config(table["device"], key) == cfg
            assert gemv.tuned_config("some other GPU", key) is None
            monkeypatch.setenv("VLT_GEMV_TUNED", "0")
            assert gemv.tuned_config(table["device"], key) is None
            monkeypatch.delenv("VLT_GEMV_TUNED")


def test_gemv_default_tile_is_near_the_measured_best():
    """A shape no table lists takes ``default_tile`` (one compile, no autotuning): for each launch a
    committed table timed every tile of, the default is a tile it timed and is within 1.15x of the
    best one measured."""
    import glob
    import json
    import os
    import re
    from vlt.kernels import gemv
    for path in glob.glob(os.path.join(gemv.TUNED_DIR, "*.json")):
        for key, row in json.load(open(path))["timings"].items():
            n, k = map(int, re.match(r"N=(\d+) K=(\d+)", key).groups())
            tile = gemv.default_tile(n, k)
            got = row["us_per_tile"][str(tile)]
            assert got <= 1.15 * row["best_us"], (path, key, tile, got, row["best_us"])
