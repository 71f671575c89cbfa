"""``vlt chat --ckpt DIR``: an interactive multi-turn chat with a saved model (``vlt.inference.ChatSession``).

Type a message and press Enter; ``/image PATH`` attaches an image to your next message, ``/reset``
starts over, ``/quit`` (or end of input) leaves. Answers stream as they are generated. The export's
recorded prompt settings (system prompt, image limits) are the defaults, as for ``vlt generate``.
"""
from __future__ import annotations

import argparse
import sys


def add_chat_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--ckpt", required=True, help="directory written by vlt export / save_pretrained_vlt")
    p.add_argument("--system", default=None, help="system prompt (default: the training run's, from the export)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--capacity", type=int, default=8192, help="tokens a full-attention layer holds")
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    return p


def run_chat(args, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    try:
        return _run(args, stdin, stdout)
    except (FileNotFoundError, ValueError) as e:
        print(f"vlt chat: error: {e}", file=sys.stderr)
        return 2


def _run(args, stdin, stdout) -> int:
    from pathlib import Path

    import torch
    from PIL import Image
    from vlt.generate_cli import TextStreamer, image_processor, load_for_inference, prompt_record, system_prompt
    from vlt.inference import ChatSession, compile_in_this_process
    compile_in_this_process()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    ckpt = Path(args.ckpt).expanduser()
    model, tok = load_for_inference(args.ckpt, device, args.dtype)
    proc = image_processor(ckpt, model, args.max_pixels) if model.vision is not None else None

    def new_session():
        return ChatSession(model, tok, image_processor=proc, system=system_prompt(args, prompt_record(ckpt)),
                           capacity=args.capacity)
    chat, images = new_session(), []
    print("vlt chat: type a message; /image PATH, /reset, /quit", file=sys.stderr)
    for line in stdin:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            chat, images = new_session(), []
            continue
        if line.startswith("/image "):
            path = Path(line[len("/image "):].strip()).expanduser()
            if not path.is_file():
                print(f"vlt chat: no image at {str(path)!r}", file=sys.stderr)
                continue
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
            continue
        streamer = TextStreamer(tok, [tok.im_end_id, tok.eos_id, tok.pad_id], out=stdout)
        try:
            chat.say(line, images, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_p=args.top_p, on_token=streamer)
        except ValueError as e:   # e.g. the conversation outgrew a full-attention capacity
            print(f"vlt chat: {e}; /reset to start over", file=sys.stderr)
        streamer.close()
        images = []
    return 0


def main(argv=None) -> int:
    return run_chat(add_chat_args(argparse.ArgumentParser("vlt chat")).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
