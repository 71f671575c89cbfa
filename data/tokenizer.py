"""Tokenisers and the Qwen2.5-VL ChatML template with assistant-only loss masks.

Two tokenisers share one small protocol (``encode``/``decode``/``vocab_size`` and the ids of the
special tokens): :class:`ByteTokenizer`, built in so the embedded default needs no download, and
:class:`HFTokenizer`, any ``transformers`` tokenizer saved in a local directory.

The template is built piece by piece (text segments and special ids) rather than by rendering a
string, because the loss mask must be exact: labels are set only on assistant content and its
closing ``<|im_end|>``, never on ``<|im_start|>assistant\\n``. For a Qwen2.5-VL tokenizer the ids
equal those of its own ``apply_chat_template`` (specials split pre-tokenisation there too).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

IGNORE_INDEX = -100
DEFAULT_SYSTEM = "You are a helpful assistant."

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")
_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class _SpecialIds:
    """Convenience properties shared by both tokenisers (ids resolved by ``token_to_id``)."""

    def token_to_id(self, token: str) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        return self.token_to_id("<|endoftext|>")

    @property
    def eos_id(self) -> int:
        return self.token_to_id("<|im_end|>")

    @property
    def im_start_id(self) -> int:
        return self.token_to_id("<|im_start|>")

    @property
    def im_end_id(self) -> int:
        return self.token_to_id("<|im_end|>")

    @property
    def image_pad_id(self) -> int:
        return self.token_to_id("<|image_pad|>")

    @property
    def video_pad_id(self) -> int:
        return self.token_to_id("<|video_pad|>")

    @property
    def vision_start_id(self) -> int:
        return self.token_to_id("<|vision_start|>")

    @property
    def vision_end_id(self) -> int:
        return self.token_to_id("<|vision_end|>")


class ByteTokenizer(_SpecialIds):
    """UTF-8 bytes are ids 0..255; the seven specials follow (256..262); vocab padded to 264.

    ``encode`` maps special-token strings that appear in the text to their ids, like HF tokenisers.
    """

    name = "byte"

    def __init__(self) -> None:
        self._special = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._inverse = {v: k for k, v in self._special.items()}

    def token_to_id(self, token: str) -> int:
        return self._special[token]

    @property
    def vocab_size(self) -> int:
        n = 256 + len(SPECIAL_TOKENS)
        return (n + 7) // 8 * 8

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in _SPECIAL_RE.split(text):
            if not part:
                continue
            if part in self._special:
                ids.append(self._special[part])
            else:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            out.append(self._inverse.get(i, ""))  # ids in the padding range decode to nothing
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer(_SpecialIds):
    """A ``transformers`` tokenizer loaded from a local directory (never from the hub).

    Missing vision/ChatML specials are added (with a warning in the log) so any tokenizer works;
    ``vocab_size`` is ``len(tokenizer)`` rounded up to a multiple of 8.
    """

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        p = Path(path).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"tokenizer: {path!r} is not a directory (use 'byte' or a local HF tokenizer dir)")
        self.name = str(p)
        self.tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        missing = [t for t in SPECIAL_TOKENS if self.tok.convert_tokens_to_ids(t) in (None, self.tok.unk_token_id)]
        if missing:
            import logging

            logging.getLogger(__name__).warning("tokenizer %s lacks %s; adding them as special tokens", p, missing)
            self.tok.add_special_tokens({"additional_special_tokens": missing})
        self._ids = {t: int(self.tok.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}

    def token_to_id(self, token: str) -> int:
        return self._ids[token]

    @property
    def vocab_size(self) -> int:
        return (len(self.tok) + 7) // 8 * 8

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path_or_name: str = "byte"):
    """``"byte"`` -> :class:`ByteTokenizer`; a local directory -> :class:`HFTokenizer`."""
    if path_or_name in (None, "", "byte"):
        return ByteTokenizer()
    return HFTokenizer(path_or_name)


def _media_ids(tok, pad_id: int, n_tokens: int) -> list[int]:
    return [tok.vision_start_id] + [pad_id] * n_tokens + [tok.vision_end_id]


def _encode_user(tok, text: str, media: list[tuple], cursor: list[int]) -> list[int]:
    """Encode a human turn, expanding ``<image>``/``<video>`` from ``media`` in order.

    ``media`` holds ("image", n_tokens) or ("video", [(timestamp, n_tokens), ...]) entries;
    ``cursor[0]`` is the next entry to use (shared across turns).
    """
    ids: list[int] = []
    for part in re.split(r"(<image>|<video>)", text):
        if part == "<image>":
            kind, n = media[cursor[0]]
            if kind != "image":
                raise ValueError("placeholder <image> but the next media item is a video")
            ids += _media_ids(tok, tok.image_pad_id, n)
            cursor[0] += 1
        elif part == "<video>":
            kind, frames = media[cursor[0]]
            if kind != "video":
                raise ValueError("placeholder <video> but the next media item is an image")
            for t, n in frames:
                ids += tok.encode(f"<t={t:.1f}s>") + _media_ids(tok, tok.video_pad_id, n)
            cursor[0] += 1
        elif part:
            ids += tok.encode(part)
    return ids


def count_placeholders(conversations: list[dict]) -> tuple[int, int]:
    """(number of ``<image>``, number of ``<video>``) over all turns."""
    text = "".join(str(t.get("value", "")) for t in conversations)
    return text.count("<image>"), text.count("<video>")


def _normalise_media(image_token_counts) -> list[tuple]:
    media = []
    for m in image_token_counts or []:
        media.append(("image", int(m)) if isinstance(m, (int,)) else tuple(m))
    return media


def apply_chat_template(
    tok,
    conversations: list[dict],
    image_token_counts=(),
    system: str | None = DEFAULT_SYSTEM,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Tokenise a LLaVA/ShareGPT conversation into (input_ids, labels) in Qwen2.5-VL ChatML.

    ``image_token_counts`` lists, in placeholder order, an int per ``<image>`` or
    ``("video", [(t_seconds, n_tokens), ...])`` per ``<video>``. Raises ValueError when the
    placeholders and media do not match (the reader counts that as ``image_count_mismatch``).
    """
    media = _normalise_media(image_token_counts)
    n_img, n_vid = count_placeholders(conversations)
    if n_img + n_vid != len(media):
        raise ValueError(f"{n_img} <image> + {n_vid} <video> placeholders but {len(media)} media items")
    nl = tok.encode("\n")
    ids: list[int] = []
    labels: list[int] = []

    def add(piece: list[int], train: bool) -> None:
        ids.extend(piece)
        labels.extend(piece if train else [IGNORE_INDEX] * len(piece))

    turns = list(conversations)
    if turns and _ROLE.get(turns[0].get("from", ""), "") == "system":
        system = str(turns.pop(0).get("value", ""))
    if system:
        add([tok.im_start_id] + tok.encode("system\n" + system) + [tok.im_end_id] + nl, False)
    cursor = [0]
    for turn in turns:
        role = _ROLE.get(turn.get("from", turn.get("role", "")))
        if role not in ("user", "assistant"):
            raise ValueError(f"unknown turn role {turn.get('from')!r} (allowed: human, gpt, user, assistant)")
        value = str(turn.get("value", turn.get("content", "")))
        add([tok.im_start_id] + tok.encode(role + "\n"), False)
        if role == "user":
            add(_encode_user(tok, value, media, cursor) + [tok.im_end_id], False)
            add(nl, False)
        else:
            # the answer and its <|im_end|> carry the loss; the newline after it does not
            add(tok.encode(value) + [tok.im_end_id], True)
            add(nl, False)
    if add_generation_prompt:
        add([tok.im_start_id] + tok.encode("assistant\n"), False)
    return ids, labels


def build_prompt_ids(tok, conversations: list[dict], image_token_counts=(),
                     system: str | None = DEFAULT_SYSTEM) -> list[int]:
    """Prompt ids for generation: the conversation (without a trailing assistant answer) followed by
    ``<|im_start|>assistant\\n``. A trailing ``gpt`` turn, if present, is dropped."""
    turns = list(conversations)
    if turns and _ROLE.get(turns[-1].get("from", "")) == "assistant":
        turns = turns[:-1]
    ids, _ = apply_chat_template(tok, turns, image_token_counts, system=system, add_generation_prompt=True)
    return ids
