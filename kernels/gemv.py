"""Batch-1 matrix-vector product (a decode step's projections) as a Triton kernel.

At batch 1 every projection of a decoder step is a GEMV, bound by reading the weight once. cuBLAS
answers these with GEMM tiles of width 8 and, for long rows, split-K plus a separate reduction
kernel; on an H200 the decode profile (benchmarks/profiles) shows them at 40-87% of the copy
bandwidth, lowest on the smaller matrices. This kernel gives each program BN whole rows, streams
them in [BN, BK] tiles with fp32 accumulation and writes BN outputs: no split-K, no second kernel,
and enough programs (N / BN) to keep every SM's loads in flight. Tile sizes are autotuned per
(N, K).

``linear(x, weight, bias)`` is ``F.linear`` that takes this path for one row on CUDA (a
``torch.library`` custom op, so it runs inside torch.compile'd code and CUDA graphs) and F.linear
otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; a single row on CUDA goes through the GEMV kernel."""
    if (triton is None or not x.is_cuda or x.numel() != x.shape[-1] or x.dtype != weight.dtype
            or weight.stride(-1) != 1):
        return F.linear(x, weight, bias)
    return gemv(x.reshape(-1), weight, bias).view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("vlt::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [N] = weight [N, K] @ x [K] (+ bias), fp32 accumulation, in x's dtype."""
    y = torch.empty(weight.shape[0], device=x.device, dtype=x.dtype)
    gemv_into(y, x.contiguous(), weight, bias)
    return y


@gemv.register_fake
def _(x, weight, bias=None):
    return x.new_empty(weight.shape[0])


def gemv_into(y, x, weight, bias=None, *, config: dict | None = None):
    """Launch on given buffers; ``config`` (BN, BK, num_warps) skips autotuning (the CPU tests run the
    kernel through Triton's interpreter, which cannot time configurations)."""
    N, K = weight.shape
    assert x.shape == (K,) and y.shape == (N,) and weight.stride(-1) == 1, (x.shape, weight.shape, y.shape)
    args = (x, weight, bias if bias is not None else y, y, N, K, weight.stride(0))
    if config is None:
        _gemv_tuned[lambda meta: (triton.cdiv(N, meta["BN"]),)](*args, HAS_BIAS=bias is not None)
    else:
        c = dict(config)
        _gemv_kernel[(triton.cdiv(N, c["BN"]),)](*args, HAS_BIAS=bias is not None, **c)


if triton is not None:
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_n, HAS_BIAS: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr):
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        mn = rows < N
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            mk = cols < K
            x = tl.load(x_ptr + cols, mask=mk, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_n + cols[None, :],
                        mask=mn[:, None] & mk[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, 1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=mn, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=mn)

    _gemv_tuned = triton.autotune(
        configs=[triton.Config(dict(BN=bn, BK=bk), num_warps=w)
                 for bn, bk, w in ((2, 2048, 4), (4, 1024, 4), (4, 2048, 8), (8, 512, 4), (8, 1024, 4),
                                   (8, 1024, 8), (16, 256, 4), (16, 512, 4), (16, 512, 8), (32, 256, 8))],
        key=["N", "K"])(_gemv_kernel)
