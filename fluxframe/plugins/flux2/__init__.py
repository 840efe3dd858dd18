"""Built-in plugin: the FLUX.2 model family (DiT, autoencoder, Mistral-3 text encoder, loaders)."""

from fluxframe.core.hookspecs import hookimpl


@hookimpl
def register_model_families(register):
    from .family import Flux2  # torch loads only when a model family is actually needed

    register("flux2", Flux2)
