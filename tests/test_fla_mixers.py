"""fla layers as vlt mixers (layers/fla_mixers.py): packed final states, engine decode == eager,
each CPU path against an independent fla naive reference, and the user errors. The mixer contract
itself runs on the ones with a CPU path in tests/test_mixers.py, beside the built-in mixers.
The CUDA path (fla's Triton forward and the cache conversion) is not exercised here: no GPU."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from vlt.layers import create_mixer

warnings.filterwarnings("ignore", message=".*Triton.*")
D, H = 32, 4
CASES = {"kda": dict(num_v_heads=8), "deltanet": dict(use_gate=True), "gdn2": dict(num_v_heads=8),
         "gla": dict(num_kv_heads=2, use_short_conv=True), "mamba2": dict(state_size=8, n_groups=2)}
TOL = dict(rtol=1e-5, atol=1e-5)   # the naive references compute in fp32 whatever the input dtype


def make(name, seed=0, **opts):
    torch.manual_seed(seed)
    m = create_mixer(name, hidden_size=D, num_heads=H, **{**CASES[name], **opts})
    with torch.no_grad():  # non-trivial gates so decay and beta both matter
        for gate in ("b_proj", "w_proj", "gk_proj.1"):
            if hasattr(m, gate.split(".")[0]):
                m.get_submodule(gate).weight.normal_(std=0.5)
    return m.double()


# the mixer contract (parallel == recurrent, split prefill, packed == one by one, state bytes,
# gradients) runs on these in tests/test_mixers.py with the built-in mixers; here what is fla's own:
@pytest.mark.parametrize("name", sorted(CASES))
def test_packed_final_states_equal_one_by_one(name):
    m = make(name)
    lengths = [5, 1, 7]
    seqs = [torch.randn(1, n, D, dtype=torch.float64) for n in lengths]
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    packed, states = m(torch.cat(seqs, 1), cu_seqlens=cu, use_cache=True)
    alone = [m(s, use_cache=True) for s in seqs]
    torch.testing.assert_close(packed, torch.cat([a[0] for a in alone], 1), **TOL)
    torch.testing.assert_close(states["ssm"], torch.cat([a[1]["ssm"] for a in alone]), **TOL)


def test_kda_cpu_path_matches_fla_naive_chunk():
    """The mixer's op against fla's *chunked* naive KDA (another algorithm than the recurrence the
    CPU path runs), fed the layer's own q/k/v/g/beta."""
    from fla.ops.kda.gate import naive_kda_gate
    from fla.ops.kda.naive import naive_chunk_kda
    from vlt.kernels import short_conv
    m = make("kda").float()
    B, T = 2, 20
    x = torch.randn(B, T, D)
    with torch.no_grad():
        y, _ = m(x)
        conv = lambda proj, c: short_conv(proj(x), c.weight[:, 0], backend="torch")[0]
        q = F.normalize(conv(m.q_proj, m.q_conv1d).view(B, T, H, -1), dim=-1)
        k = F.normalize(conv(m.k_proj, m.k_conv1d).view(B, T, H, -1), dim=-1)
        v = conv(m.v_proj, m.v_conv1d).view(B, T, m.num_v_heads, -1)
        g = naive_kda_gate(m.f_proj(x).view(B, T, m.num_v_heads, -1), m.A_log, m.dt_bias)
        # GVA: expand q/k to the value heads for the chunked reference
        G = m.num_v_heads // H
        o, _ = naive_chunk_kda(q.repeat_interleave(G, 2), k.repeat_interleave(G, 2), v, g,
                               m.b_proj(x).sigmoid(), chunk_size=4)
        gate = m.g_proj(x).view(B, T, m.num_v_heads, -1)
        o = F.rms_norm(o, (o.shape[-1],), m.o_norm.weight, m.o_norm.eps) * gate.sigmoid()
        ref = m.o_proj(o.reshape(B, T, -1))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_delta_rule_recurrence_the_deltanet_cpu_path_runs_matches_fla_chunkwise():
    """DeltaNet's CPU path runs fla's delta_rule_recurrence; checked here against fla's chunkwise
    form (another algorithm). The layer plumbing around it is covered by the contract tests only."""
    from fla.ops.delta_rule.naive import delta_rule_chunkwise, delta_rule_recurrence
    torch.manual_seed(0)
    q, k, v = torch.randn(2, H, 16, 8), F.normalize(torch.randn(2, H, 16, 8), dim=-1), torch.randn(2, H, 16, 8)
    beta = torch.rand(2, H, 16)
    ref, _ = delta_rule_chunkwise(q, k, v, beta, chunk_size=8)
    rec, _ = delta_rule_recurrence(q, k, v, beta)
    torch.testing.assert_close(rec, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_decode_equals_eager(name):
    """InferenceEngine (GenericStep on the preallocated cache) == the model's eager decode, for a
    batch of two prompts of different lengths (per-row states and counters), after a layout with
    the fla mixer in both layers' positions."""
    from vlt.config import VLMConfig
    from vlt.inference import InferenceEngine, generate, generate_eager
    from vlt.model import VLM
    torch.manual_seed(0)
    model = VLM(VLMConfig.from_name("tiny-hybrid", decoder={"layout": f"[{name}, swa, {name}]",
                                                             "mixers": {name: CASES[name], "swa": {"window": 6}}})).eval()
    prompts = [torch.tensor([3, 4, 5, 6, 7, 8, 9, 10, 11]), torch.tensor([12, 13, 14, 15])]
    refs = [generate_eager(model, ids[None], max_new_tokens=8) for ids in prompts]
    engine = InferenceEngine(model, batch_size=2, capacity=32)
    out = generate(engine, [(ids, None) for ids in prompts], max_new_tokens=8)
    assert torch.equal(out, torch.cat(refs))
    assert len(set(map(tuple, out.tolist()))) == 2   # the two rows differ: a row mix-up would show


def test_gpu_only_mixers_say_so_on_cpu():
    m = create_mixer("rwkv7", hidden_size=D, num_heads=H)
    with pytest.raises(ValueError, match=r"mixer 'rwkv7'.*needs a CUDA device.*run on CPU: "
                                         r"\['deltanet', 'gdn2', 'gla', 'kda', 'mamba2'\]"):
        m(torch.randn(1, 3, D))


def test_generic_fla_class_and_layout():
    from vlt.config import VLMConfig
    cfg = VLMConfig.from_dict(dict(vision=dict(kind="none"), decoder=dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4,
        layout=["kda", {"mixer": "fla:Comba"}, "swa"])))
    assert [n for n, _ in cfg.layers()] == ["kda", "fla:Comba", "swa"]
    m = create_mixer("fla:Comba", hidden_size=D, num_heads=H)
    assert type(m).__name__ == "FlaComba" and "q_proj.weight" in dict(m.named_parameters())


@pytest.mark.parametrize("name,opts,match", [
    ("kda", dict(expand_v=1.3), r"mixer 'kda' .*expand_v=1.3.*allowed options: \[.*'num_v_heads'"),
    ("kda", dict(windoww=3), r"unknown option\(s\) \['windoww'\].*allowed"),
    ("fla:Nope", {}, r"fla.layers has no layer class 'Nope'"),
])
def test_bad_options_fail_before_allocation(name, opts, match, monkeypatch):
    real = []
    orig = torch.nn.Linear.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        if self.weight.device.type != "meta":  # validation builds the fla layer on the meta device
            real.append(a)
    monkeypatch.setattr(torch.nn.Linear, "__init__", spy)
    with pytest.raises(ValueError, match=match):
        create_mixer(name, hidden_size=D, num_heads=H, **opts)
    assert real == []
