"""The pipeline runner: walks one request through the stages, in this order and no other.

request → validate → input filters → text encoding → conditioners → sampler loop → decode →
output filters → postprocessors (watermark, then metadata/signing) → atomic write → audit record.

A block at any filter writes no image and records why. The audit line is appended and flushed
before the image is renamed into place, so no image is ever released without its record. The
runner knows only the core interfaces; the model family, sampler, conditioners, filters and
postprocessors come from plugins by name.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxframe import __version__
from fluxframe.core.config import Config
from fluxframe.core.hashing import sha256_image, sha256_json, sha256_text
from fluxframe.core.inputs import InputFile, read_file_inputs, read_input
from fluxframe.core.interfaces import (
    ComposedStrategy,
    Conditioner,
    MemoryStrategy,
    ModelFamily,
    OutputContext,
    Postprocessor,
    Sampler,
    StepCache,
)
from fluxframe.core.options import instantiate
from fluxframe.core.output import (
    OutputGuard,
    check_folder,
    check_request_id,
    check_target,
    sweep_stale,
    template_name,
)
from fluxframe.core.plugins import PluginHost
from fluxframe.core.types import Conditioning, GenerationRequest, GenerationResult, Latents, StepInfo
from fluxframe.errors import (
    Blocked,
    Cancelled,
    ConfigError,
    FluxframeError,
    OutputError,
    PluginError,
    RequestError,
    SafetyError,
)

log = logging.getLogger("fluxframe")

NO_SAFETY = "no [safety] section: no filter checks prompts, inputs or outputs of this deployment"
NO_PROVENANCE = "no [provenance] section: outputs are neither watermarked nor signed"


@dataclass
class Stages:
    """Everything a run needs, resolved from the config once."""

    model: ModelFamily
    sampler: Sampler
    policy: Any  # fluxframe.core.policy.SafetyPolicy
    conditioners: dict[str, Conditioner] = field(default_factory=dict)
    postprocessors: list[Postprocessor] = field(default_factory=list)
    audit: Any = None  # fluxframe.core.audit.AuditLog, when [safety] audit_log is set
    guard: OutputGuard = field(default_factory=OutputGuard)
    cache: StepCache | None = None  # [sampler.cache], when configured


def _check_plugins(config: Config, host: PluginHost) -> list[str]:
    family = host.get("model_family", config.model.family).factory
    host.get("sampler", config.sampler.name)
    build_step_cache(config, host)
    build_memory(config, host)
    build_conditioners(config, host)
    lora_specs(config)
    warnings = list(family.check(config))
    limits = family.limits_for(config)
    if limits is not None:
        for key in ("width", "height"):
            if (problem := size_problem(getattr(config.sampler, key), limits)) is not None:
                raise ConfigError(f"{problem} for this checkpoint", path=config.source, key=f"sampler.{key}")
    from fluxframe.core.audit import audit_key_warnings

    warnings += audit_key_warnings(config)
    if config.safety is None:
        warnings.append(NO_SAFETY)
    elif config.safety.audit_log is None:
        warnings.append("[safety] has no audit_log: verdicts are not recorded")
    if config.provenance is None:
        warnings.append(NO_PROVENANCE)
    return warnings


def config_warnings(config: Config, host: PluginHost) -> list[str]:
    """Check the config against the installed plugins without loading weights.

    Raises for what cannot work (an unknown family, a required filter that is not installed, a
    signing key that cannot be used); returns warnings for what works but should be said, every time.
    """
    from fluxframe.core.audit import audit_log_for
    from fluxframe.core.policy import SafetyPolicy

    warnings = _check_plugins(config, host)
    audit = audit_log_for(config)  # its key variable must be set
    if audit is not None and audit.path.parent.is_dir():  # a missing folder is made at start-up
        audit.preflight()
    SafetyPolicy.from_config(config.safety, host, base_dir=config.base_dir, source=config.source)
    check_default_size(config, build_postprocessors(config, host))
    output_guard(config, create=False)
    return warnings


def output_guard(config: Config, *, create: bool) -> OutputGuard:
    """The deployment's output guard, once its output folder is shown to be usable: not a guarded place, a
    writable folder (made when ``create``; config check only proves it could be)."""
    guard = build_guard(config)
    if (why := guard.problem(config.output_dir)) is not None:
        raise ConfigError(f"{config.output_dir} {why}", path=config.source, key="output.dir")
    check_folder(config.output_dir, create=create)
    return guard


def check_output(config: Config, path: str | Path, *, overwrite: bool = False,
                 suffixes: dict[str, str] | None = None) -> Path:
    """The checks an output path gets, made before any weight loads (the CLI calls this first); ``suffixes``:
    the formats the file may have (default: the image formats)."""
    path = Path(path).expanduser().absolute()
    check_target(path, overwrite=overwrite, guard=build_guard(config), suffixes=suffixes)
    return path


def size_problem(value: int, limits: Any) -> str | None:
    if not limits.min_size <= value <= limits.max_size:
        return f"must be between {limits.min_size} and {limits.max_size}, got {value}"
    if value % limits.pixel_multiple:
        return f"must be a multiple of {limits.pixel_multiple}, got {value}"
    return None


def check_default_size(config: Config, postprocessors: list[Postprocessor]) -> None:
    """The [sampler] size must be one every postprocessor can finish (a watermark has a minimum size)."""
    for post in postprocessors:
        try:
            post.check_size(config.sampler.width, config.sampler.height)
        except RequestError as exc:
            raise ConfigError(str(exc), path=config.source, key=f"sampler.{exc.field or 'width'}") from None


def _option_paths(config: Config) -> list[Path]:
    """Files and folders named by plugin options (filter lists, estimator models ...): strings that name an
    existing path, resolved as the plugin resolves them (against the config's folder)."""
    tables = [s.options for s in (config.safety.filters.values() if config.safety else ())]
    tables += [c.options for c in config.conditioners] + list(config.memory.options.values())
    tables += [options for options in config.postprocessors.values() if isinstance(options, dict)]
    out = []
    for table in tables:
        values = [v for value in table.values() for v in (value if isinstance(value, list) else [value])]
        for value in values:
            if isinstance(value, str) and value and "\0" not in value:
                path = config.resolve(value)
                if path.exists():
                    out.append(path)
    return out


def build_guard(config: Config) -> OutputGuard:
    """Every file this deployment reads or writes: no output may be one of them (see fluxframe.core.output)."""
    guard = OutputGuard()
    paths = [Path(config.source)] if Path(config.source).is_file() else []
    if config.model.path is not None:
        model = config.model_path
        paths.append(model)
        if model.is_file():  # a single file's other components are folders beside it
            paths += [p for p in model.parent.iterdir() if p.is_dir()]
    paths += [config.resolve(p) for p in (config.model.vae, config.model.text_encoder) if p is not None]
    paths += [config.resolve(entry.path) for entry in config.lora]
    if config.safety is not None and config.safety.audit_log is not None:
        from fluxframe.core.audit import head_path

        log_file = config.resolve(config.safety.audit_log)
        paths += [log_file, head_path(log_file)]
    if config.provenance is not None and (c2pa := config.provenance.c2pa) is not None:
        paths += [config.resolve(c2pa.certificate), config.resolve(c2pa.private_key)]
    for path in paths + _option_paths(config):
        guard.add(path)
    guard.folders.add(Path(os.path.realpath(config.serve_state_dir)))  # the service's queue and token hashes
    return guard


def lora_specs(config: Config) -> list[dict[str, Any]]:
    """The [[lora]] entries with their paths resolved; ConfigError naming the entry for a file that is absent."""
    specs = []
    for i, entry in enumerate(config.lora):
        path = config.resolve(entry.path)
        if not path.is_file():
            raise ConfigError("no such file" if not path.exists() else "not a file", path=config.source,
                              key=f"lora.{i}.path ({path})")
        specs.append({"path": path, "weight": entry.weight, "mode": entry.mode, "key": f"lora.{i}"})
    return specs


def apply_loras(config: Config, model: ModelFamily) -> None:
    if not config.lora:
        return
    try:
        model.apply_loras(lora_specs(config))
    except ConfigError as exc:  # the model's messages name the entry; add the config file
        raise ConfigError(exc.message, path=exc.path or config.source, key=exc.key) from None


# The built-in postprocessors' option tables live under [provenance]; [postprocessors.NAME] holds every other one.
PROVENANCE_TABLES = ("watermark", "c2pa")


def postprocessor_tables(config: Config) -> dict[str, tuple[str, dict[str, Any]]]:
    """The enabled postprocessors: name -> (the key path of its options, the options). A table present enables
    its postprocessor: ``[provenance.watermark]``, ``[provenance.c2pa]``, ``[postprocessors.NAME]``."""
    tables: dict[str, tuple[str, dict[str, Any]]] = {}
    if config.provenance is not None:
        for name in PROVENANCE_TABLES:
            if (section := getattr(config.provenance, name)) is not None:
                tables[name] = (f"provenance.{name}", section.model_dump())
    for name, options in config.postprocessors.items():
        if name in PROVENANCE_TABLES:
            raise ConfigError(f"the built-in {name} postprocessor is configured in [provenance.{name}]",
                              path=config.source, key=f"postprocessors.{name}")
        tables[name] = (f"postprocessors.{name}", options)
    return tables


def build_postprocessors(config: Config, host: PluginHost) -> list[Postprocessor]:
    """The enabled postprocessors (see postprocessor_tables), each built with its options, in ascending ``order``
    (pixel watermarks 100-199 before metadata and signing 200-299); one whose plugin is absent stops start-up."""
    posts: list[Postprocessor] = []
    for name, (key, options) in postprocessor_tables(config).items():
        registration = host.get("postprocessor", name)
        post = instantiate(registration.factory, options, key=key, source=config.source, base_dir=config.base_dir)
        if not all(callable(getattr(post, m, None)) for m in ("process_image", "process_file", "check_size")) \
                or not isinstance(getattr(post, "order", None), int):
            raise PluginError(f"postprocessor {name!r} of plugin {registration.plugin!r}: its factory returned "
                              f"{type(post).__name__}, not a Postprocessor", plugin=registration.plugin)
        posts.append(post)
    return sorted(posts, key=lambda p: p.order)


def build_memory(config: Config, host: PluginHost) -> MemoryStrategy:
    """The [memory] strategy: one strategy, or several composed (see ComposedStrategy), each built with the
    options in its [memory.NAME] table (see fluxframe.core.options)."""
    section = config.memory
    names = section.names
    for name in section.options:
        if name not in names:
            raise ConfigError(f"options for memory strategy {name!r}, which `memory.strategy` does not select",
                              path=config.source, key=f"memory.{name}")
    strategies = [instantiate(host.get("memory_strategy", name).factory, section.options.get(name, {}),
                              key=f"memory.{name}", source=config.source, base_dir=config.base_dir)
                  for name in names]
    if len(strategies) == 1 and strategies[0].placement:
        return strategies[0]
    try:
        return ComposedStrategy(strategies)
    except ValueError as exc:
        raise ConfigError(str(exc), path=config.source, key="memory.strategy") from None


def build_step_cache(config: Config, host: PluginHost) -> StepCache | None:
    """The [sampler.cache] step cache built with its options, or None when there is none. A ConfigError naming the
    key when the method is unknown, an option is bad, or the sampler or model family cannot use a step cache."""
    section = config.sampler.cache
    if section is None:
        return None
    try:
        registration = host.get("step_cache", section.method)
    except PluginError as exc:
        raise ConfigError(str(exc), path=config.source, key="sampler.cache.method") from None
    cache = instantiate(registration.factory, section.options, key="sampler.cache", source=config.source,
                        base_dir=config.base_dir)
    if not all(callable(getattr(cache, m, None)) for m in ("start", "settings")):
        raise PluginError(f"step cache {section.method!r} of plugin {registration.plugin!r}: its factory returned "
                          f"{type(cache).__name__}, not a StepCache", plugin=registration.plugin)
    sampler = host.get("sampler", config.sampler.name).factory
    if not getattr(sampler, "takes_step_cache", False):
        raise ConfigError(f"sampler {config.sampler.name!r} cannot use a step cache (it does not declare "
                          f"takes_step_cache)", path=config.source, key="sampler.cache")
    family = host.get("model_family", config.model.family).factory
    if not getattr(family, "takes_step_cache", False):
        raise ConfigError(f"model family {config.model.family!r} cannot use a step cache (it does not declare "
                          f"takes_step_cache)", path=config.source, key="sampler.cache")
    return cache


def _conditioning_state(conditioning: Conditioning) -> tuple:
    """What a step cache must not reuse across: which tensors the model is given besides the latents. Step hooks
    that change the conditioning (ChannelStop switching control off) put new tensors in place, so a change of
    identity is a change of input."""
    return (tuple((name, id(t)) for name, t in conditioning.channels.items()),
            tuple(id(t) for t, _ in conditioning.extra_tokens))


def cache_record(cache: StepCache, counts: dict[str, int], steps: int) -> dict[str, Any]:
    """The step cache's line in a result, audit record and generation assertion: settings, then DiT evaluations
    computed in full and reused, over ``steps`` steps."""
    return {**cache.settings(), "steps": steps, **counts}


def build_conditioner(config: Config, host: PluginHost, name: str, family: str, options: dict[str, Any],
                      key: str) -> Conditioner:
    conditioner = instantiate(host.get("conditioner", name).factory, options, key=key, source=config.source,
                              base_dir=config.base_dir)
    if conditioner.families and family not in conditioner.families:
        raise ConfigError(
            f"conditioner {name!r} works with model families {', '.join(conditioner.families)}, "
            f"not with {family!r}", path=config.source, key=key,
        )
    return conditioner


def build_conditioners(config: Config, host: PluginHost) -> dict[str, Conditioner]:
    out: dict[str, Conditioner] = {}
    for i, settings in enumerate(config.conditioners):
        if settings.name in out:
            raise ConfigError(f"conditioner {settings.name!r} is listed twice", path=config.source,
                              key=f"conditioners.{i}.name")
        out[settings.name] = build_conditioner(config, host, settings.name, config.model.family, settings.options,
                                               key=f"conditioners.{i}")
    return out


def _printable(value: Any) -> Any:
    """A record with every string made valid UTF-8 (lone surrogates from undecodable arguments escaped), so an
    audit line can always be written."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_printable(v) for v in value]
    return value


def _input_files(request: GenerationRequest) -> list[tuple[str, InputFile]]:
    """The files a request's conditioner inputs were read from, by role ("reference.images[0]")."""
    out = []
    for name, inputs in request.conditioning.items():
        for key, value in (inputs.items() if isinstance(inputs, dict) else ()):
            if isinstance(value, InputFile):
                out.append((f"{name}.{key}", value))
            elif isinstance(value, (list, tuple)):
                out += [(f"{name}.{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, InputFile)]
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _config_hash(config: Config) -> str:
    return sha256_json(config.model_dump(mode="json"))


def _note(name: str, record: Any) -> str:
    """One line per postprocessor record: its "summary" if it has one; records with an "applied" flag
    say what happened and why."""
    if isinstance(record, dict) and record.get("summary"):
        return f"{name}: {record['summary']}"
    if isinstance(record, dict) and "applied" in record:
        if record["applied"]:
            return f"{name}: applied" + (f" ({record['method']})" if record.get("method") else "")
        return f"{name}: NOT applied: {record.get('reason') or 'no reason given'}"
    return f"{name}: {record}"


class Pipeline:
    """A loaded deployment: build once from a config, then call ``generate`` for each request."""

    def __init__(self, config: Config, stages: Stages, host: PluginHost):
        self.config = config
        self.stages = stages
        self.host = host
        self.config_hash = _config_hash(config)
        self._on_demand: dict[str, Conditioner] = {}

    @classmethod
    def from_config(cls, config: Config, host: PluginHost | None = None, *, replica: str | None = None) -> Pipeline:
        """The deployment ``config`` loaded. ``replica`` names one replica of a scaled-out deployment (``fluxframe
        serve --ray``): it writes its own audit log beside the configured one (fluxframe.core.audit.replica_log_path)
        and is otherwise the same deployment, config hash included."""
        from fluxframe.core.audit import audit_log_for
        from fluxframe.core.policy import SafetyPolicy

        if host is None:
            host = PluginHost.for_config(config)
        audit = audit_log_for(config, replica=replica)
        if audit is not None:  # before anything loads: a run whose record cannot be kept must not start
            audit.preflight()
        # Safety and provenance first: a deployment that cannot filter or sign must not load weights.
        try:
            for warning in _check_plugins(config, host):
                log.warning(warning)
            policy = SafetyPolicy.from_config(config.safety, host, base_dir=config.base_dir, source=config.source)
        except SafetyError as exc:
            if audit is not None:  # the refusal is part of the record too
                audit.append({"time": _now(), "event": "start-refused", "fluxframe": __version__,
                              "config_sha256": _config_hash(config), "reasons": [str(exc)]})
            raise
        postprocessors = build_postprocessors(config, host)
        check_default_size(config, postprocessors)
        # Where outputs go is checked before weights load too: a run must not end in an image it cannot write.
        guard = output_guard(config, create=True)
        memory = build_memory(config, host)
        model = host.get("model_family", config.model.family).factory.load(config, memory)
        if config.model.compile and model.compiled is None:
            log.warning("[model] compile: model family %r does not compile its blocks; it runs uncompiled", model.name)
            model.compiled = {"enabled": False, "reason": f"model family {model.name!r} does not compile"}
        apply_loras(config, model)
        sampler = host.get("sampler", config.sampler.name).factory()
        stages = Stages(model=model, sampler=sampler, policy=policy, postprocessors=postprocessors, audit=audit,
                        conditioners=build_conditioners(config, host), guard=guard,
                        cache=build_step_cache(config, host))
        pipeline = cls(config, stages, host)
        pipeline.sweep(config.output_dir)
        return pipeline

    def sweep(self, folder: Path) -> None:
        """Remove the temporaries of writers that died under ``folder`` (see fluxframe.core.output), audited."""
        for removed in sweep_stale(folder):
            log.warning("removed the unfinished output of an interrupted run: %s", removed["folder"])
            if self.stages.audit is not None:
                self.stages.audit.append(_printable({"time": _now(), "event": "stale-temporaries-removed",
                                                     "fluxframe": __version__, **removed}))

    # -- the run ------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest, *, progress: Callable[[StepInfo], None] | None = None,
                 write: bool = True) -> GenerationResult:
        """One request through the stages, in DESIGN's order. A block at any filter writes no image and records
        why; any other failure after start-up is recorded as an error; nothing unfinished is ever released."""
        import torch

        run = Run(request, write=write)
        try:
            with run.timed("total"):
                self.validate(run)
                with run.timed("input_filters"):
                    self.read_inputs(run)
                    self.filter_inputs(run)
                with run.timed("prompt_upsampling", when=request.upsample_prompt):
                    self.upsample_prompt(run)
                with torch.inference_mode():
                    with run.timed("text_encoding"):
                        self.encode_text(run)
                    self.condition(run)
                    with run.timed("denoising"):
                        self.denoise(run, progress)
                    with run.timed("decoding"):
                        self.decode(run)
                with run.timed("output_filters"):
                    self.filter_output(run)
                with run.timed("postprocessing"):
                    self.postprocess(run)
                    self.release(run)
            return run.result(self.stages.model)
        except Blocked:  # already audited, with the verdicts
            raise
        except Exception as exc:  # a bad reference image, a signing failure, a bug: nothing was released
            self._audit_failure(run, exc)
            raise

    def generate_many(self, requests: list[GenerationRequest], *, progress: Callable[[StepInfo], None] | None = None,
                      write: bool = True, cancelled: Callable[[str], bool] | None = None,
                      ) -> list[GenerationResult | FluxframeError]:
        """Several requests, each exactly as ``generate`` makes it (validation, read-once inputs, filters,
        conditioning, postprocessors, release and audit line per image), with compatible ones (same size, steps,
        guidance, conditioners and conditioning layout; see fluxframe.core.batching) run through the model together:
        one text encoding, one DiT call per step and one decoding for up to ``[sampler] max_batch_size`` of them.
        Each image is the one the request gives alone (its own seed's noise). Returns one entry per request, in
        order: its result, or the FluxframeError (Blocked, RequestError ...) that stopped it; a request blocked or
        failing drops out of its batch and the others go on. Timings of the batched stages are the batch's time
        shared equally among its images; ``total`` is each request's wall time from its validation to its release.
        ``progress`` is called for the steps of each batch (``StepInfo.request_ids`` names the batch's requests).
        ``cancelled(request_id)`` is asked before every step and before a request's output filters: a request it
        answers true for stops there, writes nothing, is audited as ``cancelled`` and gets a Cancelled entry (its
        batch goes on for the others, or stops when all of it is cancelled)."""
        import torch

        from fluxframe.core.batching import batch_key

        out: list[Any] = [None] * len(requests)
        started: dict[int, float] = {}
        runs: list[tuple[int, Run]] = []
        for i, request in enumerate(requests):
            started[i] = time.perf_counter()
            run = Run(request, write=write)
            if self._item(run, i, out, self._front):
                runs.append((i, run))
        groups: dict[tuple, list[tuple[int, Run]]] = {}
        for i, run in runs:
            groups.setdefault(batch_key(run, i, self.stages.model.batched), []).append((i, run))
        size = self.config.sampler.max_batch_size
        try:
            for members in groups.values():
                for at in range(0, len(members), size):
                    batch = members[at:at + size]
                    with torch.inference_mode():
                        batch = self._batch(batch, out, progress, cancelled)
                    for i, run in batch:
                        if self._item(run, i, out, self._finish):
                            run.timings["total"] = time.perf_counter() - started[i]
                            out[i] = run.result(self.stages.model)
        except BaseException as exc:  # a bug or an interrupt ends the call: the requests not run get their line too
            for i, run in runs:
                if out[i] is None:
                    self._audit_failure(run, exc)
            raise
        return out

    def _item(self, run: Run, index: int, out: list[Any], stages: Callable[[Run], None]) -> bool:
        """Per-request stages of ``generate_many``, failing as ``generate`` fails: a block is already audited, any
        other failure is audited as an error; a FluxframeError becomes this request's entry, anything else is
        raised. True when the request goes on."""
        try:
            stages(run)
            return True
        except Blocked as exc:
            out[index] = exc
        except Exception as exc:
            self._audit_failure(run, exc)
            if not isinstance(exc, FluxframeError):
                raise
            out[index] = exc
        return False

    def _front(self, run: Run) -> None:
        """Everything ``generate`` does before the model runs, and the conditioners, whose tensors are per image."""
        import torch

        self.validate(run)
        with run.timed("input_filters"):
            self.read_inputs(run)
            self.filter_inputs(run)
        with run.timed("prompt_upsampling", when=run.request.upsample_prompt):
            self.upsample_prompt(run)
        with torch.inference_mode():
            if run.text is not None:  # embeddings from a file: the checks of encode_text, per request
                self.encode_text(run)
            self.condition(run)

    def _finish(self, run: Run) -> None:
        with run.timed("output_filters"):
            self.filter_output(run)
        with run.timed("postprocessing"):
            self.postprocess(run)
            self.release(run)

    def _batch(self, batch: list[tuple[int, Run]], out: list[Any], progress: Callable[[StepInfo], None] | None,
               cancelled: Callable[[str], bool] | None = None) -> list[tuple[int, Run]]:
        """Text encoding, denoising and decoding of one batch; the requests that come through. A failure here
        is every request's of the batch (each audited)."""
        runs = [run for _, run in batch]
        ids = tuple(run.request.request_id for run in runs)
        if progress is not None:
            report = progress
            progress = lambda info: report(dataclasses.replace(info, request_ids=ids))  # noqa: E731
        watch = None if cancelled is None else lambda: self._watch(runs, cancelled)
        try:
            if len(runs) == 1:  # exactly generate's stages
                run = runs[0]
                with run.timed("text_encoding"):
                    self.encode_text(run)
                with run.timed("denoising"):
                    self.denoise(run, progress, watch)
                with run.timed("decoding"):
                    self.decode(run)
            else:
                text = self._shared(runs, "text_encoding", self._encode_batch)
                self._shared(runs, "denoising", lambda rs: self._denoise_batch(rs, text, progress, watch))
                self._shared(runs, "decoding", self._decode_batch)
            if watch is not None:  # cancelled during the last step or the decoding: still nothing is written
                try:
                    watch()
                except Cancelled:
                    pass
            going = []
            for i, run in batch:
                if run.cancelled:
                    out[i] = Cancelled("cancelled while running; nothing was written")
                    self._audit_failure(run, out[i])
                else:
                    going.append((i, run))
            return going
        except Exception as exc:
            for i, run in batch:
                self._audit_failure(run, exc)
                out[i] = exc
            if not isinstance(exc, FluxframeError):
                raise
            return []

    @staticmethod
    def _watch(runs: list[Run], cancelled: Callable[[str], bool]) -> None:
        """Mark the runs ``cancelled`` now answers true for; raise Cancelled once all of them are."""
        for run in runs:
            if not run.cancelled and cancelled(run.request.request_id):
                run.cancelled = True
        if all(run.cancelled for run in runs):
            raise Cancelled("cancelled while running; nothing was written")

    @staticmethod
    def _shared(runs: list[Run], stage: str, fn: Callable[[list[Run]], Any]) -> Any:
        started = time.perf_counter()
        value = fn(runs)
        for run in runs:
            run.timings[stage] = (time.perf_counter() - started) / len(runs)
        return value

    def _encode_batch(self, runs: list[Run]) -> Any:
        """The batch's TextConditioning: its prompts encoded at once, or its embeddings files stacked."""
        from fluxframe.core.batching import encode_unique, stack_text

        model, first = self.stages.model, runs[0]
        if first.text is not None:  # embeddings files, checked per request in _front
            texts = [run.text for run in runs]
        else:
            texts = [encode_unique(model, [run.upsampled if run.upsampled is not None else run.request.prompt
                                           for run in runs])]
            if model.true_cfg(first.settings.guidance):  # as encode_text: "" unless a negative prompt is given
                texts[0].negative = encode_unique(model, [run.request.negative_prompt or "" for run in runs])
        return stack_text(texts) if len(texts) > 1 else texts[0]

    def _denoise_batch(self, runs: list[Run], text: Any, progress: Callable[[StepInfo], None] | None,
                       watch: Callable[[], None] | None = None) -> None:
        """Each request's own noise, concatenated, through the sampler as one batch; each gets its rows back."""
        import torch

        from fluxframe.core.batching import stack_conditioning

        model, settings = self.stages.model, runs[0].settings
        noise = [model.initial_noise(run.settings.seed, settings.width, settings.height) for run in runs]
        ids, grid = noise[0].ids, noise[0].grid
        sigmas = model.sigmas(settings.steps, noise[0].tokens.shape[1])
        # One cache state per image: each decides its own steps, as it would alone.
        cache = self.stages.cache.start(len(runs)) if self.stages.cache is not None else None
        seen: list[Any] = [None] * len(runs)

        def velocity(x, sigma, step):
            if watch is not None:
                watch()
            for run in runs:  # each request's hooks see its own conditioning, as alone
                for hook in run.conditioning.step_hooks:
                    hook(step, settings.steps, run.conditioning)
            conditioning = stack_conditioning([run.conditioning for run in runs])
            if cache is None:
                return model.predict(x, ids, sigma, text, conditioning, settings.guidance)
            states = [_conditioning_state(run.conditioning) for run in runs]
            cache.invalidate([k for k, state in enumerate(states) if seen[k] is not None and seen[k] != state])
            seen[:] = states
            return model.predict(x, ids, sigma, text, conditioning, settings.guidance, cache=cache)

        tokens = self.stages.sampler.sample(torch.cat([n.tokens for n in noise]), sigmas, velocity, progress)
        for k, run in enumerate(runs):
            run.latents = Latents(tokens=tokens[k:k + 1], ids=ids, grid=grid)
            if cache is not None:
                run.step_cache = cache_record(self.stages.cache, cache.counts()[k], settings.steps)

    def _decode_batch(self, runs: list[Run]) -> None:
        import torch

        from fluxframe.core.batching import decode_chunk
        from fluxframe.core.images import to_pil

        model, first = self.stages.model, runs[0].latents
        tokens = torch.cat([run.latents.tokens for run in runs])
        step = decode_chunk(tokens, first.grid, model.limits.pixel_multiple)  # a few at a time on a CPU
        images = []
        for at in range(0, len(runs), step):
            images += to_pil(model.decode(Latents(tokens=tokens[at:at + step], ids=first.ids, grid=first.grid)))
        for run, image in zip(runs, images, strict=True):
            run.image = image

    # -- the stages, each reading and writing the run's state ---------------------------------------

    def validate(self, run: Run) -> None:
        """The request's settings and output location, checked before any model work."""
        request = run.request
        check_request_id(request.request_id)
        run.settings = self._settings(request)
        if run.write:
            run.path = self.output_path(request, run.settings.seed)
            self.sweep(run.path.parent)
        run.conditioners = self._conditioners(request)

    def read_inputs(self, run: Run) -> None:
        """Every file the request names, read once: the filters, the audit hashes and the model use these bytes,
        whatever happens to the files meanwhile (see fluxframe.core.inputs)."""
        request = run.request
        conditioning = {}
        for name, inputs in request.conditioning.items():
            if not isinstance(inputs, dict):
                raise RequestError(f"must be a table of inputs, got {type(inputs).__name__}",
                                   field=f"conditioning.{name}")
            keys = getattr(run.conditioners.get(name), "file_inputs", ())
            conditioning[name] = read_file_inputs(keys, inputs, f"conditioning.{name}")
        embeds = request.prompt_embeds
        if embeds is not None and not isinstance(embeds, InputFile):
            embeds = read_input(embeds, "prompt_embeds")
        run.request = dataclasses.replace(request, conditioning=conditioning, prompt_embeds=embeds)
        if embeds is not None:  # read first: the filters check the text the embeddings were made of
            run.text, prompt, negative = self.stages.model.load_prompt_embeds(embeds)
            # the audit record and the C2PA manifest hash the stored text, as for a prompt given as text
            run.request = dataclasses.replace(run.request, prompt=prompt, negative_prompt=negative)

    def filter_inputs(self, run: Run) -> None:
        """The prompt filters, then the input image filters on exactly the images the model will see."""
        request = run.request
        # A key missing = that prompt is not used; a key set to None = embeddings given without their text.
        prompts = {"prompt": request.prompt}
        if request.negative_prompt is not None:
            prompts["negative_prompt"] = request.negative_prompt
        decision = self.stages.policy.check_prompts(prompts)
        for name, conditioner in run.conditioners.items():  # before a prompt block, so its line hashes them too
            for i, image in enumerate(conditioner.input_images(request.conditioning.get(name, {}))):
                run.inputs.append((f"{name}[{i}]", image))
        self._check(run, decision)
        if run.inputs:
            self._check(run, self.stages.policy.check_input_images(run.inputs))

    def upsample_prompt(self, run: Run) -> None:
        """The model's rewrite of the prompt, when asked: a new prompt, so it passes the prompt filters too."""
        if run.request.upsample_prompt:
            run.upsampled = self.stages.model.upsample_prompt(run.request.prompt, run.settings.seed)
            self._check(run, self.stages.policy.check_prompts({"upsampled_prompt": run.upsampled}))

    def encode_text(self, run: Run) -> None:
        model, request, settings = self.stages.model, run.request, run.settings
        cfg = model.true_cfg(settings.guidance)
        if run.text is None:
            run.text = model.encode_prompts([run.upsampled if run.upsampled is not None else request.prompt])
            if cfg:  # like diffusers' Flux2KleinPipeline: an empty negative prompt unless one is given
                run.text.negative = model.encode_prompts([request.negative_prompt or ""])
        elif cfg and run.text.negative is None:
            raise RequestError(f"{request.prompt_embeds.name}: has no negative_prompt_embeds, which true guidance "
                               f"at {settings.guidance} needs (encode with this config)", field="prompt_embeds")
        elif not cfg and run.text.negative is not None:
            log.warning("%s: negative_prompt_embeds unused: no true guidance at guidance %s",
                        request.prompt_embeds.name, settings.guidance)
            run.text.negative = None

    def condition(self, run: Run) -> None:
        """Each conditioner adds to the conditioning; they see this run's size, seed and steps."""
        resolved = dataclasses.replace(run.request, **dataclasses.asdict(run.settings))
        for name, conditioner in run.conditioners.items():
            conditioner.prepare(self.stages.model, resolved, run.request.conditioning.get(name, {}), run.conditioning)

    def denoise(self, run: Run, progress: Callable[[StepInfo], None] | None,
                watch: Callable[[], None] | None = None) -> None:
        model, settings, conditioning = self.stages.model, run.settings, run.conditioning
        latents = model.initial_noise(settings.seed, settings.width, settings.height)
        sigmas = model.sigmas(settings.steps, latents.tokens.shape[1])
        cache = self.stages.cache.start(1) if self.stages.cache is not None else None
        seen = [None]

        def velocity(x, sigma, step):
            if watch is not None:
                watch()
            for hook in conditioning.step_hooks:
                hook(step, settings.steps, conditioning)
            if cache is None:
                return model.predict(x, latents.ids, sigma, run.text, conditioning, settings.guidance)
            if seen[0] is not None and seen[0] != _conditioning_state(conditioning):
                cache.invalidate([0])
            seen[0] = _conditioning_state(conditioning)
            return model.predict(x, latents.ids, sigma, run.text, conditioning, settings.guidance, cache=cache)

        latents.tokens = self.stages.sampler.sample(latents.tokens, sigmas, velocity, progress)
        run.latents = latents
        if cache is not None:
            run.step_cache = cache_record(self.stages.cache, cache.counts()[0], settings.steps)

    def decode(self, run: Run) -> None:
        from fluxframe.core.images import to_pil

        run.image = to_pil(self.stages.model.decode(run.latents))[0]

    def filter_output(self, run: Run) -> None:
        run.decision = self._check(run, self.stages.policy.check_output(run.image))
        if run.decision.action == "blur":
            run.image = run.decision.image

    def postprocess(self, run: Run) -> None:
        """The postprocessors' pixel steps (the watermark), in their fixed order."""
        run.context = OutputContext(request=run.request, model=self.stages.model.describe(), config=self.config,
                                    verdicts=run.verdicts, step_cache=run.step_cache)
        for post in self.stages.postprocessors:
            run.image = post.process_image(run.image, run.context)

    def release(self, run: Run) -> None:
        """Encode, let the postprocessors finish the file (sign it), put it in place, then write its audit line
        (see fluxframe.core.output.release). Without a path the image goes to the caller, recorded all the same."""
        if run.path is None:
            run.record = self._audit(run, run.decision.action, run.decision.reasons)
            return
        from fluxframe.core.images import MEDIA_TYPES, PIL_FORMATS, SAVE_OPTIONS
        from fluxframe.core.output import format_of, release

        fmt = format_of(run.path)

        def make(tmp: Path) -> None:
            run.image.save(tmp, format=PIL_FORMATS[fmt], **SAVE_OPTIONS[fmt])
            for post in self.stages.postprocessors:
                post.process_file(tmp, MEDIA_TYPES[fmt], run.context)

        def audited(digest: str) -> None:  # called once the file is in place; a failure takes it back
            output = {"path": str(run.path), "sha256": digest, "format": fmt}
            run.record = self._audit(run, run.decision.action, run.decision.reasons, output)

        release(make, run.path, overwrite=run.request.overwrite, record=audited)

    # -- what the stages share ----------------------------------------------------------------------

    def _check(self, run: Run, decision: Any) -> Any:
        """Keep a filter decision's verdicts; a block is audited and raised."""
        run.verdicts += decision.verdicts
        if not decision.allowed:
            record = self._audit(run, "block", decision.reasons)
            raise Blocked("request blocked: " + "; ".join(decision.reasons), decision=decision, audit=record)
        return decision

    def _settings(self, request: GenerationRequest) -> Settings:
        s = self.config.sampler
        model = self.stages.model
        seed = request.seed if request.seed is not None else s.seed
        settings = Settings(
            seed=seed if seed is not None else secrets.randbelow(2**32),
            steps=next(v for v in (request.steps, s.steps, model.default_steps) if v is not None),
            guidance=next(v for v in (request.guidance, s.guidance, model.default_guidance) if v is not None),
            width=request.width if request.width is not None else s.width,
            height=request.height if request.height is not None else s.height,
        )
        if request.prompt_embeds is not None:
            if request.prompt is not None:
                raise RequestError("give either a prompt or a prompt embeddings file, not both", field="prompt")
            if request.negative_prompt is not None:
                raise RequestError("give it to `fluxframe encode`: the embeddings file carries the negative prompt",
                                   field="negative_prompt")
            if request.upsample_prompt:
                raise RequestError("a prompt given as embeddings cannot be rewritten", field="upsample_prompt")
        elif not isinstance(request.prompt, str):
            raise RequestError(f"must be text, got {type(request.prompt).__name__}", field="prompt")
        for key in ("prompt", "negative_prompt"):
            text = getattr(request, key)
            if text is not None and not isinstance(text, str):
                raise RequestError(f"must be text, got {type(text).__name__}", field=key)
            try:
                if text is not None:
                    text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise RequestError(f"is not valid UTF-8 text (undecodable byte at character {exc.start})",
                                   field=key) from None
        if not 0 <= settings.seed < 2**63:
            raise RequestError(f"must be between 0 and 2**63 - 1, got {settings.seed}", field="seed")
        if not 1 <= settings.steps <= 1000:
            raise RequestError(f"must be between 1 and 1000, got {settings.steps}", field="steps")
        if not 0 <= settings.guidance <= 100:
            raise RequestError(f"must be between 0 and 100, got {settings.guidance}", field="guidance")
        if request.negative_prompt and not model.true_cfg(settings.guidance):
            raise RequestError(
                f"this {model.name} checkpoint does not run true classifier-free guidance at guidance "
                f"{settings.guidance} (guidance-distilled models have none; base models need guidance > 1)",
                field="negative_prompt")
        for key in ("width", "height"):
            if (problem := size_problem(getattr(settings, key), model.limits)) is not None:
                raise RequestError(problem, field=key)
        for post in self.stages.postprocessors:
            post.check_size(settings.width, settings.height)
        return settings

    def _conditioners(self, request: GenerationRequest) -> dict[str, Conditioner]:
        """The configured conditioners, plus those this request names, enabled with their defaults for
        this request only (built once, then reused)."""
        active = dict(self.stages.conditioners)
        for name in request.conditioning:
            if name not in active:
                if name not in self._on_demand:
                    self._on_demand[name] = build_conditioner(
                        self.config, self.host, name, self.stages.model.name, {}, key=f"request.conditioning.{name}")
                active[name] = self._on_demand[name]
        return active

    def check(self, request: GenerationRequest) -> Settings:
        """The request's settings, resolved and checked as ``generate`` checks them (request id, prompt, seed,
        steps, guidance, size, conditioners), without running or writing anything: a RequestError names the
        field at fault. A service calls this before it accepts a request."""
        check_request_id(request.request_id)
        settings = self._settings(request)
        self._conditioners(request)
        return settings

    def file_inputs(self, conditioner: str) -> tuple[str, ...]:
        """The inputs of the named conditioner that are files (``Conditioner.file_inputs``); a PluginError or
        ConfigError when this deployment cannot use that conditioner."""
        found = self._conditioners(GenerationRequest(conditioning={conditioner: {}})).get(conditioner)
        return tuple(getattr(found, "file_inputs", ()))

    def output_path(self, request: GenerationRequest, seed: int) -> Path:
        """Where this request's image goes, checked before any model work (see fluxframe.core.output)."""
        if request.output is not None:
            if not isinstance(request.output, (str, Path)) or not str(request.output):
                raise RequestError(f"must be a file path, got {request.output!r}", field="output")
            path = Path(request.output).expanduser().absolute()
        else:
            folder = self.config.output_dir
            path = folder / template_name(self.config.output.name, request_id=request.request_id, seed=seed,
                                          fmt=self.config.output.format)
            if path.parent != folder:  # the template check makes this impossible; kept as the last word
                raise OutputError(f"{path}: [output] name leads outside the output folder {folder}")
        check_target(path, overwrite=request.overwrite, guard=self.stages.guard)
        return path

    def _audit(self, run: Run, action: str, reasons: list[str], output: dict | None = None) -> dict | None:
        request = run.request
        text = {key: getattr(request, key) for key in ("prompt", "negative_prompt")}
        embeds = request.prompt_embeds
        record = {
            "time": _now(),
            "event": "request",
            "request_id": request.request_id,
            "client": request.client,
            "fluxframe": __version__,
            "prompt_sha256": sha256_text(text["prompt"]) if isinstance(text["prompt"], str) else None,
            "negative_prompt_sha256": sha256_text(text["negative_prompt"]) if isinstance(text["negative_prompt"], str)
            and text["negative_prompt"] else None,
            "inputs": [{"role": role, "sha256": sha256_image(image)} for role, image in run.inputs],
            "input_files": [{"role": role, "sha256": f.sha256, "bytes": len(f.data)}
                            for role, f in _input_files(request)],
            "prompt_embeds_sha256": embeds.sha256 if isinstance(embeds, InputFile) else None,
            "config_sha256": self.config_hash,
            "checkpoint": self.stages.model.checkpoint_id,
            "loras": [{k: r[k] for k in ("file", "sha256", "weight")} for r in self.stages.model.loras],
            "settings": dataclasses.asdict(run.settings) if run.settings is not None else None,
            "verdicts": [dataclasses.asdict(v) for v in run.verdicts],
            "action": action,
            "reasons": reasons,
            "output": output,
            # what each postprocessor did (watermark applied or, where allowed, not; signed), once the file is made
            "postprocessors": run.context.records if output is not None and run.context is not None else None,
        }
        if self.stages.cache is not None:  # only then: a deployment without one keeps its lines as they were
            record["step_cache"] = run.step_cache
        if self.stages.audit is None:
            return record
        return self.stages.audit.append(_printable(record))

    def _audit_failure(self, run: Run, exc: Exception) -> None:
        if run.record is not None:
            return
        reason = str(exc) if isinstance(exc, FluxframeError) else f"{type(exc).__name__}: {exc}"
        try:
            self._audit(run, "cancelled" if isinstance(exc, Cancelled) else "error", [reason])
        except FluxframeError as audit_exc:  # the log itself failed: say so, and still raise the cause
            log.error("the audit line of this failed request could not be written: %s", audit_exc)


@dataclass(frozen=True)
class Settings:
    """The resolved settings of one run: the request's, else the config's [sampler], else the model's."""

    seed: int
    steps: int
    guidance: float
    width: int
    height: int


@dataclass
class Run:
    """The state of one request as it walks the stages."""

    request: GenerationRequest
    write: bool = True
    settings: Settings | None = None
    path: Path | None = None
    conditioners: dict[str, Conditioner] = field(default_factory=dict)
    inputs: list[tuple[str, Any]] = field(default_factory=list)  # (role, image) as the model sees it
    verdicts: list[Any] = field(default_factory=list)
    upsampled: str | None = None
    text: Any = None  # TextConditioning
    conditioning: Conditioning = field(default_factory=Conditioning)
    latents: Any = None
    image: Any = None
    decision: Any = None  # the output filters' Decision
    context: OutputContext | None = None
    step_cache: dict | None = None  # the step cache's settings and counts (see cache_record), when one ran
    record: dict | None = None  # set once this request's audit line is written
    cancelled: bool = False  # generate_many's ``cancelled`` answered true: it stops, writes nothing
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, stage: str, *, when: bool = True) -> Iterator[None]:
        """Time a stage into ``timings[stage]`` (not recorded when ``when`` is false: a stage that did not run)."""
        started = time.perf_counter()
        yield
        if when:
            self.timings[stage] = time.perf_counter() - started

    def result(self, model: ModelFamily) -> GenerationResult:
        notes = [_note(name, record) for name, record in self.context.records.items()]
        notes += [note for record in self.conditioning.info.values() if isinstance(record, dict)
                  for note in record.get("notes", [])]
        if model.compiled is not None and not model.compiled.get("enabled"):
            notes.append(f"compile: NOT applied: {model.compiled.get('reason') or 'no reason given'}")
        if self.step_cache is not None:
            c = self.step_cache
            notes.append(f"step cache {c['method']}: {c['computed']} DiT evaluations computed, {c['reused']} reused")
        return GenerationResult(
            request_id=self.request.request_id, image=self.image, path=self.path, prompt=self.request.prompt,
            upsampled_prompt=self.upsampled, model_family=model.name, timings=self.timings, latents=self.latents.tokens,
            verdicts=self.verdicts, notes=notes, audit=self.record, step_cache=self.step_cache,
            compile=None if model.compiled is None else dict(model.compiled),
            **dataclasses.asdict(self.settings))
