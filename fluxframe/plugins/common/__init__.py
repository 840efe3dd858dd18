"""Building blocks the built-in model families share, under public names.

A family imports what it shares with another from here, never from the other family, so each family folder
stands on its own. This package registers nothing (it is no plugin):

* ``dit`` — the parts FLUX.2's and Flux.1's diffusion transformers have in common: RoPE, timestep embedding,
  QK norm, modulation, joint attention, and the reading and sanity checks of their config.json;
* ``autoencoder`` — the KL autoencoder's encoder/decoder stacks and their config (FLUX.2's and Flux.1's
  autoencoders differ only around them);
* ``bounds`` — sane bounds on the sizes a config claims, and the size-capped JSON reader;
* ``loading`` — dtype names, device resolution, the safetensors-only rule for text encoder folders;
* ``tiny`` — the text the tiny random tokenizers of the presets and tests are trained on.
"""
