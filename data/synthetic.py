"""Embedded synthetic tasks with real signal: colour, count, OCR, long-context needle, dense OCR,
multi-image comparison, and a mix.

Every generator takes a ``random.Random`` and keyword parameters and returns a LLaVA-style
conversation plus PIL images; answers are short and exact (a colour word, a digit, a string), so
teacher-forced answer accuracy is a meaningful metric. Sizes, lengths and difficulty are
parameters, so CPU smoke runs (56x56, a few frames) and GPU layout studies (hundreds of frames,
far beyond an SWA window) use the same code.

``needle`` produces a video: frames at ``fps`` with one frame showing ``CODE:`` and a code, the
question at the end. Its frames come back in ``SyntheticRecord.frames`` with timestamps. With
``distances`` (a list of token counts) the code frame is placed so that its vision block starts at
least that many tokens before the end of the prompt (counted with the byte tokenizer and default
image settings, as the shard manifest counts; ``meta.planned_distance``), one distance drawn per
sample, and the video keeps ``num_frames`` frames, so only the evidence moves; ``vlt eval`` measures
the distance again with the model's own tokenizer and reports scores per distance from the SWA window.

``dense_ocr``: ``num_strings`` lines ``K: CODE`` in one image (distinct key letters, codes of
``alphabet``), the question names one key. ``multi_image``: ``num_images`` images of one shape each;
"which image shows the red shape?" (``mode=which``, answer 1..n), "do both shapes have the same
colour?" (``same``, yes/no, two images) or "which image has more shapes?" (``more``, answer 1..n);
``meta.evidence_image`` names the image that holds the answer, from which ``vlt eval`` measures the
evidence distance.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TASKS = ("color", "count", "ocr", "needle", "dense_ocr", "multi_image", "mix")

# Saturated, well separated colours on a mid-grey background (so white and black stay distinct).
COLORS = {
    "red": (230, 25, 25),
    "green": (20, 190, 40),
    "blue": (30, 60, 235),
    "yellow": (250, 230, 20),
    "cyan": (20, 225, 230),
    "magenta": (230, 30, 220),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUND = (128, 128, 128)
SHAPES = ("circle", "square", "triangle")
CODE_ALPHABET = string.ascii_uppercase + string.digits


@dataclass
class SyntheticRecord:
    """One generated sample: conversation, still images, and (for videos) frames + timestamps."""

    conversations: list
    images: list = field(default_factory=list)
    frames: list = field(default_factory=list)
    timestamps: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def _font(size: int):
    # Pillow >= 10.1 ships a scalable default font, so rendering never depends on system fonts.
    return ImageFont.load_default(size=size)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def _conv(question: str, answer: str, placeholder: str = "<image>") -> list:
    return [{"from": "human", "value": f"{placeholder}\n{question}"}, {"from": "gpt", "value": answer}]


def gen_color(rng: random.Random, image_size: int = 56, min_radius_frac: float = 0.15,
              max_radius_frac: float = 0.3, **_) -> SyntheticRecord:
    name = rng.choice(sorted(COLORS))
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    r = rng.uniform(min_radius_frac, max_radius_frac) * image_size
    cx, cy = rng.uniform(r, image_size - r), rng.uniform(r, image_size - r)
    _draw_shape(ImageDraw.Draw(img), rng.choice(SHAPES), cx, cy, r, COLORS[name])
    return SyntheticRecord(_conv("What colour is the shape?", name), [img], meta={"task": "color", "answer": name})


def gen_count(rng: random.Random, image_size: int = 56, max_count: int = 5, radius_frac: float = 0.09,
              **_) -> SyntheticRecord:
    if max_count < 1:
        raise ValueError(f"count.max_count must be >= 1 (got {max_count})")
    n = rng.randint(1, max_count)
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    r = max(2.0, radius_frac * image_size)
    placed: list[tuple[float, float]] = []
    for _ in range(n):
        for _attempt in range(200):  # rejection sampling: shapes must not touch, or counting is ambiguous
            cx, cy = rng.uniform(r, image_size - r), rng.uniform(r, image_size - r)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (2.6 * r) ** 2 for x, y in placed):
                break
        else:
            break
        placed.append((cx, cy))
        colour = COLORS[rng.choice(["red", "green", "blue", "yellow", "cyan", "magenta", "white"])]
        _draw_shape(draw, rng.choice(SHAPES), cx, cy, r, colour)
    answer = str(len(placed))
    return SyntheticRecord(_conv("How many shapes?", answer), [img], meta={"task": "count", "answer": answer})


def _render_text(text: str, width: int, height: int, rng: random.Random, bg=(255, 255, 255), fg=(0, 0, 0),
                 lines: list[str] | None = None) -> Image.Image:
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    lines = lines or [text]
    size = max(6, int(min(height / (1.3 * len(lines)), 1.6 * width / max(len(s) for s in lines))))
    while size > 6:  # shrink until the block fits
        font = _font(size)
        boxes = [draw.textbbox((0, 0), s, font=font) for s in lines]
        bw = max(b[2] - b[0] for b in boxes)
        bh = sum(b[3] - b[1] for b in boxes) + 2 * (len(lines) - 1)
        if bw <= width - 2 and bh <= height - 2:
            break
        size -= 1
    font = _font(size)
    boxes = [draw.textbbox((0, 0), s, font=font) for s in lines]
    bw = max(b[2] - b[0] for b in boxes)
    bh = sum(b[3] - b[1] for b in boxes) + 2 * (len(lines) - 1)
    x0 = rng.randint(0, max(0, width - bw - 1))
    y = rng.randint(0, max(0, height - bh - 1))
    for s, b in zip(lines, boxes):
        draw.text((x0 - b[0], y - b[1]), s, font=font, fill=fg)
        y += b[3] - b[1] + 2
    return img


def _render_grid(rows: list[str], cell: int) -> Image.Image:
    """Black characters on white, each centred in its own ``cell`` x ``cell`` square, a row per string."""
    img = Image.new("RGB", (cell * max(map(len, rows)), cell * len(rows)), (255, 255, 255))
    draw, font = ImageDraw.Draw(img), _font(max(6, int(0.8 * cell)))
    for r, text in enumerate(rows):
        for c, ch in enumerate(text):
            if ch != " ":
                draw.text(((c + 0.5) * cell, (r + 0.5) * cell), ch, font=font, fill=(0, 0, 0), anchor="mm")
    return img


def gen_ocr(rng: random.Random, image_size: int = 56, length: int = 4, width: int | None = None,
            alphabet: str = CODE_ALPHABET, **_) -> SyntheticRecord:
    if length < 1:
        raise ValueError(f"ocr.length must be >= 1 (got {length})")
    text = "".join(rng.choice(alphabet) for _ in range(length))
    img = _render_text(text, width or image_size, image_size, rng)
    return SyntheticRecord(_conv("What does the text say?", text), [img], meta={"task": "ocr", "answer": text})


def _frame_distances(num_frames: int, fps: float, frame_tokens: int, question: str) -> list[int]:
    """Per frame, the tokens from its vision block's start to the prompt's end (byte tokenizer,
    ``frame_tokens`` per frame, as ``build_prompt_ids`` lays a video out)."""
    from .tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    # after the video: "\n" + question + <|im_end|> "\n" <|im_start|> "assistant\n" (build_prompt_ids)
    tail = len(tok.encode("\n" + question)) + 3 + len(tok.encode("assistant\n"))
    dist, suffix = [0] * num_frames, tail
    for i in reversed(range(num_frames)):
        dist[i] = suffix + frame_tokens + 2  # from <|vision_start|>: the frame's own timestamp comes before it
        suffix = dist[i] + len(tok.encode(f"<t={i / fps:.1f}s>"))
    return dist


def gen_needle(rng: random.Random, image_size: int = 56, num_frames: int = 16, code_length: int = 4,
               fps: float = 1.0, distractors: bool = True, distances: list | None = None,
               alphabet: str = CODE_ALPHABET, code_kind: str = "text", **_) -> SyntheticRecord:
    """``code_kind="text"``: the code frame shows ``CODE:`` and ``code_length`` characters of
    ``alphabet`` (distractor frames show unlabelled strings). ``"color"``: the one frame with a
    shape on it (the others are noise), the answer its colour: the same recall over distance without
    reading text, which tiny models learn in far fewer steps."""
    if num_frames < 1:
        raise ValueError(f"needle.num_frames must be >= 1 (got {num_frames})")
    if code_kind not in ("text", "color"):
        raise ValueError(f"needle.code_kind={code_kind!r} is not one of ['text', 'color']")
    question = "What code appeared?" if code_kind == "text" else "What colour was the shape?"
    # random draws in the order of the original needle (code, frame, then per frame), so the sets it
    # wrote before these options existed come out the same
    if code_kind == "color":
        code = rng.choice(sorted(COLORS))
    else:
        code = "".join(rng.choice(alphabet) for _ in range(code_length))
    planned = None
    if distances:
        from .image import ImageProcessor
        if not all(isinstance(d, int) and d > 0 for d in distances):
            raise ValueError(f"needle.distances must be positive token counts (got {distances!r})")
        dist = _frame_distances(num_frames, fps, ImageProcessor().tokens_for_size(image_size, image_size), question)
        target = rng.choice(list(distances))
        if target > dist[0]:
            raise ValueError(f"needle.distances: {target} tokens needs more than needle.num_frames={num_frames} "
                             f"frames (the whole video spans {dist[0]} tokens here); raise num_frames")
        k = max(i for i in range(num_frames) if dist[i] >= target)  # the latest frame at least that far back
        planned = dist[k]
    else:
        k = rng.randrange(num_frames)
    nprng = np.random.default_rng(rng.getrandbits(63))
    frames = []
    for i in range(num_frames):
        if i == k and code_kind == "color":
            needle = Image.new("RGB", (image_size, image_size), BACKGROUND)
            r = 0.25 * image_size
            _draw_shape(ImageDraw.Draw(needle), rng.choice(SHAPES), rng.uniform(r, image_size - r),
                        rng.uniform(r, image_size - r), r, COLORS[code])
            frames.append(needle)
        elif i == k:
            frames.append(_render_text(code, image_size, image_size, rng, lines=["CODE:", code]))
        elif distractors and code_kind == "text" and rng.random() < 0.5:
            # a distractor string without the CODE: label, so the model must find the labelled frame
            fake = "".join(rng.choice(alphabet) for _ in range(code_length))
            bg = tuple(int(c) for c in nprng.integers(60, 200, 3))
            frames.append(_render_text(fake, image_size, image_size, rng, bg=bg))
        else:
            noise = nprng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
            frames.append(Image.fromarray(noise))
    ts = [round(i / fps, 3) for i in range(num_frames)]
    conv = _conv(question, code, placeholder="<video>")
    meta = {"task": "needle", "answer": code, "needle_frame": k}
    if planned is not None:
        meta["planned_distance"] = planned
    return SyntheticRecord(conv, frames=frames, timestamps=ts, meta=meta)


def gen_dense_ocr(rng: random.Random, image_size: int = 112, width: int | None = None, num_strings: int = 6,
                  length: int = 3, alphabet: str = string.digits, cell: int = 0, **_) -> SyntheticRecord:
    """Many labelled strings in one image; recall of the one the question names (information-dense).
    ``cell`` > 0: a grid instead of free text, one string per row and one character per ``cell`` x ``cell``
    square (the key, a blank, the code), the image ``(length + 2) * cell`` wide and ``num_strings * cell``
    high (``image_size`` and ``width`` unused). With ``cell`` = patch x merge (28 for tiny-hybrid) each image
    token holds one glyph: a layout a tiny tower can learn to read, where free text of ~10-pixel glyphs
    anywhere in the image stayed at chance (tools/ocr_probe.py)."""
    if not 1 <= num_strings <= 26:
        raise ValueError(f"dense_ocr.num_strings must be in 1..26 (got {num_strings})")
    if length < 1:
        raise ValueError(f"dense_ocr.length must be >= 1 (got {length})")
    if cell < 0 or 0 < cell < 8:
        raise ValueError(f"dense_ocr.cell must be 0 (free text) or >= 8 pixels (got {cell})")
    keys = rng.sample(string.ascii_uppercase, num_strings)
    codes = ["".join(rng.choice(alphabet) for _ in range(length)) for _ in keys]
    j = rng.randrange(num_strings)
    if cell:
        img = _render_grid([k + " " + c for k, c in zip(keys, codes)], cell)
    else:
        img = _render_text("", width or image_size, image_size, rng, lines=[f"{k}: {c}" for k, c in zip(keys, codes)])
    return SyntheticRecord(_conv(f"What is written after {keys[j]}?", codes[j]), [img],
                           meta={"task": "dense_ocr", "answer": codes[j], "line": j, "num_strings": num_strings,
                                 "keys": keys, "codes": codes})   # every line, in image order (tools/ocr_probe.py)


_MI_MODES = ("which", "same", "more")


def gen_multi_image(rng: random.Random, image_size: int = 56, num_images: int = 2, mode: str = "random",
                    max_count: int = 4, **_) -> SyntheticRecord:
    """Questions that need several images at once; answers are an image number or yes/no."""
    if mode not in (*_MI_MODES, "random"):
        raise ValueError(f"multi_image.mode={mode!r} is not one of {[*_MI_MODES, 'random']}")
    if not 2 <= num_images <= len(COLORS):
        raise ValueError(f"multi_image.num_images must be in 2..{len(COLORS)} (got {num_images})")
    mode = rng.choice(_MI_MODES) if mode == "random" else mode
    n = 2 if mode == "same" else num_images
    if mode == "more" and max_count < n:
        raise ValueError(f"multi_image.max_count={max_count} must be >= num_images={n} for mode 'more' "
                         "(every image gets a different count)")
    names = sorted(COLORS)
    if mode == "which":
        colours, counts = rng.sample(names, n), [1] * n
        j = rng.randrange(n)
        question, answer = f"Which image shows the {colours[j]} shape?", str(j + 1)
    elif mode == "same":
        c0 = rng.choice(names)
        colours = [c0, c0] if rng.random() < 0.5 else [c0, rng.choice([c for c in names if c != c0])]
        counts, j = [1, 1], None
        question, answer = "Do the two shapes have the same colour?", "yes" if colours[0] == colours[1] else "no"
    else:
        counts = rng.sample(range(1, max_count + 1), n)
        colours = [rng.choice(names) for _ in range(n)]
        j = counts.index(max(counts))
        question, answer = "Which image has more shapes?", str(j + 1)
    images = []
    for colour, count in zip(colours, counts):
        img = Image.new("RGB", (image_size, image_size), BACKGROUND)
        draw = ImageDraw.Draw(img)
        r = (0.25 if count == 1 else 0.09) * image_size
        cells = rng.sample(range(9), count)  # a 3x3 grid of cells: shapes never touch
        for c in cells:
            cx, cy = (c % 3 + 0.5) * image_size / 3, (c // 3 + 0.5) * image_size / 3
            _draw_shape(draw, rng.choice(SHAPES), cx, cy, min(r, image_size / 6 - 1), COLORS[colour])
        images.append(img)
    text = "\n".join(f"Image {i + 1}: <image>" for i in range(n)) + "\n" + question
    conv = [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]
    meta = {"task": "multi_image", "answer": answer, "mode": mode}
    if j is not None:
        meta["evidence_image"] = j
    return SyntheticRecord(conv, images, meta=meta)


_GENERATORS = {"color": gen_color, "count": gen_count, "ocr": gen_ocr, "needle": gen_needle,
               "dense_ocr": gen_dense_ocr, "multi_image": gen_multi_image}


def generate_record(task: str, rng: random.Random, **params) -> SyntheticRecord:
    """Generate one record. ``mix`` takes ``weights`` ({task: weight}) and per-task ``task_params``."""
    if task == "mix":
        weights = params.get("weights") or {"color": 1.0, "count": 1.0, "ocr": 1.0}
        bad = [t for t in weights if t not in _GENERATORS]
        if bad:
            raise ValueError(f"synthetic.weights has unknown tasks {bad} (allowed: {sorted(_GENERATORS)})")
        names = sorted(weights)
        sub = rng.choices(names, weights=[float(weights[n]) for n in names])[0]
        sub_params = {k: v for k, v in params.items() if k not in ("weights", "task_params")}
        sub_params.update((params.get("task_params") or {}).get(sub, {}))
        return _GENERATORS[sub](rng, **sub_params)
    if task not in _GENERATORS:
        raise ValueError(f"synthetic.task={task!r} is not one of {list(TASKS)}")
    return _GENERATORS[task](rng, **params)


def check_params(task: str, params: dict, extra=()) -> None:
    """ValueError naming any parameter the task's generator does not take (typos would be ignored);
    ``extra``: the other keys the caller accepts beside them (listed as allowed too)."""
    import difflib
    import inspect

    if task not in TASKS:
        raise ValueError(f"synthetic.task={task!r} is not one of {list(TASKS)}")
    gens = list(_GENERATORS.values()) if task == "mix" else [_GENERATORS[task]]
    allowed = {"weights", "task_params"} if task == "mix" else set()
    for g in gens:
        signature = inspect.signature(g).parameters.items()
        allowed |= {n for n, p in signature if p.kind is p.POSITIONAL_OR_KEYWORD} - {"rng"}
    allowed |= set(extra)
    bad = sorted(set(params) - allowed)
    if bad:
        close = difflib.get_close_matches(bad[0], sorted(allowed), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"synthetic parameter(s) {bad} not understood by task {task!r} "
                         f"({hint}allowed: {sorted(allowed)})")
    for g in gens:  # a value of the wrong kind would end in a TypeError deep inside the generator
        for n, prm in inspect.signature(g).parameters.items():
            if n not in params or prm.default is inspect.Parameter.empty or prm.default is None:
                continue
            want, got = type(prm.default), params[n]
            ok = isinstance(got, want) or (want is float and isinstance(got, int) and not isinstance(got, bool))
            if want in (int, float, bool, str) and not ok:
                raise ValueError(f"synthetic parameter {n}={got!r} for task {task!r}: expected {want.__name__} "
                                 f"(default {prm.default!r})")


def make_sample(task: str, rng: random.Random, **params):
    """Contract entry point: (conversations, list[PIL.Image]); video frames follow the stills."""
    rec = generate_record(task, rng, **params)
    return rec.conversations, rec.images + rec.frames


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    """Per-sample RNG: sample i of a split is the same whatever else is generated."""
    return random.Random(f"vlt-synth/{seed}/{split}/{index}")
