"""Built-in plugin: the Flex.2 / Flux.1 model family (Flux.1 MM-DiT, 16-channel autoencoder, T5 + CLIP-L)."""

from fluxframe.core.hookspecs import hookimpl


@hookimpl
def register_model_families(register):
    from .family import Flex2  # torch loads only when a model family is actually needed

    register("flex2", Flex2)
