"""``vlt bench stream``: a video stream prefilled one frame at a time with the state carried.

Each frame is a 448x448 image (``--grid 16 16`` merged tokens = 256 LLM tokens) run through the
Qwen2.5-VL vision tower (32 blocks, width 1280, random weights, transformers' module) and then
through the decoder as one 256-token step with M-RoPE video positions (t, t + row, t + col).
The decoder step is ``vlt.bench.static.StaticStepper`` (in-place SWA ring / GDN states, positions
and slots computed on the device; per-block pieces compiled by Inductor on CUDA, ``--compile``)
captured once in a CUDA graph and replayed every frame.

Vision (``--vision-mode``): ``static`` (default) runs the HF module's weights through
``vlt.qwen_vision_static.StaticQwenVision`` (window order, rotary table and window mask precomputed
for the frame's grid, one SDPA call per layer, no host syncs), captured in its own CUDA graph on
CUDA (not with ``--no-graph``); it is checked once against transformers' forward on the stream's
frame (relative error in the JSON). ``eager`` runs transformers' forward every frame (window
indices rebuilt, host syncs, one SDPA call per window). Vision time per frame includes patchifying
the frame.

Recorded per frame index: total / vision / decoder ms (CUDA events), FPS, allocated GPU memory and
the state's bytes. ``--eager-frames`` frames are also run through transformers' vision forward and
the mixers' own eager path (the "before" of the static, graphed path), and ``--check-frames`` frames
(past the SWA ring's wrap) are checked eager vs static vs graph on the same inputs. Layouts with a
growing cache (``full``) are not streamed: their state would need a capacity; see ``vlt bench infer``.
Writes stream.json and stream.png to --out.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from vlt.bench.common import (add_common_args, add_compile_arg, allocated_bytes, build_model, err, graphed, header,
                              kernel_profile, plt, reset_peak, save_json, setup, step_compile_backend)

# Qwen2.5-VL-3B's vision_config (REFERENCE.md), random weights.
QWEN25_VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                           out_hidden_size=2048, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
                           tokens_per_second=2)
TINY_VISION = dict(QWEN25_VL_3B_VISION, depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                   out_hidden_size=64, fullatt_block_indexes=[1])


def add_bench_stream_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_common_args(p, layouts=("hybrid",))
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--grid", nargs=2, type=int, default=None, help="merged tokens per frame h w (default 16 16)")
    p.add_argument("--vision", default="qwen", choices=["qwen", "none"],
                   help="qwen: Qwen2.5-VL tower per frame; none: random features (decoder only)")
    p.add_argument("--vision-mode", default="static", choices=["static", "eager"],
                   help="static: StaticQwenVision, in a CUDA graph on CUDA; eager: transformers' forward per frame")
    p.add_argument("--eager-frames", type=int, default=100, help="frames through the eager path (0: none)")
    p.add_argument("--check-frames", type=int, default=None, help="frames compared eager vs graph "
                   "(default: enough to wrap the SWA ring, window / tokens + 2)")
    p.add_argument("--no-graph", action="store_true", help="no CUDA graphs (decoder step and vision tower)")
    add_compile_arg(p)
    p.add_argument("--profile", action="store_true",
                   help="profile one ungraphed decoder frame step and vision forward: profile_stream_*.txt")
    return p


def build_tower(args, device, dtype):
    from vlt.config import VisionConfig
    from vlt.qwen_vision import QwenVisionTower
    hf = TINY_VISION if args.tiny else QWEN25_VL_3B_VISION
    tower = QwenVisionTower(VisionConfig(kind="qwen2_5_vl", hf_config=hf), hf["out_hidden_size"])
    return tower.to(device, dtype).eval()


def static_vision(tower, image, rep, use_graph, compile=None, profile_path=None):
    """Per-frame features from StaticQwenVision (graphed when ``use_graph``), checked once against
    transformers' forward on ``image``; what was used and the check go into ``rep``."""
    from vlt.bench.static import rel_err
    from vlt.qwen_vision import patchify
    from vlt.qwen_vision_static import StaticQwenVision

    def patchified():
        return patchify(image, tower.patch_size, tower.merge_size, tower.temporal_patch_size)
    from vlt.qwen_vision_static import pad_mlp_hidden
    if compile:  # the tuned path: aligned MLP GEMMs (exact: zero padding, see pad_mlp_hidden)
        rep["vision_mlp_width"] = pad_mlp_hidden(tower.visual)
    static = StaticQwenVision(tower, patchified()[1], compile=compile)
    run, rep["vision_graph"] = static.forward, False
    if use_graph:
        try:
            run, rep["vision_graph"] = static.graphed(), True
        except Exception as e:  # noqa: BLE001 - stream the static forward without the graph, and say so
            rep["vision_graph_error"] = err(e)
    rep["vision_equal_windows"] = static.equal_windows
    if profile_path:
        rep["vision_profile"] = kernel_profile(lambda: static.forward(patchified()[0]), profile_path, reps=3)

    def features():  # the graph's output buffer: the decoder step copies it in before the next frame
        return run(patchified()[0])[None]
    rep["vision_check_static_vs_hf_rel_err"] = float(f"{rel_err(features(), tower([image])[None]):.3g}")
    return features


def run_bench_stream(args) -> int:
    import torch
    device, dtype = setup(args)
    cuda = device.type == "cuda"
    h, w = args.grid or ((2, 4) if args.tiny else (16, 16))
    T = h * w
    rep = header(args, "stream")
    rep.update(frames=args.frames, tokens_per_frame=T, grid=[h, w], image_px=[28 * h, 28 * w], vision=args.vision,
               vision_mode=args.vision_mode if args.vision == "qwen" else None)
    path = f"{args.out}/stream.json"
    tower = None
    if args.vision == "qwen":
        try:
            tower = build_tower(args, device, dtype)
        except Exception as e:  # noqa: BLE001 - reported; the decoder stream still runs
            rep["vision_error"] = err(e)
            print("vision tower unavailable:", rep["vision_error"], flush=True)
    image = torch.randn(3, 28 * h, 28 * w, device=device, dtype=dtype)
    D = None

    def eager_features():
        if tower is not None:
            return tower([image]).to(dtype)[None]
        return torch.randn(1, T, D, device=device, dtype=dtype)
    features, vision_method = eager_features, "transformers' forward per frame (eager)"
    if tower is not None and args.vision_mode == "static":
        try:
            with torch.no_grad():
                features = static_vision(tower, image, rep, cuda and not args.no_graph,
                                         step_compile_backend(args, device),
                                         f"{args.out}/profile_stream_vision.txt" if args.profile and cuda else None)
            vision_method = (f"StaticQwenVision (fixed grid, one SDPA call per layer, compile: "
                             f"{step_compile_backend(args, device)})"
                             + (" in a CUDA graph" if rep["vision_graph"] else " without a graph"))
            print("vision static vs transformers rel err:", rep["vision_check_static_vs_hf_rel_err"], flush=True)
        except Exception as e:  # noqa: BLE001 - reported; the stream runs transformers' forward instead
            rep["vision_static_error"] = err(e)
            print("static vision unavailable:", rep["vision_static_error"], flush=True)
    if tower is None:
        vision_method = "none (random features)"
    rep["method"] = (f"vision: {vision_method}; decoder step = StaticStepper (compile: "
                     f"{step_compile_backend(args, device)}), state in place, "
                     f"{'in a CUDA graph (per layout: graph)' if cuda and not args.no_graph else 'no graph'}; "
                     f"eager baseline: transformers' vision forward + the mixers' own path; per-frame times from "
                     f"{'CUDA events' if cuda else 'perf_counter'}")

    for layout in args.layouts:
        res = dict(layout=layout)
        rep["results"].append(res)
        model = build_model(layout, args, device, dtype).eval()
        if not args.no_pack:
            from vlt.bench.static import pack_projections
            res["packed_groups"] = pack_projections(model)
        D = model.config.decoder.hidden_size
        with torch.no_grad():
            try:
                _stream_layout(model, res, args, device, dtype, T, (h, w), features, eager_features, cuda)
            except Exception as e:  # noqa: BLE001
                res["error"] = err(e)
                print("STREAM error", res["error"], flush=True)
        save_json(rep, path)
        del model
        if cuda:
            torch.cuda.empty_cache()
    save_json(rep, path)
    plot(rep, f"{args.out}/stream.png")
    print_table(rep)
    return 0


def _stream_layout(model, res, args, device, dtype, T, grid, features, eager_features, cuda):
    import torch
    from vlt.bench.static import StaticStepper, eager_step, frame_positions, rel_err
    from vlt.layers import state_nbytes
    h, w = grid
    adv = max(h, w)
    window = min([b.mixer.window for b in model.layers if getattr(b.mixer, "window", None)] or [T])
    n_check = args.check_frames if args.check_frames is not None else window // T + 2
    # -- 1. correctness: eager (mixers' own state) vs static step vs graph replay on the same frames
    xs = [torch.randn(1, T, model.config.decoder.hidden_size, device=device, dtype=dtype) for _ in range(n_check)]
    st = StaticStepper(model, T, capacity=None, compile=step_compile_backend(args, device))
    res["compile"] = st.compile
    offs = frame_positions(T, 0, device, grid)
    base = torch.zeros((), dtype=torch.long, device=device)

    def frame_step():
        st.pos.copy_(offs + base)
        st.step()
        base.add_(adv)

    state, errs = None, []
    for f, x in enumerate(xs):
        ref, state = eager_step(model, x, frame_positions(T, f * adv, device, grid), state)
        st.x.copy_(x)
        frame_step()
        errs.append(rel_err(st.out, ref))
    res["check_frames"] = n_check
    res["check_static_vs_eager_max_rel_err"] = round(max(errs), 6) if errs else None
    _progress(args, f"{res['layout']}: {n_check} frames checked, "
                    f"static vs eager {res['check_static_vs_eager_max_rel_err']}")
    if args.profile and cuda:
        res["decoder_profile"] = kernel_profile(frame_step, f"{args.out}/profile_stream_decoder_{res['layout']}.txt",
                                                reps=3)
    use_graph = cuda and not args.no_graph
    reset = _resetter(st, base)
    if use_graph:
        reset()
        try:
            step = graphed(frame_step)
        except Exception as e:  # noqa: BLE001 - stream without the graph, and say so
            res["graph_error"] = err(e)
            use_graph = False
            step = frame_step
    _progress(args, f"{res['layout']}: graph {'captured' if use_graph else 'not used'}")
    if use_graph:
        reset()
        for x in xs:
            st.x.copy_(x)
            step()
        res["check_graph_vs_eager_rel_err"] = round(rel_err(st.out, ref), 6) if xs else None
    else:
        step = frame_step
    # -- 2. eager baseline ("before"): transformers' vision forward, the mixers' own path, state as dicts
    eager_ms, eager_state_bytes = [], []
    state = None
    for f in range(args.eager_frames):
        t0 = time.perf_counter()
        feats = eager_features()
        _, state = eager_step(model, feats, frame_positions(T, f * adv, device, grid), state)
        if cuda:
            torch.cuda.synchronize()
        eager_ms.append((time.perf_counter() - t0) * 1e3)
        eager_state_bytes.append(state_nbytes(state["layers"]))
    del state
    if eager_ms:
        tail = eager_ms[len(eager_ms) // 2:]
        res.update(eager_frames=len(eager_ms), eager_fps_median_2nd_half=round(1e3 / statistics.median(tail), 2),
                   eager_state_bytes=eager_state_bytes,
                   eager_ms=[round(v, 3) for v in eager_ms])
    _progress(args, f"{res['layout']}: {len(eager_ms)} eager baseline frames")
    # -- 3. the stream: graphed decoder step per frame, vision as --vision-mode says
    reset()
    reset_peak(device)
    n = args.frames
    vis_ms, dec_ms, tot_ms, mem, peak = [], [], [], [], []
    ev = []
    t_start = time.perf_counter()
    for f in range(n):
        if cuda:
            e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            e[0].record()
        else:
            t0 = time.perf_counter()
        feats = features()
        if cuda:
            e[1].record()
        else:
            t1 = time.perf_counter()
        st.x.copy_(feats)
        step()
        if cuda:
            e[2].record()
            ev.append(e)
            mem.append(torch.cuda.memory_allocated())
            peak.append(torch.cuda.max_memory_allocated())
        else:
            t2 = time.perf_counter()
            vis_ms.append((t1 - t0) * 1e3)
            dec_ms.append((t2 - t1) * 1e3)
            tot_ms.append((t2 - t0) * 1e3)
            mem.append(st.state_nbytes())
    if cuda:
        torch.cuda.synchronize()
        for e in ev:
            vis_ms.append(e[0].elapsed_time(e[1]))
            dec_ms.append(e[1].elapsed_time(e[2]))
            tot_ms.append(e[0].elapsed_time(e[2]))
    wall = time.perf_counter() - t_start
    res.update(graph=use_graph, frames=n, wall_s=round(wall, 2), fps_wall=round(n / wall, 2),
               state_bytes=st.state_nbytes(), tokens_streamed=n * T,
               fps=[round(1e3 / t, 2) for t in tot_ms], vision_ms=[round(v, 3) for v in vis_ms],
               decoder_ms=[round(v, 3) for v in dec_ms], mem_bytes=mem, peak_bytes=peak)
    for f in (100, 1000):
        if n > f - 1:
            res[f"frame{f}"] = dict(fps=res["fps"][f - 1], vision_ms=res["vision_ms"][f - 1],
                                    decoder_ms=res["decoder_ms"][f - 1], mem_bytes=mem[f - 1])
    lo = min(100, n - 1)
    sel = tot_ms[lo:]
    res["fps_median_from_100"] = round(1e3 / statistics.median(sel), 2)
    res["fps_min_from_100"] = round(1e3 / max(sel), 2)
    res["decoder_only_fps_median_from_100"] = round(1e3 / statistics.median(dec_ms[lo:]), 2)
    res["vision_ms_median"] = round(statistics.median(vis_ms[lo:]), 3)
    m = mem[lo:]
    res["mem_change_from_100"] = round((max(m) - min(m)) / max(min(m), 1), 6)
    res["goal_60fps"] = res["fps_median_from_100"] >= 60
    res["goal_mem_const_1pct"] = res["mem_change_from_100"] <= 0.01
    print("STREAM", {k: v for k, v in res.items() if not isinstance(v, list)}, flush=True)


def _progress(args, msg):
    print(f"[{time.perf_counter() - args.t0:7.1f} s] {msg}", flush=True)


def _resetter(st, base):
    def reset():
        for s in st.states:
            if s["kind"] == "attn":
                s["k"].zero_()
                s["v"].zero_()
                s["ktok"].fill_(-1)
            else:
                for c in s["conv"]:
                    c.zero_()
                s["ssm"].zero_()
        st.tok.zero_()
        base.zero_()
    return reset


def print_table(rep):
    print("=== SUMMARY stream ===")
    print(f"{rep['machine']}  stream: {rep['tokens_per_frame']} tokens/frame, vision={rep['vision']}"
          f"{' (' + rep['vision_error'] + ')' if rep.get('vision_error') else ''}")
    print(f"  method: {rep['method']}")
    if "vision_check_static_vs_hf_rel_err" in rep:
        print(f"  vision static vs transformers' forward on the frame: rel err "
              f"{rep['vision_check_static_vs_hf_rel_err']}")
    for r in rep["results"]:
        if "error" in r:
            print(f"  {r['layout']}: {r['error']}")
            continue
        print(f"  {r['layout']}: FPS median from frame 100 {r['fps_median_from_100']} (min {r['fps_min_from_100']}), "
              f"decoder-only {r['decoder_only_fps_median_from_100']} FPS, vision {r['vision_ms_median']} ms/frame, "
              f"wall {r['fps_wall']} FPS; eager path {r.get('eager_fps_median_2nd_half')} FPS")
        for f in (100, 1000):
            if f"frame{f}" in r:
                print(f"    frame {f}: {r[f'frame{f}']}")
        print(f"    memory change frames 100..end: {r['mem_change_from_100'] * 100:.4f}%  state {r['state_bytes']} B; "
              f"checks eager/static {r['check_static_vs_eager_max_rel_err']} graph {r.get('check_graph_vs_eager_rel_err')}")
        print(f"    GOAL >= 60 FPS: {r['goal_60fps']}   GOAL memory constant within 1%: {r['goal_mem_const_1pct']}")


def plot(rep, path):
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(14, 4.5))
    for r in rep["results"]:
        if "fps" not in r:
            continue
        idx = list(range(1, len(r["fps"]) + 1))
        axes[0].plot(idx, r["fps"], lw=0.7, label=f"{r['layout']} total (graph)")
        axes[0].plot(idx, [1e3 / v for v in r["decoder_ms"]], lw=0.7, label=f"{r['layout']} decoder only")
        if r.get("eager_ms"):
            axes[0].plot(range(1, len(r["eager_ms"]) + 1), [1e3 / v for v in r["eager_ms"]], lw=0.7,
                         label=f"{r['layout']} eager (no graph)")
        if r["mem_bytes"]:
            axes[1].plot(idx, [m / 2**30 for m in r["mem_bytes"]], label=f"{r['layout']} allocated")
    axes[0].axhline(60, color="k", ls=":", lw=0.8)
    axes[0].set(xlabel="frame index", ylabel="FPS", title=f"stream FPS, {rep['tokens_per_frame']} tok/frame, "
                f"{rep['machine']}")
    axes[1].set(xlabel="frame index", ylabel="GiB (or state bytes on CPU / 2^30)", title="memory per frame")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    from vlt.bench import module_main
    return module_main("vlt bench stream", add_bench_stream_args, run_bench_stream, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
