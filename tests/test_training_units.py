"""Loss terms against hand-computed values, the freezing guard, and the trainable table."""
import math

import pytest
import torch

from vlt.config import VLMConfig
from vlt.model import VLM
from vlt.convert import convert_to_student, teacher_like
from vlt.training import Distillation, InstructionTuning, kl_distill_loss, layer_mse_loss
from vlt.training.freezing import apply_trainable, check_new_params_train, trainable_table

TINY = {"decoder": {"hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2}}


def test_kl_matches_hand_computation():
    # one position, vocab 2: teacher logits (0, ln 3) -> p = (1/4, 3/4); student (0, 0) -> q = (1/2, 1/2); T = 1
    t = torch.tensor([[[0.0, math.log(3.0)]]])
    s = torch.zeros(1, 1, 2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl_distill_loss(s, t, torch.ones(1, 1), 1.0).item() == pytest.approx(expected, rel=1e-6)
    # temperature 2: softmax of logits / 2, times T^2 = 4
    p = [1.0 / (1 + math.sqrt(3.0)), math.sqrt(3.0) / (1 + math.sqrt(3.0))]
    expected_t2 = 4 * sum(pi * math.log(pi / 0.5) for pi in p)
    assert kl_distill_loss(s, t, torch.ones(1, 1), 2.0).item() == pytest.approx(expected_t2, rel=1e-6)
    # masked positions do not count
    t2 = torch.cat([t, torch.tensor([[[5.0, -5.0]]])], 1)
    s2 = torch.zeros(1, 2, 2)
    assert kl_distill_loss(s2, t2, torch.tensor([[1.0, 0.0]]), 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_layer_mse_matches_hand_computation():
    s = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])]
    t = [torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 4.0]])]
    # layer MSEs: (0 + 4)/2 = 2 and (9 + 16)/2 = 12.5 -> mean 7.25, x 1000
    loss, terms = layer_mse_loss(s, t, scale=1000.0)
    assert loss.item() == pytest.approx(7250.0) and terms["loss/mse"].item() == pytest.approx(7.25)
    # cosine: layer 0 cos = 1/sqrt(5); layer 1 undefined for a zero vector -> 0 (torch's eps)
    loss_c, terms_c = layer_mse_loss(s, t, scale=1.0, cosine_weight=1.0)
    expected_cos = ((1 - 1 / math.sqrt(5)) + 1.0) / 2
    assert terms_c["loss/cosine"].item() == pytest.approx(expected_cos, rel=1e-5)


def test_distillation_trains_only_converted_layers_and_guard_refuses_frozen_new_params():
    teacher = {"model_name": "tiny-hybrid", "layout": "[full] * 3", **TINY}
    mod = Distillation(teacher=teacher, student_layout="[full, gdn, swa]", phase="layer")
    trainable = {n for n, p in mod.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("layers.1.mixer.") for n in trainable)
    assert "layers.1.mixer.o_proj.weight" in trainable and "layers.1.mixer.a_proj.weight" in trainable
    check_new_params_train(mod.model, mod.new_params)  # fine as configured
    # a recipe whose patterns miss GDN's o_proj and gates must not start
    apply_trainable(mod.model, ["layers.*.mixer.q_proj.*", "layers.*.mixer.k_proj.*"])
    with pytest.raises(ValueError, match=r"newly initialised parameter\(s\) would stay frozen.*o_proj"):
        check_new_params_train(mod.model, mod.new_params)
    table = trainable_table(mod.model)
    assert "mixer:gdn" in table and "mixer:full" in table


def test_layer_loss_is_zero_when_student_equals_teacher_layer():
    teacher = {"model_name": "tiny-hybrid", "layout": "[full] * 2", **TINY}
    mod = Distillation(teacher=teacher, student_layout="[full, swa]", student_mixers={"swa": {"window": 1000}},
                       phase="layer")
    mod.converted = [1]  # swa with a window beyond the input computes exactly what the teacher's layer does
    mod.model.vision = mod.teacher.vision  # same tower (the student copied it anyway)
    ids = torch.randint(0, 256, (1, 12))
    loss, _ = mod.compute_loss({"input_ids": ids, "labels": ids})
    assert loss.item() < 1e-6


def test_convert_copies_teacher_and_marks_new_params():
    torch.manual_seed(0)
    t_cfg = VLMConfig.from_name("tiny-hybrid", decoder={**TINY["decoder"], "layout": "[full] * 2"})
    teacher = VLM(t_cfg)
    student, new = convert_to_student(teacher, "[full, gdn]", init="transfer")
    assert new and all(n.startswith("layers.1.mixer.") for n in new)
    torch.testing.assert_close(student.layers[0].mixer.q_proj.weight, teacher.layers[0].mixer.q_proj.weight)
    torch.testing.assert_close(student.layers[1].mlp.up_proj.weight, teacher.layers[1].mlp.up_proj.weight)
    # transfer: GDN's q comes from attention's q; k from the KV head repeated over the query heads
    torch.testing.assert_close(student.layers[1].mixer.q_proj.weight, teacher.layers[1].mixer.q_proj.weight)
    hd = teacher.layers[1].mixer.head_dim
    k = teacher.layers[1].mixer.k_proj.weight
    torch.testing.assert_close(student.layers[1].mixer.k_proj.weight[hd:2 * hd], k[:hd])  # head 1 <- kv head 0
    # mimic: beta 0.5 and decay exp(-1e-3) at init
    g = student.layers[1].mixer
    assert torch.all(g.a_proj.weight == 0) and torch.all(g.A_log == 0)
    assert torch.nn.functional.softplus(g.dt_bias).allclose(torch.tensor(1e-3), rtol=1e-5, atol=0)
    assert teacher_like(student.config).layers()[1][0] == "full"


def test_init_from_with_mismatching_layout_is_a_clear_error(tmp_path):
    from vlt.checkpoint.export import save_pretrained_vlt
    m = InstructionTuning(model_name="tiny-hybrid", model=TINY, layout="[swa, gdn]")
    path = save_pretrained_vlt(m.model, tmp_path / "exp")
    with pytest.raises(ValueError, match=r"layout differs: this recipe has \['gdn', 'gdn'\]"):
        InstructionTuning(model_name="tiny-hybrid", model=TINY, layout="[gdn, gdn]", init_from=str(path))
    ok = InstructionTuning(init_from=str(path))  # no model given: taken from the checkpoint
    assert ok.model.layout == ["swa", "gdn"] and ok.new_params == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InstructionTuning(model_name="tiny-hybrid", init_from=str(tmp_path / "nope.ckpt"))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint intact and no torn file behind."""
    from vlt.checkpoint import AtomicCheckpointIO
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def crash(obj, f, *a, **k):
        open(f, "wb").write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_fsdp_strategy_wraps_each_decoder_block():
    """`--trainer.strategy fsdp` resolves to per-DecoderBlock units with sharded checkpoints
    (the strategy object only; running FSDP needs GPUs, which CI does not have)."""
    from lightning.pytorch.strategies import StrategyRegistry
    from vlt.model import DecoderBlock
    from vlt.training.strategies import register_strategies
    register_strategies()
    strategy = StrategyRegistry.get("fsdp")
    assert strategy._state_dict_type == "sharded"
    assert strategy.kwargs["use_orig_params"] is True
    policy = strategy.kwargs["auto_wrap_policy"]
    assert DecoderBlock in getattr(policy, "_module_classes", policy)


def test_partial_activation_checkpointing_recomputes_the_first_blocks_same_grads(monkeypatch):
    from vlt.model import checkpointed_blocks
    assert [checkpointed_blocks(s, 8) for s in (False, True, 0.5, 0.1, 0.0, 1.0)] == [0, 8, 4, 1, 0, 8]
    with pytest.raises(ValueError, match="activation_checkpointing=1.5.*fraction"):
        checkpointed_blocks(1.5, 8)
    with pytest.raises(ValueError, match="activation_checkpointing='yes'"):
        InstructionTuning(model_name="tiny-hybrid", activation_checkpointing="yes")

    model = VLM(VLMConfig.from_name("tiny-hybrid")).train()
    ids = torch.randint(0, model.embed_tokens.num_embeddings, (1, 24))
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    grads = {}
    for setting in (False, 0.5):
        model.zero_grad()
        model.gradient_checkpointing = setting
        model(ids, labels=ids).loss.backward()
        grads[setting] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    n = len(model.layers)
    assert calls == list(model.layers[: math.ceil(n / 2)])  # only the 0.5 run, and its first half
    for a, b in zip(grads[False], grads[0.5]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kl_phase_shares_the_frozen_teachers_image_features(color_batches):
    """With the student's tower frozen at the teacher's weights the KL phase runs the tower once (in the
    teacher's forward) and gives the student the same features: same loss, one tower forward fewer, and
    the FLOP count leaves the student's tower out. A changed or trainable student tower is not shared."""
    batches, tokens = color_batches
    torch.manual_seed(0)
    mod = Distillation(teacher={"model_name": "tiny-hybrid", "layout": "[full] * 2"}, student_layout="[swa, gdn]",
                       phase="kl", tokens=tokens)
    batch = dict(batches[0])
    assert batch["images"], "the color batches carry images"
    batch["loss_rows"] = mod.loss_rows(batch)
    calls = []
    hook = mod.model.vision.register_forward_hook(lambda *args: calls.append(1))
    assert not mod._shared_vision          # decided at fit start
    ref, _ = mod.compute_loss(batch)
    ref_flops = mod.count_step_flops(batch).as_dict()
    assert len(calls) == 1 and "vision" in ref_flops
    assert mod._vision_is_shared()
    mod._shared_vision = True
    loss, _ = mod.compute_loss(batch)
    assert len(calls) == 1                 # the student's tower did not run
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    flops = mod.count_step_flops(batch).as_dict()
    assert "vision" not in flops and flops["teacher/vision"] == ref_flops["teacher/vision"]
    hook.remove()
    with torch.no_grad():
        next(mod.model.vision.parameters()).add_(1e-3)
    assert not mod._vision_is_shared()     # the weights differ from the teacher's
    with torch.no_grad():
        next(mod.model.vision.parameters()).sub_(1e-3)
    next(mod.model.vision.parameters()).requires_grad_(True)
    assert not mod._vision_is_shared()     # a tower that trains computes its own features
