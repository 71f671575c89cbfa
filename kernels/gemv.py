"""Batch-1 matrix-vector products (a decode step's projections) as one Triton kernel, with the
elementwise ops around them fused in.

At batch 1 every projection of a decoder step is a GEMV, bound by reading the weight once. cuBLAS
answers these with GEMM tiles of width 8 and, for long rows, split-K plus a separate reduction
kernel; on an H200 (``vlt bench decode-kernels``) that reaches 1.4-3.7 TB/s, lowest on the smaller
matrices. This kernel gives each program BN whole rows, streams them in [BN, BK] tiles with fp32
accumulation and writes BN outputs: no split-K and no second kernel. Tile sizes are autotuned per
shape. Around the product it applies what a pre-norm decoder block does next to it, so those ops
need no kernels of their own:

- prologue ``rmsnorm``: y = W rmsnorm(x) (each program recomputes the row's statistics: K values
  from L2, negligible next to its share of the weight);
- prologue ``swiglu``: y = W (silu(gate) * up), the MLP's down projection;
- epilogue: + bias, then + residual.

Roundings follow the unfused torch ops (RMSNorm's output, SiLU's output and their product, the
projection's output are each rounded to the input dtype), so the fused step matches the model's.

``linear`` / ``norm_linear`` / ``swiglu_linear`` take this path for one row on CUDA (a
``torch.library`` custom op, so it runs inside torch.compile'd code and CUDA graphs) and the torch
ops otherwise.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from vlt.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

NONE, RMSNORM, SWIGLU = 0, 1, 2  # prologues
# Under Triton's interpreter (the CPU tests) CPU tensors take the kernel path too, with a fixed tile.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRET_CONFIG = dict(BN=4, BK=32, ACC1D=False)


def _one_row(x, weight):
    return (triton is not None and (x.is_cuda or _INTERPRET) and x.numel() == x.shape[-1]
            and x.dtype == weight.dtype and weight.stride(-1) == 1)


def linear(x, weight, bias=None, residual=None):
    """``F.linear(x, weight, bias)`` (+ ``residual``)."""
    if not _one_row(x, weight):
        y = F.linear(x, weight, bias)
        return y if residual is None else residual + y
    return _call(x, None, None, weight, bias, residual, 0.0, NONE)


def norm_linear(x, norm_weight, eps: float, weight, bias=None):
    """``F.linear(rms_norm(x), weight, bias)`` with vlt.kernels.rms_norm's roundings."""
    if not _one_row(x, weight):
        from vlt.kernels.norm import rms_norm
        return F.linear(rms_norm(x, norm_weight, eps, "torch"), weight, bias)
    return _call(x, None, norm_weight, weight, bias, None, eps, RMSNORM)


def swiglu_linear(gate, up, weight, residual=None):
    """``F.linear(F.silu(gate) * up, weight)`` (+ ``residual``): the MLP's down projection."""
    if not _one_row(gate, weight):
        y = F.linear(F.silu(gate) * up, weight)
        return y if residual is None else residual + y
    return _call(gate, up, None, weight, None, residual, 0.0, SWIGLU)


def _call(x, x2, norm_weight, weight, bias, residual, eps, prologue):
    flat = [None if t is None else t.reshape(-1) for t in (x, x2, norm_weight, bias, residual)]
    y = torch.ops.vlt.gemv(flat[0], flat[1], flat[2], weight, flat[3], flat[4], eps, prologue)
    return y.view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("vlt::gemv", mutates_args=())
def gemv(x: torch.Tensor, x2: torch.Tensor | None, norm_weight: torch.Tensor | None, weight: torch.Tensor,
         bias: torch.Tensor | None, residual: torch.Tensor | None, eps: float, prologue: int) -> torch.Tensor:
    """y [N] = weight [N, K] @ prologue(x [K], x2) (+ bias) (+ residual), in x's dtype."""
    y = torch.empty(weight.shape[0], device=x.device, dtype=x.dtype)
    gemv_into(y, x, weight, bias, x2=x2, norm_weight=norm_weight, residual=residual, eps=eps, prologue=prologue)
    return y


@gemv.register_fake
def _(x, x2, norm_weight, weight, bias, residual, eps, prologue):
    return x.new_empty(weight.shape[0])


def gemv_into(y, x, weight, bias=None, *, x2=None, norm_weight=None, residual=None, eps: float = 0.0,
              prologue: int = NONE, config: dict | None = None):
    """Launch on given buffers (y must not alias the inputs). ``config`` (BN, BK, ACC1D, num_warps)
    skips autotuning: the CPU tests run the kernel through Triton's interpreter, which cannot time."""
    N, K = weight.shape
    assert x.shape == (K,) and y.shape == (N,) and weight.stride(-1) == 1, (x.shape, weight.shape, y.shape)
    assert (prologue == SWIGLU) == (x2 is not None) and (prologue == RMSNORM) == (norm_weight is not None)
    x, x2, norm_weight = (None if t is None else t.contiguous() for t in (x, x2, norm_weight))
    args = (x, x2 if x2 is not None else x, norm_weight if norm_weight is not None else x, weight,
            bias if bias is not None else y, residual if residual is not None else y, y, N, K, weight.stride(0), eps)
    use_pdl = pdl.enabled(x)
    flags = dict(PRO=prologue, HAS_BIAS=bias is not None, HAS_RES=residual is not None, PDL=use_pdl)
    config = config or (_INTERPRET_CONFIG if _INTERPRET else None)
    if config is None:
        _gemv_tuned[lambda meta: (triton.cdiv(N, meta["BN"]),)](*args, **flags, launch_pdl=use_pdl)
    else:
        c = dict(config)
        _gemv_kernel[(triton.cdiv(N, c["BN"]),)](*args, **flags, **c, launch_pdl=use_pdl)


if triton is not None:
    from vlt.kernels.pdl import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _x_tile(x_ptr, x2_ptr, nw_ptr, cols, mk, rstd, PRO: tl.constexpr, dt: tl.constexpr):
        """The product's input at ``cols``, after the prologue, in fp32 (rounded as the torch ops)."""
        x = tl.load(x_ptr + cols, mask=mk, other=0.0).to(tl.float32)
        if PRO == 1:
            x = (tl.load(nw_ptr + cols, mask=mk, other=0.0).to(tl.float32) * (x * rstd)).to(dt).to(tl.float32)
        elif PRO == 2:
            up = tl.load(x2_ptr + cols, mask=mk, other=0.0).to(tl.float32)
            x = ((x * tl.sigmoid(x)).to(dt).to(tl.float32) * up).to(dt).to(tl.float32)
        return x

    @triton.jit
    def _mac(acc, w, x, ACC1D: tl.constexpr):
        """acc += w x: reduced per tile into [BN] (ACC1D), or kept [BN, BK] and reduced at the end."""
        if ACC1D:
            out = acc + tl.sum(w.to(tl.float32) * x[None, :], 1)
        else:
            out = acc + w.to(tl.float32) * x[None, :]
        return out

    @triton.jit
    def _gemv_kernel(x_ptr, x2_ptr, nw_ptr, w_ptr, b_ptr, res_ptr, y_ptr, N, K, stride_n, eps,
                     PRO: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, ACC1D: tl.constexpr, PDL: tl.constexpr):
        dt = y_ptr.dtype.element_ty
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        mn = rows < N
        w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_n
        # The first weight tile is loaded before anything the previous kernel writes: under PDL
        # (vlt.kernels.pdl) it streams in while that kernel finishes.
        cols = tl.arange(0, BK)
        w = tl.load(w_rows + cols[None, :], mask=mn[:, None] & (cols < K)[None, :], other=0.0)
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        rstd = 0.0
        if PRO == 1:  # RMSNorm statistics of the whole input row
            ss = tl.zeros((BK,), dtype=tl.float32)
            for k0 in range(0, K, BK):
                c = k0 + tl.arange(0, BK)
                xx = tl.load(x_ptr + c, mask=c < K, other=0.0).to(tl.float32)
                ss += xx * xx
            rstd = 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)
        if ACC1D:
            acc = tl.zeros((BN,), dtype=tl.float32)
        else:
            acc = tl.zeros((BN, BK), dtype=tl.float32)
        acc = _mac(acc, w, _x_tile(x_ptr, x2_ptr, nw_ptr, cols, cols < K, rstd, PRO, dt), ACC1D)
        for k0 in range(BK, K, BK):
            c = k0 + tl.arange(0, BK)
            w = tl.load(w_rows + c[None, :], mask=mn[:, None] & (c < K)[None, :], other=0.0)
            acc = _mac(acc, w, _x_tile(x_ptr, x2_ptr, nw_ptr, c, c < K, rstd, PRO, dt), ACC1D)
        if ACC1D:
            y = acc
        else:
            y = tl.sum(acc, 1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=mn, other=0.0).to(tl.float32)
        if HAS_RES:
            y = tl.load(res_ptr + rows, mask=mn, other=0.0).to(tl.float32) + y.to(dt).to(tl.float32)
        tl.store(y_ptr + rows, y.to(dt), mask=mn)

    # (BN, BK, ACC1D, num_warps): a few rows per program with long tiles down to many rows with short
    # ones; which wins depends on the matrix shape and the GPU, so every shape times them once.
    _CONFIGS = [(1, 2048, False, 4), (2, 1024, False, 4), (2, 2048, False, 4), (2, 2048, False, 8),
                (4, 512, False, 4), (4, 1024, False, 4), (4, 1024, False, 8), (4, 2048, False, 8),
                (8, 256, False, 4), (8, 512, False, 4), (8, 1024, False, 4), (8, 1024, False, 8),
                (8, 2048, False, 8), (16, 256, False, 4), (16, 512, False, 8), (16, 1024, False, 8),
                (32, 256, False, 8), (4, 1024, True, 4), (4, 2048, True, 4), (8, 1024, True, 8),
                (8, 2048, True, 8), (16, 512, True, 8), (16, 1024, True, 8)]
    _gemv_tuned = triton.autotune(
        configs=[triton.Config(dict(BN=bn, BK=bk, ACC1D=a), num_warps=w) for bn, bk, a, w in _CONFIGS],
        # PDL is left out of the key: with and without it a shape takes the same tile, so the two
        # launch modes give the same bits (which the GPU tests check, to catch an early load)
        key=["N", "K", "PRO", "HAS_BIAS", "HAS_RES"])(_gemv_kernel)
