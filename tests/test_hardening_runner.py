"""Issue 22's fixes as a deployment meets them through the runner and the CLI: the audit log is checked before
weights load (class 3), a size the watermark cannot mark is refused before generating unless the deployment allows
it, and then recorded (class 5), and `config check` refuses what every `generate` would (class 8)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from fluxframe import api
from fluxframe.cli import main
from fluxframe.core.audit import verify_log
from fluxframe.errors import AuditError, ConfigError, RequestError
from fluxframe.plugins.flux2.family import Flux2

ROOT = Path(__file__).resolve().parent.parent
TINY = {"model": {"preset": "tiny", "dtype": "float32", "device": "cpu"}, "sampler": {"steps": 1, "width": 64,
                                                                                     "height": 64}}


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight load fails the test: the refusal must come first."""
    monkeypatch.setattr(Flux2, "load", classmethod(lambda *a, **k: pytest.fail("weights loaded before the check")))


def cfg(tmp_path, **sections):
    data = {**TINY, "output": {"dir": str(tmp_path / "out")}, **sections}
    return api.parse_config(data, source=str(tmp_path / "deploy.toml"), base_dir=tmp_path)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- class 3: the audit log is checked at start-up, keyed from the config --------------------------------------

@pytest.mark.parametrize("breakage", ["directory", "dev-null", "half-line", "head-missing", "head-dir"])
def test_a_log_that_cannot_be_appended_stops_start_up_before_weights(tmp_path, host, no_weights, breakage):
    log = tmp_path / "logs" / "audit.jsonl"
    log.parent.mkdir()
    if breakage == "directory":
        log.mkdir()
    elif breakage == "dev-null":
        log.symlink_to("/dev/null")
    else:
        from fluxframe.core.audit import AuditLog

        AuditLog(log).append({"event": "test"})
        if breakage == "half-line":
            with open(log, "ab") as f:
                f.write(b'{"event":"cut sh')
        elif breakage == "head-missing":
            log.with_name("audit.jsonl.head").unlink()
        else:
            log.with_name("audit.jsonl.head").unlink()
            log.with_name("audit.jsonl.head").mkdir()
    before = log.read_bytes() if log.is_file() and not log.is_symlink() else None
    with pytest.raises(AuditError) as info:
        api.load(cfg(tmp_path, safety={"audit_log": str(log)}), host=host)
    assert str(log) in str(info.value)
    if before is not None:
        assert log.read_bytes() == before  # nothing appended, not even a refusal line


def test_the_cli_refuses_a_broken_log_in_one_line(tmp_path, capsys):
    (tmp_path / "audit.jsonl").mkdir()
    (tmp_path / "deploy.toml").write_text(textwrap.dedent(f"""
        [model]
        preset = "tiny"
        device = "cpu"
        [output]
        dir = "{tmp_path / 'out'}"
        [safety]
        audit_log = "audit.jsonl"
    """))
    for argv in (["generate", "--config", str(tmp_path / "deploy.toml"), "--prompt", "a cat"],
                 ["config", "check", str(tmp_path / "deploy.toml")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("fluxframe: error:") and "audit.jsonl" in err and err.count("\n") == 1, err


def test_audit_key_env_keys_every_line_and_must_be_set(tmp_path, host, monkeypatch):
    log = tmp_path / "audit.jsonl"
    safety = {"audit_log": str(log), "audit_key_env": "DEPLOY_AUDIT_KEY"}
    monkeypatch.delenv("DEPLOY_AUDIT_KEY", raising=False)
    for call in (api.load, api.check_config):
        with pytest.raises(ConfigError) as info:
            call(cfg(tmp_path, safety=safety), host=host)
        assert info.value.key == "safety.audit_key_env" and "DEPLOY_AUDIT_KEY" in str(info.value)
    monkeypatch.setenv("DEPLOY_AUDIT_KEY", "s3cret")
    pipeline = api.load(cfg(tmp_path, safety=safety), host=host)
    pipeline.generate(api.GenerationRequest(prompt="a cat", seed=1))
    assert all(isinstance(line.get("mac"), str) for line in lines(log))
    assert verify_log(log, key="s3cret").ok and not verify_log(log, key="other").ok
    monkeypatch.setenv("DEPLOY_AUDIT_KEY", "another")  # the next start with another key refuses the log's tail
    with pytest.raises(AuditError):
        api.load(cfg(tmp_path, safety=safety), host=host)


# -- class 5: unmarked outputs only where the deployment allows them ------------------------------------------

def test_a_size_the_watermark_cannot_mark_is_refused_before_generating_and_audited(tmp_path, host, monkeypatch):
    log = tmp_path / "audit.jsonl"
    config = cfg(tmp_path, safety={"audit_log": str(log)}, provenance={"watermark": {}})
    with pytest.raises(ConfigError) as info:  # the default size is one no request could be marked at
        api.check_config(config, host=host)
    assert info.value.key == "sampler.width" and "64x64" in str(info.value)
    config = cfg(tmp_path, sampler={**TINY["sampler"], "width": 512, "height": 512},
                 safety={"audit_log": str(log)}, provenance={"watermark": {}})
    pipeline = api.load(config, host=host)
    denoised = []
    monkeypatch.setattr(pipeline.stages.sampler, "sample", lambda *a, **k: denoised.append(1))
    for width, height in ((256, 128), (64, 512), (128, 128)):
        with pytest.raises(RequestError, match="allow_unmarked_small"):
            pipeline.generate(api.GenerationRequest(prompt="a cat", seed=1, width=width, height=height))
    assert denoised == [] and not any((tmp_path / "out").iterdir())
    refused = lines(log)
    assert [r["action"] for r in refused] == ["error"] * 3 and all("watermark" in r["reasons"][0] for r in refused)


def test_allowed_unmarked_small_outputs_are_written_and_recorded(tmp_path, host):
    log = tmp_path / "audit.jsonl"
    config = cfg(tmp_path, safety={"audit_log": str(log)},
                 provenance={"watermark": {"allow_unmarked_small": True}})
    api.check_config(config, host=host)
    result = api.load(config, host=host).generate(api.GenerationRequest(prompt="a cat", seed=1))
    assert result.path.is_file()
    record = lines(log)[-1]
    assert record["action"] == "allow"
    mark = record["postprocessors"]["watermark"]
    assert mark["applied"] is False and mark["allowed_unmarked"] is True and "64x64" in mark["reason"]


# -- class 8: config check refuses what generate would --------------------------------------------------------

def test_config_check_refuses_sizes_the_checkpoint_cannot_take(tmp_path, capsys):
    """The demo model needs multiples of 32 (16x autoencoder, 2x2 patches); the tiny preset multiples of 16."""
    for model, width, multiple in ((f'path = "{ROOT / "models" / "shapes-v1"}"', 48, 32),
                                   (f'path = "{ROOT / "models" / "shapes-v1"}"', 272, 32),
                                   ('preset = "tiny"', 40, 16), ('preset = "tiny"', 17, 16)):
        config = tmp_path / "deploy.toml"
        config.write_text(f'[model]\n{model}\ndevice = "cpu"\n[sampler]\nwidth = {width}\nheight = 256\n')
        assert main(["config", "check", str(config)]) == 1
        err = capsys.readouterr().err
        assert "sampler.width" in err and f"multiple of {multiple}" in err and err.count("\n") == 1, err
        assert main(["generate", "--config", str(config), "--prompt", "a red circle"]) == 1  # as generate does
        assert f"multiple of {multiple}" in capsys.readouterr().err
