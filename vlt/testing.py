"""Tiny real models and tokenizers for tests: vlt's own and users' (nothing is downloaded).

- ``make_tiny_teacher(dir)``: a random tiny Qwen2.5-VL saved with transformers (config.json +
  safetensors), with a byte-level tokenizer (Qwen's special tokens and chat template) and image
  processor: a real checkpoint for ``vlt.convert``, ``Distillation(teacher=dir)`` and ``vlt generate``.
- ``save_tiny_tokenizer(dir)``: that tokenizer and image processor alone.
- ``tiny_model(layout, ...)``: a random ``tiny-hybrid`` ``VLM`` (2-block ViT, 128-wide decoder, byte
  vocabulary) in eval mode, seeded, with small windows so short inputs exercise them.
- ``byte_tokenizer()``: vlt's built-in byte tokenizer (the one ``tiny-hybrid``'s token ids belong to).

Example (a user's test of their own mixer)::

    from vlt.testing import byte_tokenizer, tiny_model
    model = tiny_model("[swa, my_mixer]")
"""
from __future__ import annotations

from pathlib import Path

import torch

from vlt.convert.qwen import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS

# windows small enough that a few dozen tokens cross them
TINY_MIXERS = {"swa": {"window": 6}, "swa_gdn": {"window": 6},
               "hybrid": {"branches": [{"mixer": "swa", "window": 5}, "gdn"]}}
TINY_IMAGE_TOKEN_ID = 261  # tiny-hybrid's <|image_pad|> (the byte tokenizer's id)


def tiny_model(layout="[swa, gdn, linear, full]", mrope: bool = False, seed: int = 0, **decoder):
    """A random ``tiny-hybrid`` VLM in eval mode (``torch.manual_seed(seed)`` first): ``layout`` with
    ``TINY_MIXERS``' windows; ``mrope`` gives it M-RoPE (sections [4, 6, 6], head_dim 32); ``decoder``
    overrides further decoder keys (``mixers`` replaces ``TINY_MIXERS``)."""
    from vlt.config import VLMConfig
    from vlt.model import VLM
    torch.manual_seed(seed)
    dec = {"layout": layout, "mixers": TINY_MIXERS}
    if mrope:
        dec.update(mrope_section=[4, 6, 6], head_dim=32)
    dec.update(decoder)
    return VLM(VLMConfig.from_name("tiny-hybrid", decoder=dec)).eval()


def byte_tokenizer():
    """vlt's byte tokenizer (``vlt.data.tokenizer.ByteTokenizer``): 256 bytes + Qwen's special tokens."""
    from vlt.data.tokenizer import load_tokenizer
    return load_tokenizer("byte")


def make_tiny_teacher(out_dir, num_layers: int = 4, hidden_size: int = 64, seed: int = 0,
                      tokenizer: bool = True) -> Path:
    """Save a random tiny Qwen2.5-VL (+ byte-level tokenizer with Qwen's specials at 256..262 and
    chat template, + image processor) to ``out_dir``; the vocabulary has 272 entries."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heads = 4
    hd = hidden_size // heads
    sec = [hd // 8, (hd // 2 - hd // 8) // 2]
    sec.append(hd // 2 - sum(sec))
    ids = {t: 256 + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=272, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"],
                         rope_parameters={"rope_type": "default", "mrope_section": sec, "rope_theta": 1e6}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden_size,
                           window_size=56, fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    with torch.no_grad():  # HF's init leaves tiny models near-uniform; widen so logits are distinct
        for n, p in model.named_parameters():
            if p.dim() == 2 and "visual" not in n:
                p.normal_(0, 0.1)
    model.save_pretrained(str(out))
    if tokenizer:
        save_tiny_tokenizer(out)
    return out


def save_tiny_tokenizer(out_dir) -> Path:
    """Save a byte-level HF tokenizer (the 256 bytes, then Qwen's special tokens at 256..262, Qwen's
    chat template) and a small Qwen2-VL image processor to ``out_dir``: a tokenizer directory that
    ``vlt fit --data.init_args.tokenizer DIR``, ``save_pretrained(tokenizer_dir=DIR)`` and transformers read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=QWEN_CHAT_TEMPLATE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64).save_pretrained(str(out))
    return out
