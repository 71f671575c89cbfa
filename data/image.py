"""Image preprocessing as in Qwen2.5-VL: ``smart_resize`` to the 28-pixel token grid, then normalise.

The model's vision tower patches the [3, H, W] tensor itself; all this module guarantees is that
H and W are multiples of ``patch_size * merge_size`` and that ``num_tokens`` is the number of LLM
tokens the image will occupy, (H / 28) * (W / 28) with the defaults.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Qwen2-VL's rule: round H, W to multiples of ``factor``, keep the aspect ratio, and scale into
    [min_pixels, max_pixels]. Raises ValueError for aspect ratios above 200 (as Qwen does)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image has no pixels ({height}x{width})")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio above 200 ({height}x{width})")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class ImageProcessor:
    """PIL image -> normalised float32 tensor [3, H, W] on the token grid (dynamic resolution)."""

    def __init__(self, patch_size: int = 14, merge_size: int = 2, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS, mean=CLIP_MEAN, std=CLIP_STD) -> None:
        if patch_size < 1 or merge_size < 1:
            raise ValueError(f"patch_size and merge_size must be >= 1 (got {patch_size}, {merge_size})")
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels (got {min_pixels}, {max_pixels})")
        self.patch_size = patch_size
        self.merge_size = merge_size
        self.factor = patch_size * merge_size
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def tokens_for_size(self, height: int, width: int) -> int:
        """Token count an image of this original size will take, without decoding it."""
        h, w = self.target_size(height, width)
        return (h // self.factor) * (w // self.factor)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        h, w = self.target_size(image.height, image.width)
        if image.format == "JPEG" and image.width >= 2 * w and image.height >= 2 * h:
            # decode at 1/2, 1/4 or 1/8 scale (still >= the target) instead of the full image
            image.draft("RGB", (w, h))
        image = image.convert("RGB")
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std

    def num_tokens(self, tensor: torch.Tensor) -> int:
        """LLM tokens for a preprocessed [3, H, W] tensor."""
        return (tensor.shape[-2] // self.factor) * (tensor.shape[-1] // self.factor)

    def unnormalise(self, tensor: torch.Tensor) -> np.ndarray:
        """[3, H, W] tensor -> uint8 HWC array, for rendering samples."""
        x = (tensor * self.std + self.mean).clamp(0, 1).mul(255).byte()
        return x.permute(1, 2, 0).numpy()
