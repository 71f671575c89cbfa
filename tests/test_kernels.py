"""CPU tests of vlt.kernels' torch paths against token-by-token and dense references.

The torch paths are what the CUDA kernels are tested against (tests/test_kernels_gpu.py), so
here they are pinned to independent references: fla's naive recurrence, a float64 recurrence,
dense masked softmax, and per-sequence loops for packed (cu_seqlens) inputs.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from vlt.kernels import (attention, available_backends, gated_delta_rule, gated_delta_rule_reference,
                         linear_attention, resolve_backend, short_conv)
attention_module = importlib.import_module("vlt.kernels.attention")  # the module, not the function


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def gdn_inputs(B, T, H, HV, K, V, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, HV, V, generator=g, dtype=dtype)
    gate = F.logsigmoid(torch.randn(B, T, HV, generator=g, dtype=dtype)) * 0.3
    beta = torch.rand(B, T, HV, generator=g, dtype=dtype)
    return q, k, v, gate, beta


# -- gated delta rule ---------------------------------------------------------------------------

@pytest.mark.parametrize("HV", [2, 4])          # H = 2: plain, and GVA with HV = 2H
@pytest.mark.parametrize("with_h0", [False, True])
def test_gated_delta_torch_matches_float64_recurrence(HV, with_h0):
    B, T, H, K, V = 2, 77, 2, 16, 24          # T not a multiple of the chunk: exercises padding
    q, k, v, g, beta = gdn_inputs(B, T, H, HV, K, V)
    h0 = torch.randn(B, HV, K, V, dtype=torch.float64) if with_h0 else None
    o_ref, h_ref = gated_delta_rule_reference(q, k, v, g, beta, initial_state=h0)
    o, h = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                            backend="torch", chunk_size=16)
    # the torch path computes in float32: float32 rounding, not a formula difference
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(h, h_ref) < 1e-5


def test_gated_delta_torch_matches_fla_naive():
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive").naive_recurrent_gated_delta_rule
    B, T, H, K, V = 2, 70, 3, 32, 16
    q, k, v, g, beta = (x.float() for x in gdn_inputs(B, T, H, H, K, V, seed=1))
    h0 = torch.randn(B, H, K, V)
    o_fla, h_fla = naive(q, k, v, beta, g, initial_state=h0, output_final_state=True)  # beta before g
    o, h = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="torch")
    assert rel_err(o, o_fla) < 1e-5
    assert rel_err(h, h_fla) < 1e-5


def test_gated_delta_qk_l2norm_is_normalising_q_and_k():
    q, k, v, g, beta = gdn_inputs(1, 40, 2, 2, 8, 8, dtype=torch.float32, seed=2)
    q, k = q * 3.0, k * 5.0
    o, _ = gated_delta_rule(q, k, v, g, beta, qk_l2norm=True, backend="torch")
    o_ref, _ = gated_delta_rule_reference(F.normalize(q.double(), dim=-1), F.normalize(k.double(), dim=-1),
                                          v.double(), g.double(), beta.double())
    assert rel_err(o, o_ref) < 1e-5


def test_gated_delta_packed_equals_per_sequence():
    lens = [13, 64, 1, 50]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    H, HV, K, V = 2, 4, 8, 8
    q, k, v, g, beta = gdn_inputs(1, sum(lens), H, HV, K, V, seed=3)
    h0 = torch.randn(len(lens), HV, K, V, dtype=torch.float64)
    o, h = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                            backend="torch")
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_i, h_i = gated_delta_rule_reference(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e],
                                              initial_state=h0[i:i + 1])
        assert rel_err(o[:, s:e], o_i) < 1e-5, i
        assert rel_err(h[i:i + 1], h_i) < 1e-5, i


def test_gated_delta_carried_state_equals_one_call():
    q, k, v, g, beta = gdn_inputs(2, 90, 2, 2, 8, 8, seed=4)
    o_all, h_all = gated_delta_rule(q, k, v, g, beta, output_final_state=True, backend="torch")
    o1, h1 = gated_delta_rule(q[:, :37], k[:, :37], v[:, :37], g[:, :37], beta[:, :37],
                              output_final_state=True, backend="torch")
    o2, h2 = gated_delta_rule(q[:, 37:], k[:, 37:], v[:, 37:], g[:, 37:], beta[:, 37:], initial_state=h1,
                              output_final_state=True, backend="torch")
    assert rel_err(torch.cat([o1, o2], 1), o_all) < 1e-5
    assert rel_err(h2, h_all) < 1e-5


# -- linear attention ---------------------------------------------------------------------------

def linear_recurrence(q, k, v, g, scale, h0=None):
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64) if h0 is None else h0.double().clone()
    out = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].double().exp()[..., None, None]
        S = S + k[:, t].double()[..., None] * v[:, t].double()[..., None, :]
        out.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t].double()))
    return torch.stack(out, 1), S


@pytest.mark.parametrize("decay", [False, True])
def test_linear_attention_torch_matches_recurrence(decay):
    B, T, H, K, V = 2, 75, 3, 16, 8
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(B, T, H, K, generator=gen) * 0.3 for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen)) * 0.2 if decay else None
    h0 = torch.randn(B, H, K, V, generator=gen)
    o, h = linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, backend="torch",
                            chunk_size=16)
    o_ref, h_ref = linear_recurrence(q, k, v, g, K ** -0.5, h0)
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(h, h_ref) < 1e-5


def test_linear_attention_packed_equals_per_sequence():
    lens = [20, 3, 41]
    cu = torch.tensor([0, 20, 23, 64])
    gen = torch.Generator().manual_seed(6)
    q, k = (torch.randn(1, 64, 2, 8, generator=gen) for _ in range(2))
    v = torch.randn(1, 64, 2, 8, generator=gen)
    g = F.logsigmoid(torch.randn(1, 64, 2, generator=gen))
    o, h = linear_attention(q, k, v, g, output_final_state=True, cu_seqlens=cu, backend="torch")
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_i, h_i = linear_recurrence(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], 8 ** -0.5)
        assert rel_err(o[:, s:e], o_i) < 1e-5 and rel_err(h[i:i + 1], h_i) < 1e-5, (i, lens[i])


# -- softmax attention --------------------------------------------------------------------------

def dense_attention(q, k, v, window=None, cu_seqlens=None):
    """Float64 softmax with an explicit [Tq, Tk] mask; queries are the last Tq key positions."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    kk, vv = (x.double().repeat_interleave(Hq // Hkv, dim=2) for x in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) * D ** -0.5
    qp = torch.arange(Tk - Tq, Tk)[:, None]
    kp = torch.arange(Tk)[None, :]
    mask = kp <= qp
    if window is not None:
        mask &= kp > qp - window
    if cu_seqlens is not None:
        doc = torch.searchsorted(cu_seqlens[1:], torch.arange(Tk), right=True)
        mask &= doc[kp] == doc[qp]
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv)


def attn_inputs(B, Tq, Tk, Hq, Hkv, D=16, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Tq, Hq, D, generator=gen), torch.randn(B, Tk, Hkv, D, generator=gen),
            torch.randn(B, Tk, Hkv, D, generator=gen))


@pytest.mark.parametrize("Tq,Tk,window", [(50, 50, None), (50, 50, 7), (50, 50, 1), (20, 50, None),
                                          (20, 50, 9), (1, 50, 9), (1, 50, None), (1, 9, 9), (1, 8, 9)])
def test_attention_torch_matches_dense(monkeypatch, Tq, Tk, window):
    monkeypatch.setattr(attention_module, "_Q_BLOCK", 16)   # several query blocks even at small T
    q, k, v = attn_inputs(2, Tq, Tk, Hq=4, Hkv=2)           # GQA
    o = attention(q, k, v, window=window, backend="torch")
    assert o.shape == q.shape
    assert rel_err(o, dense_attention(q, k, v, window)) < 1e-5


@pytest.mark.parametrize("window", [None, 5])
def test_attention_packed_matches_dense(monkeypatch, window):
    monkeypatch.setattr(attention_module, "_Q_BLOCK", 16)
    cu = torch.tensor([0, 11, 12, 40, 57])
    q, k, v = attn_inputs(1, 57, 57, Hq=2, Hkv=1)
    o = attention(q, k, v, window=window, cu_seqlens=cu, backend="torch")
    assert rel_err(o, dense_attention(q, k, v, window, cu)) < 1e-5
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):  # and nothing crosses a boundary
        o_i = attention(q[:, s:e], k[:, s:e], v[:, s:e], window=window, backend="torch")
        assert rel_err(o[:, s:e], o_i) < 1e-5


# -- short conv ---------------------------------------------------------------------------------

def conv_reference(x, w, h0=None):
    """Per-sequence depthwise causal conv, x [T, C], w [C, W], h0 [C, W-1] (the W-1 earlier inputs)."""
    T, C = x.shape
    W = w.shape[1]
    prev = torch.zeros(W - 1, C, dtype=x.dtype) if h0 is None else h0.T
    full = torch.cat([prev, x], 0)
    y = torch.stack([(full[t:t + W].T * w).sum(-1) for t in range(T)])
    return F.silu(y), full[-(W - 1):].T


@pytest.mark.parametrize("with_state", [False, True])
def test_short_conv_packed_with_state_matches_per_sequence(with_state):
    cu = torch.tensor([0, 2, 9, 30])                 # a sequence shorter than the kernel too
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 30, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    h0 = torch.randn(3, 6, 3, generator=gen, dtype=torch.float64) if with_state else None
    y, h = short_conv(x, w, conv_state=h0, output_final_state=True, cu_seqlens=cu, backend="torch")
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        y_i, h_i = conv_reference(x[0, s:e], w, None if h0 is None else h0[i])
        assert rel_err(y[0, s:e], y_i) < 1e-12, i
        assert rel_err(h[i], h_i) < 1e-12, i


def test_short_conv_carried_state_equals_one_call():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 25, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    y_all, h_all = short_conv(x, w, output_final_state=True, backend="torch")
    y1, h1 = short_conv(x[:, :10], w, output_final_state=True, backend="torch")
    ys, h = [y1], h1
    for t in range(10, 25):                          # then token by token, as decode
        y_t, h = short_conv(x[:, t:t + 1], w, conv_state=h, output_final_state=True, backend="torch")
        ys.append(y_t)
    assert rel_err(torch.cat(ys, 1), y_all) < 1e-12
    assert rel_err(h, h_all) < 1e-12


# -- backend selection --------------------------------------------------------------------------

@pytest.mark.parametrize("op,backend", [("gated_delta", "fla"), ("swa", "flex"), ("attention", "sdpa")])
def test_cuda_backend_on_cpu_is_a_value_error_naming_it(op, backend):
    with pytest.raises(ValueError) as e:
        resolve_backend(op, backend, "cpu")
    msg = str(e.value)
    assert repr(backend) in msg and "CUDA" in msg and str(available_backends(op, "cpu")) in msg


def test_kernel_entry_point_rejects_fla_on_cpu():
    q, k, v, g, beta = gdn_inputs(1, 8, 1, 1, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"'fla'.*Available here: \['torch'\]"):
        gated_delta_rule(q, k, v, g, beta, backend="fla")


def test_unknown_backend_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'triton'.*allowed: \['auto', 'fla', 'torch'\]"):
        resolve_backend("gated_delta", "triton", "cpu")
    assert resolve_backend("swa", "auto", "cpu") == "torch"


# -- the SWA mixer's ring-buffer decode (a fast path in layers/attention.py) ----------------------

def test_swa_ring_decode_matches_prefill():
    from vlt.layers import create_mixer
    torch.manual_seed(10)
    m = create_mixer("swa", hidden_size=32, num_heads=4, num_kv_heads=2, window=6).double()
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    y_all, _ = m(x)
    y, state = m(x[:, :4], use_cache=True)           # prefill shorter than the window
    ys = [y]
    for t in range(4, 20):                           # then the ring fills and wraps around
        y_t, state = m.step(x[:, t:t + 1], state)
        ys.append(y_t)
    assert state["k"].shape[1] == 6
    assert rel_err(torch.cat(ys, 1), y_all) < 1e-10
