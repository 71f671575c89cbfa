"""``vlt generate --ckpt DIR --image PATH --prompt "..."``: chat with a saved vlt model.

The directory is one written by ``vlt.export.save_pretrained_vlt`` (or a Qwen2.5-VL checkpoint,
imported as a full-attention vlt model so the teacher can be compared with its student); its tokenizer (Qwen's ChatML
specials) builds the prompt with vlt.data's template (``<|im_start|>`` turns, each image expanded to
``<|vision_start|><|image_pad|> x N<|vision_end|>``, video frames as timestamped images), and its
preprocessor_config.json (if any) sets the image resize limits and normalisation. Text streams to
stdout as tokens arrive; speed and decode-state bytes go to stderr at the end.
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
    p.add_argument("--system", default=None, help="system prompt (default: Qwen's 'You are a helpful assistant.')")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: the dtype the model was saved in")
    p.add_argument("--max-pixels", type=int, default=None, help="resize limit per image (default: the checkpoint's)")
    return p


def _image_processor(ckpt: Path, model, max_pixels):
    from vlt.data.image import ImageProcessor
    kw = dict(patch_size=model.config.vision.patch_size, merge_size=model.config.vision.merge_size)
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
    from vlt.data.tokenizer import DEFAULT_SYSTEM, build_prompt_ids
    images = [Path(i).expanduser() for i in args.image]
    frames = _frames(args.video) if args.video else []
    if (images or frames) and model.vision is None:
        raise ValueError(f"{args.ckpt} has no vision tower (vision.kind='none'); drop --image/--video")
    proc = _image_processor(Path(args.ckpt).expanduser(), model, args.max_pixels) if images or frames else None
    tensors = [proc(_open(p)) for p in images + frames]
    counts: list = [proc.num_tokens(t) for t in tensors[:len(images)]]
    value = "<image>\n" * len(images)
    if frames:
        counts.append(("video", [(i / args.fps, proc.num_tokens(t)) for i, t in enumerate(tensors[len(images):])]))
        value += "<video>\n"
    conv = [{"from": "human", "value": value + args.prompt}]
    ids = build_prompt_ids(tok, conv, counts, system=DEFAULT_SYSTEM if args.system is None else args.system)
    return torch.tensor([ids], dtype=torch.long), tensors


def run_generate(args) -> int:
    try:
        return _run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"vlt generate: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch
    from vlt.export import load_pretrained_vlt
    from vlt.generation import generate
    from vlt.layers import state_nbytes
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    ckpt = Path(args.ckpt).expanduser()
    if not (ckpt / "vlt_config.json").is_file() and (ckpt / "config.json").is_file():
        # a transformers Qwen2.5-VL directory: run it as is (full attention), e.g. to compare with a student
        from vlt.convert import import_qwen2_5_vl
        from vlt.export import _DTYPES, load_tokenizer_from
        model = import_qwen2_5_vl(ckpt, _DTYPES[args.dtype or "float32"]).to(device).eval()
        tok = load_tokenizer_from(ckpt, {"tokenizer": "hf"})
    else:
        model, tok = load_pretrained_vlt(ckpt, dtype=args.dtype, device=device)
    if tok is None:
        raise ValueError(f"{args.ckpt} has no tokenizer; export it with save_pretrained_vlt(..., tokenizer_dir=TEACHER_DIR "
                         "or 'byte')")
    ids, images = build_inputs(args, model, tok)
    ids = ids.to(device)
    dtype = next(model.parameters()).dtype
    images = [im.to(device, dtype) for im in images]
    out_ids: list[int] = []
    printed = [""]
    t0 = time.perf_counter()
    first = [None]
    eos = [tok.eos_id, tok.pad_id]

    def on_token(t):
        if first[0] is None:
            first[0] = time.perf_counter()
        if int(t[0]) in eos:
            return
        out_ids.append(int(t[0]))
        text = tok.decode(out_ids)
        if not text.endswith("\ufffd"):  # hold back half a multi-byte character
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

    new, state = generate(model, ids, images, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, eos_token_id=eos, on_token=on_token, seed=args.seed, return_state=True)
    end = time.perf_counter()
    sys.stdout.write(tok.decode(out_ids)[len(printed[0]):] + "\n")
    n = new.shape[1]
    decode_s = end - first[0]
    per_kind: dict[str, int] = {}
    for block, s in zip(model.layers, state["layers"]):
        per_kind[block.mixer_name] = per_kind.get(block.mixer_name, 0) + state_nbytes(s)
    print(f"[vlt generate] prompt {ids.shape[1]} tokens ({len(images)} images), prefill {first[0] - t0:.2f} s; "
          f"{n} new tokens, {(n - 1) / decode_s if n > 1 and decode_s > 0 else float('nan'):.1f} tokens/s; "
          f"state {state_nbytes(state['layers'])} bytes {per_kind}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run_generate(add_generate_args(argparse.ArgumentParser("vlt generate")).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
