"""The image-nsfw filter: NudeNet's ONNX detector through onnxruntime. Real photographs that are safe
(scikit-image's data set) are not flagged; the blocking path is exercised with thresholds that force it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxframe.errors import ConfigError
from fluxframe.safety.image_nsfw import CLASSES, DEFAULT_THRESHOLDS, ImageNSFWFilter, default_model_path

skimage_data = pytest.importorskip("skimage.data")
DATA = Path(skimage_data.__file__).parent
# The photographs among scikit-image's bundled images (colour charts, test patterns and text left out).
PHOTOS = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "horse.png", "moon.png",
          "motorcycle_left.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg", "brick.png", "grass.png",
          "gravel.png", "cell.png", "ihc.png", "clock_motion.png", "page.png"]


def photo(name: str) -> Image.Image:
    with Image.open(DATA / name) as im:
        return im.convert("RGB")


@pytest.fixture(scope="module")
def nsfw():
    if default_model_path() is None:
        pytest.skip("nudenet is not installed")
    return ImageNSFWFilter()


@pytest.mark.parametrize("name", PHOTOS)
def test_safe_photographs_are_not_flagged(nsfw, name):
    image = photo(name)
    for candidate in (image, image.resize((1024, 1024))):  # as shipped, and at the size FLUX.2 writes
        v = nsfw.check_image(candidate, "output_image")
        assert v.allowed, f"{name}: {v.reason}"
        assert set(v.scores) == set(CLASSES)


def test_faces_in_photographs_are_seen(nsfw):
    """The detector does run: the astronaut's and the cameraman's faces score, in the right class."""
    assert nsfw.scores(photo("astronaut.png"))["FACE_FEMALE"] > 0.5
    assert nsfw.scores(photo("camera.png"))["FACE_MALE"] > 0.4


def test_scores_match_nudenet_own_detector(nsfw):
    nudenet = pytest.importorskip("nudenet")
    image = photo("astronaut.png")
    theirs = nudenet.NudeDetector().detect(np.asarray(image))  # an RGB array, as NudeNet reads arrays
    ours = nsfw.scores(image)
    assert theirs
    for det in theirs:
        assert ours[det["class"]] == pytest.approx(det["score"], abs=1e-4)


def test_thresholds_that_force_a_block(tmp_path):
    strict = ImageNSFWFilter(thresholds={"FACE_FEMALE": 0.3})
    v = strict.check_image(photo("astronaut.png"), "input_image")
    assert not v.allowed and v.action == "block" and v.target == "input_image"
    assert v.threshold == 0.3 and "FACE_FEMALE" in v.reason
    assert strict.check_image(photo("coffee.png"), "output_image").allowed
    assert set(strict.thresholds) == set(DEFAULT_THRESHOLDS) | {"FACE_FEMALE"}


def test_known_false_positive_on_a_synthetic_colour_chart():
    """Documented limit: scikit-image's colour chart (not a photograph) scores BUTTOCKS_EXPOSED ~0.83.
    A deployer can switch a class off with `false`."""
    image = photo("color.png")
    assert not ImageNSFWFilter().check_image(image, "output_image").allowed
    assert ImageNSFWFilter(thresholds={"BUTTOCKS_EXPOSED": False}).check_image(image, "output_image").allowed


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16"])
def test_any_image_mode_and_shape(nsfw, mode):
    image = photo("chelsea.png")  # 451x300: not square
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 256)
    else:
        image = image.convert(mode)
    assert nsfw.check_image(image, "input_image").allowed
    assert nsfw.check_image(Image.new("RGB", (1, 1)), "input_image").allowed


def test_a_re_encoded_image_scores_the_same(nsfw):
    image = photo("astronaut.png")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    again = Image.open(io.BytesIO(buf.getvalue()))
    assert nsfw.scores(again) == nsfw.scores(image)


def test_not_an_image_raises(nsfw):
    with pytest.raises(TypeError):
        nsfw.check_image(np.zeros((8, 8, 3)), "input_image")


@pytest.mark.parametrize(("options", "key"), [
    ({"thresholds": {"NIPPLE": 0.5}}, "safety.filters.image-nsfw.thresholds.NIPPLE"),
    ({"thresholds": {"ANUS_EXPOSED": 1.5}}, "safety.filters.image-nsfw.thresholds.ANUS_EXPOSED"),
    ({"thresholds": {"ANUS_EXPOSED": True}}, "safety.filters.image-nsfw.thresholds.ANUS_EXPOSED"),
    ({"resolution": 300}, "safety.filters.image-nsfw.resolution"),
    ({"model": "missing.onnx"}, "safety.filters.image-nsfw.model"),
    ({"treshold": 0.5}, "safety.filters.image-nsfw.treshold"),
])
def test_bad_options_name_their_key(options, key):
    with pytest.raises(ConfigError) as info:
        ImageNSFWFilter(**options)
    assert info.value.key == key


def test_version_names_the_model_file_and_resolution(nsfw):
    assert nsfw.version.startswith("1.0+320n.onnx.") and nsfw.version.endswith("@320")


def test_missing_nudenet_is_a_load_failure_not_a_config_error(monkeypatch):
    from fluxframe.errors import SafetyError
    from fluxframe.safety import image_nsfw

    monkeypatch.setattr(image_nsfw, "default_model_path", lambda: None)
    with pytest.raises(SafetyError, match="nudenet package"):
        ImageNSFWFilter()
