"""Finding plugins and collecting what they register.

Built-ins and third-party packages load the same way: entry points in the ``fluxframe`` group.
A plugin that fails to import is recorded by name and skipped, unless the config requires it;
a name registered twice is an error naming both plugins. Commands are the exception to "an error": the
CLI is built from them before any config is read, so a plugin whose ``register_commands`` fails or
clashes is recorded in ``failures`` and its commands left out, and the rest of the CLI still works.
Each kind is collected the first time it is asked for, so building the CLI runs no other hook.
``FLUXFRAME_TRACE_PLUGINS=1`` prints every hook call to stderr.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from fluxframe.core import hookspecs
from fluxframe.errors import PluginError

ENTRY_POINT_GROUP = "fluxframe"

# kind -> the hook that collects it
KINDS = {
    "model_family": "register_model_families",
    "sampler": "register_samplers",
    "step_cache": "register_step_caches",
    "conditioner": "register_conditioners",
    "postprocessor": "register_postprocessors",
    "filter": "register_filters",
    "memory_strategy": "register_memory_strategies",
    "command": "register_commands",
}
# Kinds whose failures are recorded per plugin instead of raised (see the module docstring).
TOLERANT = {"command"}


@dataclass(frozen=True)
class Command:
    """A CLI command a plugin registered: ``setup(parser)`` adds its arguments, ``run(args)`` returns the exit
    code; ``parser_options`` are argparse ``add_parser`` keywords (help, description, formatter_class)."""

    setup: Any
    run: Any
    parser_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Registration:
    kind: str
    name: str
    factory: Any
    plugin: str


@dataclass(frozen=True)
class LoadFailure:
    plugin: str
    source: str
    error: str
    detail: str


@dataclass
class PluginInfo:
    name: str
    source: str  # "package-name version" for entry points, the module path for plugins added in code
    builtin: bool
    provides: list[str] = field(default_factory=list)


class _Register:
    """The ``register`` callback one plugin gets in one collector hook; it stamps what it registers with the
    plugin's name (and says whose it is in ``FLUXFRAME_TRACE_PLUGINS`` output). What it takes is staged, and
    kept only once the plugin's hook has returned."""

    def __init__(self, found: dict[str, Registration], kind: str, plugin: str):
        self.found, self.kind, self.plugin = found, kind, plugin
        self.staged: dict[str, Registration] = {}

    def __call__(self, name: str, factory: Any) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {self.plugin!r} registered a {self.kind} without a name", plugin=self.plugin)
        existing = self.found.get(name) or self.staged.get(name)
        if existing is not None:
            raise PluginError(f"{self.kind} {name!r} is registered by both {existing.plugin!r} and {self.plugin!r}; "
                              "block one of them in [plugins] block = [...]", plugin=self.plugin)
        self.staged[name] = Registration(self.kind, name, factory, self.plugin)

    def __repr__(self) -> str:
        return f"<register {self.kind} for plugin {self.plugin!r}>"


class _RegisterCommand(_Register):
    """``register(name, setup, run, **parser_options)`` for ``register_commands``."""

    def __call__(self, name: str, setup: Any, run: Any, **parser_options: Any) -> None:  # type: ignore[override]
        if not callable(setup) or not callable(run):
            raise PluginError(f"plugin {self.plugin!r}: command {name!r} needs callables setup(parser) and run(args)",
                              plugin=self.plugin)
        if "aliases" in parser_options:  # each name a command answers to is registered, so clashes are seen
            raise PluginError(f"plugin {self.plugin!r}: command {name!r}: register each name instead of aliases",
                              plugin=self.plugin)
        super().__call__(name, Command(setup, run, parser_options))


class PluginHost:
    """A pluggy manager plus the registry of everything the plugins registered."""

    def __init__(self, *, load_entry_points: bool = True, block: Iterable[str] = (), allow: Iterable[str] | None = None,
                 required: Iterable[str] = ()):
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.block = set(block)
        self.allow = set(allow) if allow is not None else None
        self.required = set(required)
        self.failures: list[LoadFailure] = []
        self.info: dict[str, PluginInfo] = {}
        self._registry: dict[str, dict[str, Registration]] = {}  # kind -> name -> Registration, as collected
        if os.environ.get("FLUXFRAME_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(sys.stderr.write)
            self.pm.enable_tracing()
        if load_entry_points:
            self._load_entry_points()
        missing = self.required - set(self.info)
        if missing:
            reasons = {f.plugin: f.error for f in self.failures}
            detail = "; ".join(f"{name}: {reasons.get(name, 'not installed')}" for name in sorted(missing))
            raise PluginError(f"required plugin(s) not available: {detail}", plugin=sorted(missing)[0])

    @classmethod
    def for_config(cls, config: Any) -> PluginHost:
        """A host honouring a config's ``[plugins]`` allow, block and require lists."""
        return cls(block=config.plugins.block, allow=config.plugins.allow, required=config.plugins.require)

    def _load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self.info or self.pm.is_blocked(ep.name):
                continue
            dist = ep.dist
            source = f"{dist.name} {dist.version}" if dist else ep.value
            builtin = bool(dist and dist.name == "fluxframe")
            if ep.name in self.block and ep.name not in self.required:
                continue
            if self.allow is not None and ep.name not in self.allow and not builtin and ep.name not in self.required:
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take the CLI down
                self.failures.append(
                    LoadFailure(ep.name, source, f"{type(exc).__name__}: {exc}", traceback.format_exc())
                )
                continue
            self.add(module, name=ep.name, source=source, builtin=builtin)

    def add(self, plugin: Any, *, name: str, source: str | None = None, builtin: bool = False) -> None:
        """Register a plugin object or module (tests and embedding applications use this directly)."""
        if name in self.info:
            raise PluginError(f"a plugin named {name!r} is already registered", plugin=name)
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            raise PluginError(f"plugin {name!r} is invalid: {exc}", plugin=name) from exc
        self.info[name] = PluginInfo(name, source or getattr(plugin, "__name__", repr(plugin)), builtin)
        self._forget()

    def remove(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.info.pop(name, None)
        self._forget()

    def _forget(self) -> None:
        """The plugins changed: collect every kind again when next asked."""
        self._registry = {}
        for info in self.info.values():
            info.provides.clear()

    def report(self) -> dict[str, list[dict[str, Any]]]:
        """The loaded plugins (name, where from, built-in or not, what each provides) and those that failed to
        load: what `fluxframe plugins --json` prints and the service's GET /v1/plugins answers."""
        self.registry  # collect, so each plugin's `provides` is filled
        return {"plugins": [{"name": i.name, "source": i.source, "builtin": i.builtin, "provides": i.provides}
                            for i in self.info.values()],
                "failed": [{"name": f.plugin, "source": f.source, "error": f.error} for f in self.failures]}

    @property
    def registry(self) -> dict[str, dict[str, Registration]]:
        """kind -> name -> Registration, collected from every plugin's hooks (once, then cached)."""
        for kind in KINDS:
            self.collect(kind)
        return self._registry

    def collect(self, kind: str) -> dict[str, Registration]:
        """name -> Registration of one kind; its hook runs the first time the kind is asked for."""
        if kind not in self._registry:
            self._registry[kind] = self._collect(kind)
        return self._registry[kind]

    def _collect(self, kind: str) -> dict[str, Registration]:
        hook_name = KINDS[kind]
        found: dict[str, Registration] = {}
        impls = getattr(self.pm.hook, hook_name).get_hookimpls()
        # built-ins first: where a clash is only recorded (commands), the built-in keeps its name
        impls = sorted(impls, key=lambda impl: not getattr(self.info.get(impl.plugin_name), "builtin", False))
        for impl in impls:
            plugin_name = impl.plugin_name
            register = (_RegisterCommand if kind == "command" else _Register)(found, kind, plugin_name)
            # Through pluggy, one plugin at a time: tracing and pluggy's call checks see every call, and the
            # register callback knows which plugin it stamps.
            others = [p for p in self.pm.get_plugins() if p is not impl.plugin]
            try:
                self.pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
            except Exception as exc:
                failure = exc if isinstance(exc, PluginError) else PluginError(
                    f"plugin {plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}", plugin=plugin_name)
                if kind in TOLERANT:
                    self.record_failure(plugin_name, f"{hook_name}: {failure}")
                    continue
                if failure is exc:
                    raise
                raise failure from exc
            found.update(register.staged)
            if plugin_name in self.info:
                self.info[plugin_name].provides += [f"{kind}:{name}" for name in register.staged]
        return found

    def record_failure(self, plugin: str, error: str) -> None:
        """Record that a loaded plugin failed at something that must not stop the rest (``fluxframe plugins``
        lists it)."""
        info = self.info.get(plugin)
        self.failures.append(LoadFailure(plugin, info.source if info else plugin, error, traceback.format_exc()))

    def get(self, kind: str, name: str) -> Registration:
        found = self.collect(kind).get(name)
        if found is None:
            known = ", ".join(sorted(self.collect(kind))) or "none"
            hint = ""
            if any(f.plugin == name for f in self.failures):
                hint = f" (plugin {name!r} failed to load; see `fluxframe plugins`)"
            raise PluginError(f"no {kind.replace('_', ' ')} named {name!r} is registered (known: {known}){hint}",
                              plugin=name)
        return found
