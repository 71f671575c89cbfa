"""``vlt bench infer``: prefill time, per-token decode latency and peak memory vs context length.

Prefill: one forward of T random tokens with ``use_cache=True`` and ``logits_to_keep=1`` (the
generation path), event-timed, per layout and T.

Decode (batch 1): the state of a context of L tokens is BUILT DIRECTLY at its true size (random K/V
in every attention layer's buffer - L + 1 slots for ``full``, min(L + 1, window) for ``swa`` - and
random GDN conv/SSM states); a decode step's cost depends only on those sizes, so contexts up to 1M
are measured without prefilling them. The step is ``vlt.bench.static.StaticStepper`` (in-place state,
device-side indices) captured in a CUDA graph; each replay rewrites the same slot. Before timing,
the step is checked against the mixers' own eager decode path (``eager_step``) on the same state
(``check_rel_err`` of the logits), at contexts <= ``--check-max`` and always after graph replay.
``eager_ms`` times that eager path (the "before" of the graphed path) where its out-of-place cache
copy fits. On CUDA the step's per-block pieces are compiled with Inductor (``--compile``), which
fuses the small kernels of norms, RoPE, gates, the GDN step and the MLP; ``uncompiled_graph_ms``
is the same graphed step without it. GDN layers decode through two fused Triton kernels per layer
(``vlt.kernels.gdn_decode``; ``--no-fused-gdn``: the compiled torch recurrence instead), and
``unfused_gdn_graph_ms`` times that alternative on the same state (the "before" of the kernel).
The blocks' projections run through vlt's batch-1 GEMV kernel with the norms, SwiGLU and residual
adds fused in (``vlt.kernels.gemv``; ``--no-gemv``: cuBLAS and Inductor), and ``cublas_graph_ms``
times the step that way. Sliding-window layers write K/V and attend through vlt's split decode
kernel (``vlt.kernels.decode_attention``; ``--no-decode-attention``: index_copy + SDPA, as full
layers always do), and ``sdpa_swa_graph_ms`` times the step that way. On Hopper these kernels start
while the kernel before them finishes (programmatic dependent launch, ``vlt.kernels.pdl``;
``--no-pdl``: one after another), and ``no_pdl_graph_ms`` times the step without it. Input
projections are stacked (one GEMV per group, ``pack_projections``; ``--no-pack`` keeps them apart).
Full attention is timed with each SDPA backend (flash, efficient, cuDNN) and the best is reported.
A layout whose state would not fit is recorded as OOM (estimated up front, or caught).

Bandwidth floor per token = (weight bytes + state bytes read + written) / measured copy bandwidth.
Writes infer.json and infer.png to --out.
"""
from __future__ import annotations

import argparse
import sys
import time

from vlt.bench.common import (add_common_args, add_compile_arg, allocated_bytes, build_model, err, graphed, header,
                              is_oom, kernel_profile, long_swa_backend, machine_ceilings, out_of_time, peak_gib, plt,
                              reset_peak, save_json, setup, state_bytes_per_token, step_compile_backend, time_ms,
                              token_ids, weight_bytes_per_token)

SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def add_bench_infer_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_common_args(p)
    p.add_argument("--prefill-lens", nargs="*", type=int, default=[4096, 32768, 131072], help="none: decode only")
    p.add_argument("--contexts", nargs="+", type=int,
                   default=[4096, 16384, 65536, 131072, 262144, 524288, 1048576])
    p.add_argument("--check-max", type=int, default=16384, help="check the graphed step against eager up to here")
    p.add_argument("--eager-max", type=int, default=131072, help="time the eager decode path up to this context")
    p.add_argument("--rep-ms", type=float, default=200.0)
    p.add_argument("--no-graph", action="store_true", help="time the static step without CUDA graphs")
    add_compile_arg(p)
    p.add_argument("--no-fused-gdn", action="store_true",
                   help="GDN decode through the compiled torch recurrence, not the fused Triton step")
    p.add_argument("--no-gemv", action="store_true", help="projections through cuBLAS, not vlt's GEMV kernel")
    p.add_argument("--no-decode-attention", action="store_true",
                   help="sliding-window layers through index_copy + SDPA, not vlt's split decode kernel")
    p.add_argument("--no-pdl", action="store_true",
                   help="launch vlt's decode kernels one after another, without programmatic dependent launch")
    p.add_argument("--profile", action="store_true",
                   help="profile the (ungraphed) step at each layout's first context: profile_decode_<layout>.txt")
    return p


def _sdpa_ctx(name):
    import contextlib
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, name)])


def decode_row(model, layout, L, args, device, bw):
    import torch
    from vlt.bench.static import StaticStepper, eager_step, frame_positions, rel_err, step_pieces
    from vlt.kernels import pdl
    row = dict(layout=layout, context=L, state="constructed at full size (random contents), not prefilled")
    read, write = state_bytes_per_token(model, L)
    wbytes = weight_bytes_per_token(model)
    row.update(state_bytes=read, state_gib=round(read / 2**30, 3), weight_gib=round(wbytes / 2**30, 3))
    if bw:
        row["floor_ms"] = round((wbytes + read + write) / (bw * 1e12) * 1e3, 4)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info()[0]
        if read > 0.92 * free:
            row["error"] = f"OOM (estimated): state {read / 2**30:.1f} GiB > free {free / 2**30:.1f} GiB"
            return row
    reset_peak(device)
    compile = step_compile_backend(args, device)
    st = StaticStepper(model, 1, dense=True, advance=False, fill="random", context=L, compile=compile,
                       fused_gdn=False if args.no_fused_gdn else None, gemv=False if args.no_gemv else None,
                       decode_attention=False if args.no_decode_attention else None, pdl=not args.no_pdl)
    x = model.embed_tokens(token_ids(model, (1, 1), device))
    pos = frame_positions(1, L, device)
    st.x.copy_(x)
    st.pos.copy_(pos)
    ref = None
    if L <= args.check_max:
        snap = st.snapshot()
        ref, _ = eager_step(model, x, pos, st.eager_state(L))
        row["check_rel_err"] = round(rel_err(st.step(), ref), 6)
        st.restore(snap)
    backends = SDPA_BACKENDS if (layout == "full" and device.type == "cuda") else (None,)
    times = {}
    for b in backends:
        try:
            with _sdpa_ctx(b):
                fn = st.step
                if not (args.no_graph or device.type != "cuda"):
                    try:
                        fn = graphed(st.step)
                    except Exception as e:  # noqa: BLE001 - fall back to the eager static step, say so
                        row["graph_error"] = err(e)
                        torch.cuda.synchronize()
                ms, _ = time_ms(fn, device, args.rep_ms)
                times[b or "auto"] = round(ms, 4)
                if ref is not None:  # one replay from the checked state: the graph computes the same step
                    st.restore(snap)
                    fn()
                    row[f"graph_rel_err{'' if b is None else '_' + b}"] = round(rel_err(st.out, ref), 6)
        except Exception as e:  # noqa: BLE001 - a backend that cannot take these shapes is a result
            times[b or "auto"] = err(e)
    ok = {k: v for k, v in times.items() if isinstance(v, float)}
    if len(backends) > 1:
        row["sdpa_ms"] = times
    if ok:
        best = min(ok, key=ok.get)
        row.update(ms=ok[best], backend=best)
        if "floor_ms" in row:
            row["ms_over_floor"] = round(ok[best] / row["floor_ms"], 3)
    else:
        row["error"] = "; ".join(str(v) for v in times.values())
    if args.profile and device.type == "cuda" and L == args.contexts[0]:  # the timed (compiled) step, ungraphed
        row["profile"] = kernel_profile(st.step, f"{args.out}/profile_decode_{layout}.txt", reps=5)
    has_gdn = any(s["kind"] == "gdn" for s in st.states)
    row["fused_gdn"], row["gemv"] = bool(st.fused_gdn and has_gdn), bool(st.gemv)
    row["decode_attention"] = bool(st.decode_attention and any(getattr(b.mixer, "window", None) for b in model.layers))
    row["pdl"] = bool(st.pdl and (row["fused_gdn"] or row["gemv"] or row["decode_attention"]) and pdl.enabled(x))
    # the "before" of each kernel, same state and graph: GDN through the compiled recurrence; cuBLAS
    # GEMMs; SWA through index_copy + SDPA; vlt's kernels launched one after another (no PDL)
    variants = [(key, attr) for key, attr, on in (("unfused_gdn_graph_ms", "fused_gdn", row["fused_gdn"]),
                                                  ("cublas_graph_ms", "gemv", row["gemv"]),
                                                  ("sdpa_swa_graph_ms", "decode_attention", row["decode_attention"]),
                                                  ("no_pdl_graph_ms", "pdl", row["pdl"])) if on]
    for key, attr in variants if ok and not args.no_graph else ():
        setattr(st, attr, False)
        try:
            with _sdpa_ctx(None if row["backend"] == "auto" else row["backend"]):
                row[key] = round(time_ms(graphed(st.step), device, args.rep_ms)[0], 4)
        except Exception as e:  # noqa: BLE001
            row[key] = err(e)
        setattr(st, attr, True)
    if compile and ok and device.type == "cuda" and not args.no_graph:  # the same step, uncompiled
        st.pieces = step_pieces(None)
        try:
            with _sdpa_ctx(None if row["backend"] == "auto" else row["backend"]):
                row["uncompiled_graph_ms"] = round(time_ms(graphed(st.step), device, args.rep_ms)[0], 4)
        except Exception as e:  # noqa: BLE001
            row["uncompiled_graph_ms"] = err(e)
    row["compile"] = compile
    row["peak_gib"] = peak_gib(device)
    if L <= args.eager_max or layout != "full":
        try:
            es = st.eager_state(L)
            with torch.no_grad():
                row["eager_ms"] = round(time_ms(lambda: eager_step(model, x, pos, es), device, args.rep_ms)[0], 3)
            del es
        except Exception as e:  # noqa: BLE001
            row["eager_ms"] = err(e)
    del st
    return row


def prefill_row(model, layout, T, device, args):
    import torch
    row = dict(layout=layout, T=T)
    swa_b = long_swa_backend(model, T)
    if swa_b:
        row['swa_backend'] = swa_b
    ids = token_ids(model, (1, T), device)
    reset_peak(device)
    base = allocated_bytes(device)
    with torch.no_grad():
        ms, n = time_ms(lambda: model(ids, use_cache=True, logits_to_keep=1), device, max_reps=2)
    row.update(ms=round(ms, 2), reps=n, tokens_per_s=round(T / ms * 1e3, 1), peak_gib=peak_gib(device))
    if base is not None:
        row["peak_over_weights_gib"] = round(row["peak_gib"] - base / 2**30, 3)
    return row


def run_bench_infer(args) -> int:
    import torch
    device, dtype = setup(args)
    rep = header(args, "infer")
    rep["ceilings"] = machine_ceilings(device)
    bw = rep["ceilings"].get("copy_tb_s")
    rep["prefill"], rep["decode"] = [], []
    path = f"{args.out}/infer.json"
    for layout in args.layouts:
        model = build_model(layout, args, device, dtype).eval()
        if not args.no_pack:
            from vlt.bench.static import pack_projections
            rep.setdefault("packed_groups", {})[layout] = pack_projections(model)
        for T in args.prefill_lens:
            if out_of_time(args):
                break
            try:
                row = prefill_row(model, layout, T, device, args)
            except Exception as e:  # noqa: BLE001
                row = dict(layout=layout, T=T, error=err(e))
            print("PREFILL", row, flush=True)
            rep["prefill"].append(row)
            save_json(rep, path)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for L in args.contexts:
            if out_of_time(args):
                rep["decode"].append(dict(layout=layout, context=L, error="skipped: --time-limit reached"))
                continue
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    row = decode_row(model, layout, L, args, device, bw)
            except Exception as e:  # noqa: BLE001
                row = dict(layout=layout, context=L, error=err(e))
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            print("DECODE", row, flush=True)
            rep["decode"].append(row)
            save_json(rep, path)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rep["goals"] = goals(rep["decode"])
    save_json(rep, path)
    plot(rep, f"{args.out}/infer.png")
    print_table(rep)
    return 0


def goals(rows):
    def ms(layout, L):
        for r in rows:
            if r["layout"] == layout and r["context"] == L and isinstance(r.get("ms"), float):
                return r["ms"]
        return None
    out = []
    h = {r["context"]: r for r in rows if r["layout"] == "hybrid" and isinstance(r.get("ms"), float)}
    if h:
        lo, hi = min(h), max(h)
        spread = max(r["ms"] for r in h.values()) / min(r["ms"] for r in h.values())
        out.append(dict(goal="hybrid decode flat within 10%", contexts=[lo, hi], max_over_min=round(spread, 3),
                        met=spread <= 1.10))
        worst = max((r.get("ms_over_floor") or 0) for r in h.values())
        out.append(dict(goal="hybrid decode within 1.25x of bandwidth floor", worst_ratio=worst, met=0 < worst <= 1.25))
    full_ok = [r["context"] for r in rows if r["layout"] == "full" and isinstance(r.get("ms"), float)]
    if ms("hybrid", 131072) and ms("full", 131072):
        s = ms("full", 131072) / ms("hybrid", 131072)
        out.append(dict(goal="full/hybrid decode >= 1.7x at 128K", speedup=round(s, 2), met=s >= 1.7))
    if full_ok and h:
        L = max(full_ok)
        target = 1048576 if 1048576 in full_ok else L
        if ms("hybrid", target):
            s = ms("full", target) / ms("hybrid", target)
            out.append(dict(goal="full/hybrid decode >= 5x at 1M or where full runs out of memory",
                            context=target, speedup=round(s, 2), met=s >= 5))
    return out


def print_table(rep):
    print("=== SUMMARY infer ===")
    print(f"{rep['machine']}  decode step (CUDA graph, batch 1), ms; ceilings {rep.get('ceilings')}")
    layouts = list(dict.fromkeys(r["layout"] for r in rep["decode"]))
    ctxs = sorted({r["context"] for r in rep["decode"]})
    print(f"{'context':>8} " + " ".join(f"{lay:>16}" for lay in layouts))
    for L in ctxs:
        cells = []
        for lay in layouts:
            r = next((r for r in rep["decode"] if r["layout"] == lay and r["context"] == L), {})
            if isinstance(r.get("ms"), float):
                cells.append(f"{r['ms']:.3f} ({r.get('ms_over_floor', 0):.2f}f)")
            else:
                cells.append("OOM" if "OOM" in str(r.get("error", "")) else "err" if r else "-")
        print(f"{L:>8} " + " ".join(f"{c:>16}" for c in cells))
    print("(x.xxf = ms over the bandwidth floor)")
    print(f"\nprefill ms (tokens/s, peak GiB)")
    for r in rep["prefill"]:
        print(f"  {r['layout']:7} T={r['T']:>7}  " + (f"{r['ms']:.1f} ms  {r['tokens_per_s']:.0f} tok/s  "
                                                    f"{r['peak_gib']} GiB" if "ms" in r else r.get("error", "")[:80]))
    for r in rep["decode"]:
        if "check_rel_err" in r:
            print(f"  check {r['layout']} L={r['context']}: eager vs static {r['check_rel_err']}, "
                  f"graph {[v for k, v in r.items() if k.startswith('graph_rel_err')]}, eager {r.get('eager_ms')} ms, "
                  f"uncompiled graph {r.get('uncompiled_graph_ms')} ms")
    for g in rep.get("goals", []):
        print("GOAL", g)


def plot(rep, path):
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(16, 4.5))
    for layout in dict.fromkeys(r["layout"] for r in rep["decode"]):
        d = sorted((r["context"], r) for r in rep["decode"] if r["layout"] == layout and isinstance(r.get("ms"), float))
        if d:
            axes[0].plot([c for c, _ in d], [r["ms"] for _, r in d], "-o", label=f"{layout} (graph)")
            fl = [(c, r["floor_ms"]) for c, r in d if r.get("floor_ms")]
            if fl:
                axes[0].plot(*zip(*fl), ":", color=axes[0].lines[-1].get_color(), label=f"{layout} floor")
            axes[2].plot([c for c, _ in d], [r["peak_gib"] or 0 for _, r in d], "-o", label=layout)
        p = sorted((r["T"], r["ms"]) for r in rep["prefill"] if r["layout"] == layout and "ms" in r)
        if p:
            axes[1].plot(*zip(*p), "-o", label=layout)
    if not rep["prefill"]:
        axes[1].text(0.5, 0.5, "prefill not run (--prefill-lens)", ha="center", va="center",
                     transform=axes[1].transAxes)
    for ax, (xl, yl, t) in zip(axes, (("context (tokens)", "ms / token", "decode latency, batch 1"),
                                      ("prompt tokens", "ms", "prefill time"),
                                      ("context (tokens)", "GiB", "decode peak memory"))):
        ax.set(xscale="log", yscale="log" if ax is not axes[2] else "linear", xlabel=xl, ylabel=yl,
               title=f"{t}, {rep['machine']}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    from vlt.bench import module_main
    return module_main("vlt bench infer", add_bench_infer_args, run_bench_infer, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
