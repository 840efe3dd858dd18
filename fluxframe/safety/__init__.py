"""The safety filters: prompt and image NSFW filters and the IP filter. The policy that runs them (required filters
fail closed) and the hash-chained audit log are the core's (fluxframe.core.policy, fluxframe.core.audit): a
deployment can add, require or configure filters, never replace what runs them.

The filters reach the core the way any plugin's do, through ``register_filters``, and the ``check`` and ``audit``
commands reach the CLI through ``register_commands``; heavy modules (onnxruntime, rapidfuzz, transformers) are
imported only when a filter is built.
"""

from __future__ import annotations

from fluxframe.core.hookspecs import hookimpl


def _prompt_nsfw(*, base_dir=None, **options):
    from fluxframe.safety.prompt_nsfw import PromptNSFWFilter

    return PromptNSFWFilter(base_dir=base_dir, **options)


def _image_nsfw(*, base_dir=None, **options):
    from fluxframe.safety.image_nsfw import ImageNSFWFilter

    return ImageNSFWFilter(base_dir=base_dir, **options)


def _ip(*, base_dir=None, **options):
    from fluxframe.safety.ip import IPFilter

    return IPFilter(base_dir=base_dir, **options)


@hookimpl
def register_filters(register):
    """The built-in filters: prompt-nsfw, image-nsfw and ip."""
    register("prompt-nsfw", _prompt_nsfw)
    register("image-nsfw", _image_nsfw)
    register("ip", _ip)


@hookimpl
def register_commands(register):
    """``fluxframe check`` and ``fluxframe audit`` (fluxframe.safety.cli)."""
    from fluxframe.safety.cli import register_commands as commands

    commands(register)
