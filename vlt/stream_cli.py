"""``vlt stream --ckpt DIR --video FILE_OR_DIR --fps F --ask "..."``: stream a video through a model.

Frames are sampled at ``--fps`` from a video file (PyAV, ``pip install 'vlt[video]'``) or taken from a
directory of images, and sent one by one to ``vlt.inference.VideoStream`` (constant-memory state,
the engine's in-place steps, CUDA graphs on the GPU). Questions are asked at the end (default),
every ``--ask-every`` frames, or at ``--ask-at`` timestamps; each answer streams to stdout as
``[t=12.5s] answer``. The prompt settings recorded in the export (system prompt, image limits) are
the defaults, as for ``vlt generate``. Frames/s, decode-state bytes and peak memory go to stderr.
"""
from __future__ import annotations

import argparse
import sys
import time


def add_stream_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--ckpt", required=True, help="directory written by vlt export / save_pretrained_vlt")
    p.add_argument("--video", required=True, help="a video file (mp4, webm, ...) or a directory of frame images")
    p.add_argument("--fps", type=float, default=1.0, help="frames per second sampled from the video")
    p.add_argument("--ask", action="append", default=[], metavar="QUESTION", help="question (repeatable)")
    p.add_argument("--ask-every", type=int, default=0, metavar="N", help="ask after every N frames (0: at the end)")
    p.add_argument("--ask-at", type=float, nargs="+", default=None, metavar="SECONDS",
                   help="ask at these timestamps (seconds of video) instead")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--system", default=None, help="system prompt (default: the training run's, from the export)")
    p.add_argument("--max-pixels", type=int, default=None, help="resize limit per frame (default: the export's)")
    p.add_argument("--capacity", type=int, default=None,
                   help="tokens a full-attention layer holds (needed only for layouts with full attention)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    from vlt.eval_cli import add_engine_option_arg
    add_engine_option_arg(p, "chunk_attention=false: frames attend through a mask + SDPA instead of the Triton "
                             "chunk kernel (on by default on CUDA)")
    return p


def run_stream(args) -> int:
    try:
        return _run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"vlt stream: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from pathlib import Path

    import torch
    from vlt.data.video import iter_frames
    from vlt.generate_cli import image_processor, load_for_inference, prompt_record, system_prompt
    from vlt.inference import VideoStream, compile_in_this_process
    if not args.ask:
        raise ValueError("give at least one --ask QUESTION")
    if args.ask_every < 0:
        raise ValueError(f"--ask-every must be >= 0, got {args.ask_every}")
    from vlt.eval_cli import engine_options
    engine_kw = engine_options(args.engine_option)
    compile_in_this_process()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    ckpt = Path(args.ckpt).expanduser()
    frames = iter_frames(args.video, args.fps)   # checks the video before the model loads
    first = next(frames)
    model, tok = load_for_inference(args.ckpt, device, args.dtype)
    grows = any(getattr(b.mixer, "state_grows", False) for b in model.layers)
    if grows and args.capacity is None:
        raise ValueError(f"{args.ckpt} has full-attention layers, whose cache grows with the video: give --capacity "
                         "TOKENS (about frames x tokens per frame)")
    from vlt.inference import InferenceEngine
    engine = InferenceEngine(model, capacity=args.capacity, **engine_kw) if engine_kw else None
    stream = VideoStream(model, tok, image_processor=image_processor(ckpt, model, args.max_pixels), fps=args.fps,
                         system=system_prompt(args, prompt_record(ckpt)), capacity=args.capacity, engine=engine)
    pending = sorted(args.ask_at or [])

    def answer(t):
        for q in args.ask:
            sys.stdout.write(f"[t={t:.1f}s] ")
            text = stream.ask(q, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    t0 = time.perf_counter()
    n = 0
    for t, image in _chain(first, frames):
        if args.max_frames is not None and n >= args.max_frames:
            break
        while pending and pending[0] < t:
            answer(pending.pop(0))
        stream.add_frame(image)
        n += 1
        if args.ask_every and n % args.ask_every == 0:
            answer(n / args.fps)     # the video seen so far
    if args.ask_at:
        for t in pending:             # timestamps past the last frame: answered at the end
            answer(t)
    elif not args.ask_every or n % args.ask_every:
        answer(n / args.fps)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.startswith("cuda") else ""
    print(f"[vlt stream] {n} frames in {wall:.2f} s ({n / wall:.1f} frames/s incl. decoding the video and answers); "
          f"decode state {stream.state_nbytes()} bytes{peak}", file=sys.stderr)
    return 0


def _chain(first, rest):
    yield first
    yield from rest


def main(argv=None) -> int:
    return run_stream(add_stream_args(argparse.ArgumentParser("vlt stream")).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
