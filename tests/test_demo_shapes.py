"""The demo's synthetic data set: deterministic, captioned in one grammar, with an explicit held-out split -- and the
image analysis that grades the demo model, checked on the generator's own images (which validates the measurement)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from fluxframe.demo import shapes
from fluxframe.demo.shapes import Scene

MAKEFILE_PROMPT = "a large red circle on the left, on a blue background"


def test_dataset_is_deterministic_from_its_seed():
    a, b, c = shapes.training_scenes(0), shapes.training_scenes(0), shapes.training_scenes(1)
    assert a == b and a != c
    assert sorted(a, key=repr) != a  # shuffled, not in enumeration order
    assert np.array_equal(np.asarray(shapes.render(a[0])), np.asarray(shapes.render(b[0])))
    assert shapes.DATASET_VERSION == "shapes-v1"


def test_vocabulary_of_the_issue_is_covered():
    assert set(shapes.SHAPES) >= {"circle", "square", "triangle", "star"}
    assert len(shapes.COLOURS) >= 8
    assert set(shapes.POSITIONS) == {"centre", "left", "right", "top", "bottom"}
    assert set(shapes.SIZES) == {"small", "large"}


def test_captions_follow_one_grammar_and_parse_back():
    scene = Scene("circle", "red", "left", "large", "blue")
    assert scene.caption == MAKEFILE_PROMPT
    star = Scene("star", "red", "top", "small", "orange")
    assert star.caption == "a small red star at the top, on an orange background"
    for s in shapes.all_scenes("train")[::37] + shapes.all_scenes("held_out")[::11]:
        assert shapes.parse_caption(s.caption) == s
    assert shapes.parse_caption(MAKEFILE_PROMPT.upper()) == scene
    assert shapes.parse_caption("a large red circle on the left, on a red background") is None  # invisible shape
    assert shapes.parse_caption("a photo of a cat") is None


def test_makefile_prompt_is_a_training_caption():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert f"PROMPT := {MAKEFILE_PROMPT}\n" in makefile
    assert Scene("circle", "red", "left", "large", "blue") in shapes.all_scenes("train")


def test_held_out_split_is_explicit_and_balanced():
    held = shapes.HELD_OUT
    assert len(held) == 32  # of 4 × 8 × 5 = 160 triples
    train = {s.triple for s in shapes.all_scenes("train")}
    assert not train & held and len(train) == 128
    assert all(s.triple in held for s in shapes.all_scenes("held_out"))
    assert {s.triple for s in shapes.training_scenes(0)} == train
    # every pair of attributes of a held-out triple was seen in training: only the combination is new
    for shape, colour, position in held:
        assert any(t[:2] == (shape, colour) for t in train)
        assert any((t[0], t[2]) == (shape, position) for t in train)
        assert any(t[1:] == (colour, position) for t in train)
    evaluation = shapes.held_out_scenes(48)
    assert len(set(s.caption for s in evaluation)) == 48 and all(s.triple in held for s in evaluation)
    assert {s.triple for s in evaluation} == held


@pytest.mark.parametrize("shape,position", list(itertools.product(shapes.SHAPES, shapes.POSITIONS)))
def test_analysis_reads_every_shape_at_every_position(shape, position):
    for size, (colour, background) in zip(shapes.SIZES, [("yellow", "purple"), ("black", "white")]):
        scene = Scene(shape, colour, position, size, background)
        found = shapes.analyse(shapes.render(scene))
        assert all(shapes.grade(scene, found).values()), (scene, found)


def test_analysis_reads_the_generators_own_images():
    """Jittered training renders and the held-out evaluation scenes: every attribute read back correctly."""
    scenes = shapes.training_scenes(7)[:60] + shapes.held_out_scenes(48)
    wrong = []
    for scene in scenes:
        found = shapes.analyse(shapes.render(scene))
        wrong += [(k, scene, found) for k, ok in shapes.grade(scene, found).items() if not ok]
    assert not wrong, wrong[:3]


def test_analysis_tolerates_a_soft_noisy_image():
    """Generated images are never as clean as renders: blur and noise must not change the reading."""
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    for scene in shapes.held_out_scenes(12):
        image = shapes.render(scene).filter(ImageFilter.GaussianBlur(2))
        noisy = np.clip(np.asarray(image, dtype=np.float64) + rng.normal(0, 8, (256, 256, 3)), 0, 255).astype(np.uint8)
        found = shapes.analyse(noisy)
        assert (found.colour, found.position, found.shape) == (scene.colour, scene.position, scene.shape), found


def test_analysis_of_an_empty_image():
    from PIL import Image

    found = shapes.analyse(Image.new("RGB", (256, 256), shapes.COLOURS["green"]))
    assert found.background == "green" and found.shape is None and found.colour is None and found.position is None


def test_nearest_named_colour():
    for name, rgb in shapes.COLOURS.items():
        assert shapes.nearest_colour(rgb) == name
        assert shapes.nearest_colour(np.clip(np.add(rgb, 15), 0, 255)) == name


def _drawn(draw_on) -> np.ndarray:
    """A 256² picture drawn at 4x by ``draw_on(ImageDraw)`` in white on black and reduced, as analyse's input."""
    from PIL import Image, ImageDraw

    big = Image.new("RGB", (1024, 1024), shapes.COLOURS["black"])
    draw_on(ImageDraw.Draw(big))
    return np.asarray(big.resize((256, 256), Image.Resampling.BOX))


@pytest.mark.parametrize("corner", [0.0, 0.15, 0.25])
def test_a_square_with_rounded_corners_and_a_bump_on_one_edge_still_reads_square(corner):
    """A generated square's corners are soft and its edges wobble; a bump that widens its bounding box by a fifth
    used to turn it into a circle (fill of the box 0.81 to 0.86). Which ideal shape overlaps it more does not move."""
    white = shapes.COLOURS["white"]

    def draw(d):
        d.rounded_rectangle([312, 312, 712, 712], radius=int(corner * 400), fill=white)
        d.ellipse([640, 480, 792, 544], fill=white)  # a flat lump sticking out of the right edge

    found = shapes.analyse(_drawn(draw))
    assert found.fill < 0.89 and found.square_overlap > found.disk_overlap, found
    assert found.shape == "square", found


def test_a_lumpy_disk_and_a_very_rounded_square_read_circle():
    white = shapes.COLOURS["white"]

    def lumpy_disk(d):
        d.ellipse([312, 312, 712, 712], fill=white)
        d.ellipse([640, 480, 792, 544], fill=white)

    def squircle(d):  # corners rounded to 0.4 of the side: the flat part of each edge is a fifth of it
        d.rounded_rectangle([312, 312, 712, 712], radius=160, fill=white)

    for draw in (lumpy_disk, squircle):
        found = shapes.analyse(_drawn(draw))
        assert found.shape == "circle", (draw.__name__, found)
