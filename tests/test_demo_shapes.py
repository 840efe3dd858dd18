"""The demo's synthetic data set: deterministic, captioned in one grammar, with an explicit held-out split -- and the
image analysis that grades the demo model, checked on the generator's own images (which validates the measurement)."""

from __future__ import annotations

import dataclasses
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


# --- the outline style (issue 27's style LoRA demonstration) ---------------------------------------------------------

def _outline(scene: Scene) -> Scene:
    return dataclasses.replace(scene, style="outline")


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_outline_and_filled_read_apart_for_every_shape(shape):
    """Filled reads filled, outline reads hollow, at both sizes, every position and several colours; an outline's
    colour, position, shape and size read as the filled shape's."""
    for position, size, (colour, background) in zip(
            shapes.POSITIONS, itertools.cycle(shapes.SIZES),
            [("yellow", "purple"), ("black", "white"), ("red", "blue"), ("white", "green"), ("orange", "red")]):
        filled = Scene(shape, colour, position, size, background)
        for scene in (filled, _outline(filled)):
            found = shapes.analyse(shapes.render(scene))
            assert found.style == scene.style, (scene, found)
            assert all(shapes.grade(scene, found).values()), (scene, found)
        assert shapes.analyse(shapes.render(filled)).hollow < 0.02
        assert shapes.analyse(shapes.render(_outline(filled))).hollow > 0.25  # HOLLOW_CUT is 0.15


def test_outline_is_the_filled_shape_with_a_hole():
    """Same geometry: the region an outline encloses is the filled shape's region."""
    for scene in shapes.held_out_scenes(32):
        filled, _ = shapes.shape_region(np.asarray(shapes.render(scene)))
        outline, _ = shapes.shape_region(np.asarray(shapes.render(_outline(scene))))
        enclosed = shapes.enclosed_region(outline)
        assert (outline & ~filled).sum() <= 0.01 * filled.sum()
        assert (enclosed ^ filled).sum() <= 0.03 * filled.sum(), scene


def test_style_reading_tolerates_blur_noise_and_a_gap():
    """Generated outlines are soft and may break: blurred, noisy, or with a gap of 4 px, a ring is still hollow and a
    filled shape still filled."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(1)
    for scene in shapes.held_out_scenes(16):
        for s in (scene, _outline(scene)):
            image = shapes.render(s).filter(ImageFilter.GaussianBlur(1.5))
            noisy = np.clip(np.asarray(image, dtype=np.float64) + rng.normal(0, 8, (256, 256, 3)), 0, 255)
            found = shapes.analyse(noisy.astype(np.uint8))
            assert (found.style, found.colour, found.position) == (s.style, s.colour, s.position), (s, found)
    ring = shapes.render(Scene("circle", "red", "centre", "large", "blue", style="outline"))
    ImageDraw.Draw(ring).rectangle([126, 0, 129, 127], fill=shapes.COLOURS["blue"])  # cut the ring at the top
    found = shapes.analyse(ring)
    assert found.style == "outline" and found.shape == "circle"


def test_a_stroke_broken_in_several_places_is_still_one_outline():
    """A generated stroke may break in more than one place: the pieces of the shape's colour within the closing
    distance of each other are one outline (not only the largest piece); specks of other colours near a filled
    shape do not join it, so it still reads filled."""
    from PIL import ImageDraw

    for shape in shapes.SHAPES:
        scene = Scene(shape, "red", "centre", "large", "blue", style="outline")
        broken = shapes.render(scene)
        draw = ImageDraw.Draw(broken)
        draw.rectangle([126, 0, 129, 255], fill=shapes.COLOURS["blue"])  # cut top and bottom: two pieces
        draw.rectangle([0, 160, 255, 163], fill=shapes.COLOURS["blue"])  # and across: four
        found = shapes.analyse(broken)
        assert (found.style, found.colour, found.position) == ("outline", "red", "centre"), (shape, found)
        filled = shapes.render(dataclasses.replace(scene, style="filled"))
        draw = ImageDraw.Draw(filled)
        mask, _ = shapes.shape_region(np.asarray(filled))
        ys, xs = np.nonzero(mask)
        for k in range(24):  # yellow specks 3 px off the shape's edge all round
            angle = 2 * np.pi * k / 24
            far = np.argmax(np.cos(angle) * (xs - xs.mean()) + np.sin(angle) * (ys - ys.mean()))
            x, y = xs[far] + 4 * np.cos(angle), ys[far] + 4 * np.sin(angle)
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=shapes.COLOURS["yellow"])
        found = shapes.analyse(filled)
        assert found.style == "filled" and found.hollow < 0.05, (shape, found)


def test_an_unknown_style_is_refused():
    with pytest.raises(ValueError, match="style"):
        shapes.render(Scene("circle", "red", "centre", "large", "blue", style="dotted"))


def test_outline_dataset_uses_training_triples_only(tmp_path):
    from fluxframe.demo.train_lora import read_dataset

    scenes = shapes.outline_scenes(192, seed=0)
    assert scenes == shapes.outline_scenes(192, seed=0) and len(scenes) == 192
    assert all(s.style == "outline" for s in scenes)
    assert not {s.triple for s in scenes} & shapes.HELD_OUT
    assert {s.triple for s in scenes} == {s.triple for s in shapes.all_scenes("train")}
    assert len({s.caption for s in scenes}) == 192
    assert shapes.write_dataset(scenes[:3], tmp_path) == 3
    items = read_dataset(tmp_path)
    assert [i.caption for i in items] == [s.caption for s in scenes[:3]]
    assert shapes.analyse(shapes.render(scenes[0])).style == "outline"


def test_balanced_outline_dataset_draws_every_shape_and_size_equally():
    scenes = shapes.outline_scenes(200, seed=0, balanced=True)
    assert scenes == shapes.outline_scenes(200, seed=0, balanced=True)
    assert not {s.triple for s in scenes} & shapes.HELD_OUT
    assert {s.triple for s in scenes} == {s.triple for s in shapes.all_scenes("train")}
    for shape in shapes.SHAPES:
        for size in shapes.SIZES:
            assert sum(s.shape == shape and s.size == size for s in scenes) == 25, (shape, size)
    assert shapes.outline_scenes(192, seed=0) != shapes.outline_scenes(192, seed=0, balanced=True)


def test_demo_data_command_writes_a_whole_folder_and_refuses_a_used_one(tmp_path, capsys):
    from fluxframe.cli import main

    out = tmp_path / "outline"
    assert main(["demo-data", "--out", str(out), "--count", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0000.txt", "0001.png", "0001.txt",
                                                     "0002.png", "0002.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["outline"]  # no staging folder left beside it
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["demo-data", "--out", str(out), "--count", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(out) in err and "not empty" in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    (tmp_path / "file").write_text("x")
    assert main(["demo-data", "--out", str(tmp_path / "file")]) == 2
    assert "not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["demo-data", "--out", str(empty), "--count", "1"]) == 0
    assert len(list(empty.iterdir())) == 2
