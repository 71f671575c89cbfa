"""Registry, layouts and config validation: user errors are ValueErrors naming key and allowed values."""
import pytest
import torch

from vlt.config import VLMConfig
from vlt.layers import TokenMixer, create_mixer, list_mixers, register_mixer
from vlt.layout import parse_pattern


@register_mixer("test_identity_mixer")
class IdentityMixer(TokenMixer):
    """A user's own mixer defined outside vlt (here: in a test module)."""

    def __init__(self, hidden_size: int, scale: float = 1.0, layer_idx: int | None = None):
        super().__init__()
        self.proj = torch.nn.Linear(hidden_size, hidden_size)
        self.scale = scale

    def forward(self, x, *, state=None, cu_seqlens=None, position_ids=None, use_cache=False):
        return self.proj(x) * self.scale, ({} if use_cache else None)

    def state_size(self, batch_size, seq_len, dtype=torch.bfloat16):
        return 0


def tiny(**decoder):
    base = dict(vision=dict(kind="none"), decoder=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                       num_heads=4, layout="[swa, gdn]"))
    base["decoder"].update(decoder)
    return VLMConfig.from_dict(base)


def test_builtin_mixers_registered():
    assert {"full", "swa", "linear", "gdn", "hybrid", "swa_gdn"} <= set(list_mixers())


def test_user_mixer_by_name_and_by_class_path():
    cfg = tiny(layout=["test_identity_mixer", {"mixer": f"{__name__}.IdentityMixer", "scale": 2.0}])
    from vlt.model import VLM
    m = VLM(cfg)
    assert [type(b.mixer) for b in m.layers] == [IdentityMixer, IdentityMixer]
    assert m.layers[1].mixer.scale == 2.0
    m(torch.randint(0, 64, (1, 5)))


def test_unknown_mixer_lists_registered():
    with pytest.raises(ValueError, match=r"decoder.layout\[1\].*unknown mixer 'gnd'.*registered mixers.*gdn"):
        tiny(layout="[swa, gnd]")
    with pytest.raises(ValueError, match="unknown mixer"):
        create_mixer("nope", hidden_size=8)


@pytest.mark.parametrize("pattern,expected", [
    ("[swa, gdn, gdn, gdn] * 2", ["swa", "gdn", "gdn", "gdn"] * 2),
    ("[full] * 2 + [gdn] * 3", ["full"] * 2 + ["gdn"] * 3),
    ("gdn * 3", ["gdn"] * 3),
    ("3 * [swa, linear]", ["swa", "linear"] * 3),
    ("[swa, fla:Comba] * 2", ["swa", "fla:Comba"] * 2),     # any fla layer by class name
])
def test_pattern_parsing(pattern, expected):
    assert parse_pattern(pattern) == expected


@pytest.mark.parametrize("decoder,match", [
    (dict(layout="[swa, gdn] * 2", num_layers=3), r"num_layers=3 but decoder.layout describes 4"),
    (dict(layout=[{"mixer": "swa", "window": 0}]), r"layout\[0\].*window must be a positive integer"),
    (dict(layout=[{"mixer": "swa", "window": "big"}]), r"window must be a positive integer"),
    (dict(num_heads=5), r"num_heads=5 does not divide hidden_size=32"),
    (dict(num_kv_heads=3), r"num_kv_heads=3 must divide num_heads=4"),
    (dict(layout=[{"mixer": "gdn", "windoww": 3}]), r"unknown option\(s\) \['windoww'\].*allowed"),
    (dict(mixers={"swa": {"windw": 8}}), r"^decoder.mixers.swa.windw: .*did you mean 'window'.*allowed"),
    (dict(mixers={"sw": {"window": 8}}), r"decoder.mixers has options for unknown mixer 'sw'"),
    (dict(layout="[swa, gdn) * 2"), r"cannot parse pattern"),
    (dict(layout="[swa, gdn] * 0"), r"repeat count"),
    (dict(layout=[{"mixer": "linear", "feature_map": "tanh"}]), r"feature_map='tanh'; allowed"),
    (dict(layout=[{"mixer": "hybrid", "branches": ["swa"]}]), r"at least two mixers"),
    (dict(mrope_section=[4, 4, 4]), r"mrope_section .* must sum to head_dim/2"),
])
def test_bad_layouts_fail_before_allocation(decoder, match, monkeypatch):
    # Any parameter allocation before validation would show up as a Linear being constructed.
    built = []
    orig = torch.nn.Linear.__init__
    monkeypatch.setattr(torch.nn.Linear, "__init__", lambda self, *a, **k: (built.append(a), orig(self, *a, **k))[1])
    with pytest.raises(ValueError, match=match):
        tiny(**decoder)
    assert built == []


def test_unknown_config_keys():
    with pytest.raises(ValueError, match=r"decoder.hiden_size.*allowed under decoder"):
        VLMConfig.from_dict(dict(vision=dict(kind="none"), decoder=dict(hiden_size=3)))
    with pytest.raises(ValueError, match=r"vision.kind='clip'; allowed"):
        VLMConfig.from_dict(dict(vision=dict(kind="clip")))


def test_config_round_trip_exact(tmp_path):
    cfg = VLMConfig.from_name("tiny-hybrid", decoder={"layout": ["swa", {"mixer": "gdn", "expand_v": 1.0},
                                                                 {"mixer": "swa_gdn", "window": 7}, "linear"]})
    cfg.save(tmp_path / "c.json")
    back = VLMConfig.load(tmp_path / "c.json")
    assert back == cfg and back.layers() == cfg.layers()
    assert [n for n, _ in back.layers()] == ["swa", "gdn", "swa_gdn", "linear"]
    assert back.layers()[2][1]["window"] == 7


def test_infinitevl_layout():
    cfg = VLMConfig.from_name("infinitevl-4b")
    layers = cfg.layers()
    assert len(layers) == 36
    assert [i for i, (n, _) in enumerate(layers) if n == "swa"] == list(range(0, 36, 4))
    swa = layers[0][1]
    assert (swa["window"], swa["num_kv_heads"], swa["head_dim"], swa["qkv_bias"]) == (8192, 2, 128, True)
    assert layers[1][1]["expand_v"] == 2.0
