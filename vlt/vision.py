"""Vision towers and projectors: images [3, H, W] in, LLM-width tokens out.

Every tower maps a list of images (H, W multiples of patch * merge) to one tensor
[sum of tokens, D_llm] in image order, each image's tokens in raster order of its merged grid
(H / (patch * merge)) x (W / (patch * merge)) - the order Qwen2.5-VL uses, so M-RoPE positions and
image-pad runs line up for every tower.
"""
from __future__ import annotations

import torch
from torch import nn

from vlt.config import VisionConfig
from vlt.layers.norm import RMSNorm  # the merger's norm; also keeps `from vlt.vision import RMSNorm` (old path)


class PatchMerger(nn.Module):
    """Qwen2.5-VL's merger: RMSNorm per patch, concat merge x merge patches, MLP (Linear, GELU, Linear)."""

    def __init__(self, in_dim: int, out_dim: int, merge_size: int = 2):
        super().__init__()
        self.merge_size = merge_size
        hidden = in_dim * merge_size ** 2
        self.ln_q = RMSNorm(in_dim)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, grid):  # grid [B, h, w, C] -> [B, (h/m) * (w/m), out]
        B, h, w, C = grid.shape
        m = self.merge_size
        x = self.ln_q(grid).view(B, h // m, m, w // m, m, C).permute(0, 1, 3, 2, 4, 5)
        return self.mlp(x.reshape(B, (h // m) * (w // m), m * m * C))


class LinearProjector(nn.Module):
    """Average-pool merge x merge patches, then one Linear (LLaVA-1-style projector)."""

    def __init__(self, in_dim: int, out_dim: int, merge_size: int = 2):
        super().__init__()
        self.merge_size = merge_size
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, grid):
        B, h, w, C = grid.shape
        m = self.merge_size
        x = grid.view(B, h // m, m, w // m, m, C).mean(dim=(2, 4))
        return self.proj(x.reshape(B, -1, C))


class TimmTower(nn.Module):
    def __init__(self, cfg: VisionConfig, out_dim: int):
        super().__init__()
        import timm
        kwargs = dict(cfg.timm_kwargs)
        kwargs.setdefault("patch_size", cfg.patch_size)
        kwargs.setdefault("dynamic_img_size", True)
        self.vit = timm.create_model(cfg.timm_name, pretrained=False, num_classes=0, global_pool="", **kwargs)
        if cfg.weights_file:
            self._load(cfg.weights_file)
        self.patch_size, self.merge_size = cfg.patch_size, cfg.merge_size
        width = self.vit.num_features
        proj = PatchMerger if cfg.projector == "patch_merger" else LinearProjector
        self.projector = proj(width, out_dim, cfg.merge_size)

    def _load(self, path):
        from pathlib import Path
        if not Path(path).is_file():
            raise FileNotFoundError(f"vision.weights_file {path!r} does not exist; give a local .safetensors/.pth "
                                    "file of the timm model's state dict, or leave it unset for random init")
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = self.vit.load_state_dict(sd, strict=False)
        if missing:
            raise ValueError(f"vision.weights_file {path!r} lacks {len(missing)} tensors of "
                             f"{type(self.vit).__name__}, e.g. {missing[:3]}")

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        by_shape: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault(tuple(im.shape), []).append(i)
        dtype = next(self.parameters()).dtype
        feats, order = [], []   # each shape's features, and the images they belong to
        for (c, H, W), idx in by_shape.items():
            image_grid(images[idx[0]], self.patch_size, self.merge_size)  # clear error on a bad size
            x = torch.stack([images[i] for i in idx]).to(dtype)
            tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]
            grid = tokens.reshape(len(idx), H // self.patch_size, W // self.patch_size, -1)
            merged = self.projector(grid)                          # [n, tokens per image, D]
            feats.append(merged.reshape(-1, merged.shape[-1]))
            order += [(i, merged.shape[1]) for i in idx]
        flat = torch.cat(feats) if len(feats) > 1 else feats[0]
        if [i for i, _ in order] == list(range(len(images))):   # one shape, or shapes already in order
            return flat
        # back to the images' order with one gather, not a slice per image (32-frame videos in a 32-row
        # batch are ~1,000 images a step, and each slice's backward was a zero-filled full-size tensor)
        start, rows = {}, 0
        for i, n in order:
            start[i], rows = (rows, n), rows + n
        idx = torch.cat([torch.arange(s, s + n) for s, n in (start[i] for i in range(len(images)))])
        return flat.index_select(0, idx.to(flat.device))


def build_vision_tower(cfg: VisionConfig, out_dim: int) -> nn.Module | None:
    if cfg.kind == "none":
        return None
    if cfg.kind == "timm":
        return TimmTower(cfg, out_dim)
    if cfg.kind == "qwen2_5_vl":
        from vlt.qwen_vision import QwenVisionTower
        return QwenVisionTower(cfg, out_dim)
    raise AssertionError(cfg.kind)


def image_grid(image: torch.Tensor, patch_size: int, merge_size: int) -> tuple[int, int]:
    """(rows, cols) of LLM tokens for one image."""
    unit = patch_size * merge_size
    H, W = image.shape[-2:]
    if H % unit or W % unit:
        raise ValueError(f"image of size {H}x{W} is not a multiple of patch_size*merge_size={unit}; "
                         "resize it with vlt.data's ImageProcessor")
    return H // unit, W // unit
