"""Hashes of the images and latents fixed requests give, to hold a refactor to bit-identical output.

Run it on two checkouts (e.g. `git worktree add ../before <rev>`) with the same FLUXFRAME_CACHE and compare:

    FLUXFRAME_CACHE=/tmp/ffcache .venv/bin/python bench/image_hashes.py > after.txt

Seven configurations: the demo model with and without a negative prompt, the tiny preset alone and with a
reference image, tiny-klein, a tiny Flex.2 checkpoint alone and with inpaint + control. Each line: the first 16 hex
digits of the SHA-256 of the image's pixels, then of the denoised latents (float32 bytes).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [os.getcwd(), str(ROOT / "tests")]  # the checkout run from, and its test helpers

from flex2_helpers import build_flux_folder  # noqa: E402

from fluxframe import api  # noqa: E402


def digest(result) -> str:
    pixels = hashlib.sha256(np.asarray(result.image).tobytes()).hexdigest()[:16]
    return pixels + " " + hashlib.sha256(result.latents.float().numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    logging.disable(logging.WARNING)
    work = Path(os.environ.get("FLUXFRAME_CACHE") or tempfile.mkdtemp()) / "image-hashes"
    work.mkdir(parents=True, exist_ok=True)
    ref, mask = work / "ref.png", work / "mask.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(ref)
    m = np.zeros((96, 80), np.uint8)
    m[:, :40] = 255
    Image.fromarray(m).save(mask)
    flex2 = work / "flex2" / "ckpt"
    if not flex2.exists():
        build_flux_folder(work / "flex2")

    def sampler(steps=3):
        return {"steps": steps, "width": 64, "height": 64}

    demo = api.load_config(ROOT / "configs" / "demo.toml").model_copy(update={"safety": None, "provenance": None})
    tiny = api.load(api.parse_config({"model": {"preset": "tiny", "dtype": "float32", "device": "cpu"},
                                      "sampler": sampler()}))
    klein = api.load(api.parse_config({"model": {"preset": "tiny-klein", "dtype": "float32", "device": "cpu"},
                                       "sampler": sampler()}))
    flex = api.load(api.parse_config({"model": {"family": "flex2", "path": str(flex2), "dtype": "float32",
                                                "device": "cpu"}, "sampler": sampler()}))
    demo_pipeline = api.load(demo)
    runs = {
        "demo": (demo_pipeline, dict(prompt="a large red circle on the left, on a blue background", seed=7)),
        "demo-neg": (demo_pipeline, dict(prompt="a small green star at the top, on a black background",
                                         negative_prompt="a red circle", seed=9)),
        "tiny": (tiny, dict(prompt="a cat", seed=1)),
        "tiny+ref": (tiny, dict(prompt="a cat", seed=1, conditioning={"reference": {"images": [ref]}})),
        "tiny-klein": (klein, dict(prompt="a cat", seed=2)),
        "flex2": (flex, dict(prompt="a cat", seed=3)),
        "flex2+inpaint+control": (flex, dict(prompt="a cat", seed=3, conditioning={
            "inpaint": {"image": ref, "mask": mask}, "control": {"image": ref, "stop": 0.5}})),
    }
    for name, (pipeline, request) in runs.items():
        print(f"{name:24s} {digest(pipeline.generate(api.GenerationRequest(**request), write=False))}")


if __name__ == "__main__":
    main()
