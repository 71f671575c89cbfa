"""The fused LM-head losses (vlt.training.losses) against the plain formulas on full logits:
values and gradients with respect to the hidden states and the head weight, over several chunk
sizes (one row per chunk, uneven last chunk, everything in one chunk), fp32 on the CPU."""
import pytest
import torch

from vlt.training.losses import (cross_entropy_reference, default_chunk, kl_distill_reference, linear_cross_entropy,
                                 linear_kl_distill, resolve_impl)

TOL = dict(rtol=1e-5, atol=1e-6)  # fp32: chunked sums reorder additions, nothing else differs


def _inputs(n=37, d=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.5).requires_grad_()
    return h, w, g


@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_linear_cross_entropy_matches_plain_value_and_grads(chunk):
    h, w, g = _inputs()
    target = torch.randint(0, w.shape[0], (h.shape[0],), generator=g)
    loss = linear_cross_entropy(h, w, target, chunk=chunk)
    gh, gw = torch.autograd.grad(loss * 3.0, (h, w))  # a non-unit upstream gradient
    ref = cross_entropy_reference(h @ w.T, target)
    rh, rw = torch.autograd.grad(ref * 3.0, (h, w))
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(gh, rh, **TOL)
    torch.testing.assert_close(gw, rw, **TOL)


def test_linear_cross_entropy_frozen_weight_and_no_grad():
    h, w, g = _inputs()
    w = w.detach()
    target = torch.randint(0, w.shape[0], (h.shape[0],), generator=g)
    loss = linear_cross_entropy(h, w, target, chunk=5)
    (gh,) = torch.autograd.grad(loss, (h,))
    (rh,) = torch.autograd.grad(cross_entropy_reference(h @ w.T, target), (h,))
    torch.testing.assert_close(gh, rh, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, target, chunk=5),
                                   cross_entropy_reference(h @ w.T, target), **TOL)
    empty = linear_cross_entropy(h[:0], w, target[:0])
    assert empty.item() == 0.0


@pytest.mark.parametrize("temperature,chunk", [(1.0, 4), (2.0, 1000), (0.7, 1)])
def test_linear_kl_distill_matches_plain_value_and_grads(temperature, chunk):
    h, w, g = _inputs()
    ht = torch.randn(h.shape[0], 24, generator=g)  # the teacher may be wider than the student
    wt = torch.randn(w.shape[0], 24, generator=g) * 0.5
    loss = linear_kl_distill(h, w, ht, wt, temperature, chunk=chunk)
    gh, gw = torch.autograd.grad(loss * 0.5, (h, w))
    ref = kl_distill_reference(h @ w.T, ht @ wt.T, torch.ones(h.shape[0]), temperature)
    rh, rw = torch.autograd.grad(ref * 0.5, (h, w))
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(gh, rh, **TOL)
    torch.testing.assert_close(gw, rw, **TOL)
    assert loss.item() > 0.01  # the two distributions differ: not a vacuous comparison of zeros


def test_kl_of_identical_models_is_zero():
    h, w, _ = _inputs()
    assert linear_kl_distill(h, w, h.detach(), w.detach(), 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_reference_known_values():
    """The plain formula itself against numbers worked out by hand."""
    s, t = torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[0.0, 2.0]]])
    p = torch.softmax(torch.tensor([0.0, 2.0]), 0)
    expected = float((p * (p.log() - torch.tensor(0.5).log())).sum())
    assert kl_distill_reference(s, t, torch.ones(1, 1), 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_bf16_autocast_close_to_fp32():
    """Under bf16 autocast the head matmuls run in bf16 and softmax in fp32: within bf16 rounding."""
    h, w, g = _inputs(n=64, d=32, v=100)
    target = torch.randint(0, 100, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, target, chunk=16)
    gh, = torch.autograd.grad(loss, (h,))
    ref = cross_entropy_reference(h @ w.T, target)
    (rh,) = torch.autograd.grad(ref, (h,))
    assert gh.dtype == h.dtype
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gh, rh, rtol=5e-2, atol=5e-3)


def test_chunk_and_impl_choices():
    assert default_chunk(151936) == 1024 and default_chunk(272) == 8192
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="loss_impl"):
        resolve_impl("fast", torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA"):
        resolve_impl("liger", torch.device("cpu"))


# ---- what `vlt fit` computes equals the plain formulas on full logits ------------------------------
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2}
TOKENS = {"vocab_size": 264, "image_token_id": 261, "video_token_id": 262, "vision_start_token_id": 259,
          "pad_token_id": 0}


def _packed_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 250, (1, 24), generator=g)
    ids[0, 20:] = 0  # row padding
    labels = torch.full_like(ids, -100)
    labels[0, 5:9] = ids[0, 5:9]
    labels[0, 14:19] = ids[0, 14:19]
    return {"input_ids": ids, "labels": labels, "cu_seqlens": torch.tensor([0, 10, 20, 24], dtype=torch.int32)}


def test_sft_step_loss_equals_full_logits_cross_entropy():
    from vlt.training import InstructionTuning
    torch.manual_seed(0)
    mod = InstructionTuning(model_name="tiny-hybrid", model={"vision": {"kind": "none"}, "decoder": TINY},
                            tokens=TOKENS)
    batch = _packed_batch()
    batch["loss_rows"] = mod.loss_rows(batch)
    loss, _ = mod.compute_loss(batch)
    grads = torch.autograd.grad(loss, list(mod.model.parameters()))
    ref = mod.model(**{k: v for k, v in batch.items() if k != "loss_rows"}).loss  # [T, vocab] logits + F.cross_entropy
    ref_grads = torch.autograd.grad(ref, list(mod.model.parameters()))
    torch.testing.assert_close(loss, ref, **TOL)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("positions", ["all", "assistant"])
def test_kl_step_loss_equals_full_logits_kl(positions):
    from vlt.model import shift_labels
    from vlt.training import Distillation
    torch.manual_seed(0)
    teacher = {"model_name": "tiny-hybrid", "layout": "[full] * 2", "vision": {"kind": "none"}, "decoder": TINY}
    mod = Distillation(teacher=teacher, student_layout="[swa, gdn]", phase="kl", kl_positions=positions,
                       temperature=2.0, tokens=TOKENS)
    batch = _packed_batch()
    batch["loss_rows"] = mod.loss_rows(batch)
    loss, _ = mod.compute_loss(batch)
    params = [p for p in mod.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    inputs = {k: batch[k] for k in ("input_ids", "cu_seqlens")}
    if positions == "assistant":
        mask = (shift_labels(batch["labels"], batch["cu_seqlens"]) != -100).float()
    else:
        mask = (batch["input_ids"] != 0).float()
    with torch.no_grad():
        t_logits = mod.teacher(**inputs).logits
    ref = kl_distill_reference(mod.model(**inputs).logits, t_logits, mask, 2.0)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss, ref, **TOL)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_layer_phase_equals_all_hidden_states_at_once(checkpointing):
    """The interleaved teacher/student walk (optionally recomputing each layer) gives the loss and
    gradients of the form that keeps every teacher hidden state and student activation."""
    from vlt.training import Distillation, layer_mse_loss
    torch.manual_seed(0)
    teacher = {"model_name": "tiny-hybrid", "layout": "[full] * 3", "vision": {"kind": "none"}, "decoder": TINY}
    mod = Distillation(teacher=teacher, student_layout="[swa, gdn, gdn]", phase="layer", cosine_weight=0.5,
                       tokens=TOKENS, activation_checkpointing=checkpointing)
    mod.train()
    batch = _packed_batch()
    loss, terms = mod.compute_loss(batch)
    params = [p for p in mod.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        t = mod.teacher(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], output_hidden_states=True)
    pos, _ = mod.model.positions(batch["input_ids"], None, None, batch["cu_seqlens"], None)
    outs = [mod.model.layers[i](t.hidden_states[i], cu_seqlens=batch["cu_seqlens"], position_ids=pos)[0]
            for i in mod.converted]
    ref, _ = layer_mse_loss(outs, [t.hidden_states[i + 1] for i in mod.converted], 1000.0, 0.5)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss, ref, **TOL)
    assert "loss/cosine" in terms
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
