"""``vlt bench infer``: the inference engine users get (``vlt generate``), timed - prefill, per-token
decode latency vs context, batched decode, and one end-to-end generate with an image.

Prefill: ``InferenceEngine.prefill`` of T random tokens (the model's parallel forward with
``use_cache=True`` and ``logits_to_keep=1``, then the state loaded into the engine's cache), event-timed.

Decode: an engine sized as ``vlt generate`` sizes it (capacity = context + room for new tokens) holds
a context of L tokens BUILT DIRECTLY at its true size (``InferenceEngine.fill_random``: random K/V and
GDN states), since a decode step's cost depends only on those sizes; contexts up to 1M are measured
without prefilling them. Timed: ``engine.decode`` - exactly the call ``vlt generate`` makes per token
(a CUDA-graph replay of the step with vlt's fused kernels on the GPU). Before timing, the step is
checked against the mixers' own eager decode on the same state (``check_rel_err``), at contexts <=
``--check-max``; ``eager_ms`` times that eager path (``vlt generate --engine eager``). At the first
context the same step without vlt's kernels (``unfused_graph_ms``: cuBLAS, the torch GDN step, SDPA)
and without programmatic dependent launch (``no_pdl_graph_ms``) are timed too.

Batched decode (``--batch-sizes``): tokens/s of B rows decoding at once at each context of
``--batch-contexts``. End to end (``--e2e-prompt``): a model with the Qwen2.5-VL vision tower, a
prompt of that many tokens with one 448x448 image, then ``--e2e-new`` tokens through
``vlt.inference.generate``: time to first token and per-token latency as ``vlt generate`` reports them.
A layout whose state would not fit is recorded as OOM (estimated up front, or caught).

Bandwidth floor per token = (weight bytes + state bytes read + written) / measured copy bandwidth.
Writes infer.json and infer.png to --out.
"""
from __future__ import annotations

import argparse
import sys
import time

from vlt.bench.common import (add_common_args, add_compile_arg, allocated_bytes, build_model, err, header,
                              kernel_profile, long_swa_backend, machine_ceilings, out_of_time, peak_gib, plt,
                              prefill_flops, reset_peak, save_json, setup, state_bytes_per_token, step_compile_backend,
                              time_ms, token_ids, weight_bytes_per_token)

ROOM = 2048  # new tokens an engine is sized for beyond its context (timing replays advance it)


def add_bench_infer_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_common_args(p)
    p.add_argument("--prefill-lens", nargs="*", type=int, default=[4096, 32768, 131072], help="none: decode only")
    p.add_argument("--contexts", nargs="+", type=int, default=[4096, 131072, 1048576])
    p.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 8, 32], help="batched decode rows (none: skip)")
    p.add_argument("--batch-contexts", nargs="*", type=int, default=[4096, 131072])
    p.add_argument("--e2e-prompt", type=int, default=4096, help="end-to-end generate: prompt tokens (0: skip)")
    p.add_argument("--e2e-new", type=int, default=256, help="end-to-end generate: new tokens")
    p.add_argument("--check-max", type=int, default=16384, help="check the engine's step against eager up to here")
    p.add_argument("--eager-max", type=int, default=131072, help="time the eager decode path up to this context")
    p.add_argument("--rep-ms", type=float, default=200.0)
    p.add_argument("--no-graph", action="store_true", help="the engine without CUDA graphs")
    p.add_argument("--no-fused", action="store_true", help="the engine without vlt's decode kernels")
    p.add_argument("--no-pdl", action="store_true", help="vlt's kernels without programmatic dependent launch")
    p.add_argument("--profile", action="store_true", help="kernel profile of the step at the first context")
    add_compile_arg(p)
    return p


def _engine(model, args, device, capacity, batch=1, **over):
    from vlt.inference import InferenceEngine
    kw = dict(batch_size=batch, capacity=capacity, graphs=False if args.no_graph or device.type != "cuda" else None,
              fused=False if args.no_fused else None, compile=step_compile_backend(args, device),
              pdl=not args.no_pdl, pack=False if args.no_pack else None)
    kw.update(over)
    return InferenceEngine(model, **kw)


def _oom_estimate(model, L, batch, device):
    import torch
    read, _ = state_bytes_per_token(model, L + ROOM, batch)
    if device.type == "cuda" and read > 0.9 * torch.cuda.mem_get_info()[0]:
        return f"OOM (estimated): state {read / 2**30:.1f} GiB > free {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB"
    return None


def decode_row(model, layout, L, args, device, bw, first: bool):
    import torch
    from vlt.inference.steps import step_for
    row = dict(layout=layout, context=L, state="constructed at full size (random contents), not prefilled",
               path="InferenceEngine.decode (what vlt generate runs per token)")
    read, write = state_bytes_per_token(model, L)
    wbytes = weight_bytes_per_token(model)
    row.update(state_bytes=read, state_gib=round(read / 2**30, 3), weight_gib=round(wbytes / 2**30, 3))
    if bw:
        row["floor_ms"] = round((wbytes + read + write) / (bw * 1e12) * 1e3, 4)
    oom = _oom_estimate(model, L, 1, device)
    if oom:
        row["error"] = oom
        return row
    reset_peak(device)
    eng = _engine(model, args, device, L + ROOM)
    eng.fill_random(L)
    tok = token_ids(model, (1,), device)
    if L <= args.check_max:   # the engine's step vs the mixers' own decode on the same state
        state = eng.export_state()
        with torch.no_grad():
            ref = model(tok[:, None], state=state, use_cache=True).logits[:, -1]
        got = eng.decode(tok)
        row["check_rel_err"] = round(float((got.float() - ref.float()).norm() / ref.float().norm()), 6)
        del state
    row["ms"] = round(time_ms(lambda: eng.decode(tok), device, args.rep_ms)[0], 4)
    if "floor_ms" in row:
        row["ms_over_floor"] = round(row["ms"] / row["floor_ms"], 3)
    row.update(graph=eng.graphs, fused=eng.fused, compile=eng.compile, pdl=eng.pdl,
               steps=sorted({type(step_for(b.mixer)).__name__ for b in model.layers}), peak_gib=peak_gib(device))
    if args.profile and device.type == "cuda" and first:
        row["profile"] = kernel_profile(eng._decode_impl, f"{args.out}/profile_decode_{layout}.txt", reps=5)
    if L <= args.eager_max:
        state = eng.export_state()
        with torch.no_grad():
            row["eager_ms"] = round(time_ms(lambda: model(tok[:, None], state=state, use_cache=True), device,
                                            args.rep_ms)[0], 3)
        del state
    eng = None  # frees the engine's state (the closures above are not called again)
    if first and device.type == "cuda" and not args.no_graph:   # the "before" of vlt's kernels and of PDL
        for key, over in (("unfused_graph_ms", dict(fused=False)), ("no_pdl_graph_ms", dict(pdl=False))):
            try:
                e2 = _engine(model, args, device, L + ROOM, **over)
                e2.fill_random(L)
                row[key] = round(time_ms(lambda: e2.decode(tok), device, args.rep_ms)[0], 4)
                del e2
            except Exception as e:  # noqa: BLE001
                row[key] = err(e)
    return row


def batch_row(model, layout, L, B, args, device):
    row = dict(layout=layout, context=L, batch=B)
    oom = _oom_estimate(model, L, B, device)
    if oom:
        row["error"] = oom
        return row
    eng = _engine(model, args, device, L + ROOM, batch=B)
    eng.fill_random(L)
    tok = token_ids(model, (B,), device)
    ms = time_ms(lambda: eng.decode(tok), device, args.rep_ms)[0]
    row.update(ms=round(ms, 4), tokens_per_s=round(B / ms * 1e3, 1), peak_gib=peak_gib(device))
    return row


def prefill_row(model, layout, T, device, args):
    import torch
    row = dict(layout=layout, T=T, path="InferenceEngine.prefill")
    swa_b = long_swa_backend(model, T)
    if swa_b:
        row['swa_backend'] = swa_b
    ids = token_ids(model, (T,), device)
    eng = _engine(model, args, device, T + ROOM)
    reset_peak(device)
    base = allocated_bytes(device)
    with torch.no_grad():
        ms, n = time_ms(lambda: eng.prefill(ids), device, max_reps=2)
    flops = prefill_flops(model, T)
    row.update(ms=round(ms, 2), reps=n, tokens_per_s=round(T / ms * 1e3, 1), peak_gib=peak_gib(device),
               model_flops=flops, tflops=round(flops / ms / 1e9, 3))
    if base is not None:
        row["peak_over_weights_gib"] = round(row["peak_gib"] - base / 2**30, 3)
    return row


def e2e_row(layout, args, device, dtype):
    """What ``vlt generate`` does after loading: a prompt with one 448x448 image, then new tokens."""
    import torch
    from vlt.inference import generate
    model = build_model(layout, args, device, dtype, vision=True).eval()
    side = 28 * (2 if args.tiny else 16)
    image = torch.randn(3, side, side, device=device, dtype=dtype)
    n_img = (side // 28) ** 2
    T = max(args.e2e_prompt, n_img + 8)
    cfg = model.config
    ids = token_ids(model, (T,), device)
    ids[4:4 + n_img] = cfg.image_token_id
    ids[3], ids[4 + n_img] = cfg.vision_start_token_id, cfg.vision_start_token_id
    eng = _engine(model, args, device, T + args.e2e_new)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    generate(eng, [(ids, [image])], max_new_tokens=4)          # warm: graph capture, compiles, autotune
    sync()
    t0 = time.perf_counter()
    generate(eng, [(ids, [image])], max_new_tokens=1)
    sync()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    new = generate(eng, [(ids, [image])], max_new_tokens=args.e2e_new)
    sync()
    total = time.perf_counter() - t0
    n = new.shape[1]
    per_token = (total - ttft) / max(n - 1, 1)
    row = dict(layout=layout, prompt_tokens=T, image_px=[side, side], image_tokens=n_img, new_tokens=n,
               ttft_ms=round(ttft * 1e3, 2), per_token_ms=round(per_token * 1e3, 4),
               tokens_per_s=round(1 / per_token, 1), total_s=round(total, 3), path="vlt.inference.generate")
    del eng, model
    return row


def run_bench_infer(args) -> int:
    import torch
    device, dtype = setup(args)
    rep = header(args, "infer")
    rep["ceilings"] = machine_ceilings(device)
    bw = rep["ceilings"].get("copy_tb_s")
    rep["prefill"], rep["decode"], rep["batched"], rep["e2e"] = [], [], [], []
    path = f"{args.out}/infer.json"
    cuda = device.type == "cuda"

    def record(kind, fn, **where):
        if out_of_time(args):
            rep[kind].append(dict(where, error="skipped: --time-limit reached"))
            return
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                row = fn()
        except Exception as e:  # noqa: BLE001 - a row that fails is a result; the others still run
            row = dict(where, error=err(e))
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        print(kind.upper(), row, flush=True)
        rep[kind].append(row)
        save_json(rep, path)
        if cuda:
            torch.cuda.empty_cache()

    for layout in args.layouts:
        model = build_model(layout, args, device, dtype).eval()
        for T in args.prefill_lens:
            record("prefill", lambda: prefill_row(model, layout, T, device, args), layout=layout, T=T)
        for i, L in enumerate(args.contexts):
            record("decode", lambda: decode_row(model, layout, L, args, device, bw, i == 0), layout=layout, context=L)
        for L in args.batch_contexts:
            for B in args.batch_sizes:
                record("batched", lambda: batch_row(model, layout, L, B, args, device),
                       layout=layout, context=L, batch=B)
        model = None  # frees the model (the row lambdas above are not called again)
        if cuda:
            torch.cuda.empty_cache()
        if args.e2e_prompt:
            record("e2e", lambda: e2e_row(layout, args, device, dtype), layout=layout)
    # the targets are set for one H200/H100; on a CPU the run is a smoke test of the same path
    rep["goals"] = goals(rep["decode"], rep["e2e"]) if cuda else []
    save_json(rep, path)
    plot(rep, f"{args.out}/infer.png")
    print_table(rep)
    return 0


def goals(rows, e2e=()):
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
    for r in e2e:
        if "ttft_ms" in r and r["layout"] == "hybrid":
            out.append(dict(goal="time to first token <= 150 ms (4K prompt, one 448x448 image)", ttft_ms=r["ttft_ms"],
                            met=r["ttft_ms"] <= 150))
            if 4096 in h:
                ratio = r["per_token_ms"] / h[4096]["ms"]
                out.append(dict(goal="generate per token within 1.05x of the engine step at 4K",
                                ratio=round(ratio, 3), met=ratio <= 1.05))
    return out


def print_table(rep):
    print("=== SUMMARY infer ===")
    graph = any(r.get("graph") for r in rep["decode"])
    print(f"{rep['machine']}  engine decode step ({'CUDA graph' if graph else 'eager, no graph'}, batch 1), ms; "
          f"ceilings {rep.get('ceilings')}")
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
    print("\nprefill ms (tokens/s, peak GiB)")
    for r in rep["prefill"]:
        print(f"  {r['layout']:7} T={r['T']:>7}  " + (f"{r['ms']:.1f} ms  {r['tokens_per_s']:.0f} tok/s  "
                                                    f"{r['peak_gib']} GiB  {r['model_flops'] / 1e12:.2f} TFLOP "
                                                    f"({r['tflops']} TFLOP/s)"
                                                    if "ms" in r else r.get("error", "")[:80]))
    for r in rep["decode"]:
        if "check_rel_err" in r:
            print(f"  check {r['layout']} L={r['context']}: engine vs eager {r['check_rel_err']}, eager "
                  f"{r.get('eager_ms')} ms, unfused {r.get('unfused_graph_ms')} ms, "
                  f"no PDL {r.get('no_pdl_graph_ms')} ms")
    for r in rep.get("batched", []):
        print(f"  batched {r['layout']:7} L={r['context']:>7} B={r['batch']:>3}  " +
              (f"{r['ms']:.3f} ms/step  {r['tokens_per_s']:.0f} tokens/s" if "ms" in r else str(r.get("error"))[:80]))
    for r in rep.get("e2e", []):
        print(f"  e2e {r['layout']}: " + (f"prompt {r['prompt_tokens']} tokens + image {r['image_px']}: time to first "
                                          f"token {r['ttft_ms']} ms, then {r['per_token_ms']} ms/token"
                                          if "ttft_ms" in r else str(r.get("error"))[:120]))
    for g in rep.get("goals", []):
        print("GOAL", g)


def plot(rep, path):
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 4, figsize=(21, 4.5))
    for layout in dict.fromkeys(r["layout"] for r in rep["decode"]):
        d = sorted((r["context"], r) for r in rep["decode"] if r["layout"] == layout and isinstance(r.get("ms"), float))
        if d:
            axes[0].plot([c for c, _ in d], [r["ms"] for _, r in d], "-o",
                         label=f"{layout} ({'graph' if d[0][1].get('graph') else 'eager'})")
            fl = [(c, r["floor_ms"]) for c, r in d if r.get("floor_ms")]
            if fl:
                axes[0].plot(*zip(*fl), ":", color=axes[0].lines[-1].get_color(), label=f"{layout} floor")
            axes[2].plot([c for c, _ in d], [r["peak_gib"] or 0 for _, r in d], "-o", label=layout)
        for L in sorted({r["context"] for r in rep.get("batched", [])}):
            b = sorted((r["batch"], r["tokens_per_s"]) for r in rep["batched"]
                       if r["layout"] == layout and r["context"] == L and "tokens_per_s" in r)
            if b:
                axes[3].plot(*zip(*b), "-o", label=f"{layout} L={L}")
        p = sorted((r["T"], r["ms"]) for r in rep["prefill"] if r["layout"] == layout and "ms" in r)
        if p:
            axes[1].plot(*zip(*p), "-o", label=layout)
    if not rep["prefill"]:
        axes[1].text(0.5, 0.5, "prefill not run (--prefill-lens)", ha="center", va="center",
                     transform=axes[1].transAxes)
    for ax, (xl, yl, t) in zip(axes, (("context (tokens)", "ms / token", "decode latency, batch 1"),
                                      ("prompt tokens", "ms", "prefill time"),
                                      ("context (tokens)", "GiB", "decode peak memory"),
                                      ("batch rows", "tokens/s", "batched decode"))):
        ax.set(xscale="log", yscale="linear" if ax is axes[2] else "log", xlabel=xl, ylabel=yl,
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
