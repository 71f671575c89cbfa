"""``vlt bench stream``: ``vlt stream``'s path, timed - a video streamed one frame at a time.

The model is InfiniteVL-4B-shaped with the Qwen2.5-VL-3B vision tower (random weights). Frames go
through ``vlt.inference.VideoStream.add_frame`` exactly as ``vlt stream`` sends them: each
448x448 frame (``--grid 16 16`` merged tokens = 256 visual tokens) becomes
``<t=..s><|vision_start|><|video_pad|> x 256<|vision_end|>`` with M-RoPE positions; the vision
tower runs per frame (``StaticQwenVision`` in a CUDA graph on the GPU) and the decoder takes the
frame's tokens as one engine step (in-place SWA ring / GDN states, a CUDA graph per frame size).
Frames are preprocessed tensors already on the device (decoding a file is not part of the timing).

Recorded per frame index: total / vision / decoder ms (CUDA events; wall clock on CPU), FPS,
allocated GPU memory and the state's bytes. ``--eager-frames`` frames also run through the model's
own forward with the state as dicts (``model(ids, images, state=..., use_cache=True)``: the eager
path, the "before"), and the engine's logits after ``--check-frames`` frames are compared with it.
Layouts with a growing cache (``full``) are streamed with a capacity for ``--frames`` frames.
Writes stream.json and stream.png to --out.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from vlt.bench.common import (add_common_args, add_compile_arg, build_model, err, header, kernel_profile, plt,
                              reset_peak, save_json, setup, step_compile_backend)


def add_bench_stream_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_common_args(p, layouts=("hybrid",))
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--grid", nargs=2, type=int, default=None, help="merged tokens per frame h w (default 16 16)")
    p.add_argument("--fps", type=float, default=2.0, help="the stream's frame rate (sets the timestamps)")
    p.add_argument("--eager-frames", type=int, default=30, help="frames through the eager path (0: none)")
    p.add_argument("--check-frames", type=int, default=8,
                   help="frames after which engine and eager logits are compared")
    p.add_argument("--no-graph", action="store_true", help="no CUDA graphs (decoder step and vision tower)")
    p.add_argument("--profile", action="store_true", help="kernel profiles of a frame (add_frame) and of its vision "
                   "tower alone after the stream: profile_stream_{frame,vision}_<layout>.txt")
    p.add_argument("--dynamic-sizes", action="store_true", help="the engine's compiled steps with automatic "
                   "dynamic shapes (InferenceEngine dynamic_sizes): one recompile for all later frame sizes")
    p.add_argument("--chunk-attention", action=argparse.BooleanOptionalAction, default=None,
                   help="frames' attention through the Triton chunk kernel (InferenceEngine chunk_attention; "
                   "default: on CUDA) or, with --no-chunk-attention, a boolean mask + SDPA (to compare)")
    add_compile_arg(p)
    return p


def _stream(model, args, device, n_frames, tokens_per_frame):
    from vlt.data.image import ImageProcessor
    from vlt.data.tokenizer import load_tokenizer
    from vlt.inference import InferenceEngine, VideoStream
    h, w = args.grid_hw
    px = 28 * h * 28 * w
    grows = any(getattr(b.mixer, "state_grows", False) for b in model.layers)
    engine = InferenceEngine(model, capacity=(n_frames + 2) * (tokens_per_frame + 16) if grows else None,
                             graphs=False if args.no_graph or device.type != "cuda" else None,
                             compile=step_compile_backend(args, device), dynamic_sizes=args.dynamic_sizes,
                             chunk_attention=args.chunk_attention)
    return VideoStream(model, load_tokenizer("byte"), image_processor=ImageProcessor(min_pixels=px, max_pixels=px),
                       fps=args.fps, system="", engine=engine)


def _layout(model, res, args, device, dtype, frames):
    import torch
    cuda = device.type == "cuda"
    # -- 1. correctness and the eager baseline: the model's own forward, state carried as dicts
    n_eager = max(args.eager_frames, args.check_frames)
    stream = _stream(model, args, device, n_eager, stream_tokens(args))
    state, eager_ms, logits = None, [], None
    prefix = stream.engine.export_state()
    state = prefix
    tok = stream.tok
    for f in range(n_eager):
        ids = tok.encode(f"<t={f / args.fps:.1f}s>") + [tok.vision_start_id] + [stream.video_pad] * \
            stream.processor.num_tokens(frames[f % len(frames)]) + [tok.vision_end_id]
        t0 = time.perf_counter()
        out = model(torch.tensor([ids], device=device), images=[frames[f % len(frames)]], state=state, use_cache=True,
                    logits_to_keep=1)
        if cuda:
            torch.cuda.synchronize()
        eager_ms.append((time.perf_counter() - t0) * 1e3)
        state = out.state
        if f == args.check_frames - 1:
            logits = out.logits[0, -1]
    del state
    if args.check_frames:
        for f in range(args.check_frames):
            got = stream.add_frame(frames[f % len(frames)])
        res["check_frames"] = args.check_frames
        res["check_engine_vs_eager_rel_err"] = round(float((got.float() - logits.float()).norm()
                                                           / logits.float().norm()), 6)
    if eager_ms:
        tail = eager_ms[len(eager_ms) // 2:]
        res.update(eager_frames=len(eager_ms), eager_fps_median_2nd_half=round(1e3 / statistics.median(tail), 2),
                   eager_ms=[round(v, 3) for v in eager_ms])
    del stream
    if cuda:
        torch.cuda.empty_cache()
    # -- 2. the stream
    stream = _stream(model, args, device, args.frames, stream_tokens(args))
    stream.events = [] if cuda else None
    reset_peak(device)
    tot_ms, mem = [], []
    t_start = time.perf_counter()
    for f in range(args.frames):
        t0 = time.perf_counter()
        stream.add_frame(frames[f % len(frames)])
        if cuda:
            mem.append(torch.cuda.memory_allocated())
        else:
            tot_ms.append((time.perf_counter() - t0) * 1e3)
            mem.append(stream.state_nbytes())
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t_start
    vis_ms = [e[0].elapsed_time(e[1]) for e in stream.events] if cuda else []
    dec_ms = [e[1].elapsed_time(e[2]) for e in stream.events] if cuda else []
    if cuda:
        tot_ms = [e[0].elapsed_time(e[2]) for e in stream.events]
    n = args.frames
    res.update(graph=stream.engine.graphs, compile=stream.engine.compile, chunk_attention=stream.engine.chunk_attention,
               frames=n, wall_s=round(wall, 2),
               fps_wall=round(n / wall, 2), state_bytes=stream.state_nbytes(), fps=[round(1e3 / t, 2) for t in tot_ms],
               vision_ms=[round(v, 3) for v in vis_ms], decoder_ms=[round(v, 3) for v in dec_ms], mem_bytes=mem,
               path="vlt.inference.VideoStream.add_frame (what vlt stream runs per frame)")
    lo = min(100, n // 2)   # steady state: from frame 100, or the second half of a shorter run
    res["steady_from_frame"] = lo + 1
    res["fps_median_steady"] = round(1e3 / statistics.median(tot_ms[lo:]), 2)
    res["fps_min_steady"] = round(1e3 / max(tot_ms[lo:]), 2)
    if dec_ms:
        res["decoder_only_fps_median_steady"] = round(1e3 / statistics.median(dec_ms[lo:]), 2)
        res["vision_ms_median"] = round(statistics.median(vis_ms[lo:]), 3)
    m = mem[lo:]
    res["mem_change_steady"] = round((max(m) - min(m)) / max(min(m), 1), 6)
    if args.profile and cuda:   # where a frame's time goes (the stream's state moves on: it is done)
        frame = frames[0]
        res["profile_frame"] = kernel_profile(lambda: stream.add_frame(frame),
                                              f"{args.out}/profile_stream_frame_{res['layout']}.txt", reps=3)
        pixels = stream._pixels(frame)
        res["profile_vision"] = kernel_profile(lambda: stream._features(pixels),
                                               f"{args.out}/profile_stream_vision_{res['layout']}.txt", reps=3)
    if cuda:
        res["goal_70fps"] = res["fps_median_steady"] >= 70
        res["goal_mem_const_1pct"] = res["mem_change_steady"] <= 0.01
    print("STREAM", {k: v for k, v in res.items() if not isinstance(v, list)}, flush=True)


def stream_tokens(args) -> int:
    h, w = args.grid_hw
    return h * w


def run_bench_stream(args) -> int:
    import torch
    device, dtype = setup(args)
    args.grid_hw = tuple(args.grid or ((2, 4) if args.tiny else (16, 16)))
    h, w = args.grid_hw
    rep = header(args, "stream")
    rep.update(frames=args.frames, tokens_per_frame=h * w, grid=[h, w], image_px=[28 * h, 28 * w],
               fps_timestamps=args.fps)
    path = f"{args.out}/stream.json"
    g = torch.Generator(device="cpu").manual_seed(0)
    frames = [torch.randn(3, 28 * h, 28 * w, generator=g).to(device, dtype) for _ in range(4)]
    for layout in args.layouts:
        res = dict(layout=layout)
        rep["results"].append(res)
        try:
            model = build_model(layout, args, device, dtype, vision=True).eval()
            with torch.no_grad():
                _layout(model, res, args, device, dtype, frames)
        except Exception as e:  # noqa: BLE001 - a layout that fails is a result
            res["error"] = err(e)
            print("STREAM error", res["error"], flush=True)
        save_json(rep, path)
        model = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save_json(rep, path)
    plot(rep, f"{args.out}/stream.png")
    print_table(rep)
    return 0


def print_table(rep):
    print("=== SUMMARY stream ===")
    print(f"{rep['machine']}  vlt stream's path: {rep['tokens_per_frame']} visual tokens/frame")
    for r in rep["results"]:
        if "error" in r:
            print(f"  {r['layout']}: {r['error']}")
            continue
        print(f"  {r['layout']}: FPS median from frame {r['steady_from_frame']} {r['fps_median_steady']} "
              f"(min {r['fps_min_steady']}), decoder-only {r.get('decoder_only_fps_median_steady')} FPS, vision "
              f"{r.get('vision_ms_median')} ms/frame, wall {r['fps_wall']} FPS; eager path "
              f"{r.get('eager_fps_median_2nd_half')} FPS; graph {r['graph']}, chunk attention kernel "
              f"{r.get('chunk_attention')}")
        print(f"    memory change from frame {r['steady_from_frame']}: {r['mem_change_steady'] * 100:.4f}%  "
              f"state {r['state_bytes']} B; engine vs eager after {r.get('check_frames')} frames: "
              f"{r.get('check_engine_vs_eager_rel_err')}")
        if "goal_70fps" in r:
            print(f"    GOAL >= 70 FPS: {r['goal_70fps']}   GOAL memory constant within 1%: {r['goal_mem_const_1pct']}")


def plot(rep, path):
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(14, 4.5))
    for r in rep["results"]:
        if "fps" not in r:
            continue
        idx = list(range(1, len(r["fps"]) + 1))
        axes[0].plot(idx, r["fps"], lw=0.7, label=f"{r['layout']} total ({'graph' if r['graph'] else 'eager steps'})")
        if r.get("decoder_ms"):
            axes[0].plot(idx, [1e3 / v for v in r["decoder_ms"]], lw=0.7, label=f"{r['layout']} decoder only")
        if r.get("eager_ms"):
            axes[0].plot(range(1, len(r["eager_ms"]) + 1), [1e3 / v for v in r["eager_ms"]], lw=0.7,
                         label=f"{r['layout']} eager path")
        if r["mem_bytes"]:
            axes[1].plot(idx, [m / 2**30 for m in r["mem_bytes"]], label=f"{r['layout']}")
    axes[0].set(xlabel="frame index", ylabel="FPS", title=f"vlt stream FPS, {rep['tokens_per_frame']} tok/frame, "
                f"{rep['machine']}")
    axes[1].set(xlabel="frame index", ylabel="GiB allocated (CPU: state bytes / 2^30)", title="memory per frame")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    from vlt.bench import module_main
    return module_main("vlt bench stream", add_bench_stream_args, run_bench_stream, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
