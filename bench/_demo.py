"""What the demo model's benchmarks share (not a benchmark itself): a pipeline for a shapes checkpoint, sampled as
``configs/demo.toml`` samples."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "models" / "shapes-v1"


def demo_pipeline(model: str | Path, *, loras: list[tuple[str | Path, float]] = (), **overrides):
    """(pipeline, sampler): the checkpoint folder ``model`` in float32 on the CPU, with the demo config's [sampler]
    table updated by those ``overrides`` that are not None, and these LoRAs (path, weight) applied."""
    from fluxframe import api

    sampler = tomllib.loads((ROOT / "configs" / "demo.toml").read_text(encoding="utf-8"))["sampler"]
    sampler.update({key: value for key, value in overrides.items() if value is not None})
    config = {"model": {"family": "flux2", "path": str(model), "dtype": "float32"}, "sampler": dict(sampler),
              "lora": [{"path": str(path), "weight": weight} for path, weight in loras]}
    return api.load(api.parse_config(config)), sampler
