"""The public API of ``import vlt``: the names are pinned (removing or renaming one is a breaking
change and must fail here), ``import vlt`` stays light, and the helpers defined in vlt/__init__.py
do what their docstrings say."""
import json
import subprocess
import sys

import pytest
import torch

import vlt

PUBLIC = {
    "__version__", "VLMConfig", "NAMED_CONFIGS", "VLM", "create_model", "register_mixer", "create_mixer",
    "list_mixers", "TokenMixer", "save_pretrained", "load_pretrained", "convert_to_student",
    "import_qwen2_5_vl", "InferenceEngine", "generate", "VideoStream", "ChatSession",
}


def test_all_is_pinned():
    assert set(vlt.__all__) == PUBLIC
    assert len(vlt.__all__) == len(PUBLIC)  # no duplicates
    assert set(vlt.__all__) == {"__version__", *vlt._LAZY, *vlt._DEFINED}  # every listed name is served


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_name_resolves_and_is_listed_by_dir(name):
    assert getattr(vlt, name) is not None
    assert name in dir(vlt)


def test_lazy_names_are_the_implementations():
    # the same objects as the modules', so isinstance checks and registries are shared
    from vlt.layers import TokenMixer, register_mixer

    from vlt.config import VLMConfig
    from vlt.inference import InferenceEngine, generate
    from vlt.model import VLM
    assert vlt.VLMConfig is VLMConfig and vlt.VLM is VLM and vlt.TokenMixer is TokenMixer
    assert vlt.register_mixer is register_mixer and vlt.InferenceEngine is InferenceEngine
    assert vlt.generate is generate
    assert {"full", "swa", "gdn", "linear"} <= set(vlt.list_mixers())


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        vlt.no_such_name  # noqa: B018


def test_import_vlt_is_light():
    # a fresh interpreter: this process has torch loaded already
    code = ("import sys, json, vlt; print(json.dumps([m for m in ('torch', 'lightning', 'transformers', "
            "'timm', 'numpy', 'vlt.model', 'vlt.layers') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_create_model_from_name_with_overrides_runs_a_forward():
    torch.manual_seed(0)
    model = vlt.create_model("tiny-hybrid", decoder={"layout": "[swa, gdn]"})
    assert isinstance(model, vlt.VLM)
    assert model.layout == ["swa", "gdn"]
    # merged, not replaced: the other decoder keys of tiny-hybrid are kept
    assert model.config.decoder.hidden_size == 128 and model.config.name == "tiny-hybrid"
    ids = torch.randint(0, 256, (2, 9))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 9, 272)
    assert torch.isfinite(out.loss) and out.loss.item() > 0


def test_create_model_from_config_and_dict_leaves_the_config_alone():
    cfg = vlt.VLMConfig.from_name("tiny-hybrid")
    model = vlt.create_model(cfg, decoder={"layout": "[full]"})
    assert model.layout == ["full"]
    assert cfg.decoder.layout == "[swa, gdn, gdn, gdn]"  # the given config is unchanged
    from_dict = vlt.create_model(cfg.to_dict(), decoder={"hidden_size": 64, "intermediate_size": 128})
    assert from_dict.config.decoder.hidden_size == 64 and from_dict.layout == ["swa", "gdn", "gdn", "gdn"]
    with pytest.raises(ValueError, match="unknown model name"):
        vlt.create_model("no-such-model")
    with pytest.raises(TypeError, match="config name"):
        vlt.create_model(3)


def test_save_and_load_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = vlt.create_model("tiny-hybrid", vision={"kind": "none"}, image_token_id=None,
                             decoder={"layout": "[swa, gdn]"}).eval()
    vlt.save_pretrained(model, tmp_path / "export")
    loaded, tokenizer = vlt.load_pretrained(tmp_path / "export")
    assert tokenizer is None and loaded.layout == ["swa", "gdn"]
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
