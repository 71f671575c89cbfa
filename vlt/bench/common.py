"""Shared pieces of ``vlt bench train|infer|stream``: models at InfiniteVL-4B shapes, the report header,
timing on CUDA (reusing vlt.bench.mixers' event timer and graph capture) or on CPU, peak memory,
FLOP and byte counts, and the machine's two ceilings (bf16 matmul rate, copy bandwidth).

Layouts benchmarked: ``full`` (36 causal attention layers), ``swa`` (36 window-8192 layers),
``gdn`` (36 GDN layers), ``hybrid`` (InfiniteVL's [swa, gdn, gdn, gdn] * 9). ``--tiny`` swaps the
4B shapes for a 4-layer, width-64 decoder so every code path runs on a CPU in seconds.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

from vlt.bench.mixers import cuda_time, graphed  # noqa: F401 - re-exported for train/infer/stream

LAYOUTS = {"full": "[full] * {n}", "swa": "[swa] * {n}", "gdn": "[gdn] * {n}", "hybrid": "[swa, gdn, gdn, gdn] * {q}"}
PEAK_BF16_TFLOPS = 789.0  # measured bf16 matmul on the H100 (REFERENCE.md); the run measures its own too
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
            mrope_section=[2, 3, 3])


def add_common_args(p, layouts=("full", "swa", "gdn", "hybrid")):
    p.add_argument("--layouts", nargs="+", default=list(layouts), choices=list(LAYOUTS))
    p.add_argument("--num-layers", type=int, default=None, help="decoder layers (default 36; --tiny 4)")
    p.add_argument("--window", type=int, default=None, help="SWA window (default 8192; --tiny 32)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (width 64, 4 layers) for CPU smoke runs")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--time-limit", type=float, default=0, help="seconds; stop starting new rows after this (0: none)")
    p.add_argument("--out", default="bench_out", help="folder for <name>.json and <name>.png")
    return p


def add_compile_arg(p):
    p.add_argument("--compile", default="auto",
                   help="torch.compile backend for the inference engine's small ops (auto: inductor on CUDA, "
                        "none on CPU; 'none' to disable)")
    p.add_argument("--no-pack", action="store_true",
                   help="keep each projection its own GEMM (default: stack q/k/v(/g/a/b) and gate/up, "
                        "vlt.inference.pack_projections)")
    return p


def step_compile_backend(args, device):
    """``--compile`` resolved: a torch.compile backend name, or None for eager pieces."""
    if args.compile == "auto":
        return "inductor" if device.type == "cuda" else None
    return None if args.compile == "none" else args.compile


def setup(args):
    import torch
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.num_layers = args.num_layers or (4 if args.tiny else 36)
    args.window = args.window or (32 if args.tiny else 8192)
    args.t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    return torch.device(args.device), getattr(torch, args.dtype)


def out_of_time(args) -> bool:
    return bool(args.time_limit) and time.perf_counter() - args.t0 > args.time_limit


def model_config(layout: str, args, vision: bool = False):
    from vlt.config import VLMConfig
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}; allowed: {list(LAYOUTS)}")
    if args.num_layers % 4 and layout == "hybrid":
        raise ValueError(f"--num-layers {args.num_layers} must be a multiple of 4 for the hybrid layout")
    pattern = LAYOUTS[layout].format(n=args.num_layers, q=args.num_layers // 4)
    dec = dict(layout=pattern, mixers={"swa": {"window": args.window, "qkv_bias": True},
                                       "full": {"qkv_bias": True}, "gdn": {"expand_v": 2.0}})
    if args.tiny:
        dec.update(TINY)
    extra = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502) if args.tiny else \
        dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652)  # Qwen2.5-VL's ids
    if vision:
        extra["vision"] = dict(kind="qwen2_5_vl", hf_config=TINY_VISION if args.tiny else QWEN25_VL_3B_VISION)
    return VLMConfig.from_name("infinitevl-4b", decoder=dec, **extra)


# the Qwen2.5-VL-3B vision tower (InfiniteVL-4B keeps its teacher's), and a tiny one for CPU smoke runs
QWEN25_VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                           out_hidden_size=2048, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
                           tokens_per_second=2)
TINY_VISION = dict(QWEN25_VL_3B_VISION, depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                   out_hidden_size=64, fullatt_block_indexes=[1])


def build_model(layout: str, args, device, dtype, seed: int = 0, vision: bool = False):
    """Random-weight model at InfiniteVL-4B shapes (``vision``: with the Qwen2.5-VL-3B tower, else
    the decoder alone), built directly on ``device`` in ``dtype``."""
    import torch
    from vlt.model import build_vlm
    torch.manual_seed(seed)
    return build_vlm(model_config(layout, args, vision), device, dtype)


def long_swa_backend(model, T: int, limit: int = 65536) -> str | None:
    """SWA layers use fla's parallel_attn above ``limit`` tokens. The committed results needed it:
    kernels/attention.py then built FlexAttention block masks uncompiled, a dense [T, T] mask
    (128 GiB at 128K tokens, seen on the H100). It now compiles the builder, but that path has not
    been run at 128K on the device yet; keep this until it has. Returns the backend set (or None)."""
    chosen = None
    for blk in model.layers:
        m = blk.mixer
        if getattr(m, "window", None) is not None:
            if not hasattr(m, "_bench_backend"):
                m._bench_backend = m.backend
            m.backend = "fla" if (T > limit and m._bench_backend == "auto" and next(m.parameters()).is_cuda) \
                else m._bench_backend
            chosen = m.backend
    return chosen


def token_ids(model, shape, device):
    """Random ids below every special token (an image id would ask for an image)."""
    import torch
    cfg = model.config
    specials = [t for t in (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id) if t is not None]
    high = min([cfg.decoder.vocab_size, *specials])
    return torch.randint(0, high, shape, device=device)


def versions() -> dict:
    """The versions every report records: python, torch, CUDA, cuDNN and the optional kernel
    libraries (None when absent)."""
    import torch
    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version()}
    for mod in ("triton", "fla", "tilelang", "flash_attn"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or without a version: recorded as such
            v[mod] = None
    return v


def header(args, name: str) -> dict:
    import torch
    cuda = torch.cuda.is_available() and str(args.device).startswith("cuda")
    argv = sys.argv[sys.argv.index(name) + 1:] if name in sys.argv else sys.argv[1:]
    rep = {"bench": name, "command": " ".join(["vlt", "bench", name, *argv]),
           "machine": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
           "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "dtype": args.dtype, "tiny": bool(args.tiny), "num_layers": args.num_layers, "window": args.window,
           "batch": 1, "results": []}
    if cuda:
        rep["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return rep


def save_json(report: dict, path: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


# -- timing and memory ------------------------------------------------------------------------------

def time_ms(fn, device, rep_ms: float = 300.0, max_reps: int | None = None):
    """Median ms of fn(): CUDA events (vlt.bench.mixers.cuda_time) on CUDA, perf_counter on CPU."""
    import torch
    if torch.device(device).type == "cuda":
        if max_reps is not None and max_reps <= 3:  # long steps (a 128K training step): few, event-timed
            fn()
            torch.cuda.synchronize()
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(max_reps)]
            for s, e in ev:
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize()
            return statistics.median(s.elapsed_time(e) for s, e in ev), max_reps
        return cuda_time(fn, rep_ms)
    fn()
    ts = []
    for _ in range(max_reps or 3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), len(ts)


def kernel_profile(fn, path: str, reps: int = 1, rows: int = 30) -> dict:
    """Run ``fn`` ``reps`` times under torch.profiler (CUDA activity) and write the kernels sorted by
    total device time to ``path`` (a text table); returns a summary (kernel launches and device ms per
    call, the top kernels' share) for the JSON. Where a goal is missed this says where the time goes."""
    import torch
    fn()
    torch.cuda.synchronize()
    with cuda_profiler() as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return write_kernel_table(prof, path, reps, rows)


def cuda_profiler():
    from torch.profiler import ProfilerActivity, profile
    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])


def write_kernel_table(prof, path: str, reps: int = 1, rows: int = 30) -> dict:
    """The kernels of a finished ``cuda_profiler()`` sorted by device time, as ``kernel_profile`` writes them."""
    import torch
    # GPU-side user annotations (record_function ranges such as Lightning's "Optimizer.step#AdamW.step",
    # which wraps forward and backward through the closure) span kernels that are listed on their own:
    # counting them too made a 4B stage-2 step read 3.1 s of device time for 0.79 s of kernels.
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
              and not getattr(e, "is_user_annotation", False)]
    total_us = sum(e.time_range.elapsed_us() for e in events)
    # busy / span: how much of the profiled stretch the GPU had a kernel running (low = host-bound)
    span_us = (max(e.time_range.end for e in events) - min(e.time_range.start for e in events)) if events else 0
    by_name = {}
    for e in events:
        n, t = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (n + 1, t + e.time_range.elapsed_us())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:rows]
    with open(path, "w") as f:
        busy = total_us / max(span_us, 1e-9)
        f.write(f"{len(events) / reps:.0f} kernels and {total_us / reps / 1e3:.3f} ms device time per call; "
                f"GPU busy {busy:.1%} of the {span_us / 1e3:.1f} ms from first to last kernel\n")
        f.write(f"{'share':>6} {'ms/call':>9} {'calls':>6}  kernel\n")
        for name, (n, t) in top:
            f.write(f"{t / max(total_us, 1e-9):6.1%} {t / reps / 1e3:9.3f} {n // reps:6d}  {name[:150]}\n")
    return dict(kernels_per_call=round(len(events) / reps), device_ms_per_call=round(total_us / reps / 1e3, 3),
                busy_fraction=round(total_us / max(span_us, 1e-9), 4),
                top=[dict(kernel=name[:120], share=round(t / max(total_us, 1e-9), 4)) for name, (n, t) in top[:8]])


def reset_peak(device):
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    import torch
    if torch.device(device).type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def allocated_bytes(device):
    import torch
    return torch.cuda.memory_allocated() if torch.device(device).type == "cuda" else None


def is_oom(e: BaseException) -> bool:
    import torch
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def err(e: BaseException) -> str:
    return ("OOM: " if is_oom(e) else "") + f"{type(e).__name__}: {e}"[:300]


def machine_ceilings(device) -> dict:
    """Measured bf16 matmul TFLOP/s (8192^3) and device-to-device copy TB/s (bytes read + written)."""
    import torch
    if torch.device(device).type != "cuda":
        return {}
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms, _ = cuda_time(lambda: a @ b, 200)
    src = torch.randn(2**29, device=device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    cms, _ = cuda_time(lambda: dst.copy_(src), 200)
    out = {"matmul_bf16_tflops": round(2 * 8192**3 / ms / 1e9, 1),
           "copy_tb_s": round(2 * src.numel() * 2 / cms / 1e9, 3)}
    a = b = src = dst = None  # frees the buffers (the timed lambdas above are not called again)
    torch.cuda.empty_cache()
    return out


# -- counting ---------------------------------------------------------------------------------------

def matmul_params(model) -> int:
    """Weights of every matrix product a token goes through: decoder Linears + lm_head (tied or not)."""
    from torch import nn
    n = sum(m.weight.numel() for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not name.startswith("vision"))
    return n


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: all decoder parameters except the embedding table
    (one row is read) unless it is tied to lm_head (then read once, as lm_head)."""
    tied = model.lm_head.weight is model.embed_tokens.weight
    n = 0
    for name, p in model.named_parameters():
        if name.startswith("vision"):
            continue
        if name.startswith("embed_tokens") and not tied:
            continue
        n += p.numel() * p.element_size()
    return n


def mixer_flops_fwd(mixer, T: int) -> float:
    """Forward FLOPs of a mixer's token mixing (not its projections) over T tokens from empty state
    (the count `vlt fit` logs its MFU with: vlt.training.flops)."""
    from vlt.training.flops import mixer_seq_flops
    return mixer_seq_flops(mixer, [T])


def prefill_flops(model, T: int) -> float:
    """Model FLOPs of a T-token prefill: 2 * matmul params * T, the LM head for the last token only
    (``logits_to_keep=1``), plus the mixers' forward mixing FLOPs. The InfiniteVL-4B hybrid needs 1.16x
    the FLOPs of its all-attention twin at 4K (GDN's wide value and gate projections), 0.72x at 32K and
    0.30x at 128K."""
    head = model.lm_head.weight.numel()
    f = 2.0 * (matmul_params(model) - head) * T + 2.0 * head
    for blk in model.layers:
        f += mixer_flops_fwd(blk.mixer, T)
    return f


def train_flops(model, T: int) -> float:
    """Model FLOPs of one training step on T tokens: 6 * matmul params * T plus 3x the mixers'
    forward mixing FLOPs (recomputation by activation checkpointing is not counted, as for MFU)."""
    f = 6.0 * matmul_params(model) * T
    for blk in model.layers:
        f += 3.0 * mixer_flops_fwd(blk.mixer, T)
    return f


def state_bytes_per_token(model, context: int, batch: int = 1) -> tuple[int, int]:
    """(bytes of state read, bytes written) by one decode step at ``context`` tokens of history, from
    each mixer's declared state (``state_spec``): a cache whose size depends on its capacity (K/V) is
    read whole and written one token; a fixed-size state (GDN, linear) is read and written whole."""
    from vlt.layers import spec_nbytes
    dt = next(model.parameters()).dtype
    read = write = 0
    for blk in model.layers:
        m = blk.mixer
        whole = spec_nbytes(m.state_spec(batch, context + 1, dt))
        one = spec_nbytes(m.state_spec(batch, 1, dt))
        read += whole
        write += one if one != whole else whole
    return read, write


# -- plots --------------------------------------------------------------------------------------------

def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot
