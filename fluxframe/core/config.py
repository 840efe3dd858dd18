"""The deployment config: one TOML file, validated in full before anything heavy loads.

Unknown keys and wrong types are errors naming the key path (``sampler.steps``). Relative paths
are resolved against the config file's folder, so a config works from any working directory.
Plugin options (the tables of conditioners, memory strategies, filters, postprocessors) are checked against
each plugin's factory when it is built: see fluxframe.core.options.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fluxframe.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelSection(_Section):
    family: str = "flux2"
    path: str | None = None
    preset: str | None = None  # a built-in checkpoint the model family makes itself, e.g. "tiny"
    # Single-file checkpoints: `path` is then the DiT file; the autoencoder file and the text encoder come apart.
    vae: str | None = None
    text_encoder: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    device: str = "auto"
    # Compile the DiT's repeated block classes once each with torch.compile (regional compilation); where torch
    # has no working compiler, the blocks run uncompiled and the result says so.
    compile: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.path is None) == (self.preset is None):
            raise ValueError("give exactly one of `path` (a checkpoint folder) or `preset` (\"tiny\")")
        if self.path is None and (self.vae is not None or self.text_encoder is not None):
            raise ValueError("`vae` and `text_encoder` go with `path` (a single-file checkpoint), not with `preset`")
        return self


class StepCacheSettings(BaseModel):
    """[sampler.cache]: ``method`` picks the step cache plugin; every other key is one of its options (checked by
    its factory: ``threshold`` for ``first-block``)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    method: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SamplerSection(_Section):
    name: str = "flow-euler"
    # None: the model's own default (FLUX.2 dev 50 / 4.0, klein distilled 4 / 1.0, klein base 50 / 4.0).
    steps: int | None = Field(None, ge=1, le=1000)
    guidance: float | None = Field(None, ge=0.0, le=100.0)
    width: int = Field(1024, ge=16, le=4096)
    height: int = Field(1024, ge=16, le=4096)
    seed: int | None = Field(None, ge=0, lt=2**63)
    # Pipeline.generate_many runs at most this many requests through the model at once (memory grows with it);
    # it caps `fluxframe batch --batch-size`.
    max_batch_size: int = Field(8, ge=1, le=256)
    # A step cache (see fluxframe.plugins.stepcache); none by default, so every step runs the whole DiT.
    cache: StepCacheSettings | None = None

    @field_validator("guidance", mode="before")
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:
        # TOML users write `guidance = 4`; an int is a fine float, a string is not.
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class OutputSection(_Section):
    dir: str = "outputs"
    format: Literal["png", "jpeg", "webp"] = "png"
    name: str = "{request_id}"  # fields: fluxframe.core.output.TEMPLATE_FIELDS; one file name, never a path

    @field_validator("name")
    @classmethod
    def _template(cls, value: str) -> str:
        from fluxframe.core.output import template_problem

        if (problem := template_problem(value)) is not None:
            raise ValueError(problem)
        return value


class PluginsSection(_Section):
    allow: list[str] | None = None
    block: list[str] = []
    require: list[str] = []


class MemorySection(BaseModel):
    """[memory]: ``strategy`` is one name, a list of names or names joined by "+" (composed); a table named
    after a selected strategy holds its options (``[memory.group-offload] blocks_per_group = 2``), checked by
    the strategy's factory."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    strategy: str | list[str] = "none"

    @field_validator("strategy")
    @classmethod
    def _names(cls, value: str | list[str]) -> str | list[str]:
        names = value.split("+") if isinstance(value, str) else value
        if not names or any(not n.strip() for n in names):
            raise ValueError("name at least one strategy, and no empty names")
        if len({n.strip() for n in names}) != len(names):
            raise ValueError("a strategy is listed twice")
        return value

    @property
    def names(self) -> list[str]:
        names = self.strategy.split("+") if isinstance(self.strategy, str) else self.strategy
        return [n.strip() for n in names]

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class FilterSettings(BaseModel):
    """[safety.filters.NAME]: the policy keys below; every other key is an option of the filter itself,
    passed to its factory, which names any it does not know."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    action: Literal["block", "blur", "flag"] = "block"
    timeout: float = Field(10.0, gt=0, le=600)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SafetySection(_Section):
    require: list[str] = []
    filters: dict[str, FilterSettings] = {}
    audit_log: str | None = None
    # The name of the environment variable holding the audit log's HMAC key (the key itself stays out of the
    # file); fluxframe.core.audit.audit_log_for refuses to start when the variable is unset or empty.
    audit_key_env: str | None = None

    @field_validator("audit_key_env")
    @classmethod
    def _key_env(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(f"must be an environment variable's name (letters, digits, _), got {value!r}")
        if value is not None and "audit_log" in info.data and info.data["audit_log"] is None:
            raise ValueError("names the audit log's key, but there is no audit_log to key")
        return value

    def enabled(self) -> dict[str, FilterSettings]:
        """Configured filters plus required ones (requiring a filter enables it with its defaults)."""
        out = dict(self.filters)
        for name in self.require:
            out.setdefault(name, FilterSettings())
        return out


class ConditionerSettings(BaseModel):
    """[[conditioners]]: `name` picks the plugin; every other key is an option of the conditioner."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LoraSettings(_Section):
    """[[lora]]: a LoRA file for the DiT, its weight, and how it is applied (see fluxframe.plugins.lora)."""

    path: str
    weight: float = 1.0
    mode: Literal["auto", "fuse", "side"] = "auto"

    @field_validator("weight", mode="before")
    @classmethod
    def _finite_float(cls, value: Any) -> Any:
        value = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value


class WatermarkSettings(_Section):
    method: str = "fluxframe-rs"  # fluxframe.provenance.watermark.DEFAULT_METHOD; "dwtDct" is the FLUX reference's
    message: str | None = None  # bits as a string of 0/1; default: fluxframe's own message
    # Outputs too small for the method's mark are refused before generating, unless this allows them (unmarked,
    # and recorded as such in the watermark record the manifest carries).
    allow_unmarked_small: bool = False


class C2PASettings(_Section):
    certificate: str  # PEM chain: signing certificate first, then intermediates/root
    private_key: str
    algorithm: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = "es256"
    passphrase_env: str | None = None  # name of the environment variable holding the key's passphrase
    timestamp_url: str | None = None
    claim_generator: str | None = None


class ProvenanceSection(_Section):
    """The built-in postprocessors' option tables: present = enabled (see fluxframe.core.pipeline)."""

    watermark: WatermarkSettings | None = None
    c2pa: C2PASettings | None = None


class RaySettings(_Section):
    """[serve.ray]: `fluxframe serve --ray` (see fluxframe.serve.ray). Either a fixed number of replicas or
    autoscaling between min_replicas and max_replicas."""

    replicas: int = Field(1, ge=1, le=1024)
    min_replicas: int | None = Field(None, ge=0, le=1024)
    max_replicas: int | None = Field(None, ge=1, le=1024)
    num_gpus: float = Field(0.0, ge=0, le=64)
    num_cpus: float = Field(1.0, gt=0, le=1024)
    max_batch_size: int | None = Field(None, ge=1, le=256)  # default: [serve] max_batch_size
    address: str | None = None  # an existing Ray cluster ("auto", "ray://host:10001"); default: start one here
    # How long a replica's claim on a job lasts without renewal (renewed each step and by a heartbeat); a killed
    # replica's job runs again on another replica this long after its last renewal, at most.
    lease_seconds: float = Field(60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _scaling(self) -> RaySettings:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both min_replicas and max_replicas (autoscaling) or neither (fixed replicas)")
        if self.min_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is larger than max_replicas")
        return self


class ServeSection(_Section):
    """[serve]: `fluxframe serve` (see fluxframe.serve). Sizes are checked before a request body is decoded."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # The job queue (SQLite), token hashes and uploaded inputs; default: <output dir>/.fluxframe-serve
    state_dir: str | None = None
    max_queue: int = Field(1000, ge=1, le=1_000_000)  # queued jobs; one more is answered 429 with Retry-After
    max_batch_size: int | None = Field(None, ge=1, le=256)  # jobs run together; default: [sampler] max_batch_size
    batch_wait_ms: int = Field(50, ge=0, le=60_000)  # how long the worker waits for more compatible jobs
    retention_hours: float = Field(24.0 * 7, gt=0)  # finished jobs' records and images, then removed
    rate_limit_per_minute: int = Field(60, ge=1)  # per token
    max_jobs_per_token: int = Field(16, ge=1)  # queued or running at once, per token
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_prompt_chars: int = Field(4000, ge=1)
    max_references: int = Field(4, ge=0, le=64)
    max_image_pixels: int = Field(4096 * 4096, ge=1)  # each uploaded image, read from its header before decoding
    max_wait_seconds: float = Field(600.0, ge=0)  # the longest ?wait= a POST may ask for
    trust: list[str] = []  # CA certificates (PEM) POST /v1/verify trusts, besides none
    ray: RaySettings = RaySettings()


class Config(_Section):
    model: ModelSection
    sampler: SamplerSection = SamplerSection()
    output: OutputSection = OutputSection()
    plugins: PluginsSection = PluginsSection()
    memory: MemorySection = MemorySection()
    conditioners: list[ConditionerSettings] = []
    lora: list[LoraSettings] = []
    safety: SafetySection | None = None
    provenance: ProvenanceSection | None = None
    # [postprocessors.NAME]: a third-party postprocessor enabled, with its options (the built-ins' are [provenance])
    postprocessors: dict[str, dict[str, Any]] = {}
    serve: ServeSection = ServeSection()
    # Where the file was read from; relative paths resolve against its folder.
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)
    source: str = Field("<config>", exclude=True)

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, arbitrary_types_allowed=True)

    def resolve(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def model_path(self) -> Path | None:
        return self.resolve(self.model.path) if self.model.path else None

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.output.dir)

    @property
    def serve_state_dir(self) -> Path:
        """`fluxframe serve`'s job queue, token hashes and uploads: [serve] state_dir, else in the output folder."""
        return self.resolve(self.serve.state_dir) if self.serve.state_dir else self.output_dir / ".fluxframe-serve"


def _key_path(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _messages(error: ValidationError) -> list[tuple[str, str]]:
    out = []
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        kind = item["type"]
        if kind == "extra_forbidden":
            message = "unknown key"
        elif kind == "missing":
            message = "required key is missing"
        else:
            message = item["msg"].removeprefix("Value error, ")
            if "input" in item and kind.endswith("_type"):
                message += f" (got {type(item['input']).__name__} {item['input']!r})"
        out.append((_key_path(loc), message))
    return out


def parse_config(data: dict[str, Any], *, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate a config dict; every problem found is listed in one ConfigError."""
    if "base_dir" in data or "source" in data:
        bad = "base_dir" if "base_dir" in data else "source"
        raise ConfigError("unknown key", path=source, key=bad)
    try:
        return Config.model_validate({**data, "base_dir": base_dir or Path.cwd(), "source": source})
    except ValidationError as exc:
        problems = _messages(exc)
        error = ConfigError("; ".join(f"{key}: {msg}" if key else msg for key, msg in problems), path=source)
        error.key = problems[0][0] if problems else None
        error.problems = problems
        raise error from None


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file does not exist", path=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file: {exc}", path=str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=str(path)) from None
    return parse_config(data, source=str(path), base_dir=path.resolve().parent)
