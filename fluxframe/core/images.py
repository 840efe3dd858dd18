"""Conversions between model tensors in [-1, 1] and PIL images, the formats fluxframe writes, and reading an image
input (through the read-once path of fluxframe.core.inputs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fluxframe.errors import RequestError

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# Generated images are kept at full quality: JPEG at 95 with full-resolution chroma (4:4:4) and
# lossless WebP. Pillow's defaults (JPEG 75 at 4:2:0, lossy WebP) also erase the pixel watermark.
SAVE_OPTIONS = {"png": {}, "jpeg": {"quality": 95, "subsampling": 0}, "webp": {"lossless": True}}


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB images, rounded as diffusers rounds them."""
    arrays = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arrays]


def from_pil(image: Image.Image) -> torch.Tensor:
    """An image -> (1, 3, H, W) float32 in [-1, 1] (RGB), computed as diffusers computes it: 2·(x / 255) − 1."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(2.0 * array - 1.0).permute(2, 0, 1)[None].contiguous()


def open_image(item: Any, where: str):
    """A path, an InputFile (see fluxframe.core.inputs) or a PIL image -> a fully loaded PIL image, or a
    RequestError naming the input."""
    from fluxframe.core.inputs import InputFile, read_input

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (str, Path)):
        item = read_input(item, where)
    if not isinstance(item, InputFile):
        raise RequestError(f"must be an image file path or a PIL image, got {type(item).__name__}", field=where)
    return item.image(where)
