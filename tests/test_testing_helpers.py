"""vlt.testing: the tiny models and tokenizers that vlt's tests and users' tests build."""
import torch

from vlt.testing import TINY_IMAGE_TOKEN_ID, byte_tokenizer, save_tiny_tokenizer, tiny_model


def test_tiny_model_is_seeded_and_takes_overrides():
    a, b = tiny_model("[swa, gdn]", seed=3), tiny_model("[swa, gdn]", seed=3)
    assert a.layout == ["swa", "gdn"] and not a.training
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert tiny_model("[full]", hidden_size=64, intermediate_size=128).config.decoder.hidden_size == 64
    assert tiny_model("[full]", mrope=True).config.decoder.mrope_section == [4, 6, 6]


def test_byte_tokenizer_ids_match_the_tiny_model():
    tok = byte_tokenizer()
    assert tok.image_pad_id == TINY_IMAGE_TOKEN_ID == tiny_model("[full]").config.image_token_id


def test_tiny_hf_tokenizer_reads_back_with_qwen_specials(tmp_path):
    from vlt.data.tokenizer import load_tokenizer
    tok = load_tokenizer(str(save_tiny_tokenizer(tmp_path / "tok")))
    assert tok.image_pad_id == 261 and tok.decode(tok.encode("héllo")) == "héllo"
