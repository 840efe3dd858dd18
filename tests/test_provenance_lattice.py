"""The fluxframe-rs watermark (issue 26): the message comes back exactly from 256 px per edge after re-encoding,
crops, resizes, rotation and aspect changes (a representative subset per size; the full matrix is
bench/watermark_issue26.py, the grid bench/watermark_grid.py), the rotation and scale estimates are right,
unmarked images are not claimed, bad inputs are refused naming the field, and ``verify`` reports the geometry.
"""

from __future__ import annotations

import numpy as np
import pytest
import robustness as rb
from PIL import Image
from provenance_helpers import output_context

from fluxframe.errors import ProvenanceError
from fluxframe.provenance import lattice
from fluxframe.provenance import watermark as wm
from fluxframe.provenance.robust import encode_bits
from fluxframe.provenance.verify import verify

RS = wm.LATTICE_METHOD
MESSAGE = wm.FLUXFRAME_MESSAGE

#: Images that carry a readable mark at every size (dense grey textures — brick, grass, gravel — do not at 256²:
#: see docs/provenance.md).
IMAGES = ("rocket", "camera", "clock", "gradient")

#: Per size, a representative subset of issue 26's attacks.
CASES = {
    (256, 256): ("JPEG 75", "crop 10% all sides", "rotate +5° (filled)", "aspect x 0.9, y 1.0", "resize 150%"),
    (384, 256): ("JPEG 60", "rotate -2° (cropped)", "crop 10% left", "brightness -10%"),
    (512, 512): ("WebP 80", "rotate +5° (cropped)", "resize 50%", "contrast +10%"),
    (1024, 1024): ("JPEG 75 + crop 10% all sides + resize 50%", "rotate -5° (filled)", "JPEG 60"),
}


def _image(name: str, size: tuple[int, int]) -> Image.Image:
    return rb.generated(name, size) if name == "gradient" else rb.photo(name, size)


@pytest.fixture(scope="module")
def marked() -> dict:
    out = {}
    for size in CASES:
        for name in IMAGES:
            image, record = wm.embed(_image(name, size), MESSAGE, method=RS)
            assert record["applied"], record
            out[size, name] = image
    return out


@pytest.mark.parametrize("size", list(CASES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_message_survives(marked, size):
    failures = []
    for attack in CASES[size]:
        for name in IMAGES:
            found = wm.match(rb.ISSUE26[attack](marked[size, name]), {"fluxframe": MESSAGE}, method=RS)
            if not (found["detected"] and found["decoded"] == MESSAGE and found["message"] == "fluxframe"):
                failures.append((attack, name, found["confidence"], found["reason"]))
    assert not failures, failures


def test_psnr_stays_at_least_38_and_40_on_average(marked):
    values = [rb.psnr(_image(name, size), marked[size, name]) for size, name in marked]
    # Issue 26: at least 38 dB and 40 on average. Textured photos sit at PSNR_TARGET (39 dB), half a decibel over
    # the 38 after rounding; the flat gradient is held at PSNR_FLAT (44 dB) at every size, as before the target was
    # lowered (a mottled texture shows there first).
    assert min(values) >= 38.5 and np.mean(values) >= 40.0, values
    flat = [rb.psnr(_image("gradient", size), marked[size, "gradient"]) for size in CASES]
    assert min(flat) >= 43.5, flat


@pytest.mark.parametrize(("size", "attack", "rotation", "scale"), [
    ((512, 512), rb.rotate(3.0), 3.0, (1.0, 1.0)),
    ((512, 512), rb.rotate(-7.0), -7.0, (1.0, 1.0)),
    ((512, 512), rb.aspect(0.9, 1.0), 0.0, (0.9, 1.0)),
    # 384 px: the size of an image whose own mark has the base tile, so the scale is the resize itself
    ((256, 256), rb.resize(1.5), 0.0, (1.5, 1.5)),
    ((512, 512), rb.chain(rb.rotate(2.0), rb.aspect(0.9, 1.0)), None, None),  # sheared: geometry not checked
])
def test_rotation_and_scale_estimates(marked, size, attack, rotation, scale):
    found = wm.match(attack(marked[size, "rocket"]), {"fluxframe": MESSAGE}, method=RS)
    assert found["detected"], found
    if rotation is not None:
        assert found["rotation"] == pytest.approx(rotation, abs=0.4)
        assert found["scale"] == pytest.approx(scale, abs=0.01)


def test_scale_is_relative_to_the_tile_of_the_image_size():
    """A 1024² image carries a 128-px tile: read at its own size it is at scale 1."""
    assert lattice.tile_scale(1024, 1024) == 2 and lattice.tile_scale(512, 512) == 1
    image, _ = wm.embed(rb.photo("clock", (1024, 1024)), MESSAGE, method=RS)
    found = wm.match(image, {"fluxframe": MESSAGE}, method=RS)
    assert found["detected"] and found["scale"] == pytest.approx((1.0, 1.0), abs=0.01)
    assert found["rotation"] == pytest.approx(0.0, abs=0.3)


def test_unmarked_images_are_not_claimed():
    images = rb.unmarked_set()[::12] + [("flat grey", Image.new("RGB", (300, 300), (128, 128, 128)))]
    for name, image in images:
        found = wm.match(image, {"fluxframe": MESSAGE}, method=RS)
        assert not found["detected"] and found["decoded"] is None, (name, found)


def test_flat_images_decode_to_no_message():
    """A flat image reads exact zeros; the all-zero word must not come back as the all-zero message."""
    for size in ((256, 256), (384, 256), (1024, 1024)):
        read = lattice.read(np.full((size[1], size[0], 3), 77, np.uint8), {48})
        assert read["words"] == {} or read["words"][48]["message"] is None, read


def test_old_marks_are_not_read_as_fluxframe_rs():
    photo = rb.photo("camera", (768, 768))
    for method in (wm.ROBUST_METHOD, "dwtDct"):
        image, _ = wm.embed(photo, MESSAGE, method=method)
        found = wm.match(image, {"fluxframe": MESSAGE}, method=RS)
        assert not found["detected"], (method, found)


def test_bad_inputs_are_refused_naming_the_field():
    with pytest.raises(ProvenanceError, match=r"provenance\.watermark\.message: the fluxframe-rs watermark carries "
                                              r"32 to 96 bits, got 24"):
        wm.WatermarkPostprocessor(method=RS, message="011010" * 4)
    with pytest.raises(ProvenanceError, match=r"bits: .*32 to 96 bits, got 100"):
        wm.embed(rb.photo("camera", (256, 256)), "0110" * 25, method=RS)
    with pytest.raises(ProvenanceError, match=r"method: unknown watermark method 'fluxframe-RS'"):
        wm.embed(rb.photo("camera", (256, 256)), MESSAGE, method="fluxframe-RS")
    small = rb.photo("camera", (255, 400))
    same, record = wm.embed(small, MESSAGE, method=RS)
    assert same is small and record["applied"] is False
    assert "255x400" in record["reason"] and "256 pixels per edge" in record["reason"]
    with pytest.raises(ProvenanceError, match="255x400"):
        lattice.embed_rgb(np.asarray(small), MESSAGE)
    tiny = wm.match(rb.photo("camera", (40, 40)), {"fluxframe": MESSAGE}, method=RS)
    assert not tiny["detected"] and "40x40" in tiny["reason"]


def test_postprocessor_marks_256_and_falls_back_below(caplog):
    post = wm.WatermarkPostprocessor()
    assert post.method == RS == wm.DEFAULT_METHOD
    context = output_context()
    post.process_image(rb.photo("chelsea", (256, 256)), context)
    record = context.records["watermark"]
    assert record["applied"] and record["method"] == RS and record["readable"] is True
    context = output_context()
    with caplog.at_level("WARNING"):
        post.process_image(rb.photo("chelsea", (512, 200)), context)  # 200 px: under 256, but 102400 pixels
    record = context.records["watermark"]
    assert record["method"] == "dwtDct" and record["requested_method"] == RS and "dwtDct instead" in caplog.text
    assert wm.unmarked_reason(200, 200, RS) and wm.unmarked_reason(512, 200, RS) is None


def test_verify_reports_rotation_and_scale(marked, tmp_path):
    path = tmp_path / "rotated.png"
    rb.chain(rb.rotate(3.0), rb.jpeg(80))(marked[(512, 512), "clock"]).save(path)
    report = verify(path)
    found = report.watermark
    assert found["detected"] and found["method"] == RS and found["decoded"] == MESSAGE
    assert found["rotation"] == pytest.approx(3.0, abs=0.4) and found["scale"] == pytest.approx((1, 1), abs=0.01)
    assert found["robust"]["rotation"] == pytest.approx(3.0, abs=0.4)
    summary = report.summary()
    assert "fluxframe (fluxframe-rs), message " + MESSAGE in summary
    # the rotation and scale as estimated (close to the truth, as asserted above), to 0.1° and three decimals
    rotation, (x, y) = round(found["rotation"], 1) + 0.0, found["scale"]
    assert f"geometry:     rotated {rotation:+.1f}° (counter-clockwise), scale x {x:.3f}, y {y:.3f}" in summary, summary


# --- informed embedding -------------------------------------------------------------------------------------------


def _uninformed(monkeypatch, image: Image.Image) -> Image.Image:
    """``image`` marked as before the informed embedding (every chip at amplitude 1, textured images at the 40 dB
    target of the time: the same pixels)."""
    monkeypatch.setattr(lattice, "_ROUNDS", 0)
    monkeypatch.setattr(lattice, "PSNR_TARGET", 40.0)
    marked, _ = wm.embed(image, MESSAGE, method=RS)
    monkeypatch.undo()
    return marked


def _margins(marked: Image.Image) -> tuple[np.ndarray, float]:
    """Each coded bit's soft value times its sign (positive: read right) and the sync confidence, read on the
    lattice known."""
    import cv2

    from fluxframe.provenance.robust import encode_bits

    luma = cv2.cvtColor(np.asarray(marked).astype(np.float32), cv2.COLOR_RGB2GRAY)  # as ``read`` takes it
    soft, sync = lattice._read_at_origin(luma, len(MESSAGE))
    return soft * (2.0 * encode_bits(MESSAGE) - 1.0), sync


@pytest.mark.parametrize(("name", "size"), [("coffee", (256, 256)), ("astronaut", (384, 256))])
def test_textured_photos_the_uninformed_mark_lost_now_read_after_jpeg(monkeypatch, name, size):
    image = rb.photo(name, size)
    before = wm.match(rb.jpeg(75)(_uninformed(monkeypatch, image)), {"fluxframe": MESSAGE}, method=RS)
    assert before["decoded"] != MESSAGE, before
    marked, _ = wm.embed(image, MESSAGE, method=RS)
    assert rb.psnr(image, marked) >= 38.5  # PSNR_TARGET 39 dB, less rounding
    for attack in ("none", "JPEG 90", "JPEG 75", "JPEG 60"):
        found = wm.match(rb.ISSUE26[attack](marked), {"fluxframe": MESSAGE}, method=RS)
        assert found["detected"] and found["decoded"] == MESSAGE, (attack, found)


@pytest.mark.parametrize("name", ["camera", "hubble_deep_field", "cell"])
def test_every_coded_bit_reads_right_on_the_unattacked_informed_mark(monkeypatch, name):
    image = rb.photo(name, (256, 256))
    before, _ = _margins(_uninformed(monkeypatch, image))
    assert np.count_nonzero(before < 0) > 0  # the image itself flips some bits of the uninformed mark
    after, sync = _margins(wm.embed(image, MESSAGE, method=RS)[0])
    assert after.min() > 0, np.sort(after)[:5]
    assert sync >= lattice._SYNC_TARGET - 0.3


def test_informed_sync_lifts_a_textured_photo_over_the_threshold(monkeypatch):
    """astronaut at 256²: the uninformed mark's sync peak stays under CONFIDENCE_THRESHOLD, unattacked."""
    image = rb.photo("astronaut", (256, 256))
    assert wm.match(_uninformed(monkeypatch, image), {"fluxframe": MESSAGE}, method=RS)["confidence"] < 7.0
    marked, _ = wm.embed(image, MESSAGE, method=RS)
    assert lattice.read(np.asarray(marked), {48})["confidence"] >= lattice.CONFIDENCE_THRESHOLD + 1.0
    assert rb.psnr(image, marked) >= 38.5  # PSNR_TARGET 39 dB, less rounding


def test_marks_of_the_uninformed_embedder_still_read(monkeypatch):
    """The detector is the same: files marked before the informed embedding read as they did."""
    for name in ("rocket", "camera"):
        old = _uninformed(monkeypatch, rb.photo(name, (256, 256)))
        for attack in ("none", "JPEG 75", "crop 10% all sides"):
            found = wm.match(rb.ISSUE26[attack](old), {"fluxframe": MESSAGE}, method=RS)
            assert found["detected"] and found["decoded"] == MESSAGE, (name, attack, found)


def test_allocation_keeps_energy_bounds_and_correlation():
    rng = np.random.default_rng(5)
    chips = np.where(np.arange(125) < 67, 2.0, 1.0)
    for spread in (0.3, 1.0, 2.5):
        need = rng.normal(0.0, spread, 125)
        energy = float(np.sum(chips))  # the uninformed mark's
        gains = lattice._allocate(need, chips, energy)
        assert np.sum(chips * gains**2) <= energy * (1 + 1e-6)
        assert gains.min() >= lattice._GAIN_MIN - 1e-9 and gains.max() <= lattice._GAIN_MAX + 1e-9
        # the mark's correlation with the image is not below the uninformed mark's (the lattice search needs it)
        assert np.sum(chips * gains * need) >= np.sum(chips * need) - 1e-6
        if spread <= 1.0:  # as measured on photos (at 2.5 the image outweighs the mark on a third of the bits)
            margin = np.sort((need + gains) * np.sqrt(chips))
            uninformed = np.sort((need + 1.0) * np.sqrt(chips))
            # fewer bits read wrong, and all but the _GIVE_UP weakest further from wrong than before
            assert np.count_nonzero(margin < 0) < max(1, np.count_nonzero(uninformed < 0))
            assert margin[lattice._GIVE_UP] > uninformed[lattice._GIVE_UP]


def test_informed_mark_stays_even_on_flat_images(monkeypatch):
    """Where the image works against no bit, the energy goes back evenly: no chip peaks on a flat field (the
    uninformed mark's largest change there is 3 grey levels)."""
    for value in (128, 255):
        flat = Image.new("RGB", (256, 256), (value, value, value))
        old = np.asarray(_uninformed(monkeypatch, flat), dtype=np.int16) - value
        marked, _ = wm.embed(flat, MESSAGE, method=RS)
        new = np.asarray(marked, dtype=np.int16) - value
        assert np.abs(new).max() <= np.abs(old).max() + 1, (value, np.abs(old).max(), np.abs(new).max())
        assert rb.psnr(flat, marked) >= 43.5
        found = wm.match(marked, {"fluxframe": MESSAGE}, method=RS)
        assert found["detected"] and found["decoded"] == MESSAGE


# --- the detector's prior lattice and further readings (issue 26: textured photos at 256²) ------------------------


def _residual(image: Image.Image) -> np.ndarray:
    import cv2

    return lattice._whiten(cv2.cvtColor(np.asarray(image).astype(np.float32), cv2.COLOR_RGB2GRAY))


def _marked_256(name: str) -> Image.Image:
    return wm.embed(rb.photo(name, (256, 256)), MESSAGE, method=RS)[0]


def test_the_lattice_as_embedded_is_tried_first():
    """coins at 256², cropped 10 % on all sides: the texture's autocorrelation hides the mark's lattice from the
    search; the lattice as embedded (a crop moves the offset, not the lattice) finds it."""
    import cv2

    attacked = rb.ISSUE26["crop 10% all sides"](_marked_256("coins"))
    luma = cv2.cvtColor(np.asarray(attacked).astype(np.float32), cv2.COLOR_RGB2GRAY)
    assert lattice._search(luma, 1, prior=False)[0] < lattice.CONFIDENCE_THRESHOLD
    found = wm.match(attacked, {"fluxframe": MESSAGE}, method=RS)
    assert found["detected"] and found["decoded"] == MESSAGE, found


def test_the_lattice_as_embedded_is_also_tried_at_the_autocorrelations_best_angle(monkeypatch):
    """coins at 256², rotated 5° and cropped: the search's candidates miss the rotated lattice; the tile's own
    period at the angle whose lattice collects the most autocorrelation finds it (unrotated, it does not)."""
    attacked = rb.ISSUE26["rotate +5° (cropped)"](_marked_256("coins"))
    found = wm.match(attacked, {"fluxframe": MESSAGE}, method=RS)
    assert found["detected"] and found["decoded"] == MESSAGE, found
    assert found["rotation"] == pytest.approx(5.0, abs=0.4)
    priors = lattice._priors
    monkeypatch.setattr(lattice, "_priors", lambda auto: priors(auto)[:1])
    assert not wm.match(attacked, {"fluxframe": MESSAGE}, method=RS)["detected"]


def test_a_word_that_does_not_decode_is_read_again_on_the_lattice_before_its_polish(monkeypatch):
    """brick at 256², unattacked: the polish on the sync chips follows the bricks' own pattern 0.3 % off the
    mark's lattice (23 coded bits wrong); the lattice as found reads 12 wrong, and decodes."""
    image = _marked_256("brick")
    found = lattice.read(np.asarray(image), {48})
    assert found["confidence"] >= lattice.CONFIDENCE_THRESHOLD and found["words"][48]["message"] == MESSAGE
    monkeypatch.setattr(lattice, "_rereadings", lambda best, length: iter(()))
    assert lattice.read(np.asarray(image), {48})["words"][48]["message"] is None


def test_a_word_that_does_not_decode_is_read_again_on_the_lattice_refitted_on_all_chips(monkeypatch):
    """immunohistochemistry at 256², marked at the 40 dB target of files made before PSNR_TARGET went to 39 (at 39
    it decodes without the refit), cropped 10 % at the bottom: its word fails on the lattice polished on the sync chips
    and on the lattice before that polish; refitted on all the chips it decodes."""
    with monkeypatch.context() as patch:
        patch.setattr(lattice, "PSNR_TARGET", 40.0)
        marked = _marked_256("immunohistochemistry")
    attacked = np.asarray(rb.ISSUE26["crop 10% bottom"](marked))
    found = lattice.read(attacked, {48})
    assert found["confidence"] >= lattice.CONFIDENCE_THRESHOLD and found["words"][48]["message"] == MESSAGE
    monkeypatch.setattr(lattice, "_refit", lambda residual, basis, count, length: (basis, np.zeros(125)))
    assert lattice.read(attacked, {48})["words"][48]["message"] is None


def test_the_refit_keeps_a_right_lattice_and_brings_back_one_slightly_off():
    truth = np.array([64.0, 0.0, 0.0, 64.0])
    sign = 2.0 * encode_bits(MESSAGE) - 1.0
    for name in ("camera", "astronaut"):
        residual = _residual(_marked_256(name))
        _, count = lattice._fold(residual, truth[:2], truth[2:])
        basis, soft = lattice._refit(residual, truth.copy(), count, 48)
        assert np.array_equal(basis, truth), basis
        assert lattice._decode(soft, 48)[0] == MESSAGE
        # 0.3 % long, 0.1-0.2° turned: drifts up to 0.8 px over the image
        basis, soft = lattice._refit(residual, truth + np.array([0.2, -0.15, 0.1, -0.2]), count, 48)
        assert np.abs(basis - truth).max() < 0.07, basis
        assert np.count_nonzero(soft * sign < 0) <= 10


def test_chips_read_at_a_fractional_offset_agree_with_the_pattern_at_an_integer_one():
    rng = np.random.default_rng(3)
    folded = rng.normal(0.0, 1.0, (lattice.TILE, lattice.TILE))
    spectrum = np.fft.rfft2(folded)
    for offset in ((0, 0), (5, 61), (33, 2)):
        expected = lattice.PATTERN.soft_words(folded, offset, {48})[48]
        assert np.allclose(lattice.PATTERN.words(lattice._chip_values(spectrum, offset), {48})[48], expected)
    # half a pixel: between the readings at the two neighbouring offsets, and neither of them
    half = lattice.PATTERN.words(lattice._chip_values(spectrum, (5, 60.5)), {48})[48]
    left, right = (lattice.PATTERN.soft_words(folded, (5, c), {48})[48] for c in (60, 61))
    assert not np.allclose(half, left) and not np.allclose(half, right)
    assert np.corrcoef(half, left + right)[0, 1] > 0.9


def test_the_further_readings_decode_nothing_on_unmarked_images(monkeypatch):
    """They run only from CONFIDENCE_THRESHOLD (unmarked images stay under it); forced on every image here, the
    extra words read on unmarked images decode to no message."""
    calls = []
    rereadings = lattice._rereadings

    def counted(best, length):
        calls.append(length)
        yield from rereadings(best, length)

    monkeypatch.setattr(lattice, "CONFIDENCE_THRESHOLD", 0.0)
    monkeypatch.setattr(lattice, "_rereadings", counted)
    for name, image in rb.unmarked_set()[::19]:
        read = lattice.read(np.asarray(image.convert("RGB")), {48})
        assert read["words"] == {} or read["words"][48]["message"] is None, name
    assert len(calls) >= 8


def test_false_match_probability_counts_every_reading():
    single = wm.lattice_false_match_probability(48) / lattice.READINGS
    assert lattice.READINGS == 3
    assert single == pytest.approx(1.11e-17, rel=0.01) and wm.lattice_false_match_probability(48) < 1e-16
