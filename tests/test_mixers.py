"""Every registered mixer (and every fla mixer with a CPU path) keeps the one contract (layers/base.py):
parallel == recurrent, split prefill == one prefill, packed == one by one, gradients everywhere, honest
state sizes."""
import pytest
import torch
import torch.nn.functional as F

from numerics import perturb_fla_init
from vlt.layers import create_mixer, list_mixers, state_nbytes
from vlt.layers.fla_mixers import cpu_mixers

D, H = 32, 4

# One config per registered mixer (the test below fails if a new mixer is registered without one).
CASES = {
    "full": dict(num_kv_heads=2),
    "swa": dict(num_kv_heads=2, window=5),
    "linear": dict(decay="data"),
    "gdn": dict(num_v_heads=8, expand_v=1.5),
    "hybrid": dict(num_kv_heads=2, branches=[{"mixer": "swa", "window": 4}, "linear"], combine="learned"),
    "swa_gdn": dict(num_kv_heads=2, window=6),
}
# fla layers with a CPU path (layers/fla_mixers.py; not in list_mixers) keep the same contract
FLA_CASES = {"kda": dict(num_v_heads=8), "deltanet": dict(use_gate=True), "gdn2": dict(num_v_heads=8),
             "gla": dict(num_kv_heads=2, use_short_conv=True), "mamba2": dict(state_size=8, n_groups=2),
             "rwkv7": {}}
CASES.update(FLA_CASES)


def tol(name):
    # fla's naive references (and mamba2's chunked torch kernel) compute in fp32 whatever the input dtype
    return dict(rtol=1e-5, atol=1e-5) if name in FLA_CASES else dict(rtol=1e-5, atol=1e-6)


def make(name, seed=0):
    torch.manual_seed(seed)
    m = create_mixer(name, hidden_size=D, num_heads=H, **CASES[name])
    if name in FLA_CASES:
        perturb_fla_init(m)
    return m.double()


def test_every_builtin_mixer_has_a_case():
    from vlt.layers import get_mixer_class
    builtin = {n for n in list_mixers() if get_mixer_class(n).__module__.startswith("vlt.layers")}
    assert builtin == set(CASES) - set(FLA_CASES)
    assert set(cpu_mixers()) == set(FLA_CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_parallel_equals_recurrent(name):
    m = make(name)
    x = torch.randn(2, 17, D, dtype=torch.float64)
    y, _ = m(x)
    state, steps = None, []
    for t in range(x.shape[1]):
        yt, state = m.step(x[:, t:t + 1], state)
        steps.append(yt)
    torch.testing.assert_close(torch.cat(steps, 1), y, **tol(name))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("split", [1, 7, 12])
def test_split_prefill_equals_one_prefill(name, split):
    m = make(name)
    x = torch.randn(2, 19, D, dtype=torch.float64)
    y, full_state = m(x, use_cache=True)
    ya, s = m(x[:, :split], use_cache=True)
    yb, s = m(x[:, split:], state=s, use_cache=True)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y, **tol(name))
    # and the carried states agree, so decoding after either continues identically
    xn = torch.randn(2, 1, D, dtype=torch.float64)
    torch.testing.assert_close(m.step(xn, s)[0], m.step(xn, full_state)[0], **tol(name))


@pytest.mark.parametrize("name", sorted(CASES))
def test_packed_equals_one_by_one(name):
    m = make(name)
    lengths = [5, 11, 1, 8]
    seqs = [torch.randn(1, n, D, dtype=torch.float64) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed, _ = m(torch.cat(seqs, 1), cu_seqlens=cu)
    alone = torch.cat([m(s)[0] for s in seqs], 1)
    torch.testing.assert_close(packed, alone, **tol(name))
    # Leakage would show up here: perturbing sample 0 must not move any other sample's output.
    seqs[0] = seqs[0] + 1.0
    packed2, _ = m(torch.cat(seqs, 1), cu_seqlens=cu)
    torch.testing.assert_close(packed2[:, lengths[0]:], packed[:, lengths[0]:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_reach_every_parameter(name):
    m = make(name).float()
    x = torch.randn(2, 9, D, requires_grad=True)
    y, _ = m(x)
    (y.square().mean()).backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient reaches {pname}"
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_size_matches_real_state(name):
    m = make(name).float()
    x = torch.randn(3, 14, D)
    _, s = m(x, use_cache=True)
    assert state_nbytes(s) == m.state_size(3, 14, torch.float32)
    _, s2 = m.step(torch.randn(3, 1, D), s)
    grows = state_nbytes(s2) > state_nbytes(s)
    assert grows == m.state_grows, f"{name}: state grew={grows}, declared state_grows={m.state_grows}"


def test_gdn_mixer_matches_fla_naive_recurrence():
    """The GDN mixer's CPU path == fla's naive recurrent reference fed the mixer's own q/k/v/g/beta."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from vlt.kernels import gated_rms_norm, short_conv
    m = create_mixer("gdn", hidden_size=D, num_heads=H, expand_v=2.0)
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial gates so decay and beta both matter
        m.a_proj.weight.normal_(std=0.5)
        m.b_proj.weight.normal_(std=0.5)
    x = torch.randn(2, 23, D)
    y, _ = m(x)
    with torch.no_grad():
        conv = lambda proj, c: short_conv(proj(x), c.weight[:, 0], backend="torch")[0]
        q = F.normalize(conv(m.q_proj, m.q_conv1d).view(2, 23, H, -1), dim=-1)
        k = F.normalize(conv(m.k_proj, m.k_conv1d).view(2, 23, H, -1), dim=-1)
        v = conv(m.v_proj, m.v_conv1d).view(2, 23, H, -1)
        beta = m.b_proj(x).sigmoid()
        g = -m.A_log.exp() * F.softplus(m.a_proj(x) + m.dt_bias)
        o, _ = naive_recurrent_gated_delta_rule(q, k, v, beta, g)
        o = gated_rms_norm(o, m.g_proj(x).view(2, 23, H, -1), m.o_norm_weight, m.norm_eps)
        ref = m.o_proj(o.reshape(2, 23, -1))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_swa_with_window_beyond_input_equals_full():
    torch.manual_seed(0)
    full = create_mixer("full", hidden_size=D, num_heads=H, num_kv_heads=2)
    swa = create_mixer("swa", hidden_size=D, num_heads=H, num_kv_heads=2, window=64)
    swa.load_state_dict(full.state_dict())
    x = torch.randn(2, 30, D)
    # the windowed mask goes through another SDPA path than is_causal: fp32 round-off only
    torch.testing.assert_close(swa(x)[0], full(x)[0], rtol=1e-5, atol=1e-5)


def test_swa_state_is_constant_after_window():
    m = make("swa").float()
    s, sizes = None, []
    for _ in range(12):
        _, s = m.step(torch.randn(1, 1, D), s)
        sizes.append(state_nbytes(s))
    assert sizes[4:] == [sizes[4]] * 8 and sizes[0] < sizes[4]
