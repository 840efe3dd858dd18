"""The demo: a synthetic shapes data set and ``fluxframe train-demo``, which trains the shipped demo model on it.

A plugin like any other (entry point ``demo``): its command joins the CLI through ``register_commands``; torch
loads only when the command runs.
"""

from fluxframe.core.hookspecs import hookimpl


@hookimpl
def register_commands(register):
    """``fluxframe train-demo`` (fluxframe.demo.cli)."""
    from fluxframe.demo.cli import register_commands as commands

    commands(register)
