"""Tokenizer round trips, the ChatML template and its loss mask (exact positions), image processing."""

import pytest
import torch
from PIL import Image

from vlt.data.image import ImageProcessor, smart_resize
from vlt.data.tokenizer import (IGNORE_INDEX, ByteTokenizer, apply_chat_template, build_prompt_ids,
                                load_tokenizer)


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 264 and tok.vocab_size % 8 == 0
    text = "héllo wörld ✓ <|im_start|>user\n<|image_pad|><|im_end|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids.count(tok.im_start_id) == 1 and ids.count(tok.image_pad_id) == 1
    assert max(ids) < tok.vocab_size
    ids_set = {tok.pad_id, tok.eos_id, tok.im_start_id, tok.image_pad_id, tok.video_pad_id,
               tok.vision_start_id, tok.vision_end_id}
    assert len(ids_set) == 7 and min(ids_set) >= 256
    assert tok.eos_id == tok.encode("<|im_end|>")[0]


def test_chat_template_exact_string_and_mask_positions():
    tok = ByteTokenizer()
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]
    ids, labels = apply_chat_template(tok, conv, [3])
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 3 + "<|vision_end|>\nWhat colour?<|im_end|>\n"
                "<|im_start|>assistant\nred<|im_end|>\n"
                "<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n")
    assert tok.decode(ids) == expected
    assert len(ids) == len(labels)
    # loss exactly on "red<|im_end|>" and "yes<|im_end|>"
    trained = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    a1 = tok.decode(ids).index("assistant\nred")
    prefix1 = tok.encode(expected[: a1 + len("assistant\n")])
    p1 = len(prefix1)
    a2 = expected.rindex("assistant\nyes")
    p2 = len(tok.encode(expected[: a2 + len("assistant\n")]))
    assert trained == [p1, p1 + 1, p1 + 2, p1 + 3, p2, p2 + 1, p2 + 2, p2 + 3]
    assert labels[p1 + 3] == tok.eos_id and labels[p2 + 3] == tok.eos_id
    assert [labels[i] for i in trained] == [ids[i] for i in trained]
    assert ids.count(tok.image_pad_id) == 3


def test_empty_system_omitted_and_generation_prompt():
    tok = ByteTokenizer()
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    ids, _ = apply_chat_template(tok, conv, system="")
    assert tok.decode(ids).startswith("<|im_start|>user\nhi")
    prompt = build_prompt_ids(tok, conv, system="")
    assert tok.decode(prompt) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_video_placeholder_expands_frames_with_timestamps():
    tok = ByteTokenizer()
    conv = [{"from": "human", "value": "<video>\nWhat code?"}, {"from": "gpt", "value": "AB"}]
    ids, _ = apply_chat_template(tok, conv, [("video", [(0.0, 2), (1.5, 2)])], system=None)
    text = tok.decode(ids)
    assert "<t=0.0s><|vision_start|><|video_pad|><|video_pad|><|vision_end|>" in text
    assert "<t=1.5s><|vision_start|>" in text and ids.count(tok.video_pad_id) == 4


def test_placeholder_mismatch_raises():
    tok = ByteTokenizer()
    with pytest.raises(ValueError):
        apply_chat_template(tok, [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}], [4])


def test_hf_tokenizer_from_local_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["[UNK]", "\n", "user", "assistant", "system", "hi", "yo", "Ġ"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Split(r"\n| ", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")
    fast.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    ids = {tok.pad_id, tok.eos_id, tok.im_start_id, tok.image_pad_id, tok.video_pad_id, tok.vision_start_id,
           tok.vision_end_id}
    assert len(ids) == 7 and tok.vocab_size >= len(vocab) + 7
    conv = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "yo"}]
    ids, labels = apply_chat_template(tok, conv, [2], system=None)
    assert ids.count(tok.image_pad_id) == 2
    trained = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert [ids[i] for i in trained] == [vocab["yo"], tok.eos_id]
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "nope"))


@pytest.mark.parametrize("hw", [(56, 56), (100, 300), (20, 20), (4000, 3000), (28, 2000)])
def test_smart_resize_bounds(hw):
    h, w = smart_resize(*hw, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 256)
    assert h % 28 == 0 and w % 28 == 0
    assert 56 * 56 <= h * w <= 28 * 28 * 256
    assert abs(h / w - hw[0] / hw[1]) / (hw[0] / hw[1]) < 0.35


def test_image_processor_tensor_and_tokens():
    proc = ImageProcessor(min_pixels=56 * 56, max_pixels=448 * 448)
    x = proc(Image.new("RGB", (450, 300), (255, 0, 0)))
    assert x.dtype == torch.float32 and x.shape[0] == 3 and x.shape[1] % 28 == 0 and x.shape[2] % 28 == 0
    assert proc.num_tokens(x) == (x.shape[1] // 28) * (x.shape[2] // 28) == proc.tokens_for_size(300, 450)
    assert torch.allclose(x[0].mean(), torch.tensor((1 - 0.48145466) / 0.26862954), atol=1e-3)
    with pytest.raises(ValueError):
        proc(Image.new("RGB", (1000, 2)))
