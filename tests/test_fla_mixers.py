"""fla layers as vlt mixers (layers/fla_mixers.py): packed final states, engine decode == eager,
each CPU path against an independent fla naive reference, and the user errors. The mixer contract
itself runs on the ones with a CPU path in tests/test_mixers.py, beside the built-in mixers.
The CUDA path (fla's Triton forward and the cache conversion) is not exercised here: no GPU."""
import warnings
from contextlib import nullcontext
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from numerics import perturb_fla_init
from vlt.layers import create_mixer

warnings.filterwarnings("ignore", message=".*Triton.*")
D, H = 32, 4
CASES = {"kda": dict(num_v_heads=8), "deltanet": dict(use_gate=True), "gdn2": dict(num_v_heads=8),
         "gla": dict(num_kv_heads=2, use_short_conv=True), "mamba2": dict(state_size=8, n_groups=2),
         "rwkv7": {}}
TOL = dict(rtol=1e-5, atol=1e-5)   # the naive references compute in fp32 whatever the input dtype


def make(name, seed=0, **opts):
    torch.manual_seed(seed)
    m = create_mixer(name, hidden_size=D, num_heads=H, **{**CASES[name], **opts})
    perturb_fla_init(m)
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


def _convs(m, x):
    from vlt.kernels import short_conv
    return [short_conv(proj(x), c.weight[:, 0], backend="torch")[0]
            for proj, c in ((m.q_proj, m.q_conv1d), (m.k_proj, m.k_conv1d), (m.v_proj, m.v_conv1d))]


def test_gdn2_cpu_path_matches_fla_naive_chunk():
    """GDN-2's recurrence against fla's chunked (WY) naive form, fed the layer's own inputs."""
    from fla.ops.gdn2.naive import naive_chunk_gdn2
    m = make("gdn2", expand_v=2.0).float()
    B, T, G = 2, 20, m.num_v_heads // H
    x = torch.randn(B, T, D)
    with torch.no_grad():
        y, _ = m(x)
        q, k, v = _convs(m, x)
        q, k = (F.normalize(t.view(B, T, H, -1), dim=-1).repeat_interleave(G, 2) for t in (q, k))
        g = -m.A_log.exp()[:, None] * F.softplus(m.f_proj(x) + m.dt_bias).view(B, T, H, -1)
        b = m.b_proj(x).sigmoid().view(B, T, H, -1).repeat_interleave(G, 2)
        w = m.w_proj(x).sigmoid().view(B, T, m.num_v_heads, -1)
        o, _ = naive_chunk_gdn2(q, k, v.view(B, T, m.num_v_heads, -1), g.repeat_interleave(G, 2), b, w, chunk_size=4)
        gate = m.g_proj(x).view(B, T, m.num_v_heads, -1)
        o = F.rms_norm(o, (o.shape[-1],), m.o_norm.weight, m.o_norm.eps) * gate.sigmoid()
        ref = m.o_proj(o.reshape(B, T, -1))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_gla_cpu_path_matches_quadratic_form():
    """GLA's recurrence against its closed (attention-like) form, O(T^2), written out here:
    o_t = sum_{s<=t} (q_t * exp(G_t - G_s) . k_s) v_s / sqrt(K), G the cumulative log-gates."""
    m = make("gla").float()
    B, T, Gr = 2, 15, m.num_kv_groups
    x = torch.randn(B, T, D)
    with torch.no_grad():
        y, _ = m(x)
        q, k, v = _convs(m, x)
        q = q.view(B, T, H, -1)
        k = k.view(B, T, H // Gr, -1).repeat_interleave(Gr, 2)
        v = v.view(B, T, H // Gr, -1).repeat_interleave(Gr, 2)
        gk = F.logsigmoid(m.gk_proj(x).view(B, T, H // Gr, -1).repeat_interleave(Gr, 2)) / m.gate_logit_normalizer
        Gc = gk.cumsum(1)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        diff = (Gc[:, :, None] - Gc[:, None, :]).masked_fill(~causal[None, :, :, None, None], -torch.inf)
        A = torch.einsum("bthk,bshk,btshk->bhts", q, k, diff.exp()) * q.shape[-1] ** -0.5
        o = torch.einsum("bhts,bshv->bthv", A, v)
        gate = m.g_proj(x).view(B, T, H, -1)
        o = F.rms_norm(o, (o.shape[-1],), m.g_norm_swish_gate.weight, m.g_norm_swish_gate.eps) * F.silu(gate)
        ref = m.o_proj(o.reshape(B, T, -1))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_mamba2_path_matches_fla_torch_forward():
    """mamba2 (SSD on vlt's chunked linear-attention kernel) against fla's own Mamba2.torch_forward:
    its naive segment-sum SSD for the prefill and its single-token recurrence for decode. fla's
    Triton activation and gated norm are swapped for their torch forms (fla's rms_norm_ref) so it
    runs on CPU. One B/C group: fla's torch prefill tiles groups over heads where its decode and
    mamba_ssm's kernels (and vlt) give head h group h // (heads / groups)."""
    from fla.modules.norm.layernorm_gated import rms_norm_ref
    m = make("mamba2", n_groups=1, chunk_size=8)
    with torch.no_grad():
        m.D.normal_()
    x, xn = torch.randn(2, 21, D, dtype=torch.float64), torch.randn(2, 1, D, dtype=torch.float64)
    with torch.no_grad():
        y, state = m(x, use_cache=True)
        y1, state1 = m.step(xn, state)
        norm = m.norm

        class RefNorm(torch.nn.Module):
            def forward(self, y, z):
                return rms_norm_ref(y, norm.weight, None, z=z, eps=norm.eps, group_size=norm.group_size,
                                    norm_before_gate=norm.norm_before_gate)
        m.act, m._modules["norm"] = F.silu, RefNorm()
        fla_forward = type(m).fla_class.torch_forward
        ref, conv, ssm = fla_forward(m, x, None, use_cache=True)
        ref1, _, ssm1 = fla_forward(m, xn, {"conv_state": conv.clone(), "recurrent_state": ssm.clone()}, use_cache=True)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    # fp32, same [B, H, head_dim, N] layout
    torch.testing.assert_close(state["ssm"], ssm.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["conv"], conv[..., 1:])              # fla keeps one more (unread) input
    torch.testing.assert_close(y1, ref1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state1["ssm"], ssm1.float(), rtol=1e-5, atol=1e-6)


def test_rwkv7_cpu_path_matches_fla_layer_forward(monkeypatch):
    """rwkv7's CPU path against fla's own RWKV7Attention.forward (the layer's plumbing: token shift,
    LoRAs, k update, norm, output correction), its Triton pieces swapped for fla's torch references
    and chunk_rwkv7 for fla's *chunkwise* naive DPLR form (another algorithm than the recurrence the
    CPU path runs). Final states (token shift and matrix) compared too."""
    import fla.layers.rwkv7 as fla_rwkv7
    from fla.modules.token_shift import token_shift_ref
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_chunkwise
    from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7
    from fla.ops.rwkv7.fused_k_update import k_update_ref
    from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref

    def chunk_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state, **_):
        K = r.shape[-1]
        o, S = dplr_chunkwise(*(t.transpose(1, 2) for t in (r * scale * K ** 0.5, k, v, a, b, w)),
                              initial_state=initial_state, output_final_state=True, chunk_size=4)
        return o.transpose(1, 2), S
    monkeypatch.setattr(fla_rwkv7, "token_shift", lambda x, cu, output_cache, cache: (token_shift_ref(x), x[:, -1]))
    monkeypatch.setattr(fla_rwkv7, "fused_addcmul_rwkv7", torch_addcmul_rwkv7)
    monkeypatch.setattr(fla_rwkv7, "fused_k_rwkv7", lambda k, a, ka, *_: k_update_ref(k, a, ka))
    monkeypatch.setattr(fla_rwkv7, "gate_output_correction", gate_output_correction_ref)
    monkeypatch.setattr(fla_rwkv7, "chunk_rwkv7", chunk_rwkv7)
    m = make("rwkv7").float()
    x = torch.randn(2, 20, D)
    with torch.no_grad():
        y, state = m(x, use_cache=True)
        cache = __import__("vlt.layers.fla_mixers", fromlist=["OneLayerCache"]).OneLayerCache()
        ref = type(m).fla_class.forward(m, x, past_key_values=cache, use_cache=True)[0]
    assert y.abs().mean() > 1e-3   # not the zero output of fla's init (o_proj zero): make() perturbs it
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state["ssm"], cache.state["recurrent_state"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state["shift"], cache.state["conv_state"])


def _teacher():
    from vlt.config import VLMConfig
    from vlt.model import VLM
    torch.manual_seed(0)
    return VLM(VLMConfig.from_name("tiny-hybrid", decoder={"hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
                                                           "num_kv_heads": 2, "layout": "[full] * 3"}))


def test_transfer_from_attention_into_kda_and_gdn2():
    """Stage I conversion: q/k/v/o copied from the teacher's attention (KV heads repeated over the
    query heads; GDN-2 with expand_v 2 gets each teacher head in the first head_dim channels of its
    value head and silent o_proj columns for the rest), the gates at the mimic init."""
    from vlt.convert import convert_to_student
    teacher = _teacher()
    student, new = convert_to_student(teacher, "[kda, gdn2, full]", mixers={"gdn2": {"expand_v": 2.0}}, init="transfer")
    Hq, Hkv, d, Dm = 4, 2, 8, 32
    for i in (0, 1):
        t, s = teacher.layers[i].mixer, student.layers[i].mixer
        assert torch.equal(s.q_proj.weight, t.q_proj.weight)
        k_rep = t.k_proj.weight.view(Hkv, d, Dm).repeat_interleave(Hq // Hkv, 0).reshape(Hq * d, Dm)
        assert torch.equal(s.k_proj.weight, k_rep)
        assert f"layers.{i}.mixer.q_proj.weight" not in new and f"layers.{i}.mixer.f_proj.1.weight" in new
    kda, gdn2 = student.layers[0].mixer, student.layers[1].mixer
    v_rep = teacher.layers[0].mixer.v_proj.weight.view(Hkv, d, Dm).repeat_interleave(Hq // Hkv, 0)
    assert torch.equal(kda.v_proj.weight, v_rep.reshape(Hq * d, Dm))
    assert torch.equal(kda.o_proj.weight, teacher.layers[0].mixer.o_proj.weight)
    v = gdn2.v_proj.weight.view(Hq, 2 * d, Dm)
    assert torch.equal(v[:, :d], teacher.layers[1].mixer.v_proj.weight.view(Hkv, d, Dm).repeat_interleave(2, 0))
    o = gdn2.o_proj.weight.view(Dm, Hq, 2 * d)
    assert torch.equal(o[:, :, :d], teacher.layers[1].mixer.o_proj.weight.view(Dm, Hq, d))
    assert torch.count_nonzero(o[:, :, d:]) == 0
    assert "layers.1.mixer.v_proj.weight" in new   # only partly from the teacher: it must train


@pytest.mark.parametrize("init", ["mimic", "transfer"])
def test_converted_kda_gdn2_student_runs_with_mimic_gates(init):
    from fla.ops.kda.gate import naive_kda_gate
    from vlt.convert import convert_to_student
    student, new = convert_to_student(_teacher(), "[kda, gdn2, full]", init=init)
    x = torch.randn(1, 6, 32)
    for m in (student.layers[0].mixer, student.layers[1].mixer):
        # beta (and GDN-2's write gate) 0.5, decay exp(-1e-3) per channel, identity convs
        assert torch.count_nonzero(m.b_proj.weight) == 0 and torch.count_nonzero(m.A_log) == 0
        assert torch.equal(m.q_conv1d.weight[:, 0, -1], torch.ones(m.key_dim))
        assert torch.count_nonzero(m.q_conv1d.weight[:, 0, :-1]) == 0
        g = naive_kda_gate(m.f_proj(x).view(1, 6, -1, m.head_k_dim), m.A_log, m.dt_bias)
        torch.testing.assert_close(g, torch.full_like(g, -1e-3), rtol=1e-4, atol=0)
    assert torch.count_nonzero(student.layers[1].mixer.w_proj.weight) == 0
    assert (init == "mimic") == ("layers.0.mixer.q_proj.weight" in new)
    ids = torch.randint(0, 200, (2, 12))
    out = student(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    params = dict(student.named_parameters())
    assert all(params[n].grad is not None for n in new)
    assert params["layers.0.mixer.o_proj.weight"].grad.abs().sum() > 0


def test_rwkv7_layers_are_each_their_own_first_layer():
    """The documented limitation (layers/fla_mixers.py): no value residual across vlt layers -
    each rwkv7 mixer is built as RWKV-7's layer 0, so it has no v_lora and needs no v_first."""
    m = create_mixer("rwkv7", hidden_size=D, num_heads=H, layer_idx=5)
    assert m.layer_idx == 0 and m.vlt_layer_idx == 5 and not hasattr(m, "v_lora")
    spec = m.state_spec(2, 10, torch.bfloat16)
    assert spec["shift"].shape == (2, D) and spec["ssm"].shape == (2, H, D // H, D // H)


def test_what_fla_refuses_on_cuda_is_a_clear_error_first():
    """Found on an H200: fla's MoBA and NSA's sliding window call flash-attn (a None called when it is
    missing), and its chunk DeltaNet asserts on float32; vlt names the problem and the fix first."""
    from vlt.layers.fla_mixers import flash_attn_installed
    dn = create_mixer("deltanet", hidden_size=D, num_heads=H)
    with pytest.raises(ValueError, match=r"mixer 'deltanet'.*refuses float32.*bf16-mixed.*gdn, gdn2, kda"):
        dn.check_fla_can_run(torch.randn(1, 65, D), None)
    dn.check_fla_can_run(torch.randn(1, 64, D), None)                 # fla's fused recurrent: float32 is fine
    dn.check_fla_can_run(torch.randn(1, 65, D, dtype=torch.bfloat16), None)
    with torch.autocast("cpu", dtype=torch.bfloat16):                  # bf16-mixed: the projections are bf16
        dn.check_fla_can_run(torch.randn(1, 65, D), None)
    nsa0 = create_mixer("nsa", hidden_size=D, num_heads=16, num_kv_heads=1, head_dim=8, window_size=0)
    nsa0.check_fla_can_run(torch.randn(1, 8, D), None)
    if flash_attn_installed():
        pytest.skip("flash-attn is installed: the two flash-attn errors cannot occur here")
    nsa = create_mixer("nsa", hidden_size=D, num_heads=16, num_kv_heads=1, head_dim=8)   # fla's window: 512
    with pytest.raises(ValueError, match=r"mixer 'nsa'.*window_size=512.*flash-attn.*window_size: 0"):
        nsa.check_fla_can_run(torch.randn(1, 8, D), None)
    m = create_mixer("moba", hidden_size=D, num_heads=H)
    with pytest.raises(ValueError, match=r"mixer 'moba'.*parallel_moba.*flash-attn is not installed"):
        m.check_fla_can_run(torch.randn(1, 8, D), None)
    state = {"k": torch.zeros(1, 3, D), "v": torch.zeros(1, 3, D), "seen": 3}
    with pytest.raises(ValueError, match=r"mixer 'moba'.*flash_attn_func.*flash-attn is not installed"):
        m.fla_forward(torch.randn(1, 1, D), state, None, True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_decode_equals_eager(name):
    """InferenceEngine (GenericStep on the preallocated cache) == the model's eager decode, for a
    batch of two prompts of different lengths (per-row states and counters), after a layout with
    the fla mixer in both layers' positions."""
    from vlt.config import VLMConfig
    from vlt.inference import InferenceEngine, generate, generate_eager
    from vlt.model import VLM
    torch.manual_seed(0)
    dec = {"layout": f"[{name}, swa, {name}]", "mixers": {name: CASES[name], "swa": {"window": 6}}}
    model = VLM(VLMConfig.from_name("tiny-hybrid", decoder=dec)).eval()
    prompts = [torch.tensor([3, 4, 5, 6, 7, 8, 9, 10, 11]), torch.tensor([12, 13, 14, 15])]
    refs = [generate_eager(model, ids[None], max_new_tokens=8) for ids in prompts]
    engine = InferenceEngine(model, batch_size=2, capacity=32)
    out = generate(engine, [(ids, None) for ids in prompts], max_new_tokens=8)
    assert torch.equal(out, torch.cat(refs))
    assert len(set(map(tuple, out.tolist()))) == 2   # the two rows differ: a row mix-up would show


@pytest.mark.parametrize("name", ["kda", "mamba2"])
def test_engine_with_compiled_generic_step_equals_eager(name):
    """The engine compiles its generic step on CUDA; Dynamo's eager backend on the CPU traces the same
    code (fla_forward is kept out of the graph: fla's Triton launchers are not traceable)."""
    from vlt.config import VLMConfig
    from vlt.inference import InferenceEngine, generate, generate_eager
    from vlt.model import VLM
    torch.manual_seed(0)
    dec = {"layout": f"[{name}, swa]", "mixers": {name: CASES[name], "swa": {"window": 6}}}
    model = VLM(VLMConfig.from_name("tiny-hybrid", decoder=dec)).eval()
    ids = torch.tensor([3, 4, 5, 6, 7, 8])
    ref = generate_eager(model, ids[None], max_new_tokens=6)
    assert torch.equal(generate(InferenceEngine(model, capacity=32, compile="eager"), [(ids, None)],
                                max_new_tokens=6), ref)


def test_nsa_head_grouping_is_checked_with_the_options():
    """Found by `vlt bench mixers` on an H200: 16 heads over 2 key/value heads built, then fla's kernel asserted
    "Group size (HQ/H) must be a power of 2 and >= 16" at the first forward."""
    for heads, kv in ((16, 2), (24, 1), (4, 1)):
        with pytest.raises(ValueError, match=rf"mixer 'nsa'.*{heads} / {kv}.*power of 2 and >= 16.*num_kv_heads: 1"):
            create_mixer("nsa", hidden_size=D, num_heads=heads, num_kv_heads=kv, head_dim=8)
    create_mixer("nsa", hidden_size=D, num_heads=32, num_kv_heads=2, head_dim=8)


def test_gpu_only_mixers_say_so_on_cpu():
    m = create_mixer("nsa", hidden_size=D, num_heads=16, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match=r"mixer 'nsa'.*needs a CUDA device.*run on CPU: "
                                         r"\['deltanet', 'gdn2', 'gla', 'kda', 'mamba2', 'rwkv7'\]"):
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


@pytest.mark.slow
def test_quickstart_with_kda_hybrid_layout_learns(tmp_path, monkeypatch):
    """`vlt fit --config quickstart --config layouts/kda_hybrid` at a test size (hidden 64, 96-token
    packed rows, 400 steps; ~1 min on 2 CPU cores): answer accuracy must rise well above chance (1/8)
    and the validation loss fall. Measured (acc at steps 100-400, val loss at 100 and 400): seed 0
    0.20 / 0.25 / 0.80 / 1.00; seeds 1-3 (same data) 0.16 / 0.22 / 0.45 / 0.63 (loss 0.49 -> 0.13),
    0.20 / 0.48 / 0.52 / 0.91 (0.36 -> 0.03), 0.22 / 0.11 / 0.52 / 0.63 (0.39 -> 0.12). When it learns
    is seed-dependent (another CPU's rounding is another draw), so the bounds leave that room."""
    import csv
    import json

    from vlt.cli import main
    monkeypatch.chdir(tmp_path)
    spec = {"task": "color", "num_train": 2000, "num_val": 64, "image_size": 28, "seed": 0,
            "cache_dir": str(tmp_path / "synth")}
    main(["fit", "--config", "quickstart", "--config", "layouts/kda_hybrid",
          '--model.init_args.model={"decoder": {"hidden_size": 64, "intermediate_size": 128, "num_heads": 4, '
          '"num_kv_heads": 2}}',
          f"--data.init_args.synthetic={json.dumps(spec)}", "--data.init_args.max_length=96",
          "--data.init_args.batch_size=4", "--data.init_args.num_workers=0", "--trainer.max_steps=400",
          "--trainer.val_check_interval=100", "--trainer.limit_val_batches=16", "--trainer.accelerator=cpu",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    run = tmp_path / "lightning_logs" / "version_0"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["vlt_layout"] == ["swa", "kda", "kda", "kda"]
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val/answer_acc")]
    acc = [float(r["val/answer_acc"]) for r in rows]
    loss = [float(r["val/loss"]) for r in rows]
    assert len(acc) == 4, rows
    assert acc[-1] >= 0.5 and acc[-1] >= acc[0] + 0.25, acc     # chance is 0.125
    assert loss[-1] < loss[0] / 2, loss


@pytest.mark.parametrize("recipe", ["kda_hybrid", "mamba2_hybrid"])
def test_layout_recipes_build_and_train_a_step(recipe):
    import pathlib

    import yaml

    from vlt.config import VLMConfig
    from vlt.model import VLM
    args = yaml.safe_load(open(pathlib.Path(__file__).parents[1] / "recipes" / "layouts" / f"{recipe}.yaml"))
    args = args["model"]["init_args"]
    torch.manual_seed(0)
    model = VLM(VLMConfig.from_name("tiny-hybrid", decoder={"hidden_size": 32, "intermediate_size": 64,
                                                            "layout": args["layout"], "mixers": args["mixers"]}))
    assert [b.mixer_name for b in model.layers][1:] == [recipe.split("_")[0]] * 3
    ids = torch.randint(0, 200, (2, 10))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    out_proj = "o_proj" if recipe == "kda_hybrid" else "out_proj"   # fla's names: Mamba2 has in_proj/out_proj
    assert getattr(model.layers[1].mixer, out_proj).weight.grad.abs().sum() > 0


def test_bench_rows_for_fla_mixers_on_cpu():
    """`vlt bench mixers` for fla mixers: the CUDA branch's row logic (vlt forward vs fla's layer
    forward, state bytes, the 1.10x goal) run on the CPU with the timer stubbed; fla's own forward
    cannot run here (Triton), which must come back as the raw rows' errors, not a crash."""
    import argparse

    from vlt.bench import mixers as bench
    from vlt.layers import state_nbytes
    rows = []

    def record(mixer, kind, op, mode, T, fn, leaves=(), extra=None):
        try:
            fn()
            rows.append(dict(mixer=mixer, kind=kind, op=op, mode=mode, T=T, ms=1.0, **(extra or {})))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(mixer=mixer, kind=kind, op=op, mode=mode, T=T, ms=None, error=str(e)))
    args = argparse.Namespace(hidden_size=D, num_heads=H, num_kv_heads=2, head_dim=8, seq_lens=[16],
                              modes=["train", "decode"])
    m = create_mixer("kda", **bench.mixer_opts("kda", args))
    bench.bench_fla_mixer(m, "kda", args, torch.float32, record, state_nbytes)
    got = {(r["kind"], r["mode"]): r for r in rows}
    assert got[("mixer", "fwd+bwd")]["ms"] == 1.0 and got[("mixer", "decode")]["ms"] == 1.0
    assert got[("mixer", "decode")]["state_bytes"] == m.state_size(1, 16, torch.float32)
    assert got[("raw", "fwd+bwd")]["ms"] is None and got[("raw", "decode")]["ms"] is None
    rows += [dict(mixer="kda", kind="raw", op="fla", mode="fwd+bwd", T=32, ms=2.0),
             dict(mixer="kda", kind="mixer", op="kda", mode="fwd+bwd", T=32, ms=2.3)]
    g = [x for x in bench.goals(rows, argparse.Namespace(seq_lens=[32])) if x.get("mixer") == "kda"]
    assert g == [dict(goal="fla mixer/fla layer <= 1.10", mixer="kda", mode="fwd+bwd", T=32, ratio=1.15, met=False)]
    assert bench.mixer_opts("mamba2", args) == {"hidden_size": D}   # fla's head_dim 64 sets its heads


def test_stage1_layer_distillation_into_kda_and_gdn2(tmp_path, monkeypatch):
    """Stage I (`phase: layer`, `init: transfer`) through the CLI with a kda/gdn2 student: it runs,
    logs the layer MSE, trains the converted mixers and saves the student's layout."""
    import csv
    import json

    from vlt.cli import main
    monkeypatch.chdir(tmp_path)
    teacher = json.dumps({"model_name": "tiny-hybrid", "layout": "[full] * 2",
                          "decoder": {"hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "num_kv_heads": 2}})
    spec = {"task": "color", "num_train": 48, "num_val": 8, "image_size": 28, "seed": 0,
            "cache_dir": str(tmp_path / "synth")}
    main(["fit", "--config", "quickstart", "--model=vlt.training.Distillation", f"--model.init_args.teacher={teacher}",
          "--model.init_args.student_layout=[kda, gdn2]", "--model.init_args.init=transfer",
          "--model.init_args.model=null", "--model.init_args.phase=layer",
          f"--data.init_args.synthetic={json.dumps(spec)}", "--data.init_args.max_length=96",
          "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--trainer.max_steps=4",
          "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.accelerator=cpu",
          "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false"])
    run = tmp_path / "lightning_logs" / "version_0"
    mse = [float(r["train/loss/mse"]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train/loss/mse")]
    assert len(mse) == 4 and all(torch.isfinite(torch.tensor(mse)))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["vlt_layout"] == ["kda", "gdn2"]
    sd = ckpt["state_dict"]
    f_key = next(k for k in sd if k.endswith("layers.0.mixer.f_proj.1.weight"))
    assert sd[f_key].abs().sum() > 0   # mimic init set it to zero: it trained


def test_state_conversion_to_fla_and_back_leaves_earlier_states_alone():
    """The CUDA decode path (fla's forward between to_fla_cache and _from_fla) without the kernels, two steps:
    fla shifts the W-wide conv caches it is given in place and returns a new recurrent state; every earlier
    state must come out unchanged and the new one right. The conversion back keeps views (KDA's V-first state
    round-trips to the very tensor fla wrote), and the second step pads the first step's buffer as it is."""
    from vlt.layers.fla_mixers import _from_fla, to_fla_cache
    # expand_v=2: the value conv is twice as wide as q's and k's (an H200 run of a version that stacked the
    # three caches failed on exactly that, 2026-12-02)
    m = create_mixer("kda", hidden_size=D, num_heads=H, expand_v=2.0)
    B, W = 2, m.conv_size
    state = {"ssm": torch.randn(B, H, D // H, 2 * D // H),
             "conv": tuple(torch.randn(B, c.weight.shape[0], W - 1) for c in (m.q_conv1d, m.k_conv1d, m.v_conv1d)),
             "seen": 5}
    history = []
    for step in range(2):
        history.append((state, {"ssm": state["ssm"].clone(), "conv": tuple(c.clone() for c in state["conv"])}))
        # step 1's convs are views of step 0's buffer: padded from it in one kernel, not concatenated again
        with mock.patch("torch.cat", side_effect=AssertionError("concatenated again")) if step else nullcontext():
            cache = to_fla_cache(m, state)
        convs = cache["conv_state"]
        assert all(c.is_contiguous() and c.shape[-1] == W for c in convs)
        new_inputs = [torch.randn(B, c.shape[1]) for c in convs]
        for c, x in zip(convs, new_inputs):   # what fla's conv update does to its cache
            c.copy_(torch.roll(c, -1, dims=-1))
            c[..., -1] = x
        assert cache["recurrent_state"].is_contiguous() == (step == 1)   # step 1: fla's own tensor, no copy
        fla_state = cache["recurrent_state"].contiguous() * 2   # fla returns a new [B, H, V, K] state
        new = _from_fla(m, {"recurrent_state": fla_state, "conv_state": convs})
        for old, kept in history:
            assert torch.equal(old["ssm"], kept["ssm"]) and all(map(torch.equal, old["conv"], kept["conv"]))
        for o, n, x in zip(state["conv"], new["conv"], new_inputs):
            assert n.shape == o.shape and torch.equal(n, torch.cat([o[..., 1:], x[..., None]], -1))
        assert torch.equal(new["ssm"], fla_state.transpose(-1, -2))               # vlt's [B, H, K, V] values
        again = to_fla_cache(m, new)["recurrent_state"]
        assert torch.equal(again, fla_state) and again.data_ptr() == fla_state.data_ptr()   # back, no copy
        state = dict(new, seen=state["seen"] + 1)


@pytest.mark.parametrize("name", ["kda", "gdn2", "deltanet", "gla"])
def test_engine_holds_fla_delta_cache_in_fla_layout(name):
    """vlt.inference.fla_step: the engine's cache is fla's layer-cache layout (W conv columns; KDA/GLA state
    V first), so fla's kernels update it in place on CUDA; a state loaded from vlt's format comes back exact,
    its bytes are the declared state's, and one engine step equals the mixer's own step."""
    from vlt.inference.fla_step import FLA_DELTA
    from vlt.inference.steps import StepContext, step_for
    m = make(name, expand_v=2) if name == "kda" else make(name)
    assert step_for(m) is FLA_DELTA
    _, state = m(torch.randn(1, 6, D, dtype=torch.float64), use_cache=True)
    cache = FLA_DELTA.allocate(m, 2, 16, torch.float64, torch.device("cpu"))
    K, V = state["ssm"].shape[-2:]
    assert cache["recurrent_state"].shape[-2:] == ((V, K) if name in ("kda", "gla") else (K, V))
    assert [c.shape[-1] for c in cache["conv_state"]] == [s.shape[-1] + 1 for s in state["conv"]]
    FLA_DELTA.load(m, cache, state, 1, 6)
    back = FLA_DELTA.export(m, cache, 1, 6)
    assert torch.equal(back["ssm"], state["ssm"]) and all(map(torch.equal, back["conv"], state["conv"]))
    assert FLA_DELTA.state_nbytes(m, cache) == m.state_size(2, 16, torch.float64)
    x = torch.randn(2, 1, D, dtype=torch.float64)
    ctx = StepContext(tok=torch.tensor([0, 6]), pos=torch.tensor([[0], [6]]), T=1)
    y, o_proj = FLA_DELTA(m, cache, ctx, x, None)
    ref, new = m.step(x[1:], state)
    assert o_proj is None
    torch.testing.assert_close(y[1:], ref, **TOL)
    after = FLA_DELTA.export(m, cache, 1, 7)
    torch.testing.assert_close(after["ssm"], new["ssm"], **TOL)
    for a, b in zip(after["conv"], new["conv"]):
        torch.testing.assert_close(a, b, **TOL)


def test_fla_cache_update_leaves_the_engines_counter_alone():
    """The engine hands its device counter ctx.tok as ``seen``; fla's layers call ``update(offset=T)`` on the
    cache, which advanced that tensor in place (``+=``) under every fla layer of a step before the fix."""
    from vlt.layers.fla_mixers import OneLayerCache
    tok = torch.tensor([3, 5])
    cache = OneLayerCache(None, tok)
    cache.update(recurrent_state=torch.zeros(1), offset=1)
    assert tok.tolist() == [3, 5] and cache.seen.tolist() == [4, 6]
