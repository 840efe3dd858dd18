"""The safety layer inside a real run (tiny preset): every failure mode of a required filter blocks the
request, leaves no image behind, and the audit log says why; violations block, blur or flag."""

from __future__ import annotations

import json
import time

import pytest
from PIL import Image

from fluxframe import api, hookimpl
from fluxframe.core.audit import verify_log
from fluxframe.core.interfaces import Filter, Verdict
from fluxframe.errors import Blocked, SafetyError


class Faulty(Filter):
    """A filter that misbehaves in the way its `mode` says, on prompts or on the output."""

    name = "faulty"
    version = "1"

    def __init__(self, mode: str = "ok", stage: str = "prompt", seconds: float = 2.0):
        self.mode, self.stage, self.seconds = mode, stage, seconds
        self.targets = frozenset({"prompt"} if stage == "prompt" else {"output_image"})

    def _act(self, target):
        if self.mode == "raise":
            raise RuntimeError("detector crashed")
        if self.mode == "timeout":
            time.sleep(self.seconds)
        if self.mode == "garbage":
            return {"allowed": True}
        return Verdict(filter=self.name, version=self.version, allowed=True, target=target)

    def check_prompt(self, text, target):
        return self._act(target)

    def check_image(self, image, target):
        return self._act(target)


def broken_factory(**options):
    raise ImportError("No module named 'detector_weights'")


class FaultyPlugin:
    @hookimpl
    def register_filters(self, register):
        register("faulty", Faulty)
        register("broken", broken_factory)


@pytest.fixture
def safety_host(host):
    host.add(FaultyPlugin(), name="faulty-plugin")
    return host


def config(tmp_path, safety):
    return api.parse_config({
        "model": {"preset": "tiny", "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 1, "width": 32, "height": 32},
        "output": {"dir": str(tmp_path / "out")},
        "safety": {"audit_log": str(tmp_path / "audit.jsonl"), **safety},
    })


def audit_lines(tmp_path):
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


RUNTIME_FAULTS = [
    ("raise", "prompt", "RuntimeError: detector crashed"),
    ("timeout", "prompt", "timed out"),
    ("garbage", "prompt", "not a Verdict"),
    ("raise", "output", "RuntimeError: detector crashed"),
    ("timeout", "output", "timed out"),
    ("garbage", "output", "not a Verdict"),
]


@pytest.mark.parametrize("mode,stage,words", RUNTIME_FAULTS, ids=[f"{m}-{s}" for m, s, _ in RUNTIME_FAULTS])
def test_required_filter_failing_at_run_time_blocks(tmp_path, safety_host, mode, stage, words):
    cfg = config(tmp_path, {"require": ["faulty"],
                            "filters": {"faulty": {"mode": mode, "stage": stage, "seconds": 1.5, "timeout": 0.3}}})
    pipeline = api.load(cfg, host=safety_host)
    with pytest.raises(Blocked) as info:
        pipeline.generate(api.GenerationRequest(prompt="a red circle", seed=1))
    assert "faulty" in str(info.value) and words in str(info.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    (line,) = audit_lines(tmp_path)
    assert line["action"] == "block" and line["output"] is None
    assert any("faulty" in r and words in r for r in line["reasons"])
    assert verify_log(tmp_path / "audit.jsonl").ok


@pytest.mark.parametrize("name,words", [("ghost", "not"), ("broken", "No module named 'detector_weights'")],
                         ids=["absent", "import-error"])
def test_required_filter_that_cannot_load_stops_start_up(tmp_path, safety_host, name, words):
    cfg = config(tmp_path, {"require": [name]})
    with pytest.raises(SafetyError) as info:
        api.load(cfg, host=safety_host)
    assert name in str(info.value) and words in str(info.value)
    assert not (tmp_path / "out").exists()
    (line,) = audit_lines(tmp_path)
    assert line["event"] == "start-refused" and name in line["reasons"][0]


def test_blocking_the_plugin_cannot_remove_a_required_filter(tmp_path):
    """[plugins] block on the plugin that provides a required filter: fluxframe refuses to start."""
    cfg = api.parse_config({
        "model": {"preset": "tiny"}, "plugins": {"block": ["safety"]},
        "safety": {"require": ["prompt-nsfw"]},
    })
    with pytest.raises(SafetyError, match="prompt-nsfw"):
        api.check_config(cfg)


def test_optional_filter_failing_does_not_block_but_is_recorded(tmp_path, safety_host):
    cfg = config(tmp_path, {"filters": {"faulty": {"mode": "raise"}}})
    result = api.load(cfg, host=safety_host).generate(api.GenerationRequest(prompt="a red circle", seed=1))
    assert result.path.exists()
    (line,) = audit_lines(tmp_path)
    assert line["action"] in ("allow", "flag") and line["output"]["path"] == str(result.path.resolve())
    assert any("filter error" in v["reason"] for v in line["verdicts"])


def test_explicit_prompt_is_blocked_by_the_builtin_filter(tmp_path, safety_host):
    cfg = config(tmp_path, {"require": ["prompt-nsfw"]})
    with pytest.raises(Blocked, match="prompt-nsfw"):
        api.load(cfg, host=safety_host).generate(api.GenerationRequest(prompt="a n4ked w o m a n, nsfw", seed=1))
    (line,) = audit_lines(tmp_path)
    assert line["action"] == "block" and line["verdicts"][0]["allowed"] is False


def test_allowed_request_is_audited_with_the_output_hash(tmp_path, safety_host):
    import hashlib

    cfg = config(tmp_path, {"require": ["prompt-nsfw", "image-nsfw"]})
    pipeline = api.load(cfg, host=safety_host)
    first = pipeline.generate(api.GenerationRequest(prompt="a red circle", seed=1))
    second = pipeline.generate(api.GenerationRequest(prompt="a blue square", seed=2))
    lines = audit_lines(tmp_path)
    assert [line["request_id"] for line in lines] == [first.request_id, second.request_id]
    for line, result in zip(lines, (first, second)):
        assert line["output"]["sha256"] == hashlib.sha256(result.path.read_bytes()).hexdigest()
        assert {v["filter"] for v in line["verdicts"]} == {"prompt-nsfw", "image-nsfw"}
        assert line["prompt_sha256"] == hashlib.sha256(result.prompt.encode()).hexdigest()
        assert line["checkpoint"].startswith("sha256:")
    assert verify_log(tmp_path / "audit.jsonl").ok


class FlagEverything(Filter):
    name = "flag-all"
    targets = frozenset({"output_image"})

    def __init__(self, **options):
        pass

    def check_image(self, image, target):
        return Verdict(filter=self.name, version="1", allowed=False, target=target, reason="test violation")


@pytest.mark.parametrize("action", ["blur", "flag"])
def test_output_violation_blurs_or_flags(tmp_path, host, action):
    class Plugin:
        @hookimpl
        def register_filters(self, register):
            register("flag-all", FlagEverything)

    host.add(Plugin(), name="flag-plugin")
    cfg = api.parse_config({
        "model": {"preset": "tiny", "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 1, "width": 256, "height": 256},
        "output": {"dir": str(tmp_path / "out")},
        "safety": {"audit_log": str(tmp_path / "audit.jsonl"), "filters": {"flag-all": {"action": action}}},
    })
    pipeline = api.load(cfg, host=host)
    clean = pipeline.generate(api.GenerationRequest(prompt="x", seed=4), write=False).image if action == "flag" else None
    result = pipeline.generate(api.GenerationRequest(prompt="x", seed=4))
    written = Image.open(result.path)
    line = audit_lines(tmp_path)[-1]
    assert line["action"] == action
    if action == "flag":
        assert written.tobytes() == clean.tobytes()
    else:
        assert result.image.info.get("fluxframe:safety") == "blurred"


class PassThroughReference:
    """A conditioner that only hands its input images to the policy (what the model would see)."""

    families = ()

    def __init__(self, **options):
        pass

    def input_images(self, inputs):
        return [Image.open(p).convert("RGB") for p in inputs.get("images", [])]

    def prepare(self, model, request, inputs, conditioning):
        conditioning.info["seen"] = len(inputs.get("images", []))


class BlockBlue(Filter):
    name = "block-blue"
    targets = frozenset({"input_image"})

    def __init__(self, **options):
        pass

    def check_image(self, image, target):
        r, g, b = image.convert("RGB").getpixel((0, 0))
        return Verdict(filter=self.name, version="1", allowed=b < 200, target=target, scores={"blue": b / 255},
                       reason="blue input" if b >= 200 else "")


def test_every_input_image_is_checked_and_hashed_in_the_audit(tmp_path, host):
    class Plugin:
        @hookimpl
        def register_conditioners(self, register):
            register("passthrough", PassThroughReference)

        @hookimpl
        def register_filters(self, register):
            register("block-blue", BlockBlue)

    host.add(Plugin(), name="input-plugin")
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(red)
    Image.new("RGB", (32, 32), (0, 0, 255)).save(blue)
    pipeline = api.load(config(tmp_path, {"require": ["block-blue"]}), host=host)

    ok = pipeline.generate(api.GenerationRequest(prompt="x", seed=1, conditioning={"passthrough": {"images": [red]}}))
    assert ok.path.exists()
    with pytest.raises(Blocked, match=r"block-blue.*passthrough\[1\]|passthrough\[1\].*block-blue"):
        pipeline.generate(api.GenerationRequest(prompt="x", seed=1,
                                                conditioning={"passthrough": {"images": [red, blue]}}))
    allowed, blocked = audit_lines(tmp_path)
    assert [i["role"] for i in blocked["inputs"]] == ["passthrough[0]", "passthrough[1]"]
    assert blocked["inputs"][0]["sha256"] == allowed["inputs"][0]["sha256"]
    assert blocked["action"] == "block" and blocked["output"] is None


def test_a_conditioner_named_by_one_request_is_not_applied_to_the_next(tmp_path, host):
    class Plugin:
        @hookimpl
        def register_conditioners(self, register):
            register("passthrough", PassThroughReference)

    host.add(Plugin(), name="input-plugin")
    red = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(red)
    pipeline = api.load(config(tmp_path, {}), host=host)
    with_ref = pipeline.generate(api.GenerationRequest(prompt="x", seed=1,
                                                       conditioning={"passthrough": {"images": [red]}}))
    plain = pipeline.generate(api.GenerationRequest(prompt="x", seed=1))
    first, second = audit_lines(tmp_path)
    assert [i["role"] for i in first["inputs"]] == ["passthrough[0]"] and second["inputs"] == []
    assert with_ref.path != plain.path


def test_a_request_failing_after_the_filters_is_audited_as_an_error(tmp_path, host):
    from fluxframe.errors import RequestError

    class Plugin:
        @hookimpl
        def register_conditioners(self, register):
            register("passthrough", PassThroughReference)

    host.add(Plugin(), name="input-plugin")
    pipeline = api.load(config(tmp_path, {"require": ["prompt-nsfw"]}), host=host)
    with pytest.raises(RequestError):
        pipeline.generate(api.GenerationRequest(prompt="x", seed=1, width=40))  # not a multiple of 16
    with pytest.raises(FileNotFoundError):  # not a fluxframe error (the test conditioner's bug): audited too
        pipeline.generate(api.GenerationRequest(prompt="x", seed=1,
                                                conditioning={"passthrough": {"images": [tmp_path / "none.png"]}}))
    first, second = audit_lines(tmp_path)
    assert first["action"] == "error" and "multiple of 16" in first["reasons"][0] and first["output"] is None
    assert second["action"] == "error" and second["reasons"][0].startswith("FileNotFoundError")
    assert not any((tmp_path / "out").iterdir())  # the folder is made at start-up, checked writable; no file
