"""C2PA signing: outputs validate with the c2pa library's own Reader, and every key, passphrase and certificate
problem is a clear error at construction — with no unsigned output ever written."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
from pathlib import Path

import c2pa
import pytest
from PIL import Image
from provenance_helpers import dev_signer, output_context, write_output

from fluxframe.core.interfaces import Verdict
from fluxframe.errors import ProvenanceError
from fluxframe.provenance.certs import issue_certificates, write_private
from fluxframe.provenance.signing import ASSERTION_LABEL, TRAINED_ALGORITHMIC_MEDIA, C2PASigner
from fluxframe.provenance.watermark import FLUXFRAME_MESSAGE, WatermarkPostprocessor

PROMPT = "a red bicycle leaning on a sunlit wall"


def photo(size=(512, 512)) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize(size)


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    signer, paths = dev_signer(tmp_path_factory.mktemp("dev-certs"))
    return signer, paths


def write_pems(folder: Path, made: dict[str, bytes], *, key: bytes | None = None) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "chain.pem").write_bytes(made["chain"])
    write_private(folder / "key.pem", key if key is not None else made["key"], force=True)
    return folder / "chain.pem", folder / "key.pem"


def read_manifest(path: Path, ca: Path, media_type: str):
    context = c2pa.Context.from_dict({"trust": {"user_anchors": ca.read_text()}})
    with open(path, "rb") as fh, c2pa.Reader(media_type, fh, context=context) as reader:
        return reader.get_validation_state(), reader.get_validation_results(), reader.get_active_manifest()


def verdicts():
    return [Verdict(filter="prompt-nsfw", version="1.2", allowed=True, target="prompt", scores={"nsfw": 0.02},
                    threshold=0.85, reason="below threshold"),
            Verdict(filter="image-nsfw", version="3", allowed=True, target="output_image", scores={"nsfw": 0.1},
                    threshold=0.85)]


@pytest.mark.parametrize("ext, media_type", [("png", "image/png"), ("jpg", "image/jpeg"), ("webp", "image/webp")])
def test_output_validates_with_the_c2pa_reader(dev, tmp_path, ext, media_type):
    signer, paths = dev
    context = output_context(PROMPT, verdicts=verdicts())
    out = write_output(photo(), tmp_path / f"out.{ext}", [signer, WatermarkPostprocessor()], context)

    state, results, manifest = read_manifest(out, paths["ca"], media_type)
    assert state == "Trusted", results
    assert not results["activeManifest"].get("failure")
    assert manifest["claim_generator_info"][0]["name"] == "fluxframe"
    actions = next(a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))["data"]["actions"]
    created = actions[0]
    assert created["action"] == "c2pa.created"
    assert created["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert created["softwareAgent"]["name"] == "fluxframe"
    ours = next(a for a in manifest["assertions"] if a["label"] == ASSERTION_LABEL)["data"]
    assert ours["request_id"] == context.request.request_id
    assert ours["model"] == {"family": "flux2", "checkpoint": "sha256:0123456789abcdef"}
    assert ours["prompt_sha256"] == hashlib.sha256(PROMPT.encode()).hexdigest()
    assert ours["watermark"]["applied"] is True and ours["watermark"]["bits"] == FLUXFRAME_MESSAGE
    assert [v["filter"] for v in ours["safety_verdicts"]] == ["prompt-nsfw", "image-nsfw"]
    assert ours["safety_verdicts"][0]["scores"] == {"nsfw": 0.02}
    # The prompt itself is not in the file, only its hash.
    assert PROMPT.encode() not in out.read_bytes()
    assert context.records["c2pa"]["signed"] is True
    # fluxframe writes JPEG at quality 95 with 4:4:4 chroma and lossless WebP, so every format keeps its mark,
    # and the manifest declares it only because it was read back from the encoded file.
    watermarked = any(a["action"] == "c2pa.watermarked.unbound" for a in actions)
    assert watermarked is True and ours["watermark"]["readable_after_encoding"] is True
    # Nothing else was left in the folder: no temporary or half-signed files.
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_small_image_decision_is_in_the_manifest(dev, tmp_path):
    signer, paths = dev
    context = output_context()
    out = write_output(photo((128, 128)), tmp_path / "small.png", [WatermarkPostprocessor(), signer], context)
    _, _, manifest = read_manifest(out, paths["ca"], "image/png")
    record = next(a for a in manifest["assertions"] if a["label"] == ASSERTION_LABEL)["data"]["watermark"]
    assert record["applied"] is False and "128x128" in record["reason"]
    actions = next(a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))["data"]["actions"]
    assert [a["action"] for a in actions] == ["c2pa.created"]  # no watermark action claimed


def test_include_prompt_and_claim_generator(dev, tmp_path):
    _, paths = dev
    signer = C2PASigner(paths["chain"], paths["key"], claim_generator="acme-studio/2.1", include_prompt=True)
    out = write_output(photo((64, 64)), tmp_path / "p.png", [signer], output_context(PROMPT))
    _, _, manifest = read_manifest(out, paths["ca"], "image/png")
    assert manifest["claim_generator_info"][0]["name"] == "acme-studio"
    assert manifest["claim_generator_info"][0]["version"] == "2.1"
    ours = next(a for a in manifest["assertions"] if a["label"] == ASSERTION_LABEL)["data"]
    assert ours["prompt"] == PROMPT and ours["watermark"] is None


def test_signing_failure_leaves_no_file(dev, tmp_path, monkeypatch):
    signer, _ = dev

    def fail(self, *args, **kwargs):
        raise c2pa.C2paError("simulated signing failure")

    monkeypatch.setattr(c2pa.Builder, "sign", fail)
    out = tmp_path / "never.png"
    with pytest.raises(ProvenanceError, match="simulated signing failure"):
        write_output(photo((64, 64)), out, [WatermarkPostprocessor(), signer], output_context())
    assert list(tmp_path.iterdir()) == []


def test_unsupported_media_type_is_refused(dev, tmp_path):
    signer, _ = dev
    path = tmp_path / "x.gif"
    photo((64, 64)).save(path, format="GIF")
    with pytest.raises(ProvenanceError, match="cannot sign image/gif"):
        signer.process_file(path, "image/gif", output_context())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gif"]


def test_other_algorithm_ed25519(tmp_path):
    made = issue_certificates(algorithm="ed25519")
    chain, key = write_pems(tmp_path / "k", made)
    (tmp_path / "ca.pem").write_bytes(made["ca"])
    signer = C2PASigner(chain, key, algorithm="ed25519")
    out = write_output(photo((64, 64)), tmp_path / "e.png", [signer], output_context())
    assert read_manifest(out, tmp_path / "ca.pem", "image/png")[0] == "Trusted"


# --- configuration errors: all at construction, all naming what to fix ------------------------------------------


def test_missing_certificate_and_key(dev, tmp_path):
    _, paths = dev
    with pytest.raises(ProvenanceError) as err:
        C2PASigner(tmp_path / "nope.pem", paths["key"])
    assert "provenance.c2pa.certificate" in str(err.value) and "nope.pem" in str(err.value)
    assert "does not exist" in str(err.value)
    with pytest.raises(ProvenanceError) as err:
        C2PASigner(paths["chain"], tmp_path / "nokey.pem")
    assert "provenance.c2pa.private_key" in str(err.value) and "nokey.pem" in str(err.value)


def test_unreadable_files(dev, tmp_path):
    _, paths = dev
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(ProvenanceError, match="provenance.c2pa.private_key.*a-folder.*folder"):
        C2PASigner(paths["chain"], folder)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ProvenanceError, match="provenance.c2pa.certificate.*not a PEM certificate"):
        C2PASigner(garbage, paths["key"])
    bad_key = tmp_path / "badkey.pem"
    write_private(bad_key, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ProvenanceError, match="provenance.c2pa.private_key.*badkey.pem"):
        C2PASigner(paths["chain"], bad_key)
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.pem"
        locked.write_bytes(paths["chain"].read_bytes())
        locked.chmod(0)
        with pytest.raises(ProvenanceError, match="cannot read"):
            C2PASigner(locked, paths["key"])


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_readable_by_others_is_refused(dev, tmp_path, mode):
    _, paths = dev
    key = tmp_path / "key.pem"
    key.write_bytes(paths["key"].read_bytes())
    key.chmod(mode)
    with pytest.raises(ProvenanceError) as err:
        C2PASigner(paths["chain"], key)
    assert "chmod 600" in str(err.value) and f"{mode:04o}" in str(err.value)
    assert "provenance.c2pa.private_key" in str(err.value)


def encrypted(made: dict[str, bytes], passphrase: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(made["key"], password=None)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(passphrase))


def test_encrypted_key_with_passphrase_from_environment(tmp_path, monkeypatch):
    made = issue_certificates()
    chain, key = write_pems(tmp_path, made, key=encrypted(made, b"correct horse"))
    monkeypatch.setenv("FLUXFRAME_TEST_PASSPHRASE", "correct horse")
    signer = C2PASigner(chain, key, passphrase_env="FLUXFRAME_TEST_PASSPHRASE")
    out = write_output(photo((64, 64)), tmp_path / "ok.png", [signer], output_context())
    assert out.exists()

    monkeypatch.setenv("FLUXFRAME_TEST_PASSPHRASE", "wrong horse")
    with pytest.raises(ProvenanceError) as err:
        C2PASigner(chain, key, passphrase_env="FLUXFRAME_TEST_PASSPHRASE")
    assert "wrong passphrase" in str(err.value) and "FLUXFRAME_TEST_PASSPHRASE" in str(err.value)

    monkeypatch.setenv("FLUXFRAME_TEST_PASSPHRASE", "")
    with pytest.raises(ProvenanceError, match="FLUXFRAME_TEST_PASSPHRASE.*empty"):
        C2PASigner(chain, key, passphrase_env="FLUXFRAME_TEST_PASSPHRASE")

    monkeypatch.delenv("FLUXFRAME_TEST_PASSPHRASE")
    with pytest.raises(ProvenanceError, match="FLUXFRAME_TEST_PASSPHRASE.*not set"):
        C2PASigner(chain, key, passphrase_env="FLUXFRAME_TEST_PASSPHRASE")

    with pytest.raises(ProvenanceError, match="encrypted; set provenance.c2pa.passphrase_env"):
        C2PASigner(chain, key)


def test_expired_certificate_is_refused(tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    made = issue_certificates(not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=2))
    chain, key = write_pems(tmp_path, made)
    with pytest.raises(ProvenanceError) as err:
        C2PASigner(chain, key)
    message = str(err.value)
    assert "expired on" in message and (now - dt.timedelta(days=2)).strftime("%Y-%m-%d") in message
    assert "provenance.c2pa.certificate" in message


def test_not_yet_valid_certificate_is_refused(tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    made = issue_certificates(not_before=now + dt.timedelta(days=3), days=30)
    chain, key = write_pems(tmp_path, made)
    with pytest.raises(ProvenanceError, match="not valid until"):
        C2PASigner(chain, key)


def test_key_not_matching_certificate(tmp_path):
    made, other = issue_certificates(), issue_certificates()
    chain, key = write_pems(tmp_path, made, key=other["key"])
    with pytest.raises(ProvenanceError, match="does not belong to the signing certificate"):
        C2PASigner(chain, key)


def test_algorithm_must_fit_the_key(tmp_path):
    chain, key = write_pems(tmp_path, issue_certificates())
    with pytest.raises(ProvenanceError, match="es384 needs an EC key on curve secp384r1.*secp256r1"):
        C2PASigner(chain, key, algorithm="es384")
    with pytest.raises(ProvenanceError, match="ps256 needs an RSA key"):
        C2PASigner(chain, key, algorithm="ps256")
    with pytest.raises(ProvenanceError, match="provenance.c2pa.algorithm: unknown"):
        C2PASigner(chain, key, algorithm="md5")


def test_unreachable_timestamp_authority_stops_the_deployment(tmp_path):
    chain, key = write_pems(tmp_path, issue_certificates())
    with pytest.raises(ProvenanceError, match="trial signature"):
        C2PASigner(chain, key, timestamp_url="http://127.0.0.1:9/tsa")


def test_plugin_registers_both_postprocessors():
    import fluxframe.provenance as provenance
    from fluxframe.core.plugins import PluginHost

    host = PluginHost(load_entry_points=False)
    host.add(provenance, name="provenance", source="fluxframe (test)", builtin=True)
    assert host.get("postprocessor", "watermark").factory is WatermarkPostprocessor
    assert host.get("postprocessor", "c2pa").factory is C2PASigner
    assert WatermarkPostprocessor.order < C2PASigner.order


def test_manifest_serialises_odd_values(dev):
    import numpy as np

    signer, _ = dev
    context = output_context(verdicts=[Verdict(filter="f", version="1", allowed=True, target="prompt",
                                               scores={"a": np.float32(0.5), "b": float("nan")})])
    manifest = signer.manifest(context)
    text = json.dumps(manifest, allow_nan=False)
    assert '"a": 0.5' in text and '"b": null' in text
    buffer = io.BytesIO()
    photo((64, 64)).save(buffer, format="PNG")
    buffer.seek(0)
    signer.sign_stream(buffer, io.BytesIO(), "image/png", manifest)
