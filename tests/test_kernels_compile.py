"""vlt's Triton kernels compiled for a Hopper GPU (sm_90) on a machine without one.

Triton's interpreter (tests/test_decode_kernels.py, test_decode_attention.py) runs the kernels as
Python and so misses what only the compiler rejects (shape mismatches between constexpr branches,
unsupported ops); a kernel that fails to compile would first fail on the GPU. Here every
constexpr variant the code launches is compiled to a cubin with Triton's bundled ptxas, and the
variants launched with programmatic dependent launch are checked to contain its PTX instructions
(vlt.kernels.pdl)."""
import itertools

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def _compile(fn, types: dict, consts: dict, num_warps=4):
    sig = dict(types, **{k: "constexpr" for k in consts})
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=HOPPER,
                            options=dict(num_warps=num_warps, launch_pdl=bool(consts.get("PDL"))))
    ptx = kernel.asm["ptx"]
    assert ("griddepcontrol.wait" in ptx) == bool(consts.get("PDL")), consts
    return kernel


def _types(spec: str) -> dict:
    """'a,b:*bf16 n:i32' -> {'a': '*bf16', 'b': '*bf16', 'n': 'i32'}"""
    out = {}
    for group in spec.split():
        names, ty = group.split(":")
        out.update({n: ty for n in names.split(",")})
    return out


def test_gemv_variants_compile():
    from vlt.kernels import gemv
    types = _types("x_ptr,x2_ptr,nw_ptr,w_ptr,w2_ptr,b_ptr,res_ptr,y_ptr:*bf16 N,K,stride_n:i32 eps:fp32")
    for pro, acc1d, pdl in itertools.product((0, 1, 2), (False, True), (False, True)):
        _compile(gemv._gemv_kernel, types, dict(PRO=pro, HAS_BIAS=pro == 0, HAS_RES=pro != 1, GLU=False, BN=4,
                                                BK=1024, ACC1D=acc1d, PDL=pdl))
    for acc1d, pdl in itertools.product((False, True), (False, True)):  # the MLP's gate/up + SwiGLU
        _compile(gemv._gemv_kernel, types, dict(PRO=1, HAS_BIAS=False, HAS_RES=False, GLU=True, BN=4, BK=1024,
                                                ACC1D=acc1d, PDL=pdl))


def test_gdn_decode_kernels_compile():
    from vlt.kernels import gdn_decode
    shape = dict(H=16, HV=16, K=128, V=256, W=4, BK=128, WP=4)
    for pdl in (False, True):
        _compile(gdn_decode._gdn_recurrent_kernel,
                 _types("q_in,k_in,v_in,a_in,b_in:*bf16 sq,sk,sv,sa,sb:i32 wq,wk,wv,cq,ck,cv:*bf16 "
                        "A_log,dt_bias,ssm:*fp32 out:*bf16 sumsq:*fp32 scale:fp32"),
                 dict(shape, BV=16, NV=16, PDL=pdl))
        _compile(gdn_decode._gdn_norm_kernel,
                 _types("q_in,k_in,g_in:*bf16 sq,sk,sg:i32 cq,ck,norm_w,out:*bf16 sumsq:*fp32 eps:fp32"),
                 dict(shape, BVN=256, NV=16, BNV=16, PDL=pdl))


def test_decode_attention_kernels_compile():
    from vlt.kernels import decode_attention as da
    shape = dict(G=8, GP=16, D=128, BD=128, HKV=2)
    for pdl, dt, ktok, rope in itertools.product((False, True), ("bf16", "fp32"), (False, True), (False, True)):
        _compile(da._attn_split_kernel,
                 _types(f"q,k_new,v_new,k_cache,v_cache:*{dt} ktok,tok_ptr:*i64 part_o,part_ml,cos_ptr,sin_ptr:*fp32 "
                        "sqb,sqh,skb,skh,svb,svh,tok_stride,cs_stride,L,chunk,S:i32 scale:fp32"),
                 dict(shape, HAS_KTOK=ktok, ROPE=rope, BN=64, PREC="ieee" if dt == "fp32" else None, UPCAST=False,
                      PDL=pdl))
    for pdl in (False, True):
        _compile(da._attn_combine_kernel, _types("part_o,part_ml:*fp32 out:*bf16 S:i32"), dict(shape, BS=64, PDL=pdl))
