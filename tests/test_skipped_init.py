"""vlt.model.skipped_init: a model built with torch.nn.init's initialisers switched off and then loaded
from a normally built one's state dict equals it in every parameter and every buffer (persistent or
not), for every mixer vlt registers and fla's, and the training modules use it only where init_from
loads every parameter next."""
import pytest
import torch
from torch import nn

from vlt.config import VLMConfig
from vlt.layers import create_mixer
from vlt.model import VLM, skipped_init

FLA = {"kda": dict(num_v_heads=8), "deltanet": dict(use_gate=True), "gdn2": dict(num_v_heads=8),
       "gla": dict(num_kv_heads=2, use_short_conv=True), "mamba2": dict(state_size=64), "rwkv7": {},
       "nsa": dict(num_heads=16, num_kv_heads=1, head_dim=64, block_size=64, block_counts=4, window_size=128),
       "moba": dict(num_kv_heads=2, moba_chunk_size=64, moba_topk=2)}
VLT = {"full": {}, "swa": {}, "linear": {}, "gdn": {}, "swa_gdn": {},
       "hybrid": dict(branches=[{"mixer": "swa"}, {"mixer": "gdn"}])}


def same(a: nn.Module, b: nn.Module):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())   # non-persistent ones too (never loaded)
    assert ba.keys() == bb.keys()
    for k in ba:
        assert torch.equal(ba[k], bb[k]), k


@pytest.mark.parametrize("name", [*VLT, *FLA])
def test_a_mixer_built_without_init_then_loaded_equals_the_original(name):
    opts = {"hidden_size": 64, "num_heads": 4, **VLT.get(name, {}), **FLA.get(name, {})}
    torch.manual_seed(0)
    ref = create_mixer(name, **opts)
    with skipped_init():
        m = create_mixer(name, **opts)
    m.load_state_dict(ref.state_dict())   # strict: every persistent tensor
    same(m, ref)


def test_a_whole_vlm_and_the_initialisers_come_back():
    cfg = VLMConfig.from_name("tiny-hybrid", decoder={"layout": "[swa, gdn, kda, full]"})
    torch.manual_seed(0)
    ref = VLM(cfg)
    saved = nn.init.kaiming_uniform_
    with skipped_init():
        assert nn.init.kaiming_uniform_ is not saved
        m = VLM(cfg)
    assert nn.init.kaiming_uniform_ is saved
    # without the initialisers nothing is drawn: the global generator is where it was
    state = torch.get_rng_state()
    with skipped_init():
        nn.Linear(8, 8)
    assert torch.equal(torch.get_rng_state(), state)
    m.load_state_dict(ref.state_dict())
    same(m, ref)
    ids = torch.randint(0, 200, (1, 12))
    assert torch.equal(m(ids).logits, ref(ids).logits)
    with pytest.raises(RuntimeError), skipped_init():   # restored after an error too
        raise RuntimeError("boom")
    assert nn.init.kaiming_uniform_ is saved and nn.init.normal_ is not None
    with skipped_init(enabled=False):
        assert nn.init.kaiming_uniform_ is saved


def test_training_modules_skip_init_only_with_init_from(tmp_path, monkeypatch):
    """InstructionTuning from init_from builds with the initialisers off and ends equal to the export it
    loaded; without init_from the random init runs (seeded: two builds equal)."""
    import vlt.training.base as base
    from vlt.checkpoint.export import save_pretrained_vlt
    from vlt.training import InstructionTuning
    calls = []

    def spy(enabled=True):
        calls.append(enabled)
        return skipped_init(enabled)
    monkeypatch.setattr(base, "skipped_init", spy)
    torch.manual_seed(0)
    a = InstructionTuning(model_name="tiny-hybrid", lr=1e-3)
    torch.manual_seed(0)
    b = InstructionTuning(model_name="tiny-hybrid", lr=1e-3)
    same(a.model, b.model)
    path = save_pretrained_vlt(a.model, tmp_path / "exp")
    c = InstructionTuning(init_from=str(path))
    same(c.model, a.model)
    assert calls == [False, False, True]


def test_the_qwen_vision_tower_built_without_init_then_loaded_equals_the_original(teacher_dir):
    """The Qwen2.5-VL tower (transformers' modules, the MLP held in 64-aligned buffers its parameters
    are views of) built with the initialisers off, then loaded: equal tensors and equal features."""
    from vlt.convert import import_qwen2_5_vl
    ref = import_qwen2_5_vl(teacher_dir)
    with skipped_init():
        m = VLM(ref.config)
    m.load_state_dict(ref.state_dict())
    same(m, ref)
    torch.manual_seed(0)
    image = torch.randn(3, 56, 84)
    with torch.no_grad():
        assert torch.equal(m.vision([image]), ref.vision([image]))
