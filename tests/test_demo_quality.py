"""The shipped demo model, graded honestly: captions it never saw (held-out shape/colour/position combinations),
generated at the demo config's size, steps and guidance through the public API, and read back by image analysis.

Two bars. ISSUE_BAR is issue 9's (colour >= 90 %, position >= 85 %, shape >= 75 %); models/shapes-v1 measures
colour 100 %, position 100 %, shape 88 %, size 100 %, background 100 % (circles 16 of 16, squares 13 of 16,
triangles 5 of 8, stars 8 of 8). The shape is read by ``shapes.analyse``: a circle and a square are told apart by
which ideal shape of the region's area and centroid overlaps it more (bounding-box fill, the earlier rule, read the
same images at 67 %: a bump on one edge of a square widens its box).
FLOOR is the shipped model's measured level less a margin: a regression check on the checkpoint and on the code
that loads and samples it. Run with -s to see the figures.
"""

from __future__ import annotations

import tomllib
from collections import Counter
from pathlib import Path

import pytest

from fluxframe import api
from fluxframe.demo import shapes

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.toml"
CAPTIONS = 48  # every one of the 32 held-out triples, 16 of them twice (other size, other background)
ISSUE_BAR = {"colour": 0.90, "position": 0.85, "shape": 0.75}
FLOOR = {"colour": 0.90, "position": 0.90, "shape": 0.78, "size": 0.90, "background": 0.95}


def demo_settings() -> tuple[dict, dict]:
    """The demo config's [model] (checkpoint path resolved as the config resolves it) and [sampler]."""
    data = tomllib.loads(DEMO_CONFIG.read_text(encoding="utf-8"))
    model = dict(data["model"])
    model["path"] = str((DEMO_CONFIG.parent / model["path"]).resolve())
    return model, dict(data["sampler"])


@pytest.fixture(scope="module")
def graded():
    model, sampler = demo_settings()
    if not (Path(model["path"]) / "model_index.json").is_file():
        pytest.fail(f"the demo checkpoint is missing: {model['path']}")
    sampler.pop("name", None)
    # Only the model and the sampler matter here: the filters, watermark and signature the demo also runs do not
    # change what is drawn (the watermark's change is invisible to this analysis), so they are left out for speed.
    pipeline = api.load(api.parse_config({"model": model, "sampler": sampler}))
    rows = []
    for i, scene in enumerate(shapes.held_out_scenes(CAPTIONS)):
        assert shapes.parse_caption(scene.caption) == scene
        result = pipeline.generate(api.GenerationRequest(prompt=scene.caption, seed=1000 + i), write=False)
        rows.append((scene, shapes.analyse(result.image)))
    return rows, sampler


def test_held_out_captions_are_unseen():
    train_captions = {s.caption for s in shapes.all_scenes("train")}
    assert not train_captions & {s.caption for s in shapes.held_out_scenes(CAPTIONS)}


def _rates(graded) -> dict[str, float]:
    rows, sampler = graded
    counts = Counter()
    for scene, found in rows:
        for key, ok in shapes.grade(scene, found).items():
            counts[key] += ok
    rates = {key: counts[key] / len(rows) for key in shapes.GRADED}
    print(f"\ndemo model on {len(rows)} held-out captions at {sampler['width']}x{sampler['height']}, "
          f"{sampler['steps']} steps, guidance {sampler['guidance']}: "
          + ", ".join(f"{k} {v:.0%}" for k, v in rates.items()))
    for scene, found in rows:
        wrong = [k for k, ok in shapes.grade(scene, found).items() if not ok]
        if wrong:
            print(f"  {scene.caption!r}: read {found.size} {found.colour} {found.shape} {found.position} "
                  f"on {found.background} (wrong: {', '.join(wrong)})")
    return rates


def test_demo_model_keeps_its_measured_level(graded):
    rates = _rates(graded)
    for key, floor in FLOOR.items():
        assert rates[key] >= floor, (key, rates)


def test_demo_model_draws_what_unseen_captions_ask_for(graded):
    rates = _rates(graded)
    for key, bar in ISSUE_BAR.items():
        assert rates[key] >= bar, (key, rates)
