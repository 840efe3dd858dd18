"""FLUX.2 checkpoints in the original single-file layout the FLUX.2 authors publish.

A deployment names three things::

    [model]
    path = "flux2-dev.safetensors"      # the DiT: one file, keys double_blocks.N.img_attn.qkv.weight ...
    vae = "ae.safetensors"              # the autoencoder: one file, keys encoder.down.N.block.M ...
    text_encoder = "FLUX.2-dev"         # a diffusers-layout folder holding text_encoder/ and tokenizer/

The DiT's original key names are fluxframe's own parameter names (see transformer.py), so it loads with
no key map. The autoencoder's original names are those of the latent-diffusion code FLUX descends from;
fluxframe's autoencoder uses diffusers' names, and ``vae_rules`` maps one onto the other — written once,
read forwards to load (``vae_key_map``) and backwards to write (``vae_to_original``).

Model shapes come from the tensors themselves (``transformer_config``, ``autoencoder_config``): dev and
klein 4B / 9B differ in width, depth, text width and the guidance embedder. Only safetensors are read;
pickled files are refused by the checkpoint reader.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from fluxframe.core.checkpoint import SafetensorsCheckpoint, build_and_load, check_weight_files, fingerprint
from fluxframe.core.interfaces import MemoryStrategy
from fluxframe.errors import CheckpointError, ConfigError
from fluxframe.plugins.common import bounds
from fluxframe.plugins.common.dit import check_sizes
from fluxframe.plugins.common.loading import DTYPES, resolve_device

from .autoencoder import AutoencoderConfig, Flux2Autoencoder
from .transformer import Flux2Transformer, TransformerConfig

#: Known FLUX.2 DiTs by (hidden size, double blocks, single blocks, text width, guidance embedder).
VARIANTS = {
    (6144, 8, 48, 15360, True): "dev",
    (3072, 5, 20, 7680, False): "klein-4b",
    (4096, 8, 24, 12288, False): "klein-9b",
}
GROUP_NORM_GROUPS = 32  # fixed in the original autoencoder code; not recorded in the tensors

SAME, CONV1X1 = "same", "conv1x1"  # one-to-one | diffusers' Linear (C, C) is the original's 1×1 conv (C, C, 1, 1)


# -- the autoencoder's key mapping, written once ------------------------------------------------------------------

def _resnet(ours: str, theirs: str, has_shortcut: bool) -> Iterator[tuple[str, str, str]]:
    for part in ("norm1", "conv1", "norm2", "conv2"):
        for p in ("weight", "bias"):
            yield f"{theirs}.{part}.{p}", f"{ours}.{part}.{p}", SAME
    if has_shortcut:
        for p in ("weight", "bias"):
            yield f"{theirs}.nin_shortcut.{p}", f"{ours}.conv_shortcut.{p}", SAME


def vae_rules(config: AutoencoderConfig) -> Iterator[tuple[str, str, str]]:
    """(original key, fluxframe/diffusers key, kind) for every tensor of the autoencoder."""
    n = len(config.block_out_channels)
    dec = config.decoder_block_out_channels or config.block_out_channels
    for coder, channels, down in (("encoder", config.block_out_channels, True), ("decoder", dec, False)):
        for p in ("weight", "bias"):
            yield f"{coder}.conv_in.{p}", f"{coder}.conv_in.{p}", SAME
            yield f"{coder}.norm_out.{p}", f"{coder}.conv_norm_out.{p}", SAME
            yield f"{coder}.conv_out.{p}", f"{coder}.conv_out.{p}", SAME
        # levels: the original counts decoder levels from the lowest resolution up, diffusers from the top down
        layers = config.layers_per_block + (0 if down else 1)
        chans = list(channels) if down else list(reversed(channels))
        for i in range(n):
            level = i if down else n - 1 - i
            ours = f"{coder}.{'down_blocks' if down else 'up_blocks'}.{i}"
            theirs = f"{coder}.{'down' if down else 'up'}.{level}"
            for j in range(layers):
                cin = chans[max(i - 1, 0)] if j == 0 else chans[i]
                yield from _resnet(f"{ours}.resnets.{j}", f"{theirs}.block.{j}", cin != chans[i])
            if i < n - 1:
                sampler = "downsample" if down else "upsample"
                for p in ("weight", "bias"):
                    yield f"{theirs}.{sampler}.conv.{p}", f"{ours}.{sampler}rs.0.conv.{p}", SAME
        for k in (1, 2):
            yield from _resnet(f"{coder}.mid_block.resnets.{k - 1}", f"{coder}.mid.block_{k}", False)
        if config.mid_block_add_attention:
            attn, theirs = f"{coder}.mid_block.attentions.0", f"{coder}.mid.attn_1"
            for p in ("weight", "bias"):
                yield f"{theirs}.norm.{p}", f"{attn}.group_norm.{p}", SAME
                for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
                    yield f"{theirs}.{a}.{p}", f"{attn}.{b}.{p}", CONV1X1 if p == "weight" else SAME
    for conv, theirs in (("quant_conv", "encoder.quant_conv"), ("post_quant_conv", "decoder.post_quant_conv")):
        if getattr(config, f"use_{conv}"):
            for p in ("weight", "bias"):
                yield f"{theirs}.{p}", f"{conv}.{p}", SAME
    for b in ("running_mean", "running_var", "num_batches_tracked"):
        yield f"bn.{b}", f"bn.{b}", SAME


def _from_conv1x1(tensors: list[torch.Tensor]) -> torch.Tensor:
    (t,) = tensors
    if t.ndim != 4 or t.shape[2:] != (1, 1):
        raise ValueError(f"expected a 1×1 convolution weight, got shape {tuple(t.shape)}")
    return t.flatten(1)


def vae_key_map(config: AutoencoderConfig) -> dict:
    """For ``load_into``: fluxframe key -> original key, or ((original key,), reshape)."""
    return {ours: theirs if kind == SAME else ((theirs,), _from_conv1x1) for theirs, ours, kind in vae_rules(config)}


def vae_to_original(state_dict: Mapping[str, torch.Tensor], config: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """A fluxframe (= diffusers) autoencoder state dict in the original single-file layout."""
    out = {}
    for theirs, ours, kind in vae_rules(config):
        if ours in state_dict:
            t = state_dict[ours]
            out[theirs] = t[:, :, None, None] if kind == CONV1X1 else t
    return out


# -- shapes -> configs ----------------------------------------------------------------------------------------------

def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def _need(shapes: Mapping[str, tuple[int, ...]], key: str, file: str, ndim: int = 0) -> tuple[int, ...]:
    """The shape of ``key``; with ``ndim``, checked to have that many non-zero dimensions (a header can claim any
    shape; the sizes read from it are bounded by the config checks)."""
    if key not in shapes:
        raise CheckpointError("missing: not a FLUX.2 checkpoint in the original single-file layout", file=file,
                              key=key)
    shape = tuple(shapes[key])
    if ndim and (len(shape) != ndim or not all(isinstance(d, int) and d >= 1 for d in shape)):
        raise CheckpointError(f"shape {shape} is not a {ndim}-D weight of a FLUX.2 checkpoint", file=file, key=key)
    return shape


# config field -> the tensors its value is read from, named in errors about it
DIT_SOURCES = {
    "in_channels": "img_in.weight", "out_channels": "final_layer.linear.weight", "num_layers": "double_blocks",
    "num_single_layers": "single_blocks", "attention_head_dim": "single_blocks.0.norm.query_norm.scale",
    "num_attention_heads": "img_in.weight", "joint_attention_dim": "txt_in.weight",
    "timestep_guidance_channels": "time_in.in_layer.weight", "mlp_ratio": "single_blocks.0.linear1.weight",
    "axes_dims_rope": "single_blocks.0.norm.query_norm.scale",
}
VAE_SOURCES = {
    "in_channels": "encoder.conv_in.weight", "out_channels": "decoder.conv_out.weight",
    "block_out_channels": "encoder.down", "decoder_block_out_channels": "decoder.up",
    "layers_per_block": "encoder.down.0.block", "latent_channels": "decoder.conv_in.weight",
    "patch_size": "bn.running_mean",
}


def transformer_config(shapes: Mapping[str, tuple[int, ...]], file: str = "<checkpoint>") -> TransformerConfig:
    """The DiT config from the tensor shapes of an original-layout checkpoint (name -> shape), checked against
    sane bounds (the header may claim any number of blocks)."""
    hidden, in_channels = _need(shapes, "img_in.weight", file, 2)
    joint = _need(shapes, "txt_in.weight", file, 2)[1]
    t_channels = _need(shapes, "time_in.in_layer.weight", file, 2)[1]
    out_channels = _need(shapes, "final_layer.linear.weight", file, 2)[0]
    head_dim = _need(shapes, "single_blocks.0.norm.query_norm.scale", file, 1)[0]
    mlp_hidden = (_need(shapes, "single_blocks.0.linear1.weight", file, 2)[0] - 3 * hidden) // 2
    if hidden % head_dim or head_dim % 8:
        raise CheckpointError(f"hidden size {hidden} and head dim {head_dim} do not fit a FLUX.2 DiT", file=file,
                              key="single_blocks.0.norm.query_norm.scale")
    config = TransformerConfig(
        in_channels=in_channels, out_channels=None if out_channels == in_channels else out_channels,
        num_layers=_count(shapes, r"double_blocks\.(\d+)\."),
        num_single_layers=_count(shapes, r"single_blocks\.(\d+)\."),
        attention_head_dim=head_dim, num_attention_heads=hidden // head_dim, joint_attention_dim=joint,
        timestep_guidance_channels=t_channels, mlp_ratio=mlp_hidden / hidden, axes_dims_rope=(head_dim // 4,) * 4,
        guidance_embeds="guidance_in.in_layer.weight" in shapes,
    )
    return check_sizes(config, file, DIT_SOURCES)


def variant(config: TransformerConfig) -> str:
    """"dev", "klein-4b", "klein-9b", or "custom" for any other shape."""
    key = (config.hidden_size, config.num_layers, config.num_single_layers, config.joint_attention_dim,
           config.guidance_embeds)
    return VARIANTS.get(key, "custom")


def autoencoder_config(shapes: Mapping[str, tuple[int, ...]], file: str = "<checkpoint>") -> AutoencoderConfig:
    """The autoencoder config from the tensor shapes of an original-layout ``ae.safetensors``."""
    levels = _count(shapes, r"encoder\.down\.(\d+)\.")
    if not levels:
        _need(shapes, "encoder.down.0.block.0.conv1.weight", file)
    # Bounded before the loops below go through them: the header may claim any number of levels.
    bounds.integer(levels, file=file, key="encoder.down", maximum=bounds.MAX_LEVELS)
    channels = tuple(_need(shapes, f"encoder.down.{i}.block.0.conv1.weight", file, 4)[0] for i in range(levels))
    dec = tuple(_need(shapes, f"decoder.up.{i}.block.0.conv1.weight", file, 4)[0] for i in range(levels))
    latent = _need(shapes, "decoder.conv_in.weight", file, 4)[1]
    bn = _need(shapes, "bn.running_mean", file, 1)[0]
    patch = round((bn / latent) ** 0.5)
    for c in {*channels, *dec}:
        if c % GROUP_NORM_GROUPS:
            raise CheckpointError(f"{c} channels cannot be split into {GROUP_NORM_GROUPS} norm groups", file=file,
                                  key="encoder.down.0.block.0.conv1.weight")
    config = AutoencoderConfig(
        in_channels=_need(shapes, "encoder.conv_in.weight", file, 4)[1],
        out_channels=_need(shapes, "decoder.conv_out.weight", file, 4)[0],
        block_out_channels=channels, decoder_block_out_channels=None if dec == channels else dec,
        layers_per_block=_count(shapes, r"encoder\.down\.0\.block\.(\d+)\."), latent_channels=latent,
        norm_num_groups=GROUP_NORM_GROUPS, use_quant_conv="encoder.quant_conv.weight" in shapes,
        use_post_quant_conv="decoder.post_quant_conv.weight" in shapes,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in shapes, patch_size=(patch, patch),
    )
    return config.check_sizes(file, VAE_SOURCES)


def _shapes(ckpt: SafetensorsCheckpoint) -> dict[str, tuple[int, ...]]:
    return {k: ckpt.shape(k) for k in ckpt.keys()}


# -- config and loading ------------------------------------------------------------------------------------------

def is_single_file(config) -> bool:
    """Whether [model] names an original-layout checkpoint (a file, or any of vae / text_encoder set)."""
    m = config.model
    return m.path is not None and (config.model_path.is_file() or m.vae is not None or m.text_encoder is not None)


def paths(config) -> tuple[Path, Path, Path]:
    """(DiT file, autoencoder file, text encoder folder), checked to exist; ConfigError names the key."""
    m = config.model
    if not config.model_path.is_file():
        raise ConfigError(f"{config.model_path}: `vae` and `text_encoder` are for single-file checkpoints; "
                          "`path` must then be the DiT's .safetensors file", path=config.source, key="model.path")
    for key in ("vae", "text_encoder"):
        if getattr(m, key) is None:
            raise ConfigError(
                "a single-file checkpoint holds only the DiT: set model.vae to the autoencoder file (ae.safetensors) "
                "and model.text_encoder to a diffusers-layout folder with text_encoder/ and tokenizer/",
                path=config.source, key=f"model.{key}")
    vae, te = config.resolve(m.vae), config.resolve(m.text_encoder)
    if not vae.is_file():
        raise ConfigError(f"{vae}: no such file", path=config.source, key="model.vae")
    for sub in ("text_encoder", "tokenizer"):
        if not (te / sub).is_dir():
            raise ConfigError(f"{te}: expected a folder holding {sub}/ (diffusers layout)", path=config.source,
                              key="model.text_encoder")
    return config.model_path, vae, te


def configs(config) -> tuple[TransformerConfig, AutoencoderConfig]:
    """The DiT's and the autoencoder's configs from the two files' headers (opening them refuses a truncated
    file), within sane bounds, checked to be a matching pair."""
    dit, vae, _ = paths(config)
    with SafetensorsCheckpoint.open(dit) as ckpt:
        t_config = transformer_config(_shapes(ckpt), str(dit))
    with SafetensorsCheckpoint.open(vae) as ckpt:
        v_config = autoencoder_config(_shapes(ckpt), str(vae))
    patched = v_config.latent_channels * v_config.patch_size[0] ** 2
    if patched != t_config.in_channels:
        raise CheckpointError(f"the autoencoder gives {patched} latent channels, the DiT ({dit.name}) takes "
                              f"{t_config.in_channels}: not a matching pair", file=str(vae), key="bn.running_mean")
    return t_config, v_config


def check(config) -> list[str]:
    """Read the headers only: both files are FLUX.2 in the original layout, and their shapes agree; the text
    encoder's config is within sane bounds and its weight files are as long as their headers say."""
    dit, _, te = paths(config)
    t_config, _ = configs(config)
    bounds.text_encoder_config(te / "text_encoder")
    check_weight_files(te / "text_encoder")
    kind = variant(t_config)
    return [] if kind != "custom" else [f"{dit.name}: not a known FLUX.2 shape (dev, klein 4B, klein 9B)"]


def load_transformer(file: Path, dtype: torch.dtype, device: torch.device,
                     memory: MemoryStrategy | None = None) -> Flux2Transformer:
    with SafetensorsCheckpoint.open(file) as ckpt:
        config = transformer_config(_shapes(ckpt), str(file))
        return build_and_load(lambda: Flux2Transformer(config), ckpt, what="transformer", memory=memory,
                              dtype=dtype, device=device)


def load_autoencoder(file: Path, dtype: torch.dtype, device: torch.device) -> Flux2Autoencoder:
    with SafetensorsCheckpoint.open(file) as ckpt:
        config = autoencoder_config(_shapes(ckpt), str(file))

        def build() -> Flux2Autoencoder:
            model = Flux2Autoencoder(config)
            if "bn.num_batches_tracked" not in ckpt:  # a training counter, unused at inference; not every file has it
                model.bn.register_buffer("num_batches_tracked", torch.tensor(0, device=device), persistent=False)
            return model

        return build_and_load(build, ckpt, what="vae", key_map=vae_key_map(config), dtype=dtype, device=device)


def load(family_cls, config, memory):
    """A ``family_cls`` (Flux2) instance from single files; its text encoder loads from ``text_encoder``."""
    dit, vae_file, te = paths(config)
    device, dtype = resolve_device(config.model.device), DTYPES[config.model.dtype]
    transformer = load_transformer(dit, dtype, memory.load_device("transformer", device), memory)
    transformer = memory.place("transformer", transformer, device)
    vae = memory.place("vae", load_autoencoder(vae_file, dtype, memory.load_device("vae", device)), device)
    model = family_cls(te, transformer, vae, device=device, dtype=dtype, memory=memory)
    model._checkpoint_id = fingerprint(dit, vae_file, te / "text_encoder")
    return model
