"""Commands this layer adds to the `fluxframe` CLI."""

from __future__ import annotations


def add_commands(subparsers) -> dict:
    return {}
