"""Qwen2.5-VL's vision tower (ViT + patch merger) behind vlt's tower contract.

``QwenVisionTower(cfg, out_dim)`` builds transformers' ``Qwen2_5_VisionTransformerPretrainedModel``
from ``cfg.hf_config`` (the teacher's ``vision_config`` dict) and maps a list of normalised images
[3, H, W] (H, W multiples of patch * merge = 28) to [sum of tokens, out_dim], each image's tokens in
raster order of its merged grid - exactly what the HF processor + ``model.visual`` produce:

- ``patchify`` reproduces ``Qwen2VLImageProcessor.patchify``: a still image becomes one temporal
  patch by repeating the frame ``temporal_patch_size`` (2) times; patches are grouped merge x merge
  (the merger's window ordering) and flattened as (channel, time, row, col);
- ``grid_thw`` is (1, H / patch, W / patch) in *patch* units, as HF expects (LLM grid = that / merge);
- the forward is ``StaticQwenVision``'s (vlt.qwen_vision_static), batched over the images of one size.

Videos: vlt feeds every frame as its own image (one temporal patch per frame). HF's native video
path instead stacks two consecutive frames into one temporal patch (half the tokens) and spaces the
frames' temporal M-RoPE index by ``tokens_per_second * seconds_per_grid``; vlt's teacher helpers
feed the teacher frames as images too, so teacher and student see the same tokens.

The HF module is held as ``self.visual``, so its state dict keys are the teacher's ``model.visual.*``
with the prefix ``vision.visual.`` in a vlt VLM.
"""
from __future__ import annotations

import torch
from torch import nn

from vlt.config import VisionConfig

# Keys of an HF config dict that say where it came from, not what it is.
_NOISE_KEYS = ("transformers_version", "_name_or_path", "architectures", "_commit_hash")


def hf_vision_config(hf_config: dict):
    """``Qwen2_5_VLVisionConfig`` from a plain dict (as stored in ``VisionConfig.hf_config``)."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    d = {k: v for k, v in dict(hf_config).items() if k not in _NOISE_KEYS}
    return Qwen2_5_VLVisionConfig(**d)


def patchify(image: torch.Tensor, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2):
    """One normalised image [3, H, W] -> (pixel rows [N, 3 * T * P * P], (1, H / P, W / P)).

    Same element order as ``Qwen2VLImageProcessor.patchify`` (so ``model.visual`` sees identical input).
    """
    C, H, W = image.shape
    unit = patch_size * merge_size
    if H % unit or W % unit:
        raise ValueError(f"image of size {H}x{W} is not a multiple of patch_size*merge_size={unit}; "
                         "resize it with vlt.data's ImageProcessor (Qwen's smart_resize)")
    gh, gw = H // patch_size, W // patch_size
    x = image.reshape(C, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)                    # [gh/m, gw/m, m, m, C, P, P]
    x = x.unsqueeze(5).expand(*x.shape[:5], temporal_patch_size, patch_size, patch_size)
    return x.reshape(gh * gw, C * temporal_patch_size * patch_size * patch_size), (1, gh, gw)


def pixel_inputs(images: list[torch.Tensor], patch_size=14, merge_size=2, temporal_patch_size=2):
    """(pixel_values [sum N, D], image_grid_thw [n_images, 3]) for HF's Qwen2.5-VL from vlt images."""
    rows, grids = [], []
    for im in images:
        r, g = patchify(im, patch_size, merge_size, temporal_patch_size)
        rows.append(r)
        grids.append(g)
    return torch.cat(rows, 0), torch.tensor(grids, dtype=torch.long)


class QwenVisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, out_dim: int, attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
        hf = hf_vision_config(cfg.hf_config)
        if hf.out_hidden_size != out_dim:
            raise ValueError(f"vision.hf_config.out_hidden_size={hf.out_hidden_size} must equal "
                             f"decoder.hidden_size={out_dim} (the merger writes straight into the LLM width)")
        if (hf.patch_size, hf.spatial_merge_size) != (cfg.patch_size, cfg.merge_size):
            raise ValueError(f"vision.patch_size/merge_size = {cfg.patch_size}/{cfg.merge_size} disagree with "
                             "vision.hf_config patch_size/spatial_merge_size = "
                             f"{hf.patch_size}/{hf.spatial_merge_size}")
        hf._attn_implementation = attn_implementation
        self.visual = Qwen2_5_VisionTransformerPretrainedModel(hf)
        self.patch_size, self.merge_size = hf.patch_size, hf.spatial_merge_size
        self.temporal_patch_size = hf.temporal_patch_size

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        """[sum of each image's (H/28) * (W/28) tokens, out_dim], images in order.

        Images of one size run together through ``StaticQwenVision`` (all of them in one SDPA call per
        layer, the MLP modules as they are, so training and LoRA see HF's parameters): HF's own forward
        makes one SDPA call per window and image and reads ``cu_seqlens`` back to the host, which on a 4B
        stage-2 step at 8K tokens (about 23 images of 448x448) was 10,396 launches and left the H200
        idle about 45% of the step (benchmarks/README.md). Same values as HF's forward (tested)."""
        proj = self.visual.patch_embed.proj.weight
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(tuple(im.shape[-2:]), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        for idx in by_size.values():
            rows, grids = pixel_inputs([images[i] for i in idx], self.patch_size, self.merge_size,
                                       self.temporal_patch_size)
            _, gh, gw = (int(v) for v in grids[0])
            feats = self._grid(gh, gw, proj).features(rows.to(proj.device, proj.dtype), frames=len(idx))
            for i, f in zip(idx, feats.split(gh * gw // self.merge_size ** 2)):
                out[i] = f
        return torch.cat(out, dim=0)

    def _grid(self, gh: int, gw: int, proj: torch.Tensor):
        """The per-size tables (window order, rotary), built once per image size, device and dtype."""
        from vlt.qwen_vision_static import StaticQwenVision
        key = (gh, gw, proj.device, proj.dtype)
        grids = self.__dict__.setdefault("_grids", {})  # plain attribute: not a submodule, not in state_dict
        if key not in grids:
            if len(grids) >= 256:  # many resolutions (smart_resize): keep the tables bounded
                grids.clear()
            grids[key] = StaticQwenVision(self.visual, (1, gh, gw), align_mlp=False)
        return grids[key]
