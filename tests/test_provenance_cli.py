"""`fluxframe verify` and `fluxframe certs dev`: exit codes, messages, --json, --config."""

from __future__ import annotations

import json
import stat

import pytest
from PIL import Image
from provenance_helpers import change_one_pixel, output_context, strip_manifest, write_output

from fluxframe.cli import main
from fluxframe.provenance.signing import C2PASigner
from fluxframe.provenance.watermark import WatermarkPostprocessor

CUSTOM = "0110100101011010" * 3


def photo(size=(512, 512)) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea()).resize(size)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs") / "dev"
    assert main(["certs", "dev", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def signed(certs, tmp_path_factory):
    signer = C2PASigner(certs / "chain.pem", certs / "key.pem")
    folder = tmp_path_factory.mktemp("out")
    return {
        "default": write_output(photo(), folder / "default.png", [WatermarkPostprocessor(), signer], output_context()),
        "custom": write_output(photo(), folder / "custom.png", [WatermarkPostprocessor(message=CUSTOM), signer],
                               output_context()),
    }


def test_certs_dev_creates_a_usable_chain(certs, capsys, tmp_path):
    assert sorted(p.name for p in certs.iterdir()) == ["ca.pem", "chain.pem", "key.pem"]
    assert stat.S_IMODE((certs / "key.pem").stat().st_mode) == 0o600
    # Refuses to overwrite; --force replaces.
    assert main(["certs", "dev", "--out", str(certs)]) == 1
    assert "already exists" in capsys.readouterr().err
    again = tmp_path / "again"
    assert main(["certs", "dev", "--out", str(again), "--days", "30"]) == 0
    out = capsys.readouterr()
    assert "[provenance.c2pa]" in out.out and "testing only" in out.err
    assert main(["certs", "dev", "--out", str(again), "--force"]) == 0


def test_verify_good_and_trusted(certs, signed, capsys):
    assert main(["verify", str(signed["default"]), "--trust", str(certs / "ca.pem")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{signed['default']}: OK")
    assert "Trusted" in out and "watermark:    fluxframe" in out


def test_verify_json(certs, signed, capsys):
    assert main(["verify", str(signed["default"]), "--trust", str(certs / "ca.pem"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["validation_state"] == "Trusted" and report["ai_generated"] is True
    assert report["fluxframe"]["watermark"]["applied"] is True


def test_verify_untrusted_without_anchor(signed, capsys):
    assert main(["verify", str(signed["default"])]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "not trusted" in out


def test_verify_altered(certs, signed, tmp_path, capsys):
    tampered = tmp_path / "tampered.png"
    tampered.write_bytes(change_one_pixel(signed["default"].read_bytes()))
    assert main(["verify", str(tampered), "--trust", str(certs / "ca.pem")]) == 1
    assert "altered after signing" in capsys.readouterr().out
    assert main(["verify", str(tampered), "--trust", str(certs / "ca.pem"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["altered"] is True and report["ok"] is False


def test_verify_stripped(certs, signed, tmp_path, capsys):
    stripped = tmp_path / "stripped.png"
    stripped.write_bytes(strip_manifest(signed["default"].read_bytes()))
    assert main(["verify", str(stripped), "--trust", str(certs / "ca.pem")]) == 1
    assert "no C2PA manifest" in capsys.readouterr().out


def test_verify_with_config_checks_the_configured_message(certs, signed, tmp_path, capsys):
    config = tmp_path / "deploy.toml"
    config.write_text(f'[model]\npreset = "tiny"\n\n[provenance.watermark]\nmessage = "{CUSTOM}"\n')
    trust = ["--trust", str(certs / "ca.pem")]
    assert main(["verify", str(signed["custom"]), "--config", str(config), *trust]) == 0
    assert "configured (fluxframe-rs)" in capsys.readouterr().out  # the default method
    assert main(["verify", str(signed["default"]), "--config", str(config), *trust]) == 1
    assert "no expected watermark" in capsys.readouterr().out


def test_verify_errors_are_messages(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "missing.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fluxframe: error:") and "missing.png: no such file" in err
    notes = tmp_path / "notes.txt"
    notes.write_text("hi")
    assert main(["verify", str(notes)]) == 1
    assert "not a PNG, JPEG or WebP" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\npreset = "tiny"\n[provenance.watermark]\nmessage = "012"\n')
    image = tmp_path / "x.png"
    photo((64, 64)).save(image)
    assert main(["verify", str(image), "--config", str(bad)]) == 1
    assert "provenance.watermark.message" in capsys.readouterr().err
