"""Self-describing export directories: exact round trip (layout, mixer options, tied weights,
tokenizer), LoRA merged or kept as adapters, and clear errors for missing or mismatching files."""
import json

import pytest
import torch

from vlt.convert import convert_to_student, load_hf_teacher
from vlt.checkpoint.export import load_pretrained_vlt, save_pretrained_vlt

IMG, VS, VE = 261, 259, 260
LAYOUT = [{"mixer": "swa", "window": 6}, "gdn", {"mixer": "gdn", "expand_v": 1.0}, "full"]


@pytest.fixture()
def student(teacher_dir):
    torch.manual_seed(0)
    model, _ = convert_to_student(load_hf_teacher(teacher_dir), layout=LAYOUT, init="mimic",
                                  mixers={"gdn": {"conv_size": 3}})
    with torch.no_grad():  # "training" moved the new parameters away from their init
        for n, p in model.named_parameters():
            if ".mixer." in n:
                p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


def batch():
    torch.manual_seed(1)
    return torch.tensor([[257, 40, VS] + [IMG] * 6 + [VE, 41, 42, 43, 44, 45]]), [torch.randn(3, 56, 84)]


def logits(model):
    ids, images = batch()
    with torch.no_grad():
        return model(ids, images=images).logits


def test_round_trip_is_exact(student, teacher_dir, tmp_path):
    out = save_pretrained_vlt(student, tmp_path / "m", tokenizer_dir=teacher_dir)
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "vlt_config.json", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json"} <= files
    meta = json.loads((out / "vlt_config.json").read_text())
    assert meta["layout"] == ["swa", "gdn", "gdn", "full"]
    assert meta["model"]["decoder"]["layout"] == LAYOUT  # per-layer options, as given
    assert meta["model"]["decoder"]["mixers"]["gdn"] == {"conv_size": 3}
    assert meta["tied_weights"] == {"lm_head.weight": "embed_tokens.weight"}
    loaded, tok = load_pretrained_vlt(out)
    assert loaded.config.to_dict() == student.config.to_dict()
    assert [b.mixer.window for b in loaded.layers[::3]] == [6, None]
    assert loaded.layers[2].mixer.head_v_dim == 16 and loaded.layers[1].mixer.conv_size == 3
    assert loaded.lm_head.weight.data_ptr() == loaded.embed_tokens.weight.data_ptr()  # still tied
    sd, ld = student.state_dict(), loaded.state_dict()
    assert sd.keys() == ld.keys() and all(torch.equal(sd[k], ld[k]) for k in sd)
    assert torch.equal(logits(loaded), logits(student))
    assert tok is not None and tok.image_pad_id == loaded.config.image_token_id
    from vlt.checkpoint.export import read_state
    from vlt.model import VLM
    from vlt.config import VLMConfig
    meta, state = read_state(out)  # for code that builds the model itself (training's init_from)
    VLM(VLMConfig.from_dict(meta["model"])).load_state_dict(state, strict=True)


def test_byte_tokenizer_and_no_tokenizer(student, tmp_path):
    pytest.importorskip("vlt.data.tokenizer")
    _, tok = load_pretrained_vlt(save_pretrained_vlt(student, tmp_path / "b", tokenizer_dir="byte"))
    assert type(tok).__name__ == "ByteTokenizer"
    _, tok = load_pretrained_vlt(save_pretrained_vlt(student, tmp_path / "n"))
    assert tok is None
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        save_pretrained_vlt(student, tmp_path / "x", tokenizer_dir=tmp_path / "n")


def _with_lora(model):
    from peft import LoraConfig, inject_adapter_in_model
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]), model)
    with torch.no_grad():  # a trained adapter: B != 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def test_lora_merged_on_export(student, tmp_path):
    model = _with_lora(student)
    ref = logits(model)
    out = save_pretrained_vlt(model, tmp_path / "merged", merge_lora=True)
    assert json.loads((out / "vlt_config.json").read_text())["lora"] == {"merged": True}
    loaded, _ = load_pretrained_vlt(out)
    assert not any("lora_" in n for n, _ in loaded.named_parameters())
    assert (logits(loaded) - ref).abs().max() < 1e-5 * ref.abs().max()


def test_lora_adapters_saved_separately(student, tmp_path):
    model = _with_lora(student)
    ref = logits(model)
    out = save_pretrained_vlt(model, tmp_path / "adapters")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    loaded, _ = load_pretrained_vlt(out)
    assert any("lora_" in n for n, _ in loaded.named_parameters())
    assert torch.equal(logits(loaded), ref)
    base, _ = load_pretrained_vlt(out, load_adapter=False)
    assert (logits(base) - ref).abs().max() > 1e-3  # the adapters matter, and were kept apart


def test_peft_model_wrapper(student, tmp_path):
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(student, LoraConfig(r=2, target_modules=["q_proj"]))
    out = save_pretrained_vlt(pm, tmp_path / "pm", merge_lora=True)
    loaded, _ = load_pretrained_vlt(out)
    assert loaded.layout == ["swa", "gdn", "gdn", "full"]


def test_load_errors(student, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_pretrained_vlt(tmp_path / "missing")
    out = save_pretrained_vlt(student, tmp_path / "m")
    meta = json.loads((out / "vlt_config.json").read_text())
    meta["model"]["decoder"]["layout"] = "[full] * 4"  # the reference implementation's bug: layout lost
    (out / "vlt_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"does not match.*layers\.1\.mixer"):
        load_pretrained_vlt(out)
    (out / "vlt_config.json").write_text(json.dumps({"architectures": ["X"]}))
    with pytest.raises(ValueError, match="'format': 'vlt'"):
        load_pretrained_vlt(out)
    (out / "vlt_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="vlt_config.json is missing"):
        load_pretrained_vlt(out)
    with pytest.raises(ValueError, match="needs a vlt.model.VLM"):
        save_pretrained_vlt(torch.nn.Linear(2, 2), tmp_path / "lin")
