"""vlt.kernels.decode_attention (the engine's attention decode step: K/V write + split attention +
combine) on the CPU through Triton's interpreter, against index_copy + SDPA
(``decode_attention_reference``), and the stepper using it against the model's eager blocks. The GPU
compiles the same kernels: tests/test_kernels_gpu.py and tests/test_inference_gpu.py."""
import pytest

from triton_interpreter import TINY_ENGINE
from triton_interpreter import interpret as _interpret

pytest.importorskip("triton")


def test_kernel_matches_sdpa_with_the_write():
    out = _interpret("""
        import torch
        from vlt.kernels.decode_attention import decode_attention, decode_attention_reference
        from vlt.layers.rotary import rope_cos_sin
        torch.manual_seed(0)
        rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
        # (B, Hq, Hkv, D, L, splits, dtype): GQA 8:2 with D 128 as InfiniteVL's SWA; L not a multiple of
        # the block (a short last split); one split; MHA; B 2; head dim not a power of two; bf16
        # RoPE in the kernel on every case but MHA
        for B, Hq, Hkv, D, L, splits, dt in [(1, 8, 2, 128, 200, 3, torch.float32), (1, 4, 1, 32, 50, 1, torch.float32),
                                             (2, 4, 4, 16, 130, 4, torch.float32), (1, 6, 2, 40, 96, 2, torch.float32),
                                             (1, 8, 2, 64, 300, 5, torch.bfloat16)]:
            rope = Hq != Hkv
            kc, vc = torch.randn(B, L, Hkv, D, dtype=dt), torch.randn(B, L, Hkv, D, dtype=dt)
            ktok = torch.arange(L).repeat(B, 1)
            kc2, vc2, ktok2 = kc.clone(), vc.clone(), ktok.clone()
            # slots 3, L - 1 (the last split's end), 7 of a cache not yet wrapped (only slots 0..7 are
            # valid: later splits do no work); with B 2 also one token index per row, one row wrapped
            for tok in [L + 3, 5 * L - 1, 7] + ([(7, L + 3)] if B == 2 else []):
                proj = torch.randn(B, Hq * D + 2 * Hkv * D, dtype=dt)
                q, k, v = proj.split([Hq * D, Hkv * D, Hkv * D], -1)   # strided views, as a stacked projection
                q, k, v = q.view(B, Hq, D), k.view(B, Hkv, D), v.view(B, Hkv, D)
                t = torch.tensor(tok)
                per_row = t.dim() == 1
                cos, sin = (c.view(B, D) if per_row else c.view(-1)
                            for c in rope_cos_sin(t.reshape(-1, 1), D, 10000.0)) if rope else (None, None)
                o = decode_attention(q, k, v, kc, vc, t, ktok, splits=splits, block_n=16, cos=cos, sin=sin)
                r = decode_attention_reference(q, k, v, kc2, vc2, t, ktok2, cos=cos, sin=sin)
                print(dt, B, Hq, Hkv, D, L, tok, rel(o, r))
                assert o.shape == (B, Hq, D) and o.dtype == dt
                assert rel(o, r) < (1e-5 if dt == torch.float32 else 1e-2), (B, Hq, D, L, tok)
                assert torch.equal(vc, vc2) and torch.equal(ktok, ktok2)
                # the rotated key: in fp32 the kernel's RoPE (numpy under the interpreter) and torch's
                # differ in FMA contraction and vector width from CPU to CPU, so a few fp32 ulps of
                # the key's scale; in bf16 Triton's interpreter rounds toward zero (the GPU to nearest
                # even, which tests/test_kernels_gpu.py checks bit-exactly): 1 bf16 ulp for the rounding
                # plus 1 where the fp32 difference crosses a rounding boundary
                scale = float(kc2.float().abs().max())
                rtol = 1e-5 if dt == torch.float32 else 2 ** -6
                assert torch.allclose(kc.float(), kc2.float(), rtol=rtol, atol=1e-5 * scale), (dt, B, Hq, D, L, tok)
        print("OK")
    """)
    assert out.strip().endswith("OK")


def test_engine_decode_with_the_kernels_matches_eager():
    """The engine's decode with every vlt kernel (the interpreter runs them on CPU tensors): batch 1
    (GEMVs, fused GDN step, decode attention) and batch 2 with rows of different lengths (per-row
    token counters, RoPE and valid slots in the decode attention kernel); one row's SWA ring has
    wrapped, the other's not."""
    out = _interpret("""
        for B in (1, 2):
            eng = InferenceEngine(model, batch_size=B, capacity=48, fused=True, graphs=False, compile=None)
            rows = prompts[:B]
            for b, ids in enumerate(rows):
                eng.prefill(ids, row=b)
            tokens = [[int(t) for t in torch.randint(0, 200, (6,))] for _ in rows]
            refs = [eager_logits(ids, toks) for ids, toks in zip(rows, tokens)]
            for i in range(6):
                got = eng.decode(torch.tensor([toks[i] for toks in tokens]))
                for b in range(B):
                    err = rel_err(got[b], refs[b][i])
                    print(B, b, i, err)
                    assert err < 1e-5, (B, b, i, err)
            # the new K/V landed in the slots: the engine's state converts back to the eager one
            for b, ids in enumerate(rows):
                with torch.no_grad():
                    out = model(torch.cat([ids, torch.tensor(tokens[b][:-1])])[None], use_cache=True)
                    out = model(torch.tensor([[tokens[b][-1]]]), state=out.state, use_cache=True)
                got_state = eng.export_state(b)["layers"]
                for s_got, s_ref in ((got_state[0], out.state["layers"][0]), (got_state[3], out.state["layers"][3])):
                    scale = float(s_ref["k"].abs().max())
                    assert torch.allclose(s_got["k"], s_ref["k"], rtol=1e-5, atol=1e-5 * scale)
        print("OK")
    """, prelude=TINY_ENGINE)
    assert out.strip().endswith("OK")
