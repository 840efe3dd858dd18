"""The hooks plugins implement. Each is a collector: fluxframe hands the plugin a ``register``
callback, so it knows which plugin supplied what and can refuse name clashes.

Every hook is documented in README.md ("Plugin hooks"); a test keeps the two in step.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("fluxframe")
hookimpl = pluggy.HookimplMarker("fluxframe")


@hookspec
def register_model_families(register):
    """Register model families: ``register(name, loader)`` where ``loader`` is a ModelFamily subclass."""


@hookspec
def register_samplers(register):
    """Register samplers: ``register(name, factory)``; ``factory(**options)`` returns a Sampler."""


@hookspec
def register_step_caches(register):
    """Register step caches: ``register(name, factory)``; ``factory(**options)`` returns a StepCache."""


@hookspec
def register_conditioners(register):
    """Register conditioners: ``register(name, factory)``; ``factory(**options)`` returns a Conditioner."""


@hookspec
def register_postprocessors(register):
    """Register postprocessors: ``register(name, factory)``; ``factory(**options)`` returns a Postprocessor."""


@hookspec
def register_filters(register):
    """Register safety filters: ``register(name, factory)``; ``factory(**options)`` returns a Filter."""


@hookspec
def register_memory_strategies(register):
    """Register memory strategies: ``register(name, factory)``; ``factory(**options)`` returns a MemoryStrategy."""


@hookspec
def register_commands(register):
    """Register CLI commands: ``register(name, setup, run, **parser_options)``; ``run(args)`` returns the exit code."""
