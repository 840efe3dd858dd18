"""`fluxframe check` and `fluxframe audit verify`: exit codes and what they print."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from fluxframe.cli import main
from fluxframe.core.audit import AuditLog

skimage_data = pytest.importorskip("skimage.data")
DATA = Path(skimage_data.__file__).parent


@pytest.fixture(autouse=True)
def safety_entry_point(monkeypatch):
    """The safety layer as an installed plugin (as pyproject's entry point makes it)."""
    real = importlib.metadata.entry_points
    ep = importlib.metadata.EntryPoint(name="safety", value="fluxframe.safety", group="fluxframe")

    def fake(**kwargs):
        found = list(real(**kwargs))
        if kwargs.get("group") == "fluxframe" and not any(e.name == "safety" for e in found):
            found.append(ep)
        return found

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)


@pytest.fixture
def config(tmp_path):
    (tmp_path / "names.txt").write_text("Mickey Mouse\n")
    path = tmp_path / "deploy.toml"
    path.write_text("""
[model]
preset = "tiny"

[safety]
require = ["prompt-nsfw", "image-nsfw"]

[safety.filters.ip]
names_file = "names.txt"
action = "flag"
""")
    return path


def test_check_allows_an_ordinary_prompt_and_photo(config, capsys):
    code = main(["check", "--config", str(config), "--prompt", "a lighthouse at dusk",
                 "--image", str(DATA / "coffee.png")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "result: allowed" in out and "prompt-nsfw" in out and "image-nsfw" in out and "required" in out


def test_check_blocks_and_says_why(config, capsys):
    code = main(["check", "--config", str(config), "--prompt", "a n.u.d.e woman"])
    out = capsys.readouterr().out
    assert code == 3
    assert "result: BLOCKED" in out and "sexual 1.00 >= 0.50" in out


def test_check_flags_and_json(config, capsys):
    code = main(["check", "--config", str(config), "--prompt", "m1ckey m0use at the beach",
                 "--negative-prompt", "blurry", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["allowed"] is True and report["action"] == "flag"
    assert {f["name"] for f in report["filters"]} == {"prompt-nsfw", "image-nsfw", "ip"}
    targets = {(v["filter"], v["target"]) for v in report["decisions"][0]["verdicts"]}
    assert ("prompt-nsfw", "negative_prompt") in targets and ("ip", "prompt") in targets


def test_check_output_image_with_forced_threshold(tmp_path, capsys):
    path = tmp_path / "deploy.toml"
    path.write_text('[model]\npreset = "tiny"\n[safety.filters.image-nsfw]\naction = "blur"\n'
                    '[safety.filters.image-nsfw.thresholds]\nFACE_FEMALE = 0.3\n')
    code = main(["check", "--config", str(path), "--prompt", "x", "--output-image", str(DATA / "astronaut.png")])
    assert code == 0 and "output: blur" in capsys.readouterr().out
    code = main(["check", "--config", str(path), "--prompt", "x", "--image", str(DATA / "astronaut.png")])
    assert code == 3  # on an input, blur means block


@pytest.mark.parametrize(("body", "message"), [
    ('[safety]\nrequire = ["no-such-filter"]\n', "filter 'no-such-filter': required filter is not available"),
    ('[safety.filters.prompt-nsfw]\ncolour = "red"\n', "safety.filters.prompt-nsfw.colour: unknown option"),
    ('[plugins]\nblock = ["safety"]\n[safety]\nrequire = ["prompt-nsfw"]\n', "not blocked in [plugins] block"),
])
def test_check_errors_exit_1(tmp_path, capsys, body, message):
    path = tmp_path / "deploy.toml"
    path.write_text('[model]\npreset = "tiny"\n' + body)
    assert main(["check", "--config", str(path), "--prompt", "a cat"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fluxframe: error:") and message in err


def test_check_unreadable_image_exits_1(config, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["check", "--config", str(config), "--prompt", "a cat", "--image", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "not a readable image" in err and str(bad) in err  # the shared reader's message (fluxframe.core.inputs)


def test_audit_verify(tmp_path, capsys):
    log_path = tmp_path / "audit.jsonl"
    log = AuditLog(log_path)
    for i in range(3):
        log.append({"request_id": f"r{i}"})
    assert main(["audit", "verify", str(log_path)]) == 0
    assert "ok" in capsys.readouterr().out
    raw = log_path.read_bytes().split(b"\n")
    log_path.write_bytes(b"\n".join([raw[0], raw[2], b""]))  # delete line 2
    assert main(["audit", "verify", str(log_path)]) == 1
    assert "BROKEN at line 2" in capsys.readouterr().err


def test_audit_verify_with_key(tmp_path, monkeypatch, capsys):
    log_path = tmp_path / "audit.jsonl"
    AuditLog(log_path, key="k1").append({"request_id": "r"})
    monkeypatch.setenv("FLUXFRAME_AUDIT_KEY", "k1")
    assert main(["audit", "verify", str(log_path)]) == 0
    monkeypatch.setenv("FLUXFRAME_AUDIT_KEY", "wrong")
    assert main(["audit", "verify", str(log_path)]) == 1
    assert "HMAC" in capsys.readouterr().err
