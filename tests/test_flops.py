"""vlt.training.flops against torch's FlopCounterMode on a tiny VLM (timm tower + merger + two
full-attention blocks): every matrix product, forward and backward for several choices of what
trains (FlopCounterMode counts the products autograd actually runs, so 'backward only for what
trains' is checked, not assumed). The sequence terms, which FlopCounterMode does not see on the
CPU's attention path, are checked against hand counts."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlt.config import VLMConfig
from vlt.model import VLM
from vlt.training.flops import StepFlops, mixer_seq_flops, peak_tflops_for, segment_lengths
from vlt.training.freezing import apply_trainable

T = 40


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = VLMConfig.from_name("tiny-hybrid", decoder={"layout": "[full, full]", "hidden_size": 64,
                                                      "intermediate_size": 96, "num_heads": 4, "num_kv_heads": 2})
    return VLM(cfg)


def _batch(model):
    ids = torch.randint(0, 200, (1, T), generator=torch.Generator().manual_seed(1))
    ids[0, 3:7] = model.config.image_token_id  # one 56x56 image: 4 LLM tokens
    return ids, [torch.randn(3, 56, 56)]


def _seq(fl):
    return sum(f + b for k, (f, b) in fl.parts.items() if k.endswith(("seq", "attention")))


@pytest.mark.parametrize("trainable", [["all"], ["mlps"], ["layers.1.mlp.*"], ["projector"], ["layers.0.mixer.*"]])
def test_step_flops_match_flop_counter(model, trainable):
    apply_trainable(model, trainable)
    ids, images = _batch(model)
    with FlopCounterMode(display=False) as fc:
        out = model(ids, images=images)
        out.logits.float().square().mean().backward()  # any scalar of every row's logits
    model.zero_grad(set_to_none=True)
    fl = StepFlops()
    fl.add_model(model, [T], [(56, 56)], T)
    assert fc.get_total_flops() == pytest.approx(fl.total - _seq(fl), rel=1e-12)
    assert sum(b for b in (v[1] for v in fl.parts.values())) > 0  # something trains in every case


def test_sequence_terms_by_hand(model):
    fl = StepFlops()
    fl.add_model(model, [T], [(56, 56)], T, backward=False)
    H, hd = 4, 16
    assert fl.parts["mixer:full:seq"][0] == 2 * 4 * H * hd * T * (T + 1) / 2  # causal: keys 1..T per query
    assert fl.parts["vision:attention"][0] == 2 * 4 * 64 * 16 ** 2  # 2 timm blocks, 16 patches, all pairs
    # packed samples attend within themselves only
    two = mixer_seq_flops(model.layers[0].mixer, [10, 30])
    assert two == 4 * H * hd * (10 * 11 / 2 + 30 * 31 / 2)


def test_window_and_gdn_terms():
    cfg = VLMConfig.from_name("tiny-hybrid", decoder={"layout": "[swa, gdn]", "mixers": {"swa": {"window": 8}}})
    m = VLM(cfg)
    swa, gdn = m.layers[0].mixer, m.layers[1].mixer
    # T=20, W=8: queries 1..8 see 1..8 keys, the 12 after see 8
    assert mixer_seq_flops(swa, [20]) == 4 * swa.num_heads * swa.head_dim * (8 * 9 / 2 + 12 * 8)
    K, V, H = gdn.head_k_dim, gdn.head_v_dim, gdn.num_v_heads
    assert mixer_seq_flops(gdn, [100]) == 2 * H * 100 * (3 * 64 * K + 2 * 64 * V + 3 * K * V)  # linear in T


def test_lora_counts_input_grads_but_adapter_weight_grads_only(model):
    from vlt.lora import apply_lora
    import copy
    m = copy.deepcopy(model)
    apply_lora(m, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    apply_trainable(m, ["lora"])
    ids, images = _batch(m)
    with FlopCounterMode(display=False) as fc:
        m(ids, images=images).logits.float().square().mean().backward()
    fl = StepFlops()
    fl.add_model(m, [T], [(56, 56)], T)
    assert fc.get_total_flops() == pytest.approx(fl.total - _seq(fl), rel=1e-12)
    assert fl.parts["vision"][1] == 0 and fl.parts["mlp"][1] > 0  # frozen tower: forward only


def test_segments_and_peaks():
    cu = torch.tensor([0, 5, 12, 12, 20], dtype=torch.int32)
    assert segment_lengths({"cu_seqlens": cu, "input_ids": torch.zeros(1, 20)}) == [5, 7, 8]
    assert segment_lengths({"input_ids": torch.zeros(3, 7)}) == [7, 7, 7]
    assert peak_tflops_for("NVIDIA H200")[0] == 989.4 and peak_tflops_for("NVIDIA H100 PCIe")[0] == 756.0
    assert peak_tflops_for("cpu") == (None, None)
