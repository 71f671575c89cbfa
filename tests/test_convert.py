"""Qwen2.5-VL import and student conversion against transformers on a tiny random checkpoint.

The teacher is built with transformers, saved to a temporary directory and loaded back (no hub).
Images are given at sizes on the 28-pixel grid, so HF's processor does not resize them and both
sides see the same pixels; tolerances are fp32.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vlt.convert import (check_teacher_dir, convert_to_student, load_hf_teacher, teacher_forward,
                         vlm_from_teacher_config)
from vlt.positions import mrope_positions
from vlt.qwen_vision import pixel_inputs

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
IMG, VID, VS, VE = 261, 262, 259, 260


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_hf_teacher(teacher_dir)


@pytest.fixture(scope="module")
def pils():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((112, 140), (56, 84))]


def normalise(pil):
    return (torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1) - MEAN) / STD


def prompt(grids):
    """Text, image, text, image, text - the case get_rope_index has to get right."""
    ids = [257, 10, 11, 12, VS] + [IMG] * (grids[0][0] * grids[0][1]) + [VE, 13, 14, VS]
    ids += [IMG] * (grids[1][0] * grids[1][1]) + [VE, 15, 16, 17, 258]
    return torch.tensor([ids])


def hf_inputs(pils):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    return Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)(images=pils, return_tensors="pt")


GRIDS = [(4, 5), (2, 3)]


def test_patchify_matches_hf_processor(pils):
    hf = hf_inputs(pils)
    pixels, grid = pixel_inputs([normalise(p) for p in pils])
    assert torch.equal(grid, hf["image_grid_thw"])
    assert pixels.shape == hf["pixel_values"].shape
    assert (pixels - hf["pixel_values"]).abs().max() < 1e-5


def test_vision_tower_matches_hf_visual(teacher, pils):
    student, _ = convert_to_student(teacher)
    hf = hf_inputs(pils)
    with torch.no_grad():
        ref = teacher.model.visual(hf["pixel_values"], grid_thw=hf["image_grid_thw"]).pooler_output
        out = student.vision([normalise(p) for p in pils])
    assert out.shape == ref.shape == (20 + 6, 64)
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()


def test_mrope_positions_match_hf_get_rope_index(teacher):
    ids = prompt(GRIDS)
    grid_thw = torch.tensor([[1, 2 * h, 2 * w] for h, w in GRIDS])
    ref, delta = teacher.model.get_rope_index(ids, mm_token_type_ids=(ids == IMG).int(), image_grid_thw=grid_thw)
    pos, next_pos = mrope_positions(ids, (IMG, VID), GRIDS)
    assert torch.equal(pos, ref)
    assert int(next_pos[0]) == int(delta[0, 0]) + ids.shape[1]  # decode continues where HF's would


def test_full_student_reproduces_teacher_logits(teacher, pils):
    student, new = convert_to_student(teacher)
    assert new == []  # every parameter came from the teacher
    assert student.layout == ["full"] * 4
    ids = prompt(GRIDS)
    hf = hf_inputs(pils)
    with torch.no_grad():  # the teacher driven the HF way: processor pixels, HF computes M-RoPE itself
        ref = teacher(input_ids=ids, pixel_values=hf["pixel_values"], image_grid_thw=hf["image_grid_thw"],
                      mm_token_type_ids=(ids == IMG).int()).logits
        out = student(ids, images=[normalise(p) for p in pils]).logits
    scale = ref.abs().max()
    assert scale > 1.0
    assert (out - ref).abs().max() < 1e-5 * scale


def test_teacher_forward_layer_io_matches_student(teacher, pils):
    student, _ = convert_to_student(teacher)
    ids, ims = prompt(GRIDS), [normalise(p) for p in pils]
    t = teacher_forward(teacher, {"input_ids": ids, "images": ims, "cu_seqlens": None}, layer_io=True)
    with torch.no_grad():
        s = student(ids, images=ims, output_hidden_states=True)
    assert len(t["layer_inputs"]) == len(t["layer_outputs"]) == 4
    for i in range(4):
        assert (s.hidden_states[i] - t["layer_inputs"][i]).abs().max() < 1e-5
        assert (s.hidden_states[i + 1] - t["layer_outputs"][i]).abs().max() < 1e-4
    assert (s.logits - t["logits"]).abs().max() < 1e-5 * t["logits"].abs().max()


def test_teacher_forward_packed_equals_separate(teacher, pils):
    ims = [normalise(p) for p in pils]
    a = torch.tensor([[257, 10, VS] + [IMG] * 20 + [VE, 11, 258]])
    b = torch.tensor([[257, 12, VS] + [VID] * 6 + [VE, 13, 14]])  # video pads: a frame fed as an image
    packed = torch.cat([a, b], 1)
    cu = torch.tensor([0, a.shape[1], packed.shape[1]])
    out = teacher_forward(teacher, {"input_ids": packed, "images": ims, "cu_seqlens": cu}, layer_io=True)
    ra = teacher_forward(teacher, {"input_ids": a, "images": ims[:1]})["logits"]
    rb = teacher_forward(teacher, {"input_ids": b, "images": ims[1:]})["logits"]
    assert torch.allclose(out["logits"], torch.cat([ra, rb], 1), atol=1e-5)
    assert out["layer_outputs"][0].shape == (1, packed.shape[1], 64)


def test_teacher_is_frozen(teacher):
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_swa_with_window_beyond_input_equals_full(teacher, pils):
    ids, ims = prompt(GRIDS), [normalise(p) for p in pils]
    full, _ = convert_to_student(teacher)
    wide, new = convert_to_student(teacher, layout="[swa] * 4", window=1000)
    narrow, _ = convert_to_student(teacher, layout="[swa] * 4", window=8)
    assert new == []
    with torch.no_grad():
        ref = full(ids, images=ims).logits
        assert (wide(ids, images=ims).logits - ref).abs().max() < 1e-5 * ref.abs().max()
        assert (narrow(ids, images=ims).logits - ref).abs().max() > 1e-2  # the window really applies


def test_mimic_init_and_new_params(teacher, pils):
    student, new = convert_to_student(teacher, layout="[swa, gdn, gdn, full]", window=8, init="mimic")
    gdn = student.layers[1].mixer
    assert torch.count_nonzero(gdn.a_proj.weight) == 0 and torch.count_nonzero(gdn.b_proj.weight) == 0
    assert torch.equal(gdn.q_conv1d.weight[:, 0, -1], torch.ones(gdn.key_dim))
    assert set(new) == {f"layers.{i}.mixer.{n}" for i in (1, 2) for n, _ in student.layers[i].mixer.named_parameters()}
    t_attn = teacher.model.language_model.layers[0].self_attn
    assert torch.equal(student.layers[0].mixer.q_proj.bias, t_attn.q_proj.bias)
    assert student.config.image_token_id == IMG and student.config.video_token_id == VID
    assert student.config.decoder.mrope_section == teacher.config.text_config.rope_parameters["mrope_section"]


def test_transfer_init_copies_attention(teacher):
    student, new = convert_to_student(teacher, layout="[full, gdn, linear, gdn]", init="transfer",
                                      mixers={"gdn": {"expand_v": 2.0}})
    t = teacher.model.language_model.layers[1].self_attn
    g = student.layers[1].mixer
    H, Hkv, d, D = 4, 2, 16, 64
    assert torch.equal(g.q_proj.weight, t.q_proj.weight)
    k_rep = t.k_proj.weight.view(Hkv, d, D).repeat_interleave(H // Hkv, 0).reshape(H * d, D)
    assert torch.equal(g.k_proj.weight, k_rep)  # query head h reads kv head h // 2, as GQA
    v = g.v_proj.weight.view(H, 2 * d, D)
    assert torch.equal(v[:, :d], t.v_proj.weight.view(Hkv, d, D).repeat_interleave(2, 0))
    o = g.o_proj.weight.view(D, H, 2 * d)
    assert torch.equal(o[:, :, :d], t.o_proj.weight.view(D, H, d))
    assert torch.count_nonzero(o[:, :, d:]) == 0  # extra value channels start silent
    assert "layers.1.mixer.q_proj.weight" not in new and "layers.1.mixer.v_proj.weight" in new
    assert "layers.1.mixer.o_proj.weight" in new and "layers.1.mixer.a_proj.weight" in new
    lin = student.layers[2].mixer  # same head shapes: a full copy
    assert torch.equal(lin.o_proj.weight, teacher.model.language_model.layers[2].self_attn.o_proj.weight)
    assert "layers.2.mixer.o_proj.weight" not in new


@pytest.mark.parametrize("init", ["mimic", "transfer"])
def test_converted_student_forward_backward(teacher, pils, init):
    student, new = convert_to_student(teacher, layout="[swa, gdn, gdn, full]", window=8, init=init)
    ids, ims = prompt(GRIDS), [normalise(p) for p in pils]
    out = student(ids, images=ims, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    params = dict(student.named_parameters())
    for n in new:  # every newly initialised parameter gets a gradient
        if n.endswith(("a_proj.weight", "b_proj.weight")) or "conv1d" in n or n.endswith(("A_log", "dt_bias")):
            assert params[n].grad is not None, n
        else:
            assert params[n].grad is not None and params[n].grad.abs().sum() > 0, n


def test_config_mapping_errors(teacher, teacher_dir):
    with pytest.raises(ValueError, match="no window"):
        vlm_from_teacher_config(teacher.config, layout="[swa, gdn] * 2")
    with pytest.raises(ValueError, match="init="):
        convert_to_student(teacher, init="copy")
    with pytest.raises(ValueError, match=r"layers\.0\.mixer\.k_proj\.weight.*shape"):
        convert_to_student(teacher, mixers={"full": {"num_kv_heads": 4}})
    with pytest.raises(ValueError, match="qkv_bias"):
        convert_to_student(teacher, mixers={"full": {"qkv_bias": False}})
    with pytest.raises(ValueError, match="decoder.num_layers=4"):
        convert_to_student(teacher, layout="[full] * 3")


def test_checkpoint_errors(teacher_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_hf_teacher(tmp_path / "nope")
    bad = tmp_path / "bad"
    shutil.copytree(teacher_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "model.safetensors").rename(bad / "weights.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        check_teacher_dir(bad)
    (bad / "weights.bin").rename(bad / "model.safetensors")
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    with pytest.raises(ValueError, match="expected 'qwen2_5_vl'"):
        load_hf_teacher(bad)
    cfg["text_config"]["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight.*\(128, 64\)"):
        load_hf_teacher(bad)
    (bad / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_teacher(bad)


def test_import_as_vlt_teacher(teacher, teacher_dir, pils):
    from vlt.convert import import_qwen2_5_vl
    model = import_qwen2_5_vl(teacher_dir)
    ids, ims = prompt(GRIDS), [normalise(p) for p in pils]
    ref = teacher_forward(teacher, {"input_ids": ids, "images": ims})["logits"]
    with torch.no_grad():
        assert (model(ids, images=ims).logits - ref).abs().max() < 1e-5 * ref.abs().max()
    assert model.config.decoder.mixers["swa"] == {"qkv_bias": True}  # a later swa conversion keeps the biases


def test_legacy_checkpoint_layout(teacher, teacher_dir, tmp_path, pils):
    """Released Qwen2.5-VL checkpoints use the older config (rope_scaling type mrope, top-level text
    fields) and key names (visual.*, model.layers.*); transformers maps them, and so must we."""
    from safetensors.torch import load_file, save_file
    old = tmp_path / "legacy"
    shutil.copytree(teacher_dir, old)
    cfg = json.loads((old / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    cfg = {**{k: v for k, v in text.items() if k not in ("model_type", "layer_types")}, **cfg,
           "rope_theta": rope["rope_theta"], "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    (old / "config.json").write_text(json.dumps(cfg))
    rename = lambda k: k.replace("model.visual.", "visual.").replace("model.language_model.", "model.")  # noqa: E731
    save_file({rename(k): v for k, v in load_file(str(old / "model.safetensors")).items()},
              str(old / "model.safetensors"), metadata={"format": "pt"})
    student, new = convert_to_student(old)
    assert new == [] and student.config.decoder.mrope_section == rope["mrope_section"]
    ids, ims = prompt(GRIDS), [normalise(p) for p in pils]
    ref = teacher_forward(teacher, {"input_ids": ids, "images": ims})["logits"]
    with torch.no_grad():
        assert (student(ids, images=ims).logits - ref).abs().max() < 1e-5 * ref.abs().max()


def test_hybrid_layer_gets_attention_branch_from_teacher(teacher):
    hyb = {"mixer": "hybrid", "branches": [{"mixer": "swa", "window": 8, "qkv_bias": True}, "gdn"]}
    student, new = convert_to_student(teacher, layout=["full", hyb, "full", "full"], init="mimic")
    branch = student.layers[1].mixer.branches[0]
    assert torch.equal(branch.k_proj.bias, teacher.model.language_model.layers[1].self_attn.k_proj.bias)
    assert "layers.1.mixer.branches.0.q_proj.weight" not in new and "layers.1.mixer.branches.1.q_proj.weight" in new
    with pytest.raises(ValueError, match="qkv_bias"):  # swa_gdn's swa branch has no biases
        convert_to_student(teacher, layout="[full, swa_gdn, full, full]", window=8)
