"""The IP filter: protected names matched fuzzily in prompts; protected images matched by perceptual hash
(also after resizing, re-encoding, mirroring), and different images not matched."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from fluxframe.errors import ConfigError
from fluxframe.safety.ip import IPFilter, phash

skimage_data = pytest.importorskip("skimage.data")
DATA = Path(skimage_data.__file__).parent
NAMES = ["Mickey Mouse", "Darth Vader", "Taylor Swift", "Coca-Cola", "Pikachu", "R2-D2", "Elsa"]


def photo(name: str) -> Image.Image:
    with Image.open(DATA / name) as im:
        return im.convert("RGB")


@pytest.fixture(scope="module")
def names():
    return IPFilter(names=NAMES)


@pytest.mark.parametrize(("prompt", "name"), [
    ("Mickey Mouse waving", "Mickey Mouse"),
    ("m1ckey m0use waving", "Mickey Mouse"),
    ("Mickey-Mouse waving", "Mickey Mouse"),
    ("MickeyMouse waving", "Mickey Mouse"),
    ("MICKY MOUSE waving", "Mickey Mouse"),
    ("M i c k e y  M o u s e", "Mickey Mouse"),
    ("Mіckey Mоuse (Cyrillic i and o)", "Mickey Mouse"),
    ("a darth vad3r helmet", "Darth Vader"),
    ("taylor swlft on stage", "Taylor Swift"),
    ("a cocacola bottle", "Coca-Cola"),
    ("Pikachuu plush toy", "Pikachu"),
    ("pika chu plush toy", "Pikachu"),
    ("an r2d2 robot", "R2-D2"),
    ("Elsa from the film", "Elsa"),
])
def test_protected_names_are_matched_through_evasions(names, prompt, name):
    v = names.check_prompt(prompt, "prompt")
    assert not v.allowed, f"{prompt!r}: {v.reason}"
    assert repr(name) in v.reason and v.threshold == names.name_threshold and v.scores["protected_name"] >= 0.88


@pytest.mark.parametrize("prompt", [
    "a field mouse in the grass",
    "Mickey Rourke portrait",
    "a tailor sewing a swift's nest",
    "something else entirely",
    "an elk in the snow",
    "a glass of cola with ice",
    "a vintage robot toy",
])
def test_ordinary_prompts_do_not_match(names, prompt):
    v = names.check_prompt(prompt, "prompt")
    assert v.allowed, f"{prompt!r}: {v.reason}"


def test_names_file_with_aliases_and_comments(tmp_path):
    (tmp_path / "names.txt").write_text("# characters\nSpongeBob SquarePants | Sponge Bob\n\nShrek  # ogre\n")
    f = IPFilter(names_file="names.txt", base_dir=tmp_path)
    assert [n.label for n in f.names] == ["SpongeBob SquarePants", "Sponge Bob", "Shrek"]
    assert not f.check_prompt("sp0ngebob at sea", "prompt").allowed
    assert not f.check_prompt("a shrek costume", "negative_prompt").allowed
    assert f.check_prompt("a kitchen sponge", "prompt").allowed
    assert f.check_image(photo("coffee.png"), "output_image").reason == "no protected images configured"


@pytest.fixture(scope="module")
def protected(tmp_path_factory):
    folder = tmp_path_factory.mktemp("protected")
    photo("astronaut.png").save(folder / "astronaut.png")
    photo("chelsea.png").save(folder / "chelsea.jpg", quality=95)
    return IPFilter(images_dir=str(folder))


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_resized_and_re_encoded_protected_image_is_matched(protected):
    original = photo("astronaut.png")
    for candidate in (original.resize((1024, 1024), Image.Resampling.BICUBIC),
                      _jpeg(original.resize((1024, 1024)), 60),
                      _jpeg(original.resize((256, 256)), 75),
                      original.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                      original.crop((26, 26, 486, 486)).resize((1024, 1024))):
        v = protected.check_image(candidate, "input_image")
        assert not v.allowed, v.reason
        assert "'astronaut.png'" in v.reason and v.scores["protected_image"] >= v.threshold
    cat = protected.check_image(_jpeg(photo("chelsea.png").resize((900, 600)), 70), "output_image")
    assert not cat.allowed and "chelsea.jpg" in cat.reason


@pytest.mark.parametrize("name", ["camera.png", "coffee.png", "rocket.jpg", "horse.png", "motorcycle_left.png",
                                  "retina.jpg", "hubble_deep_field.jpg"])
def test_a_different_image_does_not_match(protected, name):
    v = protected.check_image(photo(name).resize((1024, 1024)), "output_image")
    assert v.allowed, v.reason


def test_hashes_file(tmp_path):
    (tmp_path / "hashes.txt").write_text(f"# pHash label\n{phash(photo('horse.png')):016x} horse\n")
    f = IPFilter(hashes_file=str(tmp_path / "hashes.txt"))
    assert not f.check_image(photo("horse.png").resize((640, 512)), "input_image").allowed
    assert f.check_image(photo("coins.png"), "input_image").allowed
    assert f.check_prompt("Mickey Mouse", "prompt").allowed  # no names given: prompts pass, and say so


@pytest.mark.parametrize(("options", "key"), [
    ({}, "safety.filters.ip.names"),
    ({"names": "Mickey Mouse"}, "safety.filters.ip.names"),
    ({"names": ["x"], "name_threshold": 1.5}, "safety.filters.ip.name_threshold"),
    ({"names": ["x"], "image_distance": 40}, "safety.filters.ip.image_distance"),
    ({"names": ["x"], "images_dir": "/no/such/folder"}, "safety.filters.ip.images_dir"),
    ({"names": ["x"], "thresold": 0.9}, "safety.filters.ip.thresold"),
])
def test_bad_options_name_their_key(options, key):
    with pytest.raises(ConfigError) as info:
        IPFilter(**options)
    assert info.value.key == key


def test_bad_hashes_file_and_flat_reference(tmp_path):
    (tmp_path / "hashes.txt").write_text("not-a-hash label\n")
    with pytest.raises(ConfigError, match="hashes.txt:1"):
        IPFilter(hashes_file=str(tmp_path / "hashes.txt"))
    (tmp_path / "refs").mkdir()
    Image.new("RGB", (64, 64), "white").save(tmp_path / "refs" / "blank.png")
    with pytest.raises(ConfigError, match="flat image"):
        IPFilter(images_dir=str(tmp_path / "refs"))
