"""Provenance: an invisible watermark in the pixels of every output, a signed C2PA manifest on every output
file, and ``fluxframe verify`` to check both (see docs/provenance.md).

Registers two postprocessors through the same hook third-party plugins use: ``watermark`` (order 100,
fluxframe.provenance.watermark.WatermarkPostprocessor) and ``c2pa`` (order 200,
fluxframe.provenance.signing.C2PASigner). OpenCV, PyWavelets, cryptography and c2pa load only when one of them
is built or used. The ``verify`` and ``certs`` commands come through ``register_commands``
(fluxframe.provenance.cli).
"""

from __future__ import annotations

from fluxframe.core.hookspecs import hookimpl


@hookimpl
def register_postprocessors(register):
    from fluxframe.provenance.signing import C2PASigner
    from fluxframe.provenance.watermark import WatermarkPostprocessor

    register("watermark", WatermarkPostprocessor)
    register("c2pa", C2PASigner)


@hookimpl
def register_commands(register):
    """``fluxframe verify`` and ``fluxframe certs`` (fluxframe.provenance.cli)."""
    from fluxframe.provenance.cli import register_commands as commands

    commands(register)
