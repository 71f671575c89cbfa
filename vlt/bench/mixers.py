"""``vlt bench mixers``: fwd+bwd and decode-step time of each token mixer against its raw kernel.

Three rows per mixer, sequence length and mode, so framework overhead is measured apples to apples:
  mixer  the whole mixer (projections, convs, norms, the kernel, o_proj) on x [1, T, hidden];
  core   the kernel call the mixer makes, replayed through vlt.kernels with the exact arguments the
         mixer passed (its layouts, dtypes, flags): what vlt adds around the library kernel;
  raw    the library kernel on the same tensors in its own preferred layout (fla chunk/fused
         kernels, SDPA flash and cuDNN, FlexAttention with a prebuilt block mask, fla parallel_attn).
Times are medians over CUDA-event timed repetitions after warm-up. Shapes default to InfiniteVL-4B
(hidden 2048, 16 heads of 128, 2 KV heads, GDN expand_v 2, window 8192), bf16, batch 1.
Writes mixers.json (command, machine, versions, every median) and mixers.png to --out.

fla's layers (``--mixers kda gdn2 mamba2 ...``, layers/fla_mixers.py) are the library's own modules,
so their rows differ: ``mixer`` is vlt's forward (state converted to and from fla's layer cache;
mamba2 runs vlt's kernels), ``raw`` is fla's layer forward on the same module (its own kernels and
cache: what vlt's wrapper is measured against); there is no ``core`` row. kda, gdn2, deltanet and gla
also get an ``engine`` decode row: the inference engine's step (vlt.inference.fla_step, its cache in
fla's layout), what ``vlt generate`` runs (the table's "core" column shows it). Their options are fla's
defaults except the width, heads and head_dim. Decode rows of every mixer carry ``state_bytes``,
the state after T tokens as ``state_nbytes`` measures it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

MIXERS = ("full", "swa", "linear", "gdn", "swa_gdn")
#: fla-backed mixers (layers/fla_mixers.py); timed only when asked for with --mixers
FLA_MIXERS = ("kda", "gdn2", "deltanet", "gla", "mamba2", "rwkv7", "nsa", "moba")


def add_bench_mixers_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    a = parser.add_argument
    a("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS + FLA_MIXERS,
      help=f"mixers to time (default: vlt's own; fla's: {' '.join(FLA_MIXERS)})")
    a("--seq-lens", nargs="+", type=int, default=[4096, 16384, 65536], help="T for fwd+bwd; decode context")
    a("--hidden-size", type=int, default=2048)
    a("--num-heads", type=int, default=16)
    a("--num-kv-heads", type=int, default=2)
    a("--head-dim", type=int, default=128)
    a("--expand-v", type=float, default=2.0)
    a("--window", type=int, default=8192)
    a("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a("--modes", nargs="+", default=["train", "decode"], choices=["train", "decode"])
    a("--rep-ms", type=float, default=300.0, help="time budget per measurement (at least 5 repetitions)")
    a("--flex-options", nargs="*", default=[], help='extra FlexAttention kernel_options to try on the raw '
      'SWA kernel at the largest T, as JSON dicts, e.g. \'{"USE_TMA": true}\'')
    a("--out", default="bench_out", help="folder for mixers.json and mixers.png")
    a("--tiny", action="store_true", help="CPU smoke run: width 64, T 64/256, float32, whole-mixer rows "
      "only (the core/raw kernel rows need CUDA), wall-clock medians")
    return parser


TINY_SHAPES = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, expand_v=2.0, window=32,
                   seq_lens=[64, 256], dtype="float32")


def wall_time(fn, rep_ms, grads=()):
    """Median ms of fn() by the wall clock (CPU): one warm-up call, then >= 3 and <= 50 repetitions."""
    _clear(grads)
    fn()
    times = []
    budget = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (len(times) < 50 and time.perf_counter() < budget):
        _clear(grads)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), len(times)


def run_tiny(args) -> int:
    """``--tiny``: every mixer's fwd+bwd and decode step at tiny shapes on the CPU (what runs, not how fast)."""
    import torch
    from vlt.bench.common import versions   # here: vlt.bench.common imports this module
    from vlt.layers import create_mixer
    for k, v in TINY_SHAPES.items():
        setattr(args, k, v)
    os.makedirs(args.out, exist_ok=True)
    machine = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    report = {"command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]), "machine": machine,
              "versions": versions(), "tiny": True,
              "timer": "wall clock on the CPU: a smoke run of every mixer, not a speed measurement",
              "shapes": {k: getattr(args, k) for k in ("hidden_size", "num_heads", "num_kv_heads", "head_dim",
                                                       "expand_v", "window", "dtype")},
              "batch": 1, "results": []}
    from vlt.layers.fla_mixers import cpu_mixers
    skipped = [n for n in args.mixers if n in FLA_MIXERS and n not in cpu_mixers()]
    if skipped:
        print(f"--tiny skips {skipped}: no CPU path (fla mixers on CPU: {cpu_mixers()})", file=sys.stderr)
    for name in [n for n in args.mixers if n not in skipped]:
        torch.manual_seed(0)
        m = create_mixer(name, **mixer_opts(name, args))
        params = list(m.parameters())
        for T in args.seq_lens:
            x = torch.randn(1, T, args.hidden_size)
            if "train" in args.modes:
                xg = x.clone().requires_grad_()
                step, lv = fwd_bwd(lambda: m(xg)[0], [xg, *params])
                ms, n = wall_time(step, args.rep_ms, lv)
                report["results"].append(dict(mixer=name, kind="mixer", op=name, mode="fwd+bwd", T=T,
                                              ms=round(ms, 3), reps=n))
            if "decode" in args.modes:
                with torch.no_grad():
                    _, state = m(x, use_cache=True)
                    x1 = torch.randn(1, 1, args.hidden_size)
                    ms, n = wall_time(lambda: m.step(x1, state), args.rep_ms)
                report["results"].append(dict(mixer=name, kind="mixer", op=name, mode="decode", T=T,
                                              ms=round(ms, 3), reps=n))
            print(json.dumps(report["results"][-1]), flush=True)
    report["goals"] = []  # the goals compare CUDA kernels; none apply to a CPU smoke run
    with open(os.path.join(args.out, "mixers.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(report, os.path.join(args.out, "mixers.png"))
    print_table(report)
    print(f"(CPU smoke run: {report['timer']})")
    return 0


# -- timing -------------------------------------------------------------------------------------

def cuda_time(fn, rep_ms, grads=()):
    """Median ms of fn() with CUDA events; warm-up first, >= 5 and <= 200 repetitions."""
    import torch
    t0 = time.perf_counter()
    for i in range(100):  # warm-up: at least 3 calls and ~100 ms (compiles, cuDNN plans, clocks)
        _clear(grads)
        fn()
        if i >= 2:
            torch.cuda.synchronize()
            if time.perf_counter() - t0 > 0.1:
                break
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    _clear(grads)
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    n = int(min(200, max(5, rep_ms / max(est, 1e-3))))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in ev:
        _clear(grads)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev), n


def graphed(fn):
    """fn captured in a CUDA graph (launch overhead gone: the device-side cost of a decode step)."""
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def _clear(grads):
    for t in grads:
        t.grad = None


def fwd_bwd(f, leaves):
    """A closure running f() and backward with a fixed random cotangent on its first output."""
    import torch
    out = f()
    o = out[0] if isinstance(out, tuple) else out
    do = torch.randn_like(o)

    def step():
        out = f()
        (out[0] if isinstance(out, tuple) else out).backward(do)
    return step, list(leaves)


# -- recording the kernel call a mixer makes ------------------------------------------------------

_KERNEL_SITES = (("vlt.layers.attention", "attention_kernel"), ("vlt.layers.gdn", "gated_delta_rule"),
                 ("vlt.layers.linear", "linear_attention"))


def record_kernel_calls(module, x, **kw):
    """Run module(x) once with every vlt.kernels call inside it recorded: [(name, fn, args, kwargs)]."""
    import importlib
    calls, saved = [], []
    for mod_name, attr in _KERNEL_SITES:
        mod = importlib.import_module(mod_name)
        fn = getattr(mod, attr)

        def wrapper(*args, _fn=fn, _name=attr, **kwargs):
            calls.append((_name, _fn, _detach(args), _detach(kwargs)))
            return _fn(*args, **kwargs)
        saved.append((mod, attr, fn))
        setattr(mod, attr, wrapper)
    try:
        module(x, **kw)
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)
    return calls


def _detach(obj):
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def _leafify(obj, leaves):
    """Floating tensors become fresh leaves that require grad (collected in ``leaves``)."""
    import torch
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        t = obj.clone().requires_grad_()
        leaves.append(t)
        return t
    if isinstance(obj, (list, tuple)):
        return type(obj)(_leafify(o, leaves) for o in obj)
    if isinstance(obj, dict):
        return {k: _leafify(v, leaves) for k, v in obj.items()}
    return obj


def replay(calls, grad: bool):
    """A closure re-running the recorded kernel calls (all of them: a hybrid makes two)."""
    leaves, prepared = [], []
    for _, fn, args, kwargs in calls:
        if grad:
            args, kwargs = _leafify(args, leaves), _leafify(kwargs, leaves)
        prepared.append((fn, args, kwargs))

    def f():
        outs = [fn(*a, **k) for fn, a, k in prepared]
        outs = [o[0] if isinstance(o, tuple) else o for o in outs]
        return sum(o.float().sum() for o in outs) if len(outs) > 1 else outs[0]
    return f, leaves


# -- raw kernels on the recorded tensors ----------------------------------------------------------

def raw_kernels(name, args, kwargs, grad: bool, flex_options):
    """{label: (closure, leaves)} for the library kernels equivalent to one recorded call."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from vlt.kernels.backends import RECURRENT_MAX_T
    out = {}
    leaves = []

    def leaf(t):
        t = t.detach().clone().requires_grad_(grad)
        leaves.append(t)
        return t

    if name == "gated_delta_rule":
        q, k, v, g, beta = (leaf(t) for t in args[:5])
        l2 = kwargs.get("qk_l2norm", False)
        h0 = kwargs.get("initial_state")
        if grad or q.shape[1] > RECURRENT_MAX_T:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fn
            out["fla chunk_gated_delta_rule"] = (lambda: fn(q, k, v, g, beta, initial_state=h0,
                                                             use_qk_l2norm_in_kernel=l2), leaves)
        else:
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fn
            out["fla fused_recurrent_gated_delta_rule"] = (
                lambda: fn(q, k, v, g=g, beta=beta, initial_state=h0, output_final_state=True,
                           use_qk_l2norm_in_kernel=l2), leaves)
    elif name == "linear_attention":
        q, k, v = (leaf(t) for t in args[:3])
        g = args[3] if len(args) > 3 else kwargs.get("g")
        h0 = kwargs.get("initial_state")
        if grad or q.shape[1] > RECURRENT_MAX_T:
            from fla.ops.simple_gla import chunk_simple_gla as fn
            out["fla chunk_simple_gla"] = (lambda: fn(q, k, v, g=g, initial_state=h0), leaves)
        else:
            from fla.ops.simple_gla import fused_recurrent_simple_gla as fn
            out["fla fused_recurrent_simple_gla"] = (
                lambda: fn(q, k, v, g=g, initial_state=h0, output_final_state=True), leaves)
    elif name == "attention_kernel":
        q, k, v = args[:3]
        window = kwargs.get("window")
        Tq, Tk = q.shape[1], k.shape[1]
        if window is not None and Tq == 1:
            k, v, window = k[:, -window:], v[:, -window:], None
        if window is not None and window >= Tk:
            window = None
        # SDPA's and flex's own layout: [B, H, T, D] contiguous
        qh, kh, vh = (leaf(t.transpose(1, 2).contiguous()) for t in (q, k, v))
        rep = qh.shape[1] // kh.shape[1]
        causal = Tq == Tk
        if window is None:
            def sdpa(backend, expand):
                def f():
                    kk, vv = (kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)) if expand else (kh, vh)
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(qh, kk, vv, is_causal=causal, enable_gqa=not expand)
                return f
            out["sdpa flash"] = (sdpa(SDPBackend.FLASH_ATTENTION, False), leaves)
            out["sdpa cudnn (gqa)"] = (sdpa(SDPBackend.CUDNN_ATTENTION, False), leaves)
            out["sdpa cudnn (kv expanded)"] = (sdpa(SDPBackend.CUDNN_ATTENTION, True), leaves)
        else:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            W = window

            def band(b, h, qi, ki):
                return (ki <= qi) & (ki > qi - W)
            bm = create_block_mask(band, None, None, Tq, Tk, device=q.device)
            flex = torch.compile(flex_attention, dynamic=False)
            for opts in [None, *flex_options]:
                label = "flex" + ("" if opts is None else " " + json.dumps(opts))
                out[label] = ((lambda o=opts: flex(qh, kh, vh, block_mask=bm, enable_gqa=True, kernel_options=o)),
                              leaves)
            from fla.ops.attn import parallel_attn
            qf, kf, vf = (leaf(t) for t in (q, k, v))
            out["fla parallel_attn"] = (lambda: parallel_attn(qf, kf, vf, window_size=W), [qf, kf, vf])
    return out


# -- the benchmark --------------------------------------------------------------------------------

def mixer_opts(name, a):
    if name in FLA_MIXERS:
        from vlt.layers.registry import get_mixer_class, mixer_options
        allowed = mixer_options(get_mixer_class(name))
        opts = dict(hidden_size=a.hidden_size, num_heads=a.num_heads, head_dim=a.head_dim, num_kv_heads=a.num_kv_heads)
        if name == "mamba2":   # its heads split expand * hidden: keep fla's head_dim 64 (num_heads follows)
            opts.pop("num_heads"), opts.pop("head_dim")
        if name == "nsa":
            from vlt.layers.fla_mixers import flash_attn_installed
            # its kernels need >= 16 query heads per key/value head (FlaMixer.validate_options), and its window
            # branch calls flash-attn (FlaMixer.check_fla_can_run)
            opts["num_kv_heads"] = max(1, a.num_heads // 16)
            if not flash_attn_installed():
                opts["window_size"] = 0
        return {k: v for k, v in opts.items() if k in allowed}
    opts = dict(hidden_size=a.hidden_size, num_heads=a.num_heads, head_dim=a.head_dim)
    if name in ("full", "swa", "swa_gdn"):
        opts["num_kv_heads"] = a.num_kv_heads
    if name in ("swa", "swa_gdn"):
        opts["window"] = a.window
    if name in ("gdn", "swa_gdn"):
        opts["expand_v"] = a.expand_v
    return opts


def run_bench_mixers(args) -> int:
    import torch
    from vlt.bench.common import versions
    if args.tiny:
        return run_tiny(args)
    if not torch.cuda.is_available():
        print("vlt bench mixers needs a CUDA device (--tiny: a CPU smoke run at tiny shapes)", file=sys.stderr)
        return 2
    from vlt.layers import create_mixer
    flex_options = [json.loads(s) for s in args.flex_options]
    dtype = getattr(torch, args.dtype)
    os.makedirs(args.out, exist_ok=True)
    report = {"command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
              "machine": torch.cuda.get_device_name(), "versions": versions(),
              "shapes": {k: getattr(args, k) for k in ("hidden_size", "num_heads", "num_kv_heads", "head_dim",
                                                       "expand_v", "window", "dtype")},
              "batch": 1, "results": []}
    path = os.path.join(args.out, "mixers.json")

    def record(mixer, kind, op, mode, T, fn, leaves=(), extra=None):
        try:
            if mode == "decode":   # decode steps are launch-bound: time CUDA-graph replays
                fn = graphed(fn)
            ms, n = cuda_time(fn, args.rep_ms, leaves)
            row = dict(mixer=mixer, kind=kind, op=op, mode=mode, T=T, ms=round(ms, 4), reps=n, **(extra or {}))
        except Exception as e:  # noqa: BLE001 - a kernel that cannot take these inputs is reported
            row = dict(mixer=mixer, kind=kind, op=op, mode=mode, T=T, ms=None, error=f"{type(e).__name__}: {e}"[:300],
                       **(extra or {}))
        print(json.dumps(row), flush=True)
        report["results"].append(row)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        torch.cuda.empty_cache()

    from vlt.layers import state_nbytes
    for name in args.mixers:
        torch.manual_seed(0)
        opts = mixer_opts(name, args)
        report.setdefault("mixer_options", {})[name] = opts
        m = create_mixer(name, **opts).to("cuda", dtype)
        params = list(m.parameters())
        if name in FLA_MIXERS:
            bench_fla_mixer(m, name, args, dtype, record, state_nbytes)
            continue
        for T in args.seq_lens:
            x = torch.randn(1, T, args.hidden_size, device="cuda", dtype=dtype)
            if "train" in args.modes:
                xg = x.clone().requires_grad_()
                step, lv = fwd_bwd(lambda: m(xg)[0], [xg, *params])
                record(name, "mixer", name, "fwd+bwd", T, step, lv)
                calls = record_kernel_calls(m, x)
                f, lv = replay(calls, grad=True)
                step, lv = fwd_bwd(f, lv)
                record(name, "core", "+".join(c[0] for c in calls), "fwd+bwd", T, step, lv)
                if name != "swa_gdn":  # the hybrid's raw rows are its branches' rows
                    for label, (f, lv) in raw_kernels(calls[0][0], calls[0][2], calls[0][3], True,
                                                      flex_options if T == max(args.seq_lens) else []).items():
                        try:
                            step, lv = fwd_bwd(f, lv)
                        except Exception as e:  # noqa: BLE001
                            step = (lambda e=e: (_ for _ in ()).throw(e))
                        record(name, "raw", label, "fwd+bwd", T, step, lv)
                del calls, f, lv, step
            if "decode" in args.modes:
                with torch.no_grad():
                    _, state = m(x, use_cache=True)
                    x1 = torch.randn(1, 1, args.hidden_size, device="cuda", dtype=dtype)
                    record(name, "mixer", name, "decode", T, lambda: m.step(x1, state),
                           extra={"state_bytes": state_nbytes(state)})
                    record(name, "mixer", name, "decode eager", T, lambda: m.step(x1, state))
                    calls = record_kernel_calls(m, x1, state=state, use_cache=True)
                    f, _ = replay(calls, grad=False)
                    record(name, "core", "+".join(c[0] for c in calls), "decode", T, f)
                    if name != "swa_gdn":
                        for label, (f, _) in raw_kernels(calls[0][0], calls[0][2], calls[0][3], False, []).items():
                            record(name, "raw", label, "decode", T, f)
                state = calls = None
        m = params = None
        torch.cuda.empty_cache()
    report["goals"] = goals(report["results"], args)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    plot(report, os.path.join(args.out, "mixers.png"))
    print_table(report)
    return 0


def bench_fla_mixer(m, name, args, dtype, record, state_nbytes):
    """The rows of one fla-backed mixer (see the module docstring): vlt's forward and decode step
    against fla's own layer forward on the same module, fwd+bwd and decode, plus the state's bytes."""
    import torch
    from vlt.inference.fla_step import FLA_DELTA, handles
    from vlt.inference.steps import StepContext
    from vlt.layers.fla_mixers import OneLayerCache, to_fla_cache
    params = list(m.parameters())
    dev = params[0].device
    fla_fwd = type(m).fla_class.forward
    for T in args.seq_lens:
        x = torch.randn(1, T, args.hidden_size, device=dev, dtype=dtype)
        if "train" in args.modes:
            xg = x.clone().requires_grad_()
            for kind, f in (("mixer", lambda: m(xg)[0]), ("raw", lambda: fla_fwd(m, xg)[0])):
                try:
                    step, lv = fwd_bwd(f, [xg, *params])
                except Exception as e:  # noqa: BLE001 - reported as the row's error
                    step, lv = (lambda e=e: (_ for _ in ()).throw(e)), []
                record(name, kind, name if kind == "mixer" else f"fla.layers.{m.fla_class.__name__}", "fwd+bwd",
                       T, step, lv)
        if "decode" in args.modes:
            with torch.no_grad():
                try:
                    _, state = m(x, use_cache=True)
                except Exception as e:  # noqa: BLE001
                    record(name, "mixer", name, "decode", T, (lambda e=e: (_ for _ in ()).throw(e)))
                    continue
                x1 = torch.randn(1, 1, args.hidden_size, device=dev, dtype=dtype)
                extra = {"state_bytes": state_nbytes(state)}
                record(name, "mixer", name, "decode", T, lambda: m.step(x1, state), extra=extra)
                record(name, "mixer", name, "decode eager", T, lambda: m.step(x1, state), extra=extra)
                if handles(m):   # what `vlt generate` runs: the engine's step on its cache in fla's layout
                    cache = FLA_DELTA.allocate(m, 1, T, dtype, dev)
                    FLA_DELTA.load(m, cache, state, 0, T)
                    ctx = StepContext(tok=torch.tensor([T], device=dev), pos=torch.tensor([[T]], device=dev), T=1)
                    record(name, "engine", "vlt.inference.fla_step", "decode", T,
                           lambda: FLA_DELTA(m, cache, ctx, x1, None)[0],
                           extra={"state_bytes": FLA_DELTA.state_nbytes(m, cache)})
                if name != "mamba2":   # fla's Mamba2 decode without mamba_ssm is its torch loop, not a kernel
                    # fla's layer on a cache in fla's own layout, converted once outside the timed step, so
                    # vlt's row carries the whole cost of its state format (fla shifts the conv caches in
                    # place every replay: the values change, the work does not)
                    fla_cache = to_fla_cache(m, state)

                    def fla_step():
                        cache = OneLayerCache(fla_cache, state["seen"])
                        return fla_fwd(m, x1, past_key_values=cache, use_cache=True)[0]
                    record(name, "raw", f"fla.layers.{m.fla_class.__name__}", "decode", T, fla_step)
            del state
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def goals(rows, args):
    """Core within 1.10x of the fastest raw kernel; SWA at max T within 1.5x of full/4 (best); an
    fla mixer within 1.10x of fla's own layer."""
    def ms(**k):
        return [r["ms"] for r in rows if r.get("ms") is not None and all(r[a] == b for a, b in k.items())]
    out = []
    for r in rows:
        if r["mixer"] in FLA_MIXERS and r["kind"] in ("mixer", "engine") and r["mode"] in ("fwd+bwd", "decode") \
                and r["ms"] is not None:
            raw = ms(mixer=r["mixer"], kind="raw", mode=r["mode"], T=r["T"])
            if raw:
                ratio = r["ms"] / min(raw)
                out.append(dict(goal=f"fla {r['kind']}/fla layer <= 1.10", mixer=r["mixer"], mode=r["mode"],
                                T=r["T"], ratio=round(ratio, 3), met=ratio <= 1.10))
            continue
        if r["kind"] != "core" or r["mixer"] == "swa_gdn":
            continue
        raw = ms(mixer=r["mixer"], kind="raw", mode=r["mode"], T=r["T"])
        if raw and r["ms"] is not None:
            ratio = r["ms"] / min(raw)
            out.append(dict(goal="core/raw <= 1.10", mixer=r["mixer"], mode=r["mode"], T=r["T"],
                            ratio=round(ratio, 3), met=ratio <= 1.10))
    T = max(args.seq_lens)
    full, swa = ms(mixer="full", kind="raw", mode="fwd+bwd", T=T), ms(mixer="swa", kind="core", mode="fwd+bwd", T=T)
    if full and swa:
        target = 1.5 * min(full) / 4
        out.append(dict(goal="swa core <= 1.5 * full_best / 4", T=T, swa_ms=swa[0], target_ms=round(target, 3),
                        met=swa[0] <= target))
    return out


def print_table(report):
    rows = report["results"]
    print(f"\n{report['machine']}  torch {report['versions']['torch']}  fla {report['versions']['fla']}  (ms, median)")
    print(f"{'mixer':8} {'mode':8} {'T':>6} {'mixer':>9} {'core':>9} {'best raw':>9} {'core/raw':>8}  raw kernel")
    order = MIXERS + FLA_MIXERS
    keys = sorted({(r["mixer"], r["mode"], r["T"]) for r in rows}, key=lambda k: (order.index(k[0]), k[1], k[2]))
    for mixer, mode, T in keys:
        sel = [r for r in rows if (r["mixer"], r["mode"], r["T"]) == (mixer, mode, T) and r.get("ms") is not None]
        get = {r["kind"]: r for r in sel}
        raws = sorted((r for r in sel if r["kind"] == "raw"), key=lambda r: r["ms"])
        mx, core = get.get("mixer", {}).get("ms"), get.get("core", get.get("engine", {})).get("ms")
        best = raws[0] if raws else None
        ratio = f"{core / best['ms']:.2f}" if (core and best) else "-"
        print(f"{mixer:8} {mode:8} {T:>6} {mx or '-':>9} {core or '-':>9} {best['ms'] if best else '-':>9} "
              f"{ratio:>8}  {best['op'] if best else ''}")
    for g in report.get("goals", []):
        print("GOAL", json.dumps(g))


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in report["results"] if r.get("ms") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, mode in zip(axes, ("fwd+bwd", "decode")):
        series = sorted({(r["mixer"], r["kind"], r["op"]) for r in rows if r["mode"] == mode})
        for mixer, kind, op in series:
            key = (mixer, kind, op, mode)
            pts = sorted((r["T"], r["ms"]) for r in rows if (r["mixer"], r["kind"], r["op"], r["mode"]) == key)
            style = {"mixer": "-o", "core": "--s", "raw": ":^", "engine": "-.d"}[kind]
            ax.plot(*zip(*pts), style, label=f"{mixer} {kind}: {op}"[:60], markersize=4)
        ax.set(xscale="log", yscale="log", xlabel="T (tokens; decode: context)", ylabel="ms (median)",
               title=f"{mode}, {report['shapes']['dtype']}, {report['machine']}"
               + ("\nCPU smoke run (wall clock), not a speed measurement" if report.get("tiny") else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    from vlt.bench import module_main
    return module_main("vlt bench mixers", add_bench_mixers_args, run_bench_mixers, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
