"""fluxframe: FLUX.2 and Flex.2 image generation with plugins, safety filters and provenance.

Importing this package is cheap (no torch): the heavy modules load when a pipeline is built.
"""

from fluxframe.core.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
