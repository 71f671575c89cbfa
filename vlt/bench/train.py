"""``vlt bench train``: training-step tokens/s, peak memory and MFU of the decoder per layout and length.

One step = forward + next-token loss + backward + fused AdamW on random weights, batch 1 x T tokens,
bf16 parameters (AdamW states in bf16 too: fp32 master weights for 3.7B parameters would not leave
room for 128K-token activations on one 80 GB GPU). The loss is `vlt fit`'s fused LM-head
cross-entropy (vlt.training.losses) in chunks of --loss-chunk tokens, so a [T, 151936] logits matrix
never exists. Activation checkpointing per decoder block is used when ``--checkpointing`` says so
(default: from 32K tokens on; below, none, and after an out-of-memory half of the blocks, then all).
If a step with every parameter trainable runs out of memory, the row is retried training only the
token mixers (InfiniteVL stage I: MLPs, norms, embeddings frozen) and says so (``trainable: mixers``).

MFU = model FLOPs per step / step time / peak (789 TFLOP/s measured bf16 matmul on the H100;
the run also measures its own). Model FLOPs = 6 x matmul params x T + 3 x the mixers' forward
mixing FLOPs (causal attention T^2/2, SWA T*W, GDN chunked); checkpoint recomputation is not counted.
Writes train.json and train.png to --out.
"""
from __future__ import annotations

import argparse
import sys
import time

from vlt.bench.common import (long_swa_backend, PEAK_BF16_TFLOPS, add_common_args, build_model, err, header, is_oom,
                              kernel_profile,
                              machine_ceilings, matmul_params, out_of_time, peak_gib, plt, reset_peak,
                              save_json, setup, time_ms, token_ids, train_flops)


def add_bench_train_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_common_args(p)
    p.add_argument("--seq-lens", nargs="+", type=int, default=None,
                   help="tokens per step (default 8192 32768 131072; --tiny: 64 256, a CPU smoke run)")
    p.add_argument("--checkpointing", default="auto",
                   help="auto | on | off | a fraction of the blocks (0.5); auto: off below 32K tokens, "
                        "after an OOM half of the blocks, then all; on from 32K")
    p.add_argument("--trainable", default="auto", choices=["auto", "all", "mixers"],
                   help="auto: all, falling back to mixers only on OOM")
    p.add_argument("--steps", type=int, default=2, help="timed steps per row (after one warm-up)")
    p.add_argument("--loss-chunk", type=int, default=4096)
    p.add_argument("--profile", action="store_true",
                   help="profile a step at each layout's first length: kernels by device time, "
                        "profile_train_<layout>_<T>.txt")
    return p


def checkpointing_tries(setting: str, T: int):
    """Activation checkpointing settings to try in order (the next after an out-of-memory): with
    'auto', none below 32K tokens, then half of the blocks, then all of them."""
    if setting == "auto":
        return [False, 0.5, True] if T < 32768 else [True]
    if setting in ("on", "off"):
        return [setting == "on"]
    try:
        frac = float(setting)
    except ValueError:
        frac = -1.0
    if not 0 <= frac <= 1:
        raise ValueError(f"--checkpointing {setting!r}; allowed: auto, on, off, or a fraction in [0, 1]")
    return [frac]


def chunked_loss(model, ids, chunk: int):
    """Mean next-token cross-entropy through the fused LM-head loss `vlt fit` uses
    (vlt.training.losses: chunks of ``chunk`` rows, gradients formed in the same pass, no [T, V] logits)."""
    from vlt.training.losses import linear_cross_entropy
    h = model(ids, compute_logits=False).last_hidden[:, :-1].flatten(0, 1)
    return linear_cross_entropy(model.norm(h), model.lm_head.weight, ids[:, 1:].flatten(), chunk=chunk)


def set_trainable(model, which: str):
    for name, p in model.named_parameters():
        p.requires_grad_(which == "all" or ".mixer." in name)
    return [p for p in model.parameters() if p.requires_grad]


def run_row(model, T, args, device, trainable, ckpt, profile_path=None):
    import torch
    params = set_trainable(model, trainable)
    model.gradient_checkpointing = ckpt
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    ids = token_ids(model, (1, T), device)

    def step():
        loss = chunked_loss(model, ids, args.loss_chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    reset_peak(device)
    try:
        step()  # warm-up: kernel compiles and autotuning, optimizer state allocation
        ms, n = time_ms(step, device, max_reps=args.steps)
        peak = peak_gib(device)
        prof = kernel_profile(step, profile_path) if profile_path else None
        return ms, n, peak, prof
    finally:
        opt = None  # frees the AdamW state (step() is not called again)
        for p in model.parameters():
            p.grad = None


def run_bench_train(args) -> int:
    import torch
    if args.seq_lens is None:  # --tiny keeps the lengths tiny too: one 32K full-attention row took 6 min on a CPU
        args.seq_lens = [64, 256] if args.tiny else [8192, 32768, 131072]
    device, dtype = setup(args)
    rep = header(args, "train")
    rep["ceilings"] = machine_ceilings(device)
    rep["peak_tflops_for_mfu"] = PEAK_BF16_TFLOPS
    rep["method"] = ("fwd + chunked CE + bwd + fused AdamW (bf16 params and states), batch 1, random weights and "
                     "tokens; median of --steps event-timed steps after one warm-up")
    path = f"{args.out}/train.json"
    for layout in args.layouts:
        model = build_model(layout, args, device, dtype).train()
        n_mm = matmul_params(model)
        for T in args.seq_lens:
            if out_of_time(args):
                rep["results"].append(dict(layout=layout, T=T, error="skipped: --time-limit reached"))
                continue
            tries = [(tr, c) for tr in (["all", "mixers"] if args.trainable == "auto" else [args.trainable])
                     for c in checkpointing_tries(args.checkpointing, T)]
            row = dict(layout=layout, T=T)
            swa_b = long_swa_backend(model, T)
            if swa_b:
                row['swa_backend'] = swa_b
            for trainable, c in tries:
                t0 = time.perf_counter()
                try:
                    first = T == args.seq_lens[0] and args.profile and device.type == "cuda"
                    ms, n, peak, prof = run_row(model, T, args, device, trainable, c,
                                                f"{args.out}/profile_train_{layout}_{T}.txt" if first else None)
                except Exception as e:  # noqa: BLE001 - OOM and kernel failures are results too
                    row.setdefault("attempts", []).append(dict(trainable=trainable, checkpointing=c, error=err(e)))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if not is_oom(e):
                        break
                    continue
                flops = train_flops(model, T)
                row.update(trainable=trainable, checkpointing=c, step_ms=round(ms, 2), steps=n,
                           tokens_per_s=round(T / ms * 1e3, 1), model_tflop=round(flops / 1e12, 2),
                           mfu=round(flops / (ms * 1e-3) / (PEAK_BF16_TFLOPS * 1e12), 4),
                           peak_gib=peak, wall_s=round(time.perf_counter() - t0, 1))
                if prof:
                    row["profile"] = prof
                break
            if "step_ms" not in row:
                row["error"] = row["attempts"][-1]["error"]
            print("TRAIN", row, flush=True)
            rep["results"].append(row)
            save_json(rep, path)
        rep.setdefault("matmul_params", {})[layout] = n_mm
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rep["goals"] = goals(rep["results"])
    save_json(rep, path)
    plot(rep, f"{args.out}/train.png")
    print_table(rep)
    return 0


def _get(rows, layout, T, key="tokens_per_s"):
    for r in rows:
        if r.get("layout") == layout and r.get("T") == T and r.get(key) is not None:
            return r
    return None


def goals(rows):
    out = []
    for T, need in ((32768, 1.2), (131072, 2.5)):
        h, f = _get(rows, "hybrid", T), _get(rows, "full", T)
        if h and f:
            same = h["trainable"] == f["trainable"]
            ratio = h["tokens_per_s"] / f["tokens_per_s"]
            out.append(dict(goal=f"hybrid/full tokens/s >= {need} at T={T}", ratio=round(ratio, 3), met=ratio >= need,
                            trainable=[h["trainable"], f["trainable"]], same_setup=same))
    for layout in ("full", "swa", "gdn", "hybrid"):
        r = _get(rows, layout, 8192)
        if r:
            out.append(dict(goal=f"MFU >= 0.40 at 8K ({layout})", mfu=r["mfu"], met=r["mfu"] >= 0.40))
    return out


def print_table(rep):
    print("=== SUMMARY train ===")
    print(f"{rep['machine']}  train step, {rep['dtype']}, batch 1  (ceilings {rep.get('ceilings')})")
    print(f"{'layout':7} {'T':>7} {'tok/s':>9} {'step ms':>9} {'MFU':>6} {'peak GiB':>9} {'ckpt':>5} trainable / error")
    for r in rep["results"]:
        if r.get("tokens_per_s") is None:
            print(f"{r['layout']:7} {r['T']:>7} {'-':>9} {'-':>9} {'-':>6} {'-':>9} {'-':>5} {r.get('error', '')[:60]}")
            continue
        print(f"{r['layout']:7} {r['T']:>7} {r['tokens_per_s']:>9.0f} {r['step_ms']:>9.1f} {r['mfu']:>6.3f} "
              f"{r['peak_gib'] or 0:>9.1f} {str(r['checkpointing']):>5} {r['trainable']}")
    for g in rep.get("goals", []):
        print("GOAL", g)


def plot(rep, path):
    pyplot = plt()
    rows = [r for r in rep["results"] if r.get("tokens_per_s")]
    fig, axes = pyplot.subplots(1, 3, figsize=(16, 4.5))
    for layout in sorted({r["layout"] for r in rows}):
        pts = sorted((r["T"], r) for r in rows if r["layout"] == layout)
        Ts = [t for t, _ in pts]
        for ax, key in zip(axes, ("tokens_per_s", "mfu", "peak_gib")):
            ax.plot(Ts, [r[key] or 0 for _, r in pts], "-o", label=layout)
    for ax, lab in zip(axes, ("tokens/s", "MFU (of 789 TFLOP/s)", "peak memory (GiB)")):
        ax.set(xscale="log", xlabel="tokens per step", ylabel=lab, title=f"train: {lab}, {rep['machine']}")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    from vlt.bench import module_main
    return module_main("vlt bench train", add_bench_train_args, run_bench_train, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
