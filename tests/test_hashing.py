"""Every hash an audit line records can be recomputed from the files with fluxframe.core.hashing's formulas
(documented there and in the docs), and the C2PA manifest's prompt hash is the same function's."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from PIL import Image

from fluxframe import api
from fluxframe.core.hashing import canonical_json, sha256_file, sha256_image, sha256_json, sha256_text


def test_the_formulas_byte_for_byte():
    image = Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
    assert sha256_image(image) == hashlib.sha256(b"RGB 3x2\n" + bytes(range(18))).hexdigest()
    assert sha256_text("café") == hashlib.sha256("café".encode()).hexdigest()
    assert sha256_text("a \udcff b") == hashlib.sha256(b"a \xff b").hexdigest()  # an undecodable argv byte
    assert canonical_json({"b": 1, "a": ["é", 2.5]}) == '{"a":["é",2.5],"b":1}'.encode()
    assert sha256_json({"b": 1}) == hashlib.sha256(b'{"b":1}').hexdigest()


def test_an_audit_lines_hashes_recompute_from_the_files(tmp_path, host):
    ref = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(ref)
    config = api.parse_config({"model": {"preset": "tiny", "dtype": "float32", "device": "cpu"},
                               "sampler": {"steps": 1, "width": 64, "height": 64},
                               "output": {"dir": str(tmp_path / "out")},
                               "safety": {"audit_log": str(tmp_path / "audit.jsonl")}})
    prompt = "a red circle, naïve"
    result = api.load(config, host=host).generate(
        api.GenerationRequest(prompt=prompt, seed=1, conditioning={"reference": {"images": [ref]}}))
    (line,) = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert line["prompt_sha256"] == sha256_text(prompt)
    assert line["input_files"][0]["sha256"] == sha256_file(ref)
    # the pixels as the model saw them: the reference conditioner keeps a 80x64 RGB image as it is (16-multiple)
    assert line["inputs"][0]["sha256"] == sha256_image(Image.open(ref).convert("RGB"))
    assert line["config_sha256"] == sha256_json(config.model_dump(mode="json"))
    assert line["output"]["sha256"] == sha256_file(result.path)
