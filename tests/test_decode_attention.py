"""vlt.kernels.decode_attention (the static stepper's SWA decode step: K/V write + split attention +
combine) on the CPU through Triton's interpreter, against index_copy + SDPA
(``decode_attention_reference``), and the stepper using it against the model's eager blocks. The GPU
compiles the same kernels: tests/test_kernels_gpu.py and tests/test_static_gpu.py."""
import pytest

from triton_interpreter import TINY_HYBRID
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
            ktok = torch.arange(L)
            kc2, vc2, ktok2 = kc.clone(), vc.clone(), ktok.clone()
            for tok in (L + 3, 5 * L - 1, 7):               # slots 3, L - 1 (the last split's end), 7
                proj = torch.randn(B, Hq * D + 2 * Hkv * D, dtype=dt)
                q, k, v = proj.split([Hq * D, Hkv * D, Hkv * D], -1)   # strided views, as a stacked projection
                q, k, v = q.view(B, Hq, D), k.view(B, Hkv, D), v.view(B, Hkv, D)
                t = torch.tensor(tok)
                cos, sin = (c.view(-1) for c in rope_cos_sin(torch.tensor([[tok]]), D, 10000.0)) if rope else (None, None)
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


def test_static_step_with_the_kernel_matches_eager():
    out = _interpret("""
        # the dense decode step with every vlt kernel (the interpreter runs them on CPU tensors):
        # the SWA ring (window 32) not yet full, then wrapped
        for ctx in (20, 50):
            st = StaticStepper(model, 1, dense=True, advance=False, fill="random", context=ctx, fused_gdn=True,
                               gemv=True, decode_attention=True)
            x, pos = torch.randn(1, 1, 64), frame_positions(1, ctx, dev)
            ref, new_state = eager_step(model, x, pos, st.eager_state(ctx))
            st.x.copy_(x)
            st.pos.copy_(pos)
            err = rel_err(st.step(), ref)
            print(ctx, err)
            assert err < 1e-5, (ctx, err)
            for s, ns in zip(st.states, new_state["layers"]):   # the new K/V landed in the slot
                if s["kind"] == "attn":
                    slot = ctx % s["L"]
                    new_k = ns["k"][:, -1] if ns["k"].shape[1] > ctx else ns["k"][:, slot]  # chronological or ring
                    # rotated by the kernel (numpy under the interpreter) vs torch's apply_rope: equal up
                    # to FMA contraction / vector width, so a tolerance relative to the key's scale
                    scale = float(new_k.abs().max())
                    assert torch.allclose(s["k"][:, slot], new_k, rtol=1e-5, atol=1e-5 * scale), \
                        (ctx, float((s["k"][:, slot] - new_k).abs().max()), scale)
                    assert int(s["ktok"][slot]) == ctx
        print("OK")
    """, prelude=TINY_HYBRID)
    assert out.strip().endswith("OK")
