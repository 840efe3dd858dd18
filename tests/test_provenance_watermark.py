"""The invisible watermark: fluxframe's marks read back by invisible-watermark's stock decoder, the recorded
decision for small images, detection of known messages (FLUX reference included), and the postprocessor."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from provenance_helpers import flux_reference_embed, output_context

from fluxframe.errors import ProvenanceError
from fluxframe.provenance import watermark as wm


def photo(name: str = "astronaut", size=(512, 512)) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB").resize(size)


def stock_decode(image: Image.Image, length: int) -> str:
    """invisible-watermark's own decoder, used the way its README shows (BGR uint8 array)."""
    from imwatermark import WatermarkDecoder

    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    return "".join("1" if b else "0" for b in WatermarkDecoder("bits", length).decode(bgr, "dwtDct"))


def test_messages_are_as_documented():
    assert wm.FLUXFRAME_MESSAGE == "".join(f"{b:08b}" for b in b"fxfr\x00\x01")
    assert len(wm.FLUXFRAME_MESSAGE) == 48
    assert wm.FLUX_REFERENCE_MESSAGE == bin(0b001010101111111010000111100111001111010100101110)[2:]
    assert len(wm.FLUX_REFERENCE_MESSAGE) == 46
    assert wm.KNOWN_MESSAGES == {"fluxframe": wm.FLUXFRAME_MESSAGE, "flux-reference": wm.FLUX_REFERENCE_MESSAGE}
    assert wm.MIN_AREA == 256 * 256


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_stock_decoder_reads_fluxframe_default_mark(name):
    marked, record = wm.embed(photo(name), wm.FLUXFRAME_MESSAGE)
    assert record == {"applied": True, "method": "dwtDct", "bits": wm.FLUXFRAME_MESSAGE, "length": 48, "reason": None}
    assert stock_decode(marked, 48) == wm.FLUXFRAME_MESSAGE
    assert wm.detect(marked, 48) == wm.FLUXFRAME_MESSAGE


def test_stock_decoder_reads_configured_message_through_postprocessor_and_png():
    message = "1100101001110001" * 3 + "10110"  # 53 bits
    post = wm.WatermarkPostprocessor(method="dwtDct", message=message)
    context = output_context()
    marked = post.process_image(photo("coffee", (640, 480)), context)
    buffer = io.BytesIO()
    marked.save(buffer, format="PNG")
    reread = Image.open(io.BytesIO(buffer.getvalue()))
    assert stock_decode(reread, len(message)) == message
    assert context.records["watermark"]["applied"] is True
    assert context.records["watermark"]["bits"] == message


def test_mark_is_invisible_enough():
    original = photo()
    marked, _ = wm.embed(original, wm.FLUXFRAME_MESSAGE)
    a = np.asarray(original, dtype=np.float64)
    b = np.asarray(marked, dtype=np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((a - b) ** 2))
    assert psnr > 36
    assert marked.size == original.size and marked.mode == "RGB"


def test_our_decoder_equals_the_stock_decoder_on_any_image():
    for image in (photo("coffee"), flux_reference_embed(photo("chelsea")), photo("rocket", (300, 400))):
        for length in (46, 48, 64):
            assert wm.detect(image, length) == stock_decode(image, length)


def test_small_image_is_recorded_not_silently_skipped(caplog):
    small = photo(size=(128, 128))
    marked, record = wm.embed(small, wm.FLUXFRAME_MESSAGE)
    assert marked is small
    assert record["applied"] is False
    assert "128x128" in record["reason"] and "65536" in record["reason"]
    context = output_context()
    with caplog.at_level("WARNING"):
        wm.WatermarkPostprocessor().process_image(small, context)
    assert context.records["watermark"]["applied"] is False
    assert "not embedded" in caplog.text
    # The limit is on area, as the library's: 300x200 is under it, 512x128 (exactly 256²) is not.
    assert wm.embed(photo(size=(300, 200)), wm.FLUXFRAME_MESSAGE)[1]["applied"] is False
    assert wm.embed(photo(size=(512, 128)), wm.FLUXFRAME_MESSAGE)[1]["applied"] is True


def test_match_finds_known_messages_and_not_on_unmarked_images():
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera"):
        clean = wm.match(photo(name), wm.KNOWN_MESSAGES)
        assert not clean["detected"] and clean["agreement"] < wm.THRESHOLD, name
    marked, _ = wm.embed(photo("coffee"), wm.FLUXFRAME_MESSAGE)
    found = wm.match(marked, wm.KNOWN_MESSAGES)
    assert found["detected"] and found["message"] == "fluxframe" and found["agreement"] == 1.0
    assert found["scores"]["flux-reference"] < wm.THRESHOLD
    assert found["false_match_probability"] < 1e-6
    tiny = wm.match(photo(size=(100, 100)), wm.KNOWN_MESSAGES)
    assert not tiny["detected"] and "100x100" in tiny["reason"]


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_flux_reference_marks_are_recognised(name):
    # The FLUX reference code embeds in float pixel values, which the stock decoder reads partly inverted
    # (0.0 agreement on some photos); match reads them in their own colour space.
    marked = flux_reference_embed(photo(name))
    found = wm.match(marked, wm.KNOWN_MESSAGES)
    assert found["detected"] and found["message"] == "flux-reference", found


@pytest.mark.parametrize("kwargs, fragment", [
    ({"message": "01x1"}, "0 and 1"),
    ({"message": "0101010"}, "8 to 256"),
    ({"message": "01" * 129}, "8 to 256"),
    ({"message": "0" * 47 + "1"}, "25 % and 75 %"),
    ({"message": ""}, "0 and 1"),
    ({"method": "dct"}, "provenance.watermark.method"),
    ({"method": "rivaGan", "message": wm.FLUXFRAME_MESSAGE}, "32 bits"),
])
def test_bad_settings_name_the_config_key(kwargs, fragment):
    with pytest.raises(ProvenanceError) as err:
        wm.WatermarkPostprocessor(**kwargs)
    assert fragment in str(err.value)
    if "message" in kwargs and "method" not in kwargs:
        assert "provenance.watermark.message" in str(err.value)


def test_rgba_keeps_its_alpha():
    image = photo().convert("RGBA")
    image.putalpha(200)
    marked, record = wm.embed(image, wm.FLUXFRAME_MESSAGE)
    assert record["applied"] and marked.mode == "RGBA"
    assert np.all(np.asarray(marked)[:, :, 3] == 200)
    assert wm.detect(marked, 48) == wm.FLUXFRAME_MESSAGE


def test_process_file_records_whether_the_mark_survived_the_encoding(tmp_path):
    post = wm.WatermarkPostprocessor(method="dwtDct")  # the default method survives all three
    cases = (("PNG", {}, True), ("JPEG", {}, False), ("JPEG", {"quality": 95, "subsampling": 0}, True))
    for fmt, options, survives in cases:
        context = output_context()
        marked = post.process_image(photo("astronaut", (768, 768)), context)
        path = tmp_path / f"out.{fmt.lower()}"
        marked.save(path, format=fmt, **options)
        post.process_file(path, f"image/{fmt.lower()}", context)
        record = context.records["watermark"]
        assert record["readable_after_encoding"] is survives, (fmt, options, record)


def test_dwtdctsvd_goes_through_the_library():
    marked, record = wm.embed(photo(), wm.FLUXFRAME_MESSAGE, method="dwtDctSvd")
    assert record["applied"]
    assert wm.match(marked, {"fluxframe": wm.FLUXFRAME_MESSAGE}, method="dwtDctSvd")["detected"]
