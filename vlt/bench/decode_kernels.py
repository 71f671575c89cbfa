"""``vlt bench decode-kernels``: vlt's batch-1 decode kernels per shape, on the GPU.

- the fused GDN step (vlt.kernels.gdn_decode) for each (block_v, num_warps) at InfiniteVL-4B shapes
  (16 heads, K 128, V 256): 27 layers' distinct states in one CUDA graph (so the states come from
  HBM, not L2), us per layer - what the step's defaults are chosen from;
- the batch-1 GEMV (vlt.kernels.gemv, autotuned) against F.linear (cuBLAS) for each projection shape
  of the 4B decoder: 36 distinct weights per graph, us per call, TB/s reached and the tile picked;
  also without programmatic dependent launch (``gemv_no_pdl``: each GEMV waits for the last to end);
- the MLP half of a block (RMSNorm, gate/up, SwiGLU, down, residual) as the stepper runs it - SwiGLU
  in the gate/up kernel's epilogue, then a plain down GEMV - against SwiGLU in the down GEMV's
  prologue (what the stepper did before), 36 layers' weights, us per layer;
- SWA decode attention with its K/V write (vlt.kernels.decode_attention) against index_copy + each
  SDPA backend, at InfiniteVL's SWA shapes, 9 layers' distinct caches per graph, us per layer; also
  with RoPE in the kernel (the stepper's call) and for each ``--attn-programs-per-sm``.

``--tune-gemv`` first times every GEMV tile (vlt.kernels.gemv.TILES) for each launch of the 4B
decode step (shape and fused ops as the inference engine calls them), in a CUDA graph over 36 layers'
weights with programmatic dependent launch, and writes the best per launch to
gemv_configs.json - the table vlt.kernels.gemv reads from kernels/gemv_configs/<GPU name>.json.
The rows after it use that table.

Writes decode_kernels.json and decode_kernels.png to --out.
"""
from __future__ import annotations

import argparse
import os
import sys

from vlt.bench.common import header, machine_ceilings, plt, save_json
from vlt.bench.mixers import cuda_time, graphed

# every GEMV launch of the InfiniteVL-4B decode step (vlt.inference): (name, N, K, fused ops)
STEP_GEMVS = (("swa q/k/v (norm, bias)", 2560, 2048, dict(norm=True, bias=True)),
              ("swa o_proj (+res)", 2048, 2048, dict(residual=True)),
              ("gdn q/k/v/g/a/b (norm)", 12320, 2048, dict(norm=True)),
              ("gdn o_proj (+res)", 2048, 4096, dict(residual=True)),
              ("mlp gate/up (norm, swiglu)", 11008, 2048, dict(norm=True, glu=True)),
              ("mlp down (+res)", 2048, 11008, dict(residual=True)),
              ("lm head (norm)", 151936, 2048, dict(norm=True)))
GEMV_SHAPES = (("mlp gate_up", 22016, 2048), ("mlp down", 2048, 11008), ("gdn q/k/v/g/a/b", 12320, 2048),
               ("gdn o_proj", 2048, 4096), ("swa q/k/v", 2560, 2048), ("swa o_proj", 2048, 2048))


def add_bench_decode_kernels_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--block-v", nargs="+", type=int, default=[8, 16, 32], help="GDN value channels per program")
    p.add_argument("--num-warps", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--attn-lens", nargs="+", type=int, default=[4097, 8192, 32768],
                   help="K/V slots for the decode attention rows (8192: InfiniteVL's window)")
    p.add_argument("--attn-programs-per-sm", nargs="+", type=int, default=[1, 2, 4],
                   help="split counts to time the decode attention at (its default: 2)")
    p.add_argument("--tune-gemv", action="store_true",
                   help="time every GEMV tile per decode-step launch first; writes gemv_configs.json")
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--out", default="bench_out", help="folder for decode_kernels.json and .png")
    return p


def _us_per_call(fn, calls, rep_ms):
    return cuda_time(graphed(fn), rep_ms)[0] * 1e3 / calls


def gdn_rows(args, layers=27, B=1, H=16, K=128, V=256, W=4):
    import torch
    from vlt.kernels.gdn_decode import gdn_decode_step
    dev, dt = "cuda", torch.bfloat16
    Ck, Cv = H * K, H * V
    sets = []
    for _ in range(layers):
        ins = torch.randn(B, 2 * Ck + 2 * Cv + 2 * H, device=dev, dtype=dt).split([Ck, Ck, Cv, Cv, H, H], -1)
        sets.append((ins, [torch.randn(c, W, device=dev, dtype=dt) for c in (Ck, Ck, Cv)],
                     [torch.randn(B, c, W - 1, device=dev, dtype=dt) for c in (Ck, Ck, Cv)],
                     torch.zeros(H, device=dev), torch.zeros(H, device=dev),
                     torch.randn(B, H, K, V, device=dev) * 0.01, torch.ones(V, device=dev, dtype=dt)))
    rows = []
    for bv in args.block_v:
        for nw in args.num_warps:
            def run():
                for ins, ws, convs, A_log, dt_bias, ssm, norm_w in sets:
                    gdn_decode_step(*ins, ws, convs, A_log, dt_bias, ssm, norm_w, 1e-6, block_v=bv, num_warps=nw)
            rows.append(dict(block_v=bv, num_warps=nw, us_per_layer=round(_us_per_call(run, layers, args.rep_ms), 2)))
            print("GDN", rows[-1], flush=True)
    return rows


def tune_gemv(args, max_bytes=4e9):
    """The best tile per launch of STEP_GEMVS, each timed in a graph over distinct weights (as many
    layers' as fit in ``max_bytes``, at most 36) with PDL: {"configs": {key: tile}, "timings": ...}."""
    import torch
    from vlt.kernels import gemv
    dt = torch.bfloat16
    table, timings = {}, {}
    for name, N, K, ops in STEP_GEMVS:
        copies = int(max(2, min(36, max_bytes // (N * K * 2 * (2 if ops.get("glu") else 1)))))
        ws = [torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5 for _ in range(copies)]
        ws2 = ([torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5 for _ in range(copies)]
               if ops.get("glu") else None)
        x, ys = torch.randn(K, device="cuda", dtype=dt), torch.empty(copies, N, device="cuda", dtype=dt)
        extra = dict(norm_weight=torch.ones(K, device="cuda", dtype=dt) if ops.get("norm") else None,
                     residual=torch.randn(N, device="cuda", dtype=dt) if ops.get("residual") else None,
                     prologue=gemv.RMSNORM if ops.get("norm") else gemv.NONE, eps=1e-6)
        bias = torch.randn(N, device="cuda", dtype=dt) if ops.get("bias") else None
        key = gemv.tuned_key(N, K, extra["prologue"], bias is not None, extra["residual"] is not None, ws2 is not None)
        best, times = None, {}
        for bn, bk, acc1d, nw in gemv.TILES:
            if bk > K:  # tiles half masked off
                continue
            cfg = dict(BN=bn, BK=bk, ACC1D=acc1d, num_warps=nw)

            def run(cfg=cfg):
                for i in range(copies):
                    gemv.gemv_into(ys[i], x, ws[i], bias, weight2=ws2[i] if ws2 else None, config=cfg, **extra)
            try:
                us = _us_per_call(run, copies, args.rep_ms)
            except Exception as e:  # a tile this GPU cannot run (resources): skipped, and said
                print(f"GEMV tune {name} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            times[str(cfg)] = round(us, 2)
            if best is None or us < best[0]:
                best = (us, cfg)
        table[key] = best[1]
        tb_s = round(N * K * 2 * (2 if ws2 else 1) / best[0] / 1e6, 3)
        timings[key] = dict(launch=name, best_us=round(best[0], 2), tb_s=tb_s, copies=copies, us_per_tile=times)
        print("GEMV tune", name, key, best, flush=True)
        ws = ws2 = None  # frees the weights (the closures above are not called again)
    return {"device": torch.cuda.get_device_name(), "command": "vlt bench decode-kernels --tune-gemv",
            "configs": table, "timings": timings}


def gemv_rows(args, copies=36):
    import torch
    import torch.nn.functional as F
    from vlt.kernels import gemv, pdl
    rows = []
    for name, N, K in GEMV_SHAPES:
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5 for _ in range(copies)]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        row = dict(proj=name, N=N, K=K)
        def no_pdl():
            with pdl.disabled():
                return [gemv.linear(x, w) for w in ws]
        for impl, fn in (("cublas", lambda: [F.linear(x, w) for w in ws]),
                         ("gemv", lambda: [gemv.linear(x, w) for w in ws]), ("gemv_no_pdl", no_pdl)):
            us = _us_per_call(fn, copies, args.rep_ms)
            row[f"{impl}_us"], row[f"{impl}_tb_s"] = round(us, 2), round(N * K * 2 / us / 1e6, 3)
        row["gemv_over_cublas"] = round(row["gemv_us"] / row["cublas_us"], 3)
        row["gemv_config"] = None if (c := gemv.autotuned_config(N, K)) is None else str(c)
        tuned = gemv.tuned_config(torch.cuda.get_device_name(), gemv.tuned_key(N, K, gemv.NONE, False, False, False))
        if tuned:
            row["gemv_config"] = f"tuned table: {tuned}"
        print("GEMV", row, flush=True)
        rows.append(row)
        ws = None  # frees the weights (the closures above are not called again)
    return rows


def mlp_rows(args, copies=36, D=2048, F=11008):
    """The MLP half of a decoder block at batch 1: SwiGLU in the gate/up epilogue (the stepper's path)
    against SwiGLU in the down projection's prologue."""
    import torch
    from vlt.kernels import gemv
    dt = torch.bfloat16
    layers = [(torch.randn(2 * F, D, device="cuda", dtype=dt) * D ** -0.5,
               torch.randn(D, F, device="cuda", dtype=dt) * F ** -0.5, torch.ones(D, device="cuda", dtype=dt))
              for _ in range(copies)]
    x = torch.randn(1, D, device="cuda", dtype=dt)

    def epilogue():
        return [gemv.linear(gemv.norm_swiglu(x, nw, 1e-6, gu[:F], gu[F:]), down, residual=x) for gu, down, nw in layers]

    def prologue():
        out = []
        for gu, down, nw in layers:
            gate, up = gemv.norm_linear(x, nw, 1e-6, gu).chunk(2, -1)
            out.append(gemv.swiglu_linear(gate, up, down, residual=x))
        return out
    row = dict(D=D, F=F, weight_mb=round(3 * D * F * 2 / 1e6, 1))
    for name, fn in (("swiglu_epilogue", epilogue), ("swiglu_prologue", prologue)):
        us = _us_per_call(fn, copies, args.rep_ms)
        row[f"{name}_us"], row[f"{name}_tb_s"] = round(us, 2), round(3 * D * F * 2 / us / 1e6, 3)
    print("MLP", row, flush=True)
    return [row]


def attention_rows(args, layers=9, Hq=16, Hkv=2, D=128):
    """SWA decode (K/V write + attention) over ``layers`` distinct caches: vlt's split kernel against
    index_copy + SDPA (the best backend of flash / efficient / cuDNN)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from vlt.kernels.decode_attention import decode_attention, decode_attention_reference
    rows = []
    for L in args.attn_lens:
        caches = [(torch.randn(1, L, Hkv, D, device="cuda", dtype=torch.bfloat16),
                   torch.randn(1, L, Hkv, D, device="cuda", dtype=torch.bfloat16)) for _ in range(layers)]
        q, k, v = (torch.randn(1, h, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
        tok = torch.tensor(L + 7, device="cuda")
        row = dict(L=L, Hq=Hq, Hkv=Hkv, D=D, kv_mb=round(2 * L * Hkv * D * 2 / 1e6, 2))
        cos, sin = (torch.rand(D, device="cuda") for _ in range(2))
        row["vlt_us"] = round(_us_per_call(lambda: [decode_attention(q, k, v, kc, vc, tok) for kc, vc in caches],
                                           layers, args.rep_ms), 2)
        for pps in args.attn_programs_per_sm:  # with RoPE, as the stepper calls it
            row[f"vlt_rope_{pps}_per_sm_us"] = round(_us_per_call(
                lambda: [decode_attention(q, k, v, kc, vc, tok, cos=cos, sin=sin, programs_per_sm=pps)
                         for kc, vc in caches], layers, args.rep_ms), 2)
        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            def ref(b=backend):
                with sdpa_kernel([getattr(SDPBackend, b)]):
                    return [decode_attention_reference(q, k, v, kc, vc, tok) for kc, vc in caches]
            try:
                row[f"sdpa_{backend.split('_')[0].lower()}_us"] = round(_us_per_call(ref, layers, args.rep_ms), 2)
            except RuntimeError as e:  # a backend that refuses these shapes
                row[f"sdpa_{backend.split('_')[0].lower()}_us"] = f"error: {str(e)[:100]}"
        best = min(v for key, v in row.items() if key.startswith("sdpa_") and isinstance(v, float))
        row["vlt_over_best_sdpa"] = round(row["vlt_us"] / best, 3)
        row["vlt_tb_s"] = round(row["kv_mb"] / row["vlt_us"], 3)
        print("ATTN", row, flush=True)
        rows.append(row)
    return rows


def run_bench_decode_kernels(args) -> int:
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("vlt bench decode-kernels times Triton kernels on a CUDA device, and there is none here")
    args.device, args.dtype, args.tiny, args.num_layers, args.window = "cuda", "bfloat16", False, None, None
    os.makedirs(args.out, exist_ok=True)
    rep = header(args, "decode-kernels")
    rep["ceilings"] = machine_ceilings("cuda")
    if args.tune_gemv:
        import json
        from vlt.kernels import gemv
        tuned = tune_gemv(args)
        tuned["date"] = rep["date"]
        with open(f"{args.out}/gemv_configs.json", "w") as f:
            json.dump(tuned, f, indent=1)
        gemv.set_tuned_table(tuned["device"], tuned["configs"])  # the rows below use it
        rep["gemv_tuned"] = tuned["timings"]
    rep["gdn_decode"] = gdn_rows(args)
    rep["gemv"] = gemv_rows(args)
    rep["mlp"] = mlp_rows(args)
    rep["decode_attention"] = attention_rows(args)
    save_json(rep, f"{args.out}/decode_kernels.json")
    plot(rep, f"{args.out}/decode_kernels.png")
    return 0


def plot(rep, path):
    pyplot = plt()
    tuned = rep.get("gemv_tuned")
    fig, axes = pyplot.subplots(1, 4 if tuned else 3, figsize=(24 if tuned else 18, 4.5))
    a, b, c = axes[:3]
    g = rep["gdn_decode"]
    a.bar(range(len(g)), [r["us_per_layer"] for r in g])
    a.set_xticks(range(len(g)), [f"{r['block_v']}/{r['num_warps']}" for r in g], rotation=45)
    a.set(xlabel="block_v / num_warps", ylabel="us per layer", title=f"fused GDN decode step, {rep['machine']}")
    m = rep["gemv"]
    xs = range(len(m))
    b.bar([x - 0.27 for x in xs], [r["cublas_tb_s"] for r in m], 0.27, label="cuBLAS (F.linear)")
    b.bar(list(xs), [r["gemv_no_pdl_tb_s"] for r in m], 0.27, label="vlt GEMV, no PDL")
    b.bar([x + 0.27 for x in xs], [r["gemv_tb_s"] for r in m], 0.27, label="vlt GEMV")
    if rep.get("ceilings", {}).get("copy_tb_s"):
        b.axhline(rep["ceilings"]["copy_tb_s"], ls=":", color="k", label="copy bandwidth")
    b.set_xticks(list(xs), [r["proj"] for r in m], rotation=30)
    b.set(ylabel="TB/s (weight bytes / time)", title="plain batch-1 projections (autotuned tiles)")
    b.legend(fontsize=7)
    at = rep.get("decode_attention", [])
    xs = range(len(at))
    for i, (key, label) in enumerate((("sdpa_flash_us", "index_copy + SDPA flash"),
                                      ("sdpa_cudnn_us", "index_copy + SDPA cuDNN"), ("vlt_us", "vlt split decode"))):
        c.bar([x + (i - 1) * 0.27 for x in xs], [r[key] if isinstance(r.get(key), float) else 0 for r in at], 0.27,
              label=label)
    c.set_xticks(list(xs), [str(r["L"]) for r in at])
    c.set(xlabel="K/V slots", ylabel="us per layer (log)", yscale="log",
          title="SWA decode attention + K/V write (16q/2kv, D 128)")
    c.legend(fontsize=7)
    if tuned:  # the decode step's own launches, at their measured best tile
        rows = list(tuned.values())
        axes[3].bar(range(len(rows)), [r["tb_s"] for r in rows])
        if rep.get("ceilings", {}).get("copy_tb_s"):
            axes[3].axhline(rep["ceilings"]["copy_tb_s"], ls=":", color="k", label="copy bandwidth")
            axes[3].legend(fontsize=7)
        axes[3].set_xticks(range(len(rows)), [r["launch"] for r in rows], rotation=30, ha="right", fontsize=7)
        axes[3].set(ylabel="TB/s (weight bytes / time)", title="decode-step GEMVs, tuned tiles (--tune-gemv)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    from vlt.bench import module_main
    return module_main("vlt bench decode-kernels", add_bench_decode_kernels_args, run_bench_decode_kernels,
                       __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
