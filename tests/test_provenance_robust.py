"""The fluxframe-ss watermark: the message comes back exactly after what platforms do (issue 8's attack matrix,
on 20 images), it stays invisible (PSNR), small images get a recorded decision, unmarked images never match,
and ``verify`` reports the message, the confidence and the configured match while still reading dwtDct marks.

The image sets and attacks are those of bench/watermark_robustness.py (tests/robustness.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import robustness as rb
from PIL import Image
from provenance_helpers import flux_reference_embed, output_context

from fluxframe.errors import ProvenanceError
from fluxframe.provenance import robust
from fluxframe.provenance import watermark as wm
from fluxframe.provenance.verify import verify

SS = wm.ROBUST_METHOD
MESSAGE = wm.FLUXFRAME_MESSAGE
OTHER = "1010011010110001" * 3


@pytest.fixture(scope="module")
def originals() -> dict[str, Image.Image]:
    return rb.marked_set(1024)


@pytest.fixture(scope="module")
def marked(originals) -> dict[str, Image.Image]:
    out = {}
    for name, image in originals.items():
        image_marked, record = wm.embed(image, MESSAGE, method=SS)
        assert record["applied"], (name, record)
        out[name] = image_marked
    return out


def test_the_image_set_is_twenty_different_images(originals):
    assert len(originals) == 20
    sizes = {image.size for image in originals.values()}
    assert {(1024, 1024), (1024, 768), (768, 1024)} <= sizes
    fingerprints = {np.asarray(image.resize((16, 16))).tobytes() for image in originals.values()}
    assert len(fingerprints) == 20


@pytest.mark.parametrize("attack", list(rb.ATTACKS))
def test_message_survives(marked, attack):
    failures = []
    for name, image in marked.items():
        found = wm.match(rb.ATTACKS[attack](image), {"fluxframe": MESSAGE}, method=SS)
        if not (found["detected"] and found["decoded"] == MESSAGE):
            failures.append((name, found["agreement"], found["confidence"], found["reason"]))
        else:
            assert found["message"] == "fluxframe" and found["confidence"] >= robust.CONFIDENCE_THRESHOLD
            assert 0 <= found["bit_errors"] <= robust._bch(48).t
    assert not failures, failures


def test_mark_is_invisible_by_psnr(originals, marked):
    values = {name: rb.psnr(originals[name], marked[name]) for name in originals}
    assert min(values.values()) >= 38.0, values
    # Textured photos sit at the 40 dB target; none is pushed above it except flat images (up to PSNR_FLAT).
    assert all(v >= robust.PSNR_TARGET - 0.5 for v in values.values()), values
    for name in originals:
        assert marked[name].size == originals[name].size and marked[name].mode == "RGB"


def test_larger_images_carry_a_larger_tile_that_survives_downscaling():
    image = rb.photo("astronaut", (2048, 2048))
    image_marked, record = wm.embed(image, MESSAGE, method=SS)
    assert record["applied"]
    found = wm.match(image_marked, {"fluxframe": MESSAGE}, method=SS)
    assert found["detected"] and found["scale"] == pytest.approx((2.0, 2.0), rel=0.01), found  # a 256-px tile
    shrunk = rb.chain(rb.resize(0.25), rb.jpeg(75))(image_marked)  # 512x512: the 8-px chips are 2 px now
    found = wm.match(shrunk, {"fluxframe": MESSAGE}, method=SS)
    assert found["detected"] and found["decoded"] == MESSAGE, found


def test_minimum_size_is_a_recorded_decision(caplog):
    for size in ((511, 800), (800, 300), (256, 256)):
        image = rb.photo("coffee", size)
        same, record = wm.embed(image, MESSAGE, method=SS)
        assert same is image and record["applied"] is False
        assert f"{size[0]}x{size[1]}" in record["reason"] and "512 pixels per edge" in record["reason"]
    context = output_context()
    with caplog.at_level("WARNING"):
        wm.WatermarkPostprocessor().process_image(rb.photo("coffee", (200, 200)), context)
    assert context.records["watermark"]["applied"] is False
    assert context.records["watermark"]["method"] == wm.DEFAULT_METHOD
    assert "not embedded" in caplog.text


def test_images_too_small_for_the_robust_mark_fall_back_to_dwtdct(caplog):
    """256² to 511 px: marked with dwtDct instead, recorded as such, and read back by match/verify."""
    context = output_context()
    with caplog.at_level("WARNING"):
        marked = wm.WatermarkPostprocessor(method=SS).process_image(rb.photo("coffee", (300, 300)), context)
    record = context.records["watermark"]
    assert record["applied"] is True and record["method"] == "dwtDct" and record["requested_method"] == SS
    assert record["readable"] is True and "300x300" in record["reason"] and "dwtDct instead" in caplog.text
    assert wm.match(marked, {"fluxframe": MESSAGE}, method="dwtDct")["detected"]
    assert wm.embed(rb.photo("coffee", (512, 700)), MESSAGE, method=SS)[1]["applied"] is True
    tiny = wm.match(rb.photo("coffee", (60, 60)), {"fluxframe": MESSAGE}, method=SS)
    assert not tiny["detected"] and "60x60" in tiny["reason"]
    small = wm.match(rb.photo("coffee", (200, 200)), {"fluxframe": MESSAGE}, method=SS)
    assert not small["detected"] and "confidence" in small["reason"]


def test_no_false_positives_on_unmarked_images():
    images = rb.unmarked_set()
    assert len(images) >= 200
    confidences = []
    for name, image in images:
        found = wm.match(image, {"fluxframe": MESSAGE, "other": OTHER}, method=SS)
        assert not found["detected"], (name, found)
        assert found["decoded"] is None, (name, found)
        confidences.append(found["confidence"])
    assert max(confidences) < robust.CONFIDENCE_THRESHOLD


def test_postprocessor_default_survives_a_platform_jpeg(tmp_path):
    post = wm.WatermarkPostprocessor(method=SS)  # the default before fluxframe-rs (tests/test_provenance_lattice.py)
    assert post.method == SS
    context = output_context()
    image = post.process_image(rb.photo("chelsea", (768, 768)), context)
    assert context.records["watermark"]["readable"] is True
    path = tmp_path / "out.jpg"
    image.save(path, format="JPEG", quality=75)  # 4:2:0 chroma, as platforms re-encode
    post.process_file(path, "image/jpeg", context)
    assert context.records["watermark"]["readable_after_encoding"] is True


def test_config_default_and_bad_settings():
    from fluxframe.core.config import WatermarkSettings, load_config

    assert WatermarkSettings().method == wm.DEFAULT_METHOD == wm.LATTICE_METHOD
    demo = load_config(__import__("pathlib").Path(__file__).parents[1] / "configs" / "demo.toml")
    assert demo.provenance.watermark.method == wm.LATTICE_METHOD
    with pytest.raises(ProvenanceError, match=r"provenance\.watermark\.message.*32 to 96 bits"):
        wm.WatermarkPostprocessor(method=SS, message="0110" * 6)
    with pytest.raises(ProvenanceError, match=r"provenance\.watermark\.method.*fluxframe-ss"):
        wm.WatermarkPostprocessor(method="fluxframe-SS")


@pytest.fixture(scope="module")
def platform_copy(marked, tmp_path_factory):
    """A marked photo after a platform: JPEG 75, 10 % off two sides, half size, saved as JPEG."""
    path = tmp_path_factory.mktemp("platform") / "shared.jpg"
    rb.chain(rb.jpeg(75), rb.crop(left=0.1, bottom=0.1), rb.resize(0.5))(marked["rocket"]).save(path, quality=80)
    return path


def test_verify_reports_message_confidence_and_configured_match(platform_copy):
    report = verify(platform_copy)
    found = report.watermark
    assert found["detected"] and found["method"] == SS and found["message"] == "fluxframe"
    assert found["decoded"] == MESSAGE and found["confidence"] >= robust.CONFIDENCE_THRESHOLD
    assert found["matches_configured"] is None  # no configured message given
    assert "fluxframe (fluxframe-ss), message " + MESSAGE in report.summary()
    assert not report.ok  # no manifest: a watermark alone is not a verified provenance

    configured = verify(platform_copy, messages={"configured": (SS, MESSAGE)})
    assert configured.watermark["matches_configured"] is True
    assert "matches the deployment's configured message" in configured.summary()

    other = verify(platform_copy, messages={"configured": (SS, OTHER)})
    assert not other.watermark["detected"] and other.watermark["matches_configured"] is False
    assert other.watermark["robust"]["decoded"] == MESSAGE  # what is there is still reported
    assert "does NOT match" in other.summary() and MESSAGE in other.summary()


def test_cli_verify_with_config(platform_copy, tmp_path, capsys):
    from fluxframe.cli import main

    config = tmp_path / "deploy.toml"
    config.write_text('[model]\npreset = "tiny"\n\n[provenance.watermark]\n')  # default method and message
    assert main(["verify", str(platform_copy), "--config", str(config)]) == 1  # no manifest
    out = capsys.readouterr().out
    assert "configured (fluxframe-ss), message " + MESSAGE in out
    assert "matches the deployment's configured message" in out


def test_old_dwtdct_marks_are_still_detected(tmp_path):
    photo = rb.photo("coffee", (640, 480))
    old, record = wm.embed(photo, MESSAGE, method="dwtDct")
    assert record["method"] == "dwtDct"
    for name, image, expected in (("fluxframe-dwtdct.png", old, "fluxframe"),
                                  ("flux-reference.png", flux_reference_embed(photo), "flux-reference")):
        image.save(tmp_path / name)
        report = verify(tmp_path / name)
        assert report.watermark["detected"], report.summary()
        assert report.watermark["method"] == "dwtDct" and report.watermark["message"] == expected
        assert not report.watermark["robust"]["decoded"]


def test_bch_corrects_up_to_t_errors_and_rejects_noise():
    word = robust.encode_bits(MESSAGE) > 0.5
    code = robust._bch(48)
    assert len(word) == 48 + code.ecc_bits and code.t == 12
    rng = np.random.default_rng(5)
    flipped = word.copy()
    flipped[rng.choice(len(word), code.t, replace=False)] ^= True
    assert robust.decode_word(flipped, 48) == (MESSAGE, code.t)
    assert wm.robust_false_match_probability(48) < 1e-15
