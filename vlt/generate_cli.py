"""``vlt generate --ckpt DIR --image PATH --prompt "..."``: chat with a saved vlt model.

The directory is one written by ``vlt.checkpoint.export.save_pretrained_vlt`` (or a Qwen2.5-VL
checkpoint, imported as a full-attention vlt model so the teacher can be compared with its student);
its tokenizer (Qwen's ChatML specials) builds the prompt with vlt.data's template (``<|im_start|>``
turns, each image expanded to ``<|vision_start|><|image_pad|> x N<|vision_end|>``, video frames as
timestamped images), and its preprocessor_config.json (if any) sets the image resize limits and
normalisation. The export's
``prompt`` record (the training run's system prompt and image limits) is the default, so the model
is prompted as it was trained; ``--system`` / ``--max-pixels`` override it.

Decoding runs through the inference engine (``vlt.inference``: in-place cache, fused kernels and a
CUDA graph on the GPU); ``--engine eager`` runs the mixers' own decode path (the reference). Text
streams to stdout as tokens arrive; time to first token, tokens/s and decode-state bytes go to
stderr at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_generate_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--ckpt", required=True, help="directory written by save_pretrained_vlt / vlt export, or a "
                   "Qwen2.5-VL checkpoint directory (run as the teacher, full attention)")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    p.add_argument("--video", nargs="+", default=None, metavar="FRAME",
                   help="video frames: image files in time order, or one directory of frames (sorted by name)")
    p.add_argument("--fps", type=float, default=1.0, help="frame rate of --video frames (for their timestamps)")
    p.add_argument("--system", default=None, help="system prompt (default: the one the model was trained with, "
                   "recorded in its export; else Qwen's 'You are a helpful assistant.'); '' for none")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: the dtype the model was saved in")
    p.add_argument("--max-pixels", type=int, default=None, help="resize limit per image (default: the checkpoint's)")
    p.add_argument("--engine", default="auto", choices=["auto", "engine", "eager"],
                   help="auto/engine: vlt.inference's engine (CUDA graphs on the GPU); eager: the mixers' own "
                        "decode path, the reference")
    from vlt.eval_cli import add_engine_option_arg
    add_engine_option_arg(p, "compile=none: no torch.compile of the small ops between the kernels (less set-up "
                             "time, a slower step)")
    return p


def prompt_record(ckpt: Path) -> dict:
    """The training run's templating recorded in an export (``vlt_config.json`` "prompt"), or {}."""
    f = ckpt / "vlt_config.json"
    if not f.is_file():
        return {}
    return json.loads(f.read_text()).get("prompt") or {}


def system_prompt(args, record: dict) -> str:
    from vlt.data.tokenizer import DEFAULT_SYSTEM
    if args.system is not None:
        return args.system
    return record.get("system", DEFAULT_SYSTEM)


def image_processor(ckpt: Path, model, max_pixels):
    from vlt.data.image import ImageProcessor
    kw = dict(patch_size=model.config.vision.patch_size, merge_size=model.config.vision.merge_size)
    record = prompt_record(ckpt)
    kw.update({k: record[k] for k in ("min_pixels", "max_pixels") if record.get(k) is not None})
    f = ckpt / "preprocessor_config.json"
    if f.is_file():
        pc = json.loads(f.read_text())
        size = pc.get("size") or {}
        lo, hi = pc.get("min_pixels", size.get("shortest_edge")), pc.get("max_pixels", size.get("longest_edge"))
        kw.update({k: v for k, v in (("min_pixels", lo), ("max_pixels", hi), ("mean", pc.get("image_mean")),
                                     ("std", pc.get("image_std"))) if v is not None})
    if max_pixels is not None:
        kw["max_pixels"] = max_pixels
    return ImageProcessor(**kw)




def _frames(video: list[str]) -> list[Path]:
    paths = [Path(v).expanduser() for v in video]
    if len(paths) == 1 and paths[0].is_dir():
        paths = sorted(q for q in paths[0].iterdir() if q.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
        if not paths:
            raise FileNotFoundError(f"--video directory {video[0]!r} holds no .jpg/.png/.webp frames")
    return paths


def _open(path: Path):
    from PIL import Image
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    return Image.open(path)


def build_inputs(args, model, tok):
    """(input_ids [1, T], list of image tensors) for the prompt, images and video frames in ``args``."""
    import torch
    from vlt.data.tokenizer import build_prompt_ids
    images = [Path(i).expanduser() for i in args.image]
    frames = _frames(args.video) if args.video else []
    if (images or frames) and model.vision is None:
        raise ValueError(f"{args.ckpt} has no vision tower (vision.kind='none'); drop --image/--video")
    proc = image_processor(Path(args.ckpt).expanduser(), model, args.max_pixels) if images or frames else None
    tensors = [proc(_open(p)) for p in images + frames]
    counts: list = [proc.num_tokens(t) for t in tensors[:len(images)]]
    value = "<image>\n" * len(images)
    if frames:
        counts.append(("video", [(i / args.fps, proc.num_tokens(t)) for i, t in enumerate(tensors[len(images):])]))
        value += "<video>\n"
    conv = [{"from": "human", "value": value + args.prompt}]
    ids = build_prompt_ids(tok, conv, counts, system=system_prompt(args, prompt_record(Path(args.ckpt).expanduser())))
    return torch.tensor([ids], dtype=torch.long), tensors


def run_generate(args) -> int:
    try:
        return _run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"vlt generate: error: {e}", file=sys.stderr)
        return 2


def load_for_inference(ckpt_arg: str, device: str, dtype: str | None):
    """(model, tokenizer) from an export directory or a transformers Qwen2.5-VL directory."""
    from vlt.checkpoint.export import load_pretrained_vlt
    ckpt = Path(ckpt_arg).expanduser()
    if not (ckpt / "vlt_config.json").is_file() and (ckpt / "config.json").is_file():
        # a transformers Qwen2.5-VL directory: run it as is (full attention), e.g. to compare with a student
        from vlt.checkpoint.export import DTYPES, load_tokenizer_from
        from vlt.convert.qwen import import_qwen2_5_vl
        model = import_qwen2_5_vl(ckpt, DTYPES[dtype or "float32"]).to(device).eval()
        tok = load_tokenizer_from(ckpt, {"tokenizer": "hf"})
    else:
        model, tok = load_pretrained_vlt(ckpt, dtype=dtype, device=device)
    if tok is None:
        raise ValueError(f"{ckpt_arg} has no tokenizer; export it with "
                         "save_pretrained_vlt(..., tokenizer_dir=TEACHER_DIR or 'byte')")
    return model, tok


class TextStreamer:
    """Writes decoded text as token ids arrive (holding back half a multi-byte character)."""

    def __init__(self, tok, stop_ids, out=None):
        self.tok, self.stop, self.out = tok, set(stop_ids), out or sys.stdout
        self.ids: list[int] = []
        self.printed = ""
        self.first = None
        self.times: list[float] = []   # arrival of every token, for the steady per-token latency
        self.finished = False

    def __call__(self, t):
        self.times.append(time.perf_counter())
        if self.first is None:
            self.first = self.times[0]
        t = int(t[0])
        if self.finished or t in self.stop:
            self.finished = True
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def close(self):
        self.out.write(self.tok.decode(self.ids)[len(self.printed):] + "\n")
        self.out.flush()


#: the engine hands over the first token at once and tokens 2-8 together, after the decode steps that
#: hold the step's one-off compile and CUDA-graph capture: the steady per-token latency is timed from the
#: 8th token on
WARM_TOKENS = 8


def steady_ms_per_token(times) -> float | None:
    """Milliseconds per token from the arrival of token ``WARM_TOKENS`` to the last one (None when fewer
    than 8 tokens come after it): what a long generation pays per token once warm."""
    k = WARM_TOKENS - 1
    if len(times) < k + 9:
        return None
    return 1e3 * (times[-1] - times[k]) / (len(times) - 1 - k)


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process started (Linux /proc; None elsewhere): Python's start-up and the
    imports before the model loads, which a whole ``vlt generate`` command's wall time also holds."""
    try:
        import os
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / ticks   # field 22: starttime
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _run(args) -> int:
    import torch
    from vlt.eval_cli import engine_options
    from vlt.inference import compile_in_this_process
    from vlt.layers import state_nbytes
    engine_kw = engine_options(args.engine_option)   # a bad option fails before the model loads
    compile_in_this_process()
    if engine_kw and args.engine == "eager":
        raise ValueError(f"--engine-option {args.engine_option} configures the engine, which --engine eager does not "
                         "use; drop one of them")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    startup_s = seconds_since_process_start()
    t_load = time.perf_counter()
    model, tok = load_for_inference(args.ckpt, device, args.dtype)
    ids, images = build_inputs(args, model, tok)
    ids = ids.to(device)
    dtype = next(model.parameters()).dtype
    images = [im.to(device, dtype) for im in images]
    eos = [tok.eos_id, tok.pad_id]
    streamer = TextStreamer(tok, eos)
    load_s = time.perf_counter() - t_load
    t0 = time.perf_counter()
    engine_s = None
    engine_kind = "eager" if args.engine == "eager" else "engine"
    if args.engine == "auto":
        from vlt.inference import EngineUnsupported, check_engine_support
        try:
            check_engine_support(model)
        except EngineUnsupported as e:
            print(f"[vlt generate] the eager path: {e}", file=sys.stderr)
            engine_kind = "eager"
    if engine_kind == "eager":
        from vlt.inference import generate_eager
        new, state = generate_eager(model, ids, images, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_p=args.top_p, eos_token_id=eos,
                                    on_token=streamer, seed=args.seed, return_state=True)
        per_layer = [state_nbytes(s) for s in state["layers"]]
    else:
        from vlt.inference import InferenceEngine, generate
        engine = InferenceEngine(model, capacity=ids.shape[1] + args.max_new_tokens, **engine_kw)
        engine_s = time.perf_counter() - t0
        new = generate(engine, [(ids[0], images)], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, eos_token_id=eos, on_token=streamer, seed=args.seed)
        per_layer = engine.layer_state_nbytes()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    end = time.perf_counter()
    per_kind: dict[str, int] = {}
    for block, nbytes in zip(model.layers, per_layer):
        per_kind[block.mixer_name] = per_kind.get(block.mixer_name, 0) + nbytes
    streamer.close()
    n = new.shape[1]
    decode_s = end - streamer.first
    steady = steady_ms_per_token(streamer.times)
    # where a whole command's wall time goes: start-up (Python, imports), load, engine set-up, prefill, decode
    startup = f"start-up {startup_s:.2f} s; " if startup_s is not None else ""
    # seconds since process start when the work is done: the command's wall time minus this is its exit
    done_s = seconds_since_process_start()
    done = f"; done {done_s:.2f} s after process start" if done_s is not None else ""
    built = f" (engine set-up {engine_s:.3f} s of it)" if engine_s is not None else ""
    print(f"[vlt generate] {engine_kind} on {device}: {startup}load {load_s:.2f} s; "
          f"prompt {ids.shape[1]} tokens ({len(images)} images), "
          f"time to first token {streamer.first - t0:.3f} s{built}; "
          f"{n} new tokens, {(n - 1) / decode_s if n > 1 and decode_s > 0 else float('nan'):.1f} tokens/s"
          + (f" ({steady:.2f} ms/token after the first {WARM_TOKENS})" if steady is not None else "") + "; "
          f"decode state {sum(per_layer)} bytes {per_kind}{done}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run_generate(add_generate_args(argparse.ArgumentParser("vlt generate")).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
