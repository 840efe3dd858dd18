"""The safety policy: required filters fail closed in every way they can fail, optional ones degrade and
are recorded, actions (block, blur, flag) and which one wins, prompts without text."""

from __future__ import annotations

import importlib.metadata
import json
import time

import pytest
from PIL import Image

from fluxframe import hookimpl
from fluxframe.core.config import parse_config
from fluxframe.core.interfaces import Filter, Verdict
from fluxframe.core.plugins import PluginHost
from fluxframe.core.policy import BLUR_MARK_KEY, ConfiguredFilter, Decision, SafetyPolicy
from fluxframe.errors import ConfigError, SafetyError


class Fixed(Filter):
    """Allows or blocks everything it is given."""

    version = "t1"
    targets = frozenset({"prompt", "negative_prompt", "upsampled_prompt", "input_image", "output_image"})

    def __init__(self, name="fixed", allowed=True, **_):
        self.name = name
        self.allowed = allowed
        self.seen: list[tuple[str, object]] = []

    def _verdict(self, target):
        return Verdict(self.name, self.version, self.allowed, target, {"x": 0.9 if not self.allowed else 0.1}, 0.5,
                       "too much x" if not self.allowed else "fine")

    def check_prompt(self, text, target):
        self.seen.append((target, text))
        return self._verdict(target)

    def check_image(self, image, target):
        self.seen.append((target, image))
        return self._verdict(target)


class Raises(Fixed):
    def check_prompt(self, text, target):
        raise RuntimeError("model exploded")

    check_image = check_prompt


class Slow(Fixed):
    def check_prompt(self, text, target):
        time.sleep(1.0)
        return self._verdict(target)

    check_image = check_prompt


class Garbage(Fixed):
    def check_prompt(self, text, target):
        return {"allowed": True}

    check_image = check_prompt


class NotABool(Fixed):
    def check_prompt(self, text, target):
        return Verdict(self.name, "1", "yes", target)

    check_image = check_prompt


class PromptsOnly(Fixed):
    targets = frozenset({"prompt"})


def broken_factory(**_):
    raise ImportError("No module named 'onnxruntime'")


class FailureFilters:
    """A plugin registering one filter per failure mode."""

    @hookimpl
    def register_filters(self, register):
        register("good", lambda **o: Fixed("good", True, **o))
        register("bad", lambda **o: Fixed("bad", False, **o))
        register("bad2", lambda **o: Fixed("bad2", False, **o))
        register("raises", lambda **o: Raises("raises"))
        register("slow", lambda **o: Slow("slow"))
        register("garbage", lambda **o: Garbage("garbage"))
        register("not-a-bool", lambda **o: NotABool("not-a-bool"))
        register("broken", broken_factory)
        register("not-a-filter", lambda **o: object())
        register("prompts-only", lambda **o: PromptsOnly("prompts-only"))

        def strict_options(*, colour="red"):
            if colour not in ("red", "blue"):
                raise ConfigError("must be red or blue", key="safety.filters.strict.colour")
            return Fixed("strict")

        register("strict", strict_options)


@pytest.fixture
def fhost():
    h = PluginHost(load_entry_points=False)
    h.add(FailureFilters(), name="test-filters")
    return h


def policy(fhost, filters: dict, require=()):
    config = parse_config({"model": {"preset": "tiny"}, "safety": {"require": list(require), "filters": filters}})
    return SafetyPolicy.from_config(config.safety, fhost)


IMG = Image.new("RGB", (32, 32), (200, 30, 30))


# -- required filters fail closed ----------------------------------------------------------------------

@pytest.mark.parametrize(("name", "message"), [
    ("nope", "not available"),
    ("broken", "failed to load: ImportError: No module named 'onnxruntime'"),
    ("not-a-filter", "failed to load: TypeError"),
])
def test_required_filter_that_cannot_load_stops_start_up(fhost, name, message):
    with pytest.raises(SafetyError, match=message) as info:
        policy(fhost, {}, require=[name])
    assert info.value.filter == name


@pytest.mark.parametrize(("name", "message"), [
    ("raises", "raised RuntimeError: model exploded"),
    ("slow", "timed out after 0.2 s"),
    ("garbage", "returned dict, not a Verdict"),
    ("not-a-bool", "returned a Verdict with allowed='yes', not a Verdict"),
])
def test_required_filter_failing_at_check_time_blocks(fhost, name, message):
    p = policy(fhost, {name: {"timeout": 0.2}}, require=[name])
    t0 = time.perf_counter()
    for decision in (p.check_prompts({"prompt": "a cat"}), p.check_input_images([("reference[0]", IMG)]),
                     p.check_output(IMG)):
        assert not decision.allowed and decision.action == "block"
        assert any(f"required filter {name!r} failed" in r and message in r for r in decision.reasons), \
            decision.reasons
        assert decision.verdicts[0].allowed is False and message in decision.verdicts[0].reason
    assert time.perf_counter() - t0 < 2.5  # the slow one was abandoned after its timeout, three times


def test_required_filter_not_loaded_blocks_every_stage():
    p = SafetyPolicy([ConfiguredFilter("gone", None, True, error="import failed")])
    for decision in (p.check_prompts({"prompt": "a cat"}), p.check_input_images([("control", IMG)]),
                     p.check_output(IMG)):
        assert not decision.allowed
        assert "required filter 'gone' failed" in decision.reasons[0] and "import failed" in decision.reasons[0]


@pytest.mark.parametrize("name", ["raises", "slow", "garbage", "not-a-bool", "broken", "nope", "not-a-filter"])
def test_optional_filter_failures_are_recorded_not_blocking(fhost, name, caplog):
    p = policy(fhost, {name: {"timeout": 0.2}, "good": {}})
    for decision in (p.check_prompts({"prompt": "a cat"}), p.check_output(IMG)):
        assert decision.allowed and decision.action == "allow"
        failed = [v for v in decision.verdicts if v.filter == name]
        assert failed and failed[0].allowed and failed[0].reason.startswith("filter error")
        assert any(f"filter {name!r} (not required) failed" in r for r in decision.reasons)
        assert any(v.filter == "good" for v in decision.verdicts)
    if name in ("broken", "nope", "not-a-filter"):
        assert name in caplog.text  # a warning at start-up
        assert p.describe()[0]["loaded"] is False


def test_filter_option_errors_are_config_errors_even_when_optional(fhost):
    with pytest.raises(ConfigError) as info:
        policy(fhost, {"strict": {"colour": "green"}})
    assert info.value.key == "safety.filters.strict.colour"
    with pytest.raises(ConfigError, match="base_dir"):
        policy(fhost, {"strict": {"base_dir": "/"}})


# -- plugin block-lists, clashes and the CLI cannot remove a required filter ----------------------------

@pytest.fixture
def safety_entry_point(monkeypatch):
    real = importlib.metadata.entry_points
    ep = importlib.metadata.EntryPoint(name="safety", value="fluxframe.safety", group="fluxframe")

    def fake(**kwargs):
        found = list(real(**kwargs))
        if kwargs.get("group") == "fluxframe" and not any(e.name == "safety" for e in found):
            found.append(ep)
        return found

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)


def test_blocking_the_safety_plugin_does_not_remove_a_required_filter(safety_entry_point):
    config = parse_config({"model": {"preset": "tiny"}, "plugins": {"block": ["safety"]},
                           "safety": {"require": ["prompt-nsfw"]}})
    host = PluginHost(block=config.plugins.block)
    with pytest.raises(SafetyError, match="prompt-nsfw.*not blocked in \\[plugins\\] block"):
        SafetyPolicy.from_config(config.safety, host)
    # without the block it loads and works
    host = PluginHost()
    p = SafetyPolicy.from_config(config.safety, host)
    assert p.required == {"prompt-nsfw"} and not p.check_prompts({"prompt": "p0rn"}).allowed


def test_another_plugin_cannot_replace_a_required_filter(fhost):
    import fluxframe.safety

    class Impostor:
        @hookimpl
        def register_filters(self, register):
            register("prompt-nsfw", lambda **o: Fixed("prompt-nsfw", True))

    fhost.add(fluxframe.safety, name="safety")
    fhost.add(Impostor(), name="impostor")
    with pytest.raises(SafetyError, match="registered by both 'safety' and 'impostor'"):
        policy(fhost, {}, require=["prompt-nsfw"])


# -- actions -----------------------------------------------------------------------------------------

def test_block_flag_and_blur_on_prompts_and_inputs(fhost):
    flagged = policy(fhost, {"bad": {"action": "flag"}})
    d = flagged.check_prompts({"prompt": "x"})
    assert d.allowed and d.action == "flag" and d.verdicts[0].action == "flag" and "-> flag" in d.reasons[0]
    blur = policy(fhost, {"bad": {"action": "blur"}})
    d = blur.check_prompts({"prompt": "x"})
    assert not d.allowed and d.action == "block"  # no image to blur yet: blur means block
    d = blur.check_input_images([("reference[0]", IMG), ("inpaint", IMG)])
    assert not d.allowed and d.subjects == ["reference[0]", "inpaint"] and "bad on inpaint" in d.reasons[1]


def test_blur_on_output_returns_a_marked_blurred_image(fhost):
    p = policy(fhost, {"bad": {"action": "blur"}})
    source = Image.new("RGB", (256, 256))
    for x in range(0, 256, 8):  # a fine stripe pattern that a heavy blur must wipe out
        source.paste((255, 255, 255), (x, 0, x + 4, 256))
    d = p.check_output(source)
    assert d.allowed and d.action == "blur"
    out = d.image
    assert out is not source and out.size == source.size and out.info[BLUR_MARK_KEY] == "blurred"
    import numpy as np

    pixels = np.asarray(out.convert("L")).astype(float)
    assert pixels[:64].std() < 3  # the stripes are gone (above the label band)
    band = pixels[118:138]
    assert band.min() < 10 and band.max() > 200  # the label: white text on a black band
    assert np.asarray(source).std() > 100  # the input was not changed


def test_strongest_action_wins(fhost):
    p = policy(fhost, {"bad": {"action": "flag"}, "bad2": {"action": "blur"}, "good": {}})
    assert p.check_output(IMG).action == "blur"
    p = policy(fhost, {"bad": {"action": "flag"}, "bad2": {"action": "block"}})
    d = p.check_output(IMG)
    assert d.action == "block" and not d.allowed and d.image is None


# -- prompts ----------------------------------------------------------------------------------------

def test_prompt_without_text_cannot_pass_a_required_prompt_filter(fhost):
    p = policy(fhost, {"good": {}}, require=["good"])
    d = p.check_prompts({"prompt": None})
    assert not d.allowed and "no prompt text to check" in d.reasons[0]
    optional = policy(fhost, {"good": {}})
    d = optional.check_prompts({"prompt": None})
    assert d.allowed and "no prompt text" in d.verdicts[0].reason
    assert policy(fhost, {}).check_prompts({"prompt": None}).allowed  # no prompt filter configured at all


def test_every_prompt_is_checked_and_upsampled_prompts_reach_prompt_filters(fhost):
    p = policy(fhost, {"good": {}, "prompts-only": {}})
    d = p.check_prompts({"prompt": "a", "negative_prompt": "b", "upsampled_prompt": "a, detailed"})
    assert d.allowed
    seen = {(v.filter, v.target) for v in d.verdicts}
    assert seen == {("good", "prompt"), ("good", "negative_prompt"), ("good", "upsampled_prompt"),
                    ("prompts-only", "prompt"), ("prompts-only", "upsampled_prompt")}


def test_empty_policy_allows_everything():
    p = SafetyPolicy.from_config(None, PluginHost(load_entry_points=False))
    assert p.names == [] and p.required == set()
    assert p.check_prompts({"prompt": None}).allowed and p.check_output(IMG).action == "allow"


def test_decision_record_is_json(fhost):
    p = policy(fhost, {"bad": {"action": "flag"}, "raises": {}})
    d = p.check_input_images([("reference[0]", IMG)])
    record = json.loads(json.dumps(d.to_record()))
    assert record["stage"] == "input_images" and record["action"] == "flag"
    assert [v["subject"] for v in record["verdicts"]] == ["reference[0]", "reference[0]"]
    assert isinstance(d, Decision)


# -- the built-in filters through the policy --------------------------------------------------------

def test_builtin_filters_through_the_policy(host, tmp_path):
    """`host` (conftest) holds the built-in plugins, the safety filters among them."""
    (tmp_path / "names.txt").write_text("Mickey Mouse\n")
    config = parse_config({
        "model": {"preset": "tiny"},
        "safety": {"require": ["prompt-nsfw", "image-nsfw"],
                   "filters": {"ip": {"names_file": "names.txt", "action": "flag"},
                               "image-nsfw": {"action": "blur", "thresholds": {"FACE_FEMALE": 0.3}}}},
    }, base_dir=tmp_path)
    p = SafetyPolicy.from_config(config.safety, host, base_dir=config.base_dir)
    assert p.required == {"prompt-nsfw", "image-nsfw"} and set(p.names) == {"prompt-nsfw", "image-nsfw", "ip"}
    assert not p.check_prompts({"prompt": "a n.u.d.e figure"}).allowed
    d = p.check_prompts({"prompt": "m1ckey m0use in a park"})
    assert d.allowed and d.action == "flag"
    from skimage import data

    astronaut = Image.fromarray(data.astronaut())
    assert not p.check_input_images([("reference[0]", astronaut)]).allowed  # blur on an input means block
    out = p.check_output(astronaut)
    assert out.allowed and out.action == "blur" and out.image.info[BLUR_MARK_KEY] == "blurred"
    assert p.check_output(Image.fromarray(data.coffee())).action == "allow"
