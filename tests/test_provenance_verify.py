"""verify(): good outputs check, altered / stripped / untrusted ones fail and say why."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
from PIL import Image
from provenance_helpers import (
    change_one_pixel,
    dev_signer,
    flux_reference_embed,
    output_context,
    reencode,
    strip_manifest,
    write_output,
)

from fluxframe.errors import ProvenanceError
from fluxframe.provenance.certs import issue_certificates, write_private
from fluxframe.provenance.signing import C2PASigner
from fluxframe.provenance.verify import verify
from fluxframe.provenance.watermark import FLUXFRAME_MESSAGE, WatermarkPostprocessor


def photo(size=(512, 512), name="astronaut") -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB").resize(size)


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return dev_signer(tmp_path_factory.mktemp("dev-certs"))


@pytest.fixture(scope="module")
def signed(dev, tmp_path_factory):
    """A signed, watermarked PNG and JPEG."""
    signer, _ = dev
    folder = tmp_path_factory.mktemp("signed")
    return {ext: write_output(photo(), folder / f"out.{ext}", [WatermarkPostprocessor(), signer], output_context())
            for ext in ("png", "jpg")}


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_good_output_checks(dev, signed, ext):
    _, paths = dev
    report = verify(signed[ext], trust=[paths["ca"]])
    assert report.ok, report.summary()
    assert report.manifest_present and report.signature_valid and report.bound_to_pixels and report.trusted
    assert report.altered is False and report.ai_generated
    assert report.validation_state == "Trusted"
    assert report.generator.startswith("fluxframe ")
    assert report.fluxframe["model"]["family"] == "flux2"
    assert "OK" in report.summary().splitlines()[0]
    data = json.loads(report.to_json())
    assert data["ok"] is True and data["watermark"]["declared"]["bits"] == FLUXFRAME_MESSAGE
    # fluxframe's JPEG (quality 95, 4:4:4 chroma) keeps the mark as the PNG does
    assert report.watermark["detected"] and report.watermark["message"] == "fluxframe"


def test_untrusted_signer(dev, signed, tmp_path):
    # No trust anchor at all.
    report = verify(signed["png"])
    assert not report.ok and not report.trusted and report.signature_valid
    assert report.validation_state == "Valid"
    assert any("not trusted" in r for r in report.reasons)
    # Trusting some other CA does not help.
    other = tmp_path / "other-ca.pem"
    other.write_bytes(issue_certificates()["ca"])
    report = verify(signed["png"], trust=[other])
    assert not report.ok and not report.trusted
    assert any("does not chain to any of the trust anchors" in r for r in report.reasons)
    assert "NOT trusted" in report.summary()


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_one_changed_pixel_is_detected(dev, signed, tmp_path, ext):
    _, paths = dev
    tampered = tmp_path / f"tampered.{ext}"
    tampered.write_bytes(change_one_pixel(signed[ext].read_bytes()))
    report = verify(tampered, trust=[paths["ca"]])
    assert report.manifest_present
    assert not report.ok and report.altered and not report.bound_to_pixels
    assert "assertion.dataHash.mismatch" in report.validation_codes["failure"]
    assert any("altered after signing" in r for r in report.reasons)
    assert "ALTERED" in report.summary()


@pytest.mark.parametrize("strip", [strip_manifest, reencode], ids=["manifest-removed", "re-encoded"])
def test_stripped_manifest_fails_but_watermark_remains(dev, signed, tmp_path, strip):
    _, paths = dev
    stripped = tmp_path / "stripped.png"
    stripped.write_bytes(strip(signed["png"].read_bytes()))
    report = verify(stripped, trust=[paths["ca"]])
    assert not report.ok and not report.manifest_present and report.altered is None
    assert any("no C2PA manifest" in r for r in report.reasons)
    assert report.watermark["detected"] and report.watermark["message"] == "fluxframe"
    assert "manifest:     none" in report.summary()


def test_flux_reference_marks_are_reported(tmp_path):
    path = tmp_path / "flux.png"
    flux_reference_embed(photo(name="coffee")).save(path)
    report = verify(path)
    assert report.watermark["detected"] and report.watermark["message"] == "flux-reference"
    assert not report.ok  # a watermark alone is not a verified provenance


def test_configured_message_must_match(dev, signed):
    _, paths = dev
    other = "1010011010110001" * 3
    report = verify(signed["png"], trust=[paths["ca"]], messages={"configured": other})
    assert not report.ok and not report.watermark["detected"]
    assert any("no expected watermark" in r for r in report.reasons)
    report = verify(signed["png"], trust=[paths["ca"]], messages={"configured": FLUXFRAME_MESSAGE})
    assert report.ok and report.watermark["message"] == "configured"


def test_small_signed_image_without_mark_checks(dev, tmp_path):
    signer, paths = dev
    out = write_output(photo((128, 128)), tmp_path / "small.png", [WatermarkPostprocessor(), signer],
                       output_context())
    report = verify(out, trust=[paths["ca"]])
    assert report.ok, report.summary()
    assert not report.watermark["detected"]
    assert any("no watermark was embedded" in note and "128x128" in note for note in report.notes)


def test_signature_without_timestamp_is_invalid_after_the_certificate_expires(tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    expires = now + dt.timedelta(seconds=1.5)
    made = issue_certificates(not_before=now - dt.timedelta(minutes=5), not_after=expires)
    (tmp_path / "chain.pem").write_bytes(made["chain"])
    (tmp_path / "ca.pem").write_bytes(made["ca"])
    write_private(tmp_path / "key.pem", made["key"])
    signer = C2PASigner(tmp_path / "chain.pem", tmp_path / "key.pem")
    out = write_output(photo((64, 64)), tmp_path / "short.png", [signer], output_context())
    time.sleep(max(0.0, expires.timestamp() + 1.1 - time.time()))  # c2pa compares whole seconds
    report = verify(out, trust=[tmp_path / "ca.pem"])
    assert not report.ok and not report.signature_valid
    assert "signingCredential.expired" in report.validation_codes["failure"]
    assert any("expired" in note for note in report.notes)


def test_bad_inputs_are_errors_not_tracebacks(dev, tmp_path):
    _, paths = dev
    with pytest.raises(ProvenanceError, match="no such file"):
        verify(tmp_path / "missing.png")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ProvenanceError, match="not a PNG, JPEG or WebP image"):
        verify(text)
    image = tmp_path / "plain.png"
    photo((64, 64)).save(image)
    with pytest.raises(ProvenanceError, match="not a PEM certificate"):
        verify(image, trust=[text])
    # A truncated image cannot be checked at all: an error naming it, not a report (and not a traceback).
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image.read_bytes()[:200])
    with pytest.raises(ProvenanceError, match="truncated.png: not a readable image"):
        verify(truncated, trust=[paths["ca"]])


def test_signed_without_watermark_checks_with_a_note(dev, tmp_path):
    signer, paths = dev
    out = write_output(photo((320, 320)), tmp_path / "nowm.png", [signer], output_context())
    report = verify(out, trust=[paths["ca"]])
    assert report.ok, report.summary()
    assert report.fluxframe["watermark"] is None
    assert any("no watermark was embedded (none configured)" in note for note in report.notes)
