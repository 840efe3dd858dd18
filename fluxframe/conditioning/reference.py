"""FLUX.2 multi-reference editing: up to 10 reference images steer the image being drawn.

Each reference goes through the steps diffusers' ``Flux2Pipeline`` takes, so the same inputs give the
same image:

1. checked: at least 64 px on each side, aspect ratio at most 8:1 (anything else is a RequestError);
2. converted to RGB;
3. if larger than 1024² pixels, resized (Lanczos) to about 1024² keeping the aspect ratio;
4. center-cropped to multiples of the model's pixel multiple (16 for FLUX.2) — a crop, not a resize;
5. scaled to [-1, 1] and encoded by the model's autoencoder like the target (posterior mean, patchified,
   batch-norm normalised);
6. given position ids (t, row, col, 0) with t = 10·(i+1) for the i-th reference, and appended after the
   image tokens; the model cuts its prediction back to the image tokens.

The output size is never taken from the references: it is the request's width/height, else the config's
``[sampler]`` size (diffusers falls back to the first reference's size; pass it explicitly to match).

Inputs (``request.conditioning["reference"]``): ``{"images": [path or PIL image, ...]}``.
This is the simplest complete conditioner, and a template for third-party ones: validate in
``input_images`` (it runs first, before any model work, so the safety filters see exactly what the
model will see), then turn those images into conditioning in ``prepare``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from fluxframe.core.images import open_image
from fluxframe.core.interfaces import Conditioner
from fluxframe.errors import RequestError

log = logging.getLogger("fluxframe.conditioning.reference")

MAX_REFERENCES = 10  # what FLUX.2 was trained with; a model family may declare fewer
MAX_AREA = 1024 * 1024  # larger references are resized down to about this many pixels
MIN_SIDE = 64
MAX_ASPECT = 8.0
TIME_OFFSET = 10  # reference i gets t = TIME_OFFSET·(i+1)
FIELD = "conditioning.reference"


def prepare_reference(image, multiple: int, where: str = FIELD):
    """One reference as the model will see it: RGB, area-capped, center-cropped to ``multiple``."""
    from PIL import Image

    width, height = image.size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise RequestError(f"image is {width}×{height}; both sides must be at least {MIN_SIDE} px", field=where)
    if max(width / height, height / width) > MAX_ASPECT:
        raise RequestError(f"image is {width}×{height}; the aspect ratio must be at most {MAX_ASPECT:g}:1",
                           field=where)
    image = image.convert("RGB")
    if width * height > MAX_AREA:
        scale = math.sqrt(MAX_AREA / (width * height))
        size = (int(width * scale), int(height * scale))
        log.info("%s: %d×%d is over %d pixels, resized to %d×%d", where, width, height, MAX_AREA, *size)
        image = image.resize(size, Image.Resampling.LANCZOS)
        width, height = size
    cw, ch = width // multiple * multiple, height // multiple * multiple
    if (cw, ch) != (width, height):
        left, top = (width - cw) // 2, (height - ch) // 2
        image = image.crop((left, top, left + cw, top + ch))
    return image


class ReferenceConditioner(Conditioner):
    """``reference``: FLUX.2 reference images as extra tokens (see the module docstring)."""

    name = "reference"
    families = ("flux2",)
    file_inputs = ("images",)

    def __init__(self, max_references: int = MAX_REFERENCES):
        if not isinstance(max_references, int) or isinstance(max_references, bool) or \
                not 1 <= max_references <= MAX_REFERENCES:
            raise ValueError(f"max_references must be an integer from 1 to {MAX_REFERENCES}, got {max_references!r}")
        self.max_references = max_references

    def _images(self, inputs: dict[str, Any], limit: int, multiple: int = 16) -> list:
        unknown = sorted(set(inputs) - {"images"})
        if unknown:
            raise RequestError(f"unknown input {unknown[0]!r} (the reference conditioner takes 'images')",
                               field=f"{FIELD}.{unknown[0]}")
        items = inputs.get("images", [])
        if isinstance(items, (str, Path)) or not isinstance(items, (list, tuple)):
            items = [items]
        if len(items) > limit:
            raise RequestError(f"{len(items)} reference images given, at most {limit} are supported",
                               field=f"{FIELD}.images")
        return [prepare_reference(open_image(item, f"{FIELD}.images[{i}]"), multiple, f"{FIELD}.images[{i}]")
                for i, item in enumerate(items)]

    def input_images(self, inputs: dict[str, Any]) -> list:
        return self._images(inputs, self.max_references) if inputs else []

    def prepare(self, model, request, inputs, conditioning) -> None:
        if not inputs:
            return
        from fluxframe.core.images import from_pil

        limit = min(self.max_references, model.limits.max_references)
        images = self._images(inputs, limit, model.limits.pixel_multiple)
        for i, image in enumerate(images):
            latents = model.encode_image(from_pil(image))
            ids = latents.ids.clone()
            ids[:, 0] = TIME_OFFSET * (i + 1)
            conditioning.extra_tokens.append((latents.tokens, ids))
        conditioning.info[self.name] = {"images": [list(image.size) for image in images]}
