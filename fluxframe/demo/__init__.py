"""The demo: a synthetic shapes data set and ``fluxframe train-demo``, which trains the shipped demo model on it;
``fluxframe train-lora``, which trains a LoRA for a deployment's model on a folder of captioned images.

A plugin like any other (entry point ``demo``): its commands join the CLI through ``register_commands``; torch
loads only when the command runs.
"""

from fluxframe.core.hookspecs import hookimpl


@hookimpl
def register_commands(register):
    """``fluxframe train-demo`` and ``fluxframe train-lora`` (fluxframe.demo.cli)."""
    from fluxframe.demo.cli import register_commands as commands

    commands(register)
