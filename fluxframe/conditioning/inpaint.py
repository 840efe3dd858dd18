"""Inpainting: an image and a mask (white = regenerate, black = keep) as the model's "inpaint" and "mask" channels.

Works with any model family that is ``ChannelConditioned`` with those two groups (Flex.2: per token, channels
64–127 the inpaint latent, 128–131 the mask) and uses nothing else of it. The whole image is encoded into the
model's token layout (``encode_tokens``: VAE-encoded, normalised, packed), then multiplied by (1 − mask) at latent
resolution (``mask_tokens``: the mask resized there bilinearly, so its edges stay soft). Without this conditioner
the model family fills the inpaint latent with zeros and the mask with ones ("regenerate everything").

Inputs (``request.conditioning["inpaint"]``, or ``--inpaint-image`` / ``--mask``): ``{"image": ..., "mask": ...}``,
paths or PIL images. The image is resized to the output size; the mask must have the image's aspect ratio
(any size: it is resized); a mask with colour or alpha is converted to one channel (luminance), with a note.
Options (``[[conditioners]] name = "inpaint"``): ``posterior`` — "mode" (default: the VAE posterior mean, as
ComfyUI encodes) or "sample" (drawn from a generator of its own, seeded from the run's seed, never the noise's).
Works with or without the ``control`` conditioner.
"""

from __future__ import annotations

import logging
from typing import Any

from fluxframe.core.channels import require_channels
from fluxframe.core.images import open_image
from fluxframe.core.interfaces import Conditioner
from fluxframe.errors import RequestError

from .preprocess import fit

log = logging.getLogger("fluxframe.conditioning.inpaint")
FIELD = "conditioning.inpaint"
POSTERIOR = ("mode", "sample")
SEED_OFFSET = 0x1A9A1  # the VAE-sampling generator's seed is the run's seed plus this: never the noise generator


def posterior_generator(posterior: str, seed: int | None, offset: int):
    import torch

    if posterior != "sample":
        return None
    return torch.Generator("cpu").manual_seed(((seed or 0) + offset) % 2**63)


def check_posterior(name: str, posterior: Any) -> str:
    if posterior not in POSTERIOR:
        raise ValueError(f"{name}: posterior must be one of {', '.join(POSTERIOR)}, got {posterior!r}")
    return posterior


class InpaintConditioner(Conditioner):
    """``inpaint``: the inpaint latent and mask channels (see the module docstring)."""

    name = "inpaint"
    families = ("flex2",)
    file_inputs = ("image", "mask")

    def __init__(self, posterior: str = "mode"):
        self.posterior = check_posterior(self.name, posterior)

    def _inputs(self, inputs: dict[str, Any], notes: list[str]):
        unknown = sorted(set(inputs) - {"image", "mask"})
        if unknown:
            raise RequestError(f"unknown input {unknown[0]!r} (the inpaint conditioner takes 'image' and 'mask')",
                               field=f"{FIELD}.{unknown[0]}")
        for key in ("image", "mask"):
            if inputs.get(key) is None:
                other = "mask" if key == "image" else "image"
                raise RequestError(f"inpainting needs both an image and a mask; the {other} was given without "
                                   f"the {key}", field=f"{FIELD}.{key}")
        image = open_image(inputs["image"], f"{FIELD}.image").convert("RGB")
        mask = open_image(inputs["mask"], f"{FIELD}.mask")
        (iw, ih), (mw, mh) = image.size, mask.size
        if abs(mw / mh - iw / ih) > 0.01 * iw / ih:
            raise RequestError(f"the mask is {mw}×{mh} (aspect {mw / mh:.3g}), the image {iw}×{ih} "
                               f"(aspect {iw / ih:.3g}): they must have the same aspect ratio", field=f"{FIELD}.mask")
        if mask.mode not in ("L", "1", "I", "F", "I;16"):
            note = f"{FIELD}.mask: a {mask.mode} mask was converted to one channel (luminance; white = regenerate)"
            if mask.mode in ("RGBA", "LA", "PA"):
                note += "; its alpha channel was ignored"
            notes.append(note)
            log.warning(note)
        mask = mask.convert("L") if mask.mode != "F" else mask
        return image, mask

    def input_images(self, inputs: dict[str, Any]) -> list:
        return [self._inputs(inputs, [])[0]] if inputs else []

    def prepare(self, model, request, inputs, conditioning) -> None:
        if not inputs:
            return
        import numpy as np
        import torch

        from fluxframe.core.images import from_pil

        model = require_channels(model, self.name, "inpaint", "mask")
        notes: list[str] = []
        image, mask = self._inputs(inputs, notes)
        image = fit(image, request.width, request.height, f"{FIELD}.image", notes)
        tokens = model.encode_tokens(from_pil(image), posterior_generator(self.posterior, request.seed, SEED_OFFSET))
        m = np.asarray(mask, dtype=np.float32)
        m = torch.from_numpy(m / 255.0 if mask.mode == "L" else m.clip(0.0, 1.0))[None, None]
        keep = 1.0 - model.mask_tokens(m, request.width, request.height, per_channel=True).to(tokens)
        m = model.mask_tokens(m, request.width, request.height)
        conditioning.channels["inpaint"] = tokens * keep
        conditioning.channels["mask"] = m
        conditioning.info[self.name] = {"image": list(image.size), "mask": list(mask.size), "notes": notes,
                                        "regenerate_fraction": round(float(m.mean()), 4)}
