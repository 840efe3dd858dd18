"""fluxframe: FLUX.2 and Flex.2 image generation with plugins, safety filters and provenance."""

__version__ = "0.1.0"
