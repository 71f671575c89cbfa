"""vlt.kernels.chunk_attention (T > 1 new queries over a ring K/V cache plus themselves) on the CPU
through Triton's interpreter, against its torch reference (mask + SDPA) and an independent dense
loop over token indices; the engine's multi-token step with it against the step without it; the
custom op inside torch.compile; ``vlt bench stream --chunk-attention`` and ``vlt stream --engine-option``;
and the kernels compiled for sm_90 (what only the compiler rejects). On CUDA the engine uses the
kernel by default; its GPU test is tests/test_kernels_gpu.py (run on an H200, 2026-12-01)."""
import pytest

from triton_interpreter import TINY_ENGINE
from triton_interpreter import interpret as _interpret

triton = pytest.importorskip("triton")


def test_kernel_matches_sdpa_and_a_dense_loop():
    out = _interpret("""
        import itertools
        import torch
        from vlt.kernels.chunk_attention import chunk_attention, chunk_attention_reference
        torch.manual_seed(0)
        rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())

        def ring(tok, L):  # slot s holds the latest token t < tok with t % L == s (-1: none yet)
            s = torch.arange(L)
            last = tok - 1 - ((tok - 1 - s) % L)
            return torch.where(last >= 0, last, torch.full_like(last, -1))

        def dense(q, kn, vn, kc, vc, ktok, qtok, window):
            # every (row, query, head) on its own, in float64: the keys whose token index it may see
            B, T, Hq, D = q.shape
            G = Hq // kc.shape[2]
            keys, vals = torch.cat([kc, kn], 1).double(), torch.cat([vc, vn], 1).double()
            kt = torch.cat([ktok, qtok], 1)
            o = torch.zeros(B, T, Hq, D, dtype=torch.float64)
            for b, t, hq in itertools.product(range(B), range(T), range(Hq)):
                p = int(qtok[b, t])
                idx = [j for j in range(kt.shape[1])
                       if 0 <= kt[b, j] <= p and (window is None or kt[b, j] > p - window)]
                k, v = keys[b, idx, hq // G], vals[b, idx, hq // G]
                w = torch.softmax(k @ q[b, t, hq].double() * D ** -0.5, 0)
                o[b, t, hq] = w @ v
            return o

        # (B, T, Hq, Hkv, D, L, tokens seen per row, window, block_m, block_n, splits)
        cases = [
            (1, 9, 8, 2, 16, 48, [10], None, 16, 16, None),     # full attention: ring partly filled (-1 slots)
            (1, 13, 8, 2, 32, 16, [37], 16, 16, 16, None),      # SWA ring wrapped, window L: later queries lose keys
            (1, 20, 4, 4, 16, 32, [45], 20, 32, 16, 3),         # Hq == Hkv, window < L, T not a block multiple
            (2, 11, 6, 2, 16, 24, [5, 40], 24, 16, 16, 4),      # B 2: one row partly filled, one wrapped; G 3 (padded)
            (1, 12, 4, 1, 16, 8, [20], 8, 16, 16, 2),           # T > L: early new keys already out of later windows
            (1, 10, 8, 2, 16, 48, [100], 12, 16, 16, None),     # window << L: the visible slots wrap, a block skipped
            (1, 7, 4, 1, 16, 40, [30], None, 16, 16, 1),        # one split: the output stored by the split kernel
        ]
        for dt, (B, T, Hq, Hkv, D, L, toks, window, bm, bn, splits) in itertools.product(
                (torch.float32, torch.bfloat16, torch.float16), cases):
            if dt != torch.float32 and B == 1 and Hq == Hkv:
                continue   # the half-precision runs take the other cases (interpreter time)
            # q, k, v as strided views of one stacked projection (as the engine's packed q/k/v)
            proj = torch.randn(B, T, (Hq + 2 * Hkv) * D).to(dt)
            q, kn, vn = proj.split([Hq * D, Hkv * D, Hkv * D], -1)
            q, kn, vn = q.view(B, T, Hq, D), kn.view(B, T, Hkv, D), vn.view(B, T, Hkv, D)
            kc, vc = torch.randn(B, L, Hkv, D).to(dt), torch.randn(B, L, Hkv, D).to(dt)
            tok = torch.tensor(toks)
            ktok = torch.stack([ring(int(t), L) for t in tok])
            qtok = tok[:, None] + torch.arange(T)
            kc0 = kc.clone()
            o = chunk_attention(q, kn, vn, kc, vc, ktok, qtok, window=window, block_m=bm, block_n=bn, splits=splits)
            r = chunk_attention_reference(q, kn, vn, kc, vc, ktok, qtok, window=window)
            e = dense(q, kn, vn, kc, vc, ktok, qtok, window)
            # fp32: rounding order only; fp16 / bf16: the output's and the probabilities' rounding (the
            # interpreter rounds bf16 toward zero, the GPU to nearest), measured ~2.5e-4 / ~5e-3
            tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dt]
            print(dt, B, T, Hq, Hkv, D, L, toks, window, splits, rel(o, r), rel(o, e), rel(r, e))
            assert o.shape == (B, T, Hq, D) and o.dtype == dt and torch.equal(kc, kc0)
            assert rel(o, r) < tol and rel(o, e) < tol, (dt, B, T, L, toks, window)
            if toks == [100]:  # slots 16..31 hold tokens 64..79, out of every window: their block is not read
                kc[:, 16:32], vc[:, 16:32] = float("nan"), float("nan")
                assert torch.equal(chunk_attention(q, kn, vn, kc, vc, ktok, qtok, window=window, block_m=bm,
                                                   block_n=bn, splits=splits), o)
        print("OK")
    """)
    assert out.strip().endswith("OK")


def test_engine_chunk_with_the_kernel_matches_without():
    """A prompt chunk (embeddings through step_embeddings) after a prompt that wrapped the SWA ring
    (window 16), then a second chunk over the ring the first wrote: engine logits and caches with
    chunk_attention on (the kernel, under the interpreter) equal those with it off (mask + SDPA)
    within 1e-5 relative (fp32)."""
    out = _interpret("""
        on = InferenceEngine(model, capacity=48, graphs=False, compile=None, chunk_attention=True)
        off = InferenceEngine(model, capacity=48, graphs=False, compile=None, chunk_attention=False)
        assert on.chunk_attention and not off.chunk_attention
        for eng in (on, off):
            eng.prefill(prompts[0])
        for T in (7, 11):
            ids = torch.randint(0, 200, (1, T))
            with torch.no_grad():
                x = model.embed_tokens(ids)
            pos = on.next_pos[:, None] + torch.arange(T)
            got, ref = on.step_embeddings(x, pos), off.step_embeddings(x, pos)
            print(T, rel_err(got, ref))
            assert rel_err(got, ref) < 1e-5, (T, rel_err(got, ref))
        for c_on, c_off in zip(on.snapshot()[0], off.snapshot()[0]):
            assert torch.allclose(c_on.float(), c_off.float(), rtol=1e-5, atol=1e-6)
        print("OK")
    """, prelude=TINY_ENGINE)
    assert out.strip().endswith("OK")


def test_bench_stream_and_the_cli_turn_it_on(tmp_path):
    """``vlt bench stream --chunk-attention`` streams through the kernel (here under the interpreter)
    and its engine's logits still match the eager path's; ``vlt stream --engine-option
    chunk_attention=true`` reaches the engine."""
    from vlt.eval_cli import engine_options
    assert engine_options(["chunk_attention=true", "graphs=false"]) == {"chunk_attention": True, "graphs": False}
    assert engine_options([]) == {}
    assert engine_options(["chunk_attention=none"]) == {"chunk_attention": None}   # the engine's choice
    with pytest.raises(ValueError, match="chunk_attention takes true or false or none"):
        engine_options(["chunk_attention=yes"])
    out = _interpret(f"""
        import json
        from vlt.bench.stream import main
        assert main(["--tiny", "--device", "cpu", "--frames", "4", "--eager-frames", "3", "--check-frames", "3",
                     "--chunk-attention", "--out", {str(tmp_path)!r}]) == 0
        r = json.load(open({str(tmp_path / "stream.json")!r}))["results"][0]
        assert r["chunk_attention"] is True and r["check_engine_vs_eager_rel_err"] < 1e-5, r
        print("OK")
    """)
    assert out.strip().endswith("OK")


def test_custom_op_stays_in_one_compiled_graph():
    """The engine compiles attend_tokens (inductor on CUDA): the kernel is a torch custom op with a
    fake, so the step compiles with fullgraph=True (no graph break) and gives the kernel's values."""
    out = _interpret("""
        import torch
        from vlt.kernels.chunk_attention import chunk_attention, chunk_attention_reference
        torch.manual_seed(0)
        q, kn, vn = torch.randn(1, 7, 4, 16), torch.randn(1, 7, 1, 16), torch.randn(1, 7, 1, 16)
        kc, vc = torch.randn(1, 20, 1, 16), torch.randn(1, 20, 1, 16)
        ktok, qtok = torch.arange(20)[None], 20 + torch.arange(7)[None]
        torch.library.opcheck(torch.ops.vlt.chunk_attention, (q, kn, vn, kc, vc, ktok, qtok, 16, None, 16, 16, 0, 2, 0))
        step = lambda q, *a: chunk_attention(q * 2, *a, window=16, block_m=16, block_n=16) + 1
        got = torch.compile(step, backend="inductor", dynamic=False, fullgraph=True)(q, kn, vn, kc, vc, ktok, qtok)
        ref = chunk_attention_reference(q * 2, kn, vn, kc, vc, ktok, qtok, window=16) + 1
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), float((got - ref).abs().max())
        print("OK")
    """)
    assert out.strip().endswith("OK")


def test_kernels_compile_for_sm90():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vlt.kernels import chunk_attention as ca

    def compile_(fn, types, consts, num_warps):
        sig = dict(types, **{k: "constexpr" for k in consts})
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=num_warps, launch_pdl=consts["PDL"]))
        assert ("griddepcontrol.wait" in kernel.asm["ptx"]) == consts["PDL"]
        return kernel

    ints = ("sqb,sqt,sqh,skb,skt,skh,svb,svt,svh,scb,scl,sch,sob,sot,soh,T,L,window,NBR,NB,CB,S,QB").split(",")
    # InfiniteVL-4B's SWA (G 8, D 128) with the launcher's default tile (128 rows, 64 keys, 8 warps)
    shape = dict(G=8, GP=8, BT=16, D=128, BD=128, HKV=2)
    # each flag both ways, each dtype once or more (a cold compile is ~6 s a variant on this CPU)
    for dt, window, one, pdl in [("bf16", True, False, True), ("bf16", False, True, False),
                                 ("fp16", True, False, False), ("fp32", True, True, True)]:
        types = dict({n: f"*{dt}" for n in ("q", "k_new", "v_new", "k_cache", "v_cache", "out")},
                     ktok="*i64", qtok="*i64", part_o="*fp32", part_ml="*fp32", qk_scale="fp32",
                     **{n: "i32" for n in ints})
        k = compile_(ca._chunk_split_kernel, types,
                     dict(shape, BN=64, HAS_WINDOW=window, ONE_SPLIT=one, PREC="ieee" if dt == "fp32" else None,
                          UPCAST=False, PDL=pdl), num_warps=8)
        # the K/V loads of the three key loops are software-pipelined (async copies); a branch inside
        # a loop body silently stops that
        assert k.asm["ttgir"].count("async_copy_global_to_local") >= 6, (dt, window, one, pdl)
    for pdl in (False, True):
        compile_(ca._chunk_combine_kernel, dict(part_o="*fp32", part_ml="*fp32", out="*bf16", sob="i32", sot="i32",
                                                soh="i32", T="i32", S="i32", QB="i32"),
                 dict(shape, RB=16, PDL=pdl), num_warps=8)
