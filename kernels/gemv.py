"""Batch-1 matrix-vector products (a decode step's projections) as one Triton kernel, with the
elementwise ops around them fused in.

At batch 1 every projection of a decoder step is a GEMV, bound by reading the weight once. cuBLAS
answers these with GEMM tiles of width 8 and, for long rows, split-K plus a separate reduction
kernel, well below the copy bandwidth on the smaller matrices (``vlt bench decode-kernels``;
figures in benchmarks/README.md). This kernel gives each program BN whole rows, streams them in
[BN, BK] tiles with fp32 accumulation and writes BN outputs: no split-K and no second kernel. Tile
sizes come from a measured table or one default tile (Tiles, below). Around the product it applies
what a pre-norm decoder block does next to it, so those ops need no kernels of their own:

- prologue ``rmsnorm``: y = W rmsnorm(x) (each program recomputes the row's statistics: K values
  from L2, negligible next to its share of the weight);
- prologue ``swiglu``: y = W (silu(gate) * up), the MLP's down projection taking gate and up;
- epilogue: + bias, then + residual;
- epilogue SwiGLU (``norm_swiglu``): a second weight W2 of W's shape, read by the same program
  for the same rows, gives h = silu(W x) * (W2 x): the MLP's first half ends in h, so the down
  projection is a plain GEMV. (The swiglu prologue recomputes silu over all K inputs in each of
  the down projection's programs: 2048 / BN times per step.)

Roundings follow the unfused torch ops (RMSNorm's output, SiLU's output and their product, the
projection's output are each rounded to the input dtype), so the fused step matches the model's.

Tiles: Triton's autotuner times each tile once per shape, one kernel at a time; for kernels of a
few microseconds that pick varies from process to process and need not be the best inside a decode
step, where each kernel overlaps its neighbours (programmatic dependent launch) and the weights come from
HBM. ``vlt bench decode-kernels --tune-gemv`` times every tile in that setting (a CUDA graph over
36 layers' weights) and writes a table; tables in ``kernels/gemv_configs/<GPU name>.json`` are used
for the shapes they list on that GPU (``VLT_GEMV_TUNED=0`` ignores them). A shape no table lists
takes ``default_tile``, one compile: autotuning it would compile all 27 tiles per shape and dtype,
minutes before the first token of a model with other shapes (a tiny test model has 7 launch shapes).
``VLT_GEMV_AUTOTUNE=1`` hands those shapes to Triton's autotuner instead.

``linear`` / ``norm_linear`` / ``swiglu_linear`` / ``norm_swiglu`` take this path for one row on CUDA (a
``torch.library`` custom op, so it runs inside torch.compile'd code and CUDA graphs) and the torch
ops otherwise.
"""
from __future__ import annotations

import json
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


# (BN, BK, ACC1D, num_warps): a few rows per program with long tiles down to many rows with short
# ones; which wins depends on the matrix shape and the GPU, so every shape times them once.
# the tiles every shape is timed with (by the autotuner, or by ``vlt bench decode-kernels --tune-gemv``)
TILES = [(1, 2048, False, 4), (2, 1024, False, 4), (2, 2048, False, 4), (2, 2048, False, 8),
         (4, 512, False, 4), (4, 1024, False, 4), (4, 1024, False, 8), (4, 2048, False, 8),
         (8, 256, False, 4), (8, 512, False, 4), (8, 1024, False, 4), (8, 1024, False, 8),
         (8, 2048, False, 8), (16, 256, False, 4), (16, 512, False, 8), (16, 1024, False, 8),
         (32, 256, False, 8), (4, 1024, True, 4), (4, 2048, True, 4), (8, 1024, True, 8),
         (8, 2048, True, 8), (16, 512, True, 8), (16, 1024, True, 8),
         # long rows (the MLP's down projection, K = 11008): more bytes in flight per program
         (1, 4096, False, 4), (2, 4096, False, 8), (2, 4096, True, 4), (4, 4096, True, 8)]

TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemv_configs")
_tuned: dict[str, dict] = {}


def tuned_key(N: int, K: int, prologue: int, bias: bool, residual: bool, glu: bool) -> str:
    """The key of a launch in a tile table: the autotuner's key, readable."""
    return f"N={N} K={K} prologue={prologue} bias={int(bias)} residual={int(residual)} glu={int(glu)}"


def tuned_table_path(device_name: str) -> str:
    return os.path.join(TUNED_DIR, device_name.replace(" ", "_").replace("/", "_") + ".json")


def tuned_config(device_name: str, key: str) -> dict | None:
    """The measured best tile for this launch on this GPU (``torch.cuda.get_device_name``), if its
    table lists it."""
    if os.environ.get("VLT_GEMV_TUNED", "1") == "0":
        return None
    if device_name not in _tuned:
        path = tuned_table_path(device_name)
        _tuned[device_name] = {}
        if os.path.exists(path):
            with open(path) as f:
                _tuned[device_name] = json.load(f)["configs"]
    return _tuned[device_name].get(key)


def set_tuned_table(device_name: str, configs: dict) -> None:
    """Use ``configs`` (a table's ``"configs"``: ``tuned_key`` -> tile) for ``device_name`` in this
    process, in place of its committed table (``vlt bench decode-kernels --tune-gemv`` times its
    rows with the table it has just measured)."""
    _tuned[device_name] = dict(configs)


def autotuned_config(N: int, K: int):
    """The tile Triton's autotuner (``VLT_GEMV_AUTOTUNE=1``) picked for an N x K launch in this
    process, or None when it has not run for that shape."""
    if triton is None:
        return None
    return next((c for k, c in _gemv_tuned.cache.items() if tuple(k[:2]) == (N, K)), None)


def default_tile(N: int, K: int) -> dict:
    """The tile for a shape no table lists: within 1.15x of the best measured tile for each launch a
    committed table timed (tests/test_decode_kernels.py checks it against kernels/gemv_configs/):
    1024-wide K tiles (2048 for rows of 4096+, where more bytes in flight per program pay), 4 rows per
    program, 8 rows for very tall matrices (the LM head), fewer K lanes for short rows."""
    k_lanes = triton.next_power_of_2(K)
    if N >= 65536:
        return dict(BN=8, BK=min(512, k_lanes), ACC1D=False, num_warps=4)
    bk = min(2048 if K >= 4096 else 1024, k_lanes)
    return dict(BN=4, BK=bk, ACC1D=False, num_warps=8 if bk == 2048 else 4)


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


def norm_swiglu(x, norm_weight, eps: float, gate_weight, up_weight):
    """``silu(F.linear(n, gate_weight)) * F.linear(n, up_weight)`` with ``n = rms_norm(x)``: the
    MLP's first half, both products and SwiGLU in one kernel (then ``linear`` for the down projection)."""
    if not (_one_row(x, gate_weight) and up_weight.shape == gate_weight.shape
            and up_weight.stride() == gate_weight.stride() and up_weight.dtype == gate_weight.dtype):
        from vlt.kernels.norm import rms_norm
        n = rms_norm(x, norm_weight, eps, "torch")
        return F.silu(F.linear(n, gate_weight)) * F.linear(n, up_weight)
    return _call(x, None, norm_weight, gate_weight, None, None, eps, RMSNORM, weight2=up_weight)


def _call(x, x2, norm_weight, weight, bias, residual, eps, prologue, weight2=None):
    flat = [None if t is None else t.reshape(-1) for t in (x, x2, norm_weight, bias, residual)]
    y = torch.ops.vlt.gemv(flat[0], flat[1], flat[2], weight, flat[3], flat[4], eps, prologue, weight2)
    return y.view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("vlt::gemv", mutates_args=())
def gemv(x: torch.Tensor, x2: torch.Tensor | None, norm_weight: torch.Tensor | None, weight: torch.Tensor,
         bias: torch.Tensor | None, residual: torch.Tensor | None, eps: float, prologue: int,
         weight2: torch.Tensor | None = None) -> torch.Tensor:
    """y [N] = weight [N, K] @ prologue(x [K], x2) (+ bias) (+ residual), in x's dtype; with
    ``weight2`` [N, K]: y = silu(weight @ p) * (weight2 @ p), p = prologue(x)."""
    y = torch.empty(weight.shape[0], device=x.device, dtype=x.dtype)
    gemv_into(y, x, weight, bias, x2=x2, norm_weight=norm_weight, residual=residual, eps=eps, prologue=prologue,
              weight2=weight2)
    return y


@gemv.register_fake
def _(x, x2, norm_weight, weight, bias, residual, eps, prologue, weight2=None):
    return x.new_empty(weight.shape[0])


def gemv_into(y, x, weight, bias=None, *, x2=None, norm_weight=None, residual=None, eps: float = 0.0,
              prologue: int = NONE, weight2=None, config: dict | None = None):
    """Launch on given buffers (y must not alias the inputs). ``weight2``: the SwiGLU epilogue's
    second matrix (same shape and strides as ``weight``; no bias or residual with it).
    ``config`` (BN, BK, ACC1D, num_warps) skips autotuning: the CPU tests run the kernel through
    Triton's interpreter, which cannot time."""
    N, K = weight.shape
    assert x.shape == (K,) and y.shape == (N,) and weight.stride(-1) == 1, (x.shape, weight.shape, y.shape)
    assert (prologue == SWIGLU) == (x2 is not None) and (prologue == RMSNORM) == (norm_weight is not None)
    assert weight2 is None or (weight2.shape == weight.shape and weight2.stride() == weight.stride()
                               and bias is None and residual is None)
    x, x2, norm_weight = (None if t is None else t.contiguous() for t in (x, x2, norm_weight))
    args = (x, x2 if x2 is not None else x, norm_weight if norm_weight is not None else x, weight,
            weight2 if weight2 is not None else weight,
            bias if bias is not None else y, residual if residual is not None else y, y, N, K, weight.stride(0), eps)
    use_pdl = pdl.enabled(x)
    flags = dict(PRO=prologue, HAS_BIAS=bias is not None, HAS_RES=residual is not None, GLU=weight2 is not None,
                 PDL=use_pdl)
    config = config or (_INTERPRET_CONFIG if _INTERPRET else None)
    if config is None and x.is_cuda:
        key = tuned_key(N, K, prologue, bias is not None, residual is not None, weight2 is not None)
        config = tuned_config(torch.cuda.get_device_name(x.device), key)
    if config is None and os.environ.get("VLT_GEMV_AUTOTUNE", "0") != "1":
        config = default_tile(N, K)
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
    def _gemv_kernel(x_ptr, x2_ptr, nw_ptr, w_ptr, w2_ptr, b_ptr, res_ptr, y_ptr, N, K, stride_n, eps,
                     PRO: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GLU: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, ACC1D: tl.constexpr, PDL: tl.constexpr):
        dt = y_ptr.dtype.element_ty
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        mn = rows < N
        w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_n
        w2_rows = w2_ptr + rows[:, None].to(tl.int64) * stride_n  # GLU: the same rows of the up matrix
        # The first weight tile is loaded before anything the previous kernel writes: under PDL
        # (vlt.kernels.pdl) it streams in while that kernel finishes.
        cols = tl.arange(0, BK)
        w = tl.load(w_rows + cols[None, :], mask=mn[:, None] & (cols < K)[None, :], other=0.0)
        if GLU:
            w2 = tl.load(w2_rows + cols[None, :], mask=mn[:, None] & (cols < K)[None, :], other=0.0)
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
        acc2 = acc  # GLU's second product; unused (and compiled away) otherwise
        xt = _x_tile(x_ptr, x2_ptr, nw_ptr, cols, cols < K, rstd, PRO, dt)
        acc = _mac(acc, w, xt, ACC1D)
        if GLU:
            acc2 = _mac(acc2, w2, xt, ACC1D)
        for k0 in range(BK, K, BK):
            c = k0 + tl.arange(0, BK)
            w = tl.load(w_rows + c[None, :], mask=mn[:, None] & (c < K)[None, :], other=0.0)
            if GLU:
                w2 = tl.load(w2_rows + c[None, :], mask=mn[:, None] & (c < K)[None, :], other=0.0)
            xt = _x_tile(x_ptr, x2_ptr, nw_ptr, c, c < K, rstd, PRO, dt)
            acc = _mac(acc, w, xt, ACC1D)
            if GLU:
                acc2 = _mac(acc2, w2, xt, ACC1D)
        if ACC1D:
            y = acc
            y2 = acc2
        else:
            y = tl.sum(acc, 1)
            y2 = tl.sum(acc2, 1)
        if GLU:  # silu(gate) * up, each rounded as the torch ops round them
            g = y.to(dt).to(tl.float32)
            y = (g * tl.sigmoid(g)).to(dt).to(tl.float32) * y2.to(dt).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=mn, other=0.0).to(tl.float32)
        if HAS_RES:
            y = tl.load(res_ptr + rows, mask=mn, other=0.0).to(tl.float32) + y.to(dt).to(tl.float32)
        tl.store(y_ptr + rows, y.to(dt), mask=mn)

    _gemv_tuned = triton.autotune(
        configs=[triton.Config(dict(BN=bn, BK=bk, ACC1D=a), num_warps=w) for bn, bk, a, w in TILES],
        # PDL is left out of the key: with and without it a shape takes the same tile, so the two
        # launch modes give the same bits (which the GPU tests check, to catch an early load)
        key=["N", "K", "PRO", "HAS_BIAS", "HAS_RES", "GLU"])(_gemv_kernel)
