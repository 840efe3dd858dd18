"""Provenance inside a real run (tiny preset): the output is watermarked, then signed, then written; the
signed manifest carries the run's verdicts; a signing failure writes nothing and is audited."""

from __future__ import annotations

import json

import pytest

from fluxframe import api
from fluxframe.errors import ProvenanceError
from fluxframe.provenance.certs import make_dev_certificates
from fluxframe.provenance.verify import verify


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_dev_certificates(tmp_path_factory.mktemp("certs"))


def config(tmp_path, certs, allow_unmarked_small=False, **output):
    return api.parse_config({
        "model": {"preset": "tiny", "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 1, "width": 256, "height": 256},
        "output": {"dir": str(tmp_path / "out"), **output},
        "safety": {"require": ["prompt-nsfw", "image-nsfw"], "audit_log": str(tmp_path / "audit.jsonl")},
        "provenance": {"watermark": {"method": "dwtDct", "allow_unmarked_small": allow_unmarked_small},
                       "c2pa": {"certificate": str(certs["chain"]), "private_key": str(certs["key"])}},
    })


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_generated_output_is_marked_signed_and_verifies(tmp_path, host, certs, fmt):
    pipeline = api.load(config(tmp_path, certs, format=fmt), host=host)
    result = pipeline.generate(api.GenerationRequest(prompt="a red circle", seed=3))
    report = verify(result.path, trust=[certs["ca"]])
    assert report.ok, report.summary()
    assert report.ai_generated and report.trusted and not report.altered
    assert report.watermark["detected"] and report.watermark["message"] == "fluxframe"
    assert report.fluxframe["request_id"] == result.request_id
    assert report.fluxframe["model"]["checkpoint"] == pipeline.stages.model.checkpoint_id
    assert {v["filter"] for v in report.fluxframe["safety_verdicts"]} == {"prompt-nsfw", "image-nsfw"}
    assert "watermark: applied (dwtDct)" in result.notes


def test_small_output_is_signed_with_the_recorded_watermark_decision(tmp_path, host, certs):
    """Only where the deployment allows unmarked small outputs (by default such a request is refused before it
    runs: tests/test_hardening_runner.py)."""
    pipeline = api.load(config(tmp_path, certs, allow_unmarked_small=True), host=host)
    result = pipeline.generate(api.GenerationRequest(prompt="a red circle", seed=3, width=128, height=128))
    assert any(note.startswith("watermark: NOT applied") for note in result.notes)
    report = verify(result.path, trust=[certs["ca"]])
    assert report.fluxframe["watermark"]["applied"] is False and report.fluxframe["watermark"]["reason"]
    assert report.fluxframe["watermark"]["allowed_unmarked"] is True


def test_signing_failure_writes_nothing_and_is_audited(tmp_path, host, certs, monkeypatch):
    pipeline = api.load(config(tmp_path, certs), host=host)
    (signer,) = [p for p in pipeline.stages.postprocessors if p.name == "c2pa"]

    def fail(*args, **kwargs):
        raise ProvenanceError("signing service unavailable")

    monkeypatch.setattr(signer, "process_file", fail)
    with pytest.raises(ProvenanceError):
        pipeline.generate(api.GenerationRequest(prompt="a red circle", seed=3))
    assert not any((tmp_path / "out").iterdir())  # not even a temporary file
    (line,) = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert line["action"] == "error" and "signing service unavailable" in line["reasons"][0]
    assert line["output"] is None


def test_unusable_key_stops_start_up(tmp_path, host, certs):
    key = tmp_path / "key.pem"
    key.write_bytes(certs["key"].read_bytes())
    key.chmod(0o644)
    cfg = config(tmp_path, certs).model_copy(deep=True)
    bad = api.parse_config({**json.loads(cfg.model_dump_json(exclude={"base_dir", "source"})),
                            "provenance": {"c2pa": {"certificate": str(certs["chain"]), "private_key": str(key)}}})
    with pytest.raises(ProvenanceError, match="chmod 600"):
        api.load(bad, host=host)
