"""StaticQwenVision (fixed grid, one SDPA call per layer) against transformers' own Qwen2.5-VL vision
forward on a tiny random tower, fp32 on the CPU: equal windows, unequal windows (the padded path),
non-square grids and several frames per call."""
import pytest
import torch

from vlt.config import VisionConfig
from vlt.qwen_vision import QwenVisionTower
from vlt.qwen_vision_static import StaticQwenVision

# window_size 56 = 2 merged units of 2 patches of 14 px: a merged grid of 4x4 has 2x2 equal windows.
TINY = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, out_hidden_size=48,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
            fullatt_block_indexes=[1, 3], hidden_act="silu")
PATCH_DIM = 3 * 2 * 14 * 14


def _rel_err(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.fixture(scope="module")
def visual():
    torch.manual_seed(0)
    tower = QwenVisionTower(VisionConfig(kind="qwen2_5_vl", hf_config=TINY), TINY["out_hidden_size"]).eval()
    with torch.no_grad():  # HF's init is near-uniform at this size; spread every weight so errors show
        for p in tower.parameters():
            p.normal_(0, 0.3)
    return tower.visual


def _hf_and_static(visual, grid, static=None):
    t, h, w = grid
    pixels = torch.randn(t * h * w, PATCH_DIM)
    with torch.no_grad():
        ref = visual(pixels, grid_thw=torch.tensor([grid])).pooler_output
        out = (static or StaticQwenVision(visual, grid))(pixels)
    return out, ref


@pytest.mark.parametrize("grid, equal_windows", [
    ((1, 8, 8), True),     # merged 4x4: 2x2 windows of 2x2 units
    ((3, 8, 8), True),     # three frames in one call, each attended on its own
    ((1, 4, 12), True),    # non-square, merged 2x6: 1x3 windows
    ((1, 10, 8), False),   # merged 5x4: window rows of 2, 2 and 1 units -> masked path
    ((2, 6, 10), False),   # non-square and unequal, merged 3x5, two frames
    ((1, 2, 2), True),     # a single merged unit: one window smaller than the window size
])
def test_static_matches_hf_forward(visual, grid, equal_windows):
    static = StaticQwenVision(visual, grid)
    assert static.equal_windows is equal_windows and (static.window_padding is None) is equal_windows
    out, ref = _hf_and_static(visual, grid, static)
    assert out.shape == ref.shape == (grid[0] * grid[1] * grid[2] // 4, TINY["out_hidden_size"])
    assert _rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("grid", [(1, 8, 8), (1, 10, 8)])
def test_compiled_block_matches_hf_forward(visual, grid):
    # Dynamo traces the block (aot_eager: no Inductor codegen on CPU); Inductor itself runs on the GPU
    static = StaticQwenVision(visual, grid, compile="aot_eager")
    out, ref = _hf_and_static(visual, grid, static)
    assert _rel_err(out, ref) < 1e-5


def test_aligned_mlp_keeps_the_output_and_the_parameters(visual):
    """The static tower runs each block MLP from padded, stacked buffers (aligned GEMMs); the module's
    parameters become views of them: same names, shapes and values, and HF's forward unchanged."""
    import copy
    from vlt.qwen_vision_static import aligned_mlp
    pixels = torch.randn(64, PATCH_DIM)
    with torch.no_grad():
        ref = visual(pixels, grid_thw=torch.tensor([(1, 8, 8)])).pooler_output
    model = copy.deepcopy(visual)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mlp = model.blocks[0].mlp
    width = mlp.gate_proj.out_features
    w_gu, b_gu, w_down, _ = aligned_mlp(mlp, 48)
    P = width + (-width % 48)
    assert P > width and w_gu.shape == (2 * P, mlp.gate_proj.in_features) and w_down.shape[1] == P
    assert mlp.gate_proj.weight.data_ptr() == w_gu.data_ptr() and mlp.down_proj.weight.shape[1] == width
    assert aligned_mlp(mlp, 48)[0] is w_gu                  # built once per module
    assert float(w_gu[width:P].abs().sum() + w_down[:, width:].abs().sum()) == 0.0
    static = StaticQwenVision(model, (1, 8, 8))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert _rel_err(model(pixels, grid_thw=torch.tensor([(1, 8, 8)])).pooler_output, ref) < 1e-6
        assert _rel_err(static(pixels), ref) < 1e-5
    with torch.no_grad():   # an in-place update of a parameter reaches the static tower's buffers
        mlp.up_proj.weight.mul_(2.0)
    assert torch.equal(w_gu[P:P + width], mlp.up_proj.weight)


def test_window_order_matches_hf(visual):
    """The precomputed window order and window sizes are HF's (its helper exists from transformers 5.x)."""
    vision_utils = pytest.importorskip("transformers.vision_utils")
    for grid in [(1, 8, 8), (1, 10, 8), (1, 6, 10), (1, 2, 2)]:
        order, cu = vision_utils.get_vision_window_index(torch.tensor([grid]), 2, TINY["window_size"], 14)
        static = StaticQwenVision(visual, grid)
        assert torch.equal(static.unit_order, order)
        assert static.window_tokens == torch.diff(cu).tolist()


def test_wrong_window_layout_is_detected(visual):
    """The comparison above is sensitive to window membership: a tower built for one-unit windows
    (window_size 28) is far from HF's forward with window_size 56."""
    grid = (1, 8, 8)
    visual.window_size = 28
    try:
        wrong = StaticQwenVision(visual, grid)
    finally:
        visual.window_size = TINY["window_size"]
    out, ref = _hf_and_static(visual, grid, wrong)
    assert _rel_err(out, ref) > 1e-2


def test_grid_mismatch_and_bad_grid_errors(visual):
    static = StaticQwenVision(visual, (1, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(80, 1176\).*grid_thw=\(1, 8, 8\).*takes 64 patches"):
        static(torch.randn(80, PATCH_DIM))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size=2"):
        StaticQwenVision(visual, (1, 7, 8))
    with pytest.raises(ValueError, match="CUDA"):
        static.graphed()


def test_video_stream_runs_the_static_tower_as_transformers_does(tmp_path):
    """vlt stream's path (VideoStream) sends Qwen2.5-VL frames through StaticQwenVision: the features
    it uses equal transformers' forward on the same frame, and the stream equals the eager model."""
    import argparse
    from vlt.bench.common import add_common_args, build_model, setup
    from vlt.data.image import ImageProcessor
    from vlt.data.tokenizer import load_tokenizer
    from vlt.inference import VideoStream
    a = add_common_args(argparse.ArgumentParser()).parse_args(["--tiny", "--device", "cpu"])
    dev, dt = setup(a)
    model = build_model("hybrid", a, dev, dt, vision=True).eval()
    proc = ImageProcessor(min_pixels=56 * 112, max_pixels=56 * 112)
    s = VideoStream(model, load_tokenizer("byte"), image_processor=proc, system="")
    frame = torch.randn(3, 56, 112)
    with torch.no_grad():
        ours, ref = s._features(frame), model.vision([frame])
    assert len(s._vision) == 1       # the static tower was built for this frame size and used
    assert float((ours - ref).norm() / ref.norm()) < 1e-5


def test_tower_forward_batches_sizes_and_matches_hf_in_values_and_gradients():
    """QwenVisionTower.forward (what training and vlt generate run) groups the images by size and runs
    each group through StaticQwenVision: outputs in the callers' order and every parameter's gradient
    equal HF's forward over the same images (sizes interleaved, one with unequal windows)."""
    torch.manual_seed(0)
    # an MLP 40 wide: the training tower pads it to 64 on the fly (padded_mlp), as Qwen's 3420 to 3456
    tower = QwenVisionTower(VisionConfig(kind="qwen2_5_vl", hf_config=dict(TINY, intermediate_size=40)),
                            TINY["out_hidden_size"])
    with torch.no_grad():
        for p in tower.parameters():
            p.normal_(0, 0.3)
    # 112x112 = merged 4x4 (equal windows); 140x112 = merged 5x4 (unequal); 56x168 = merged 2x6
    images = [torch.randn(3, *hw) for hw in [(112, 112), (140, 112), (112, 112), (56, 168), (140, 112)]]
    from vlt.qwen_vision import pixel_inputs
    pixels, grid_thw = pixel_inputs(images)
    ref = tower.visual(pixels, grid_thw=grid_thw).pooler_output
    weight = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * weight).sum(), list(tower.parameters()))
    out = tower(images)
    assert out.shape == ref.shape and _rel_err(out, ref) < 1e-5
    grads = torch.autograd.grad((out * weight).sum(), list(tower.parameters()))
    names = [n for n, _ in tower.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        assert _rel_err(g, r) < 1e-4, name
    assert len(tower._grids) == 3                       # one table per image size
    assert all(s.mlps == [None] * TINY["depth"] for s in tower._grids.values())  # parameters not re-pointed
    assert "_grids" not in "".join(tower.state_dict())


def test_padded_mlp_equals_the_module_in_values_and_gradients(visual):
    import copy
    from vlt.qwen_vision_static import padded_mlp
    mlp = copy.deepcopy(visual.blocks[0].mlp)
    h = torch.randn(7, TINY["hidden_size"], requires_grad=True)
    ref = mlp(h)
    out = padded_mlp(mlp, h, multiple=48)          # 64 wide -> 96: padding really happens
    assert _rel_err(out, ref) < 1e-6
    params = [h, *mlp.parameters()]
    for g, r in zip(torch.autograd.grad(out.sum(), params), torch.autograd.grad(ref.sum(), params)):
        assert g.shape == r.shape and _rel_err(g, r) < 1e-6
