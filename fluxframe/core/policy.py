"""The safety policy: which filters run on what, what a violation does, and failing closed.

* A filter named in ``[safety] require`` must load, or ``SafetyPolicy.from_config`` raises SafetyError and
  fluxframe does not start. At run time, a required filter that is not loaded, raises, runs past its
  timeout or returns something that is not a Verdict blocks the request, with a reason naming it.
* A filter that is configured but not required degrades instead: its failures are recorded (a verdict
  with ``allowed=True`` and a reason starting "filter error") and do not block.
* A violation (``verdict.allowed`` false) applies the filter's action: ``block`` (no image), ``blur``
  (output only: a heavily blurred, labelled image replaces it; on prompts and inputs blur means block),
  or ``flag`` (allowed, recorded). The strongest action over all filters wins: block > blur > flag.
* Prompts given only as embeddings (text ``None``) cannot pass a required prompt filter.
* A filter's ``targets`` say what it checks; a target outside ``TARGETS`` (a misspelling) would silently check
  nothing, so it is a ConfigError, and so is a required filter whose targets are empty: it would let everything
  through while the deployment believes it guarded.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxframe.core.interfaces import Filter, Verdict
from fluxframe.core.options import instantiate
from fluxframe.errors import ConfigError, FluxframeError, SafetyError

log = logging.getLogger("fluxframe.safety")

ACTIONS = ("allow", "flag", "blur", "block")  # weakest to strongest
_RANK = {a: i for i, a in enumerate(ACTIONS)}
PROMPT_KEYS = ("prompt", "negative_prompt", "upsampled_prompt")
#: Everything a filter can be run on (check_prompts takes PROMPT_KEYS; images are "input_image", "output_image").
TARGETS = (*PROMPT_KEYS, "input_image", "output_image")
NO_TEXT = "no prompt text to check (prompt embeddings were given without their text)"
BLUR_MARK_KEY = "fluxframe:safety"


@dataclass
class ConfiguredFilter:
    name: str
    filter: Filter | None
    required: bool
    action: str = "block"
    timeout: float = 10.0
    error: str | None = None  # why it is not loaded
    plugin: str | None = None  # the plugin that registered it


@dataclass
class Decision:
    allowed: bool
    action: str  # "allow" | "block" | "blur" | "flag"
    verdicts: list[Verdict] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    image: Any = None  # the replacement (blurred, labelled) image when action == "blur"
    stage: str = ""  # "prompts" | "input_images" | "output"
    subjects: list[str] = field(default_factory=list)  # what each verdict was about: "prompt", "reference[0]"...

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready summary for the audit log (no prompt text, no pixels)."""
        return {
            "stage": self.stage,
            "allowed": self.allowed,
            "action": self.action,
            "reasons": list(self.reasons),
            "verdicts": [
                {"filter": v.filter, "version": v.version, "target": v.target, "subject": s, "allowed": v.allowed,
                 "action": v.action, "scores": dict(v.scores), "threshold": v.threshold, "reason": v.reason}
                for v, s in zip(self.verdicts, self.subjects, strict=True)
            ],
        }


class _Timeout(Exception):
    pass


def _call(fn, args: tuple, timeout: float, name: str):
    """Run ``fn(*args)`` in a daemon thread; raise _Timeout if it has not returned after ``timeout`` s.
    A timed-out call is abandoned (Python cannot kill a thread); its result is ignored."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - everything a filter raises is its failure
            box["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=run, name=f"fluxframe-filter-{name}", daemon=True)
    thread.start()
    if not done.wait(timeout):
        raise _Timeout(f"timed out after {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _looks_like_filter(obj: Any) -> bool:
    return callable(getattr(obj, "check_prompt", None)) and callable(getattr(obj, "check_image", None)) \
        and isinstance(getattr(obj, "targets", None), set | frozenset | tuple | list)


def _check_targets(name: str, instance: Any, required: bool) -> None:
    """A ConfigError naming ``safety.filters.NAME`` for targets that would make the filter check less than its
    configuration suggests: one that is not in TARGETS (never matched, so never checked), or none at all on a
    required filter."""
    targets = getattr(instance, "targets", None)
    if isinstance(targets, str) or not isinstance(targets, set | frozenset | tuple | list):
        raise ConfigError(f"the filter's targets must be a set of target names, got {targets!r}",
                          key=f"safety.filters.{name}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"unknown target {unknown[0]!r} (known: {', '.join(TARGETS)}): a filter checks only "
                          "the targets it names, so a misspelt one checks nothing", key=f"safety.filters.{name}")
    if not targets:
        if required:
            raise ConfigError("required filter checks nothing: its targets are empty",
                              key=f"safety.filters.{name}")
        log.warning("safety filter %r (not required) checks nothing: its targets are empty", name)


def blur_image(image: Any, label: str = "BLURRED BY SAFETY FILTER") -> Any:
    """A heavily blurred copy (pixelated to 1/64 of the size, then Gaussian-blurred) with a visible label
    band across the middle, and ``info["fluxframe:safety"] = "blurred"`` for the writer to keep."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    rgb = image.convert("RGB")
    w, h = rgb.size
    small = rgb.resize((max(1, w // 64), max(1, h // 64)), Image.Resampling.BOX)
    out = small.resize((w, h), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(radius=max(w, h) / 40))
    draw = ImageDraw.Draw(out)
    size = max(10, min(w // (len(label) * 0.62 + 2), h // 12))
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        font = ImageFont.load_default()
    box = draw.textbbox((0, 0), label, font=font)
    tw, th = box[2] - box[0], box[3] - box[1]
    pad = max(4, th // 2)
    top = (h - th) // 2 - pad
    draw.rectangle((0, top, w, top + th + 2 * pad), fill=(0, 0, 0))
    draw.text(((w - tw) // 2 - box[0], top + pad - box[1]), label, fill=(255, 255, 255), font=font)
    out.info[BLUR_MARK_KEY] = "blurred"
    return out


class SafetyPolicy:
    def __init__(self, filters: list[ConfiguredFilter]):
        names = [f.name for f in filters]
        if len(set(names)) != len(names):
            raise SafetyError(f"a filter is configured twice: {names}")
        for f in filters:
            if f.action not in ("block", "blur", "flag"):
                raise ConfigError(f"must be block, blur or flag, got {f.action!r}",
                                  key=f"safety.filters.{f.name}.action")
            if f.filter is None and f.error is None:
                f.error = "not loaded"
            if f.filter is not None:
                _check_targets(f.name, f.filter, f.required)
        self.filters = list(filters)

    @property
    def required(self) -> set[str]:
        return {f.name for f in self.filters if f.required}

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.filters]

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, safety, host, *, base_dir: str | Path | None = None,
                    source: str | None = None) -> SafetyPolicy:
        """Build from ``[safety]`` (a SafetySection, or None for no filters) and the plugin host.

        Each filter is built from the options in its ``[safety.filters.NAME]`` table (every key but the
        policy's ``action`` and ``timeout``) by fluxframe.core.options.instantiate: ``base_dir`` (the config
        file's folder) reaches factories that take it, and an unknown key or a bad value is a ConfigError naming
        ``safety.filters.NAME.KEY`` (``source``: the config file, for the message), required filter or not.
        A required filter that is not registered, or whose factory fails otherwise, is a SafetyError: fluxframe
        refuses to start. Other failures of a filter that is not required are logged and kept (``error`` set);
        it then records, never blocks.
        """
        if safety is None:
            return cls([])
        configured: list[ConfiguredFilter] = []
        for name, settings in safety.enabled().items():
            required = name in safety.require
            entry = ConfiguredFilter(name, None, required, settings.action, settings.timeout)
            configured.append(entry)
            try:
                registration = host.get("filter", name)
            except FluxframeError as exc:
                message = (f"not available: {exc}; is the plugin that provides it installed, and not blocked "
                           "in [plugins] block?")
                if required:
                    raise SafetyError(f"required filter is {message}", filter=name) from exc
                log.warning("safety filter %r (not required) is %s", name, message)
                entry.error = message
                continue
            entry.plugin = registration.plugin
            try:
                instance = instantiate(registration.factory, settings.options, key=f"safety.filters.{name}",
                                       source=source, base_dir=Path(base_dir) if base_dir is not None else None)
                if not _looks_like_filter(instance):
                    raise TypeError(f"factory returned {type(instance).__name__}, not a Filter")
            except ConfigError:
                raise
            except Exception as exc:
                message = f"failed to load: {type(exc).__name__}: {exc}"
                if required:
                    raise SafetyError(f"required filter {message}", filter=name) from exc
                log.warning("safety filter %r (not required) %s", name, message)
                entry.error = message
                continue
            entry.filter = instance
        return cls(configured)

    def describe(self) -> list[dict[str, Any]]:
        """The filters as configured, for audit records and `fluxframe check`."""
        return [{"name": f.name, "version": getattr(f.filter, "version", None), "plugin": f.plugin,
                 "required": f.required, "action": f.action, "timeout": f.timeout, "loaded": f.filter is not None,
                 "error": f.error} for f in self.filters]

    # -- checking -------------------------------------------------------------------------------

    @staticmethod
    def _targets(cf: ConfiguredFilter) -> frozenset[str]:
        return frozenset(getattr(cf.filter, "targets", ()) or ())

    def _failure(self, cf: ConfiguredFilter, target: str, subject: str, message: str, stage: str,
                 decision: Decision) -> None:
        version = str(getattr(cf.filter, "version", "") or "")
        if cf.required:
            verdict = Verdict(cf.name, version, False, target, {}, None, f"filter error: {message}", action="block")
            decision.reasons.append(f"required filter {cf.name!r} failed on {subject}: {message}")
            self._apply(decision, "block")
        else:
            verdict = Verdict(cf.name, version, True, target, {}, None,
                              f"filter error (not required, ignored): {message}", action="allow")
            decision.reasons.append(f"filter {cf.name!r} (not required) failed on {subject}, ignored: {message}")
        decision.verdicts.append(verdict)
        decision.subjects.append(subject)

    @staticmethod
    def _apply(decision: Decision, action: str) -> None:
        if _RANK[action] > _RANK[decision.action]:
            decision.action = action

    def _run(self, cf: ConfiguredFilter, method: str, value: Any, target: str, subject: str, stage: str,
             decision: Decision) -> None:
        if cf.filter is None:
            self._failure(cf, target, subject, f"not loaded ({cf.error})", stage, decision)
            return
        try:
            result = _call(getattr(cf.filter, method), (value, target), cf.timeout, cf.name)
        except _Timeout as exc:
            self._failure(cf, target, subject, str(exc), stage, decision)
            return
        except BaseException as exc:  # noqa: BLE001
            self._failure(cf, target, subject, f"raised {type(exc).__name__}: {exc}", stage, decision)
            return
        if not isinstance(result, Verdict) or not isinstance(result.allowed, bool):
            what = type(result).__name__ if not isinstance(result, Verdict) else \
                f"a Verdict with allowed={result.allowed!r}"
            self._failure(cf, target, subject, f"returned {what}, not a Verdict", stage, decision)
            return
        if result.allowed:
            action = "allow"
        else:
            action = cf.action
            if action == "blur" and stage != "output":
                action = "block"  # there is no image to blur yet: a prompt or input cannot be half-allowed
        verdict = dataclasses.replace(result, filter=cf.name, target=target, action=action,
                                      scores=dict(result.scores))
        decision.verdicts.append(verdict)
        decision.subjects.append(subject)
        if action != "allow":
            decision.reasons.append(f"{cf.name} on {subject}: {verdict.reason or 'violation'} -> {action}")
            self._apply(decision, action)

    @staticmethod
    def _finish(decision: Decision) -> Decision:
        decision.allowed = decision.action != "block"
        return decision

    def check_prompts(self, prompts: dict[str, str | None]) -> Decision:
        """Check each prompt text given (keys: prompt, negative_prompt, upsampled_prompt). A key that is
        absent was not used; a key whose value is None was given as embeddings without text, and then a
        required prompt filter blocks. Filters that target "prompt" also see the upsampled prompt."""
        decision = Decision(True, "allow", stage="prompts")
        for cf in self.filters:
            if cf.filter is None:
                if prompts:
                    self._failure(cf, "prompt", ", ".join(prompts), f"not loaded ({cf.error})", "prompts", decision)
                continue
            targets = self._targets(cf)
            for key, text in prompts.items():
                if not (key in targets or (key == "upsampled_prompt" and "prompt" in targets)):
                    continue
                if text is None:
                    if cf.required:
                        verdict = Verdict(cf.name, str(getattr(cf.filter, "version", "")), False, key, {}, None,
                                          NO_TEXT, action="block")
                        decision.reasons.append(f"required filter {cf.name!r} on {key}: {NO_TEXT}")
                        self._apply(decision, "block")
                    else:
                        verdict = Verdict(cf.name, str(getattr(cf.filter, "version", "")), True, key, {}, None,
                                          f"{NO_TEXT}; not required, ignored", action="allow")
                    decision.verdicts.append(verdict)
                    decision.subjects.append(key)
                    continue
                self._run(cf, "check_prompt", text, key, key, "prompts", decision)
        return self._finish(decision)

    def _check_images(self, items: list[tuple[str, Any]], target: str, stage: str) -> Decision:
        decision = Decision(True, "allow", stage=stage)
        for cf in self.filters:
            if cf.filter is None:
                if items:
                    self._failure(cf, target, ", ".join(s for s, _ in items), f"not loaded ({cf.error})", stage,
                                  decision)
                continue
            if target not in self._targets(cf):
                continue
            for subject, image in items:
                self._run(cf, "check_image", image, target, subject, stage, decision)
        return self._finish(decision)

    def check_input_images(self, images: list[tuple[str, Any]]) -> Decision:
        """Check every input image: ``[(role, PIL image), ...]``, e.g. ("reference[0]", img), ("control", img)."""
        return self._check_images(list(images), "input_image", "input_images")

    def check_output(self, image: Any) -> Decision:
        """Check the output image. With action "blur", ``decision.image`` is the blurred, labelled image to
        write instead (allowed stays True); with "block", nothing may be written."""
        decision = self._check_images([("output", image)], "output_image", "output")
        if decision.action == "blur":
            decision.image = blur_image(image)
        return decision
