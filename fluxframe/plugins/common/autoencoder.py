"""The KL autoencoder's encoder and decoder stacks (diffusers' ``Encoder``/``Decoder`` as ``AutoencoderKL`` and
``AutoencoderKLFlux2`` build them) and the config they are built from, read from and written to diffusers'
``vae/config.json``. FLUX.2's and Flux.1's autoencoders differ only in what surrounds these stacks (latent
width, normalisation, patchifying); submodule names follow diffusers, so ``vae/`` checkpoints load 1:1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from fluxframe.errors import CheckpointError

from . import bounds

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
# diffusers config keys that only steer diffusers' own machinery (tiling, upcasting, SD-style scaling).
_IGNORED_KEYS = {"sample_size", "force_upcast", "scaling_factor", "shift_factor", "latents_mean", "latents_std"}


@dataclass(frozen=True)
class AutoencoderConfig:
    """Shape of the autoencoder, fields as diffusers' config.json names them. Defaults are FLUX.2's; the batch
    norm and patch fields are FLUX.2's alone (Flux.1's autoencoder wraps this as ``Flux1AutoencoderConfig.blocks``
    and leaves them at their defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int = 2
    latent_channels: int = 32
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1
    patch_size: tuple[int, int] = (2, 2)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config.json") -> AutoencoderConfig:
        def fail(key: str, message: str) -> CheckpointError:
            return CheckpointError(message, file=source, key=key)

        checks = {  # dataclass field type -> (test, what was expected)
            "int": (lambda v: _is_int(v) and v > 0, "a positive integer"),
            "bool": (lambda v: isinstance(v, bool), "true or false"),
            "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                      and math.isfinite(v), "a number >= 0"),
            "tuple[int, ...]": (_is_int_list, "a list of positive integers"),
            "tuple[int, int]": (_is_int_list, "a list of positive integers"),
            "tuple[int, ...] | None": (lambda v: v is None or _is_int_list(v), "null or a list of positive integers"),
        }
        types = {f.name: f.type for f in fields(cls)}  # strings, because of `from __future__ import annotations`
        kwargs: dict = {}
        for key, value in d.items():
            if key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key == "act_fn":
                if value not in ("silu", "swish"):  # diffusers maps both names to SiLU
                    raise fail(key, f"only 'silu' is supported, got {bounds.short(value)}")
            elif key in ("down_block_types", "up_block_types"):
                wanted = _DOWN_BLOCK if key == "down_block_types" else _UP_BLOCK
                if not isinstance(value, (list, tuple)) or any(v != wanted for v in value):
                    raise fail(key, f"only {wanted} blocks are supported, got {bounds.short(value)}")
            elif key not in types:
                raise fail(key, "unknown autoencoder config key")
            else:
                ok, expected = checks[types[key]]
                if not ok(value):
                    raise fail(key, f"expected {expected}, got {bounds.short(value)}")
                kwargs[key] = float(value) if types[key] == "float" else value
                kwargs[key] = tuple(value) if isinstance(value, list) else kwargs[key]
        config = cls(**kwargs).check_sizes(source)

        # The block type lists fix how many levels diffusers builds; they must agree with the channel lists.
        decoder_channels = config.decoder_block_out_channels or config.block_out_channels
        for key, channels in (("down_block_types", config.block_out_channels), ("up_block_types", decoder_channels)):
            if key in d and len(d[key]) != len(channels):
                raise fail(key, f"has {len(d[key])} entries but the channel list has {len(channels)}")
        if len(decoder_channels) != len(config.block_out_channels):
            raise fail("decoder_block_out_channels", "must have as many levels as block_out_channels")
        if len(config.patch_size) != 2 or config.patch_size[0] != config.patch_size[1]:
            raise fail("patch_size", f"only square 2-D patches are supported, got {list(config.patch_size)}")
        for channels in {*config.block_out_channels, *decoder_channels}:
            if channels % config.norm_num_groups:
                raise fail("norm_num_groups", f"{config.norm_num_groups} groups do not divide {channels} channels")
        return config

    @classmethod
    def read(cls, folder: Path) -> AutoencoderConfig:
        """From a diffusers ``vae/`` folder's config.json (size-capped, checked as ``from_dict`` checks)."""
        return cls.from_dict(bounds.read_json(folder / "config.json"), source=str(folder / "config.json"))

    def check_sizes(self, source: str, names: dict[str, str] | None = None) -> AutoencoderConfig:
        """Itself, if every size is within sane bounds (see bounds.py), else a CheckpointError naming ``source``
        and the field (or ``names[field]``, where the sizes were read from a single file's tensors). Types are
        from_dict's business; this runs before anything is built, also for configs read from tensor shapes."""
        names = names or {}

        def key(name: str) -> str:
            return names.get(name, name)

        for name in ("in_channels", "out_channels", "latent_channels", "norm_num_groups"):
            bounds.integer(getattr(self, name), file=source, key=key(name), maximum=bounds.MAX_WIDTH)
        bounds.integer(self.layers_per_block, file=source, key=key("layers_per_block"),
                       maximum=bounds.MAX_LAYERS_PER_BLOCK)
        bounds.integers(self.patch_size, file=source, key=key("patch_size"), maximum=bounds.MAX_PATCH, max_len=2)
        for name in ("block_out_channels", "decoder_block_out_channels"):
            if getattr(self, name) is not None:
                bounds.integers(getattr(self, name), file=source, key=key(name), maximum=bounds.MAX_WIDTH,
                                max_len=bounds.MAX_LEVELS)
        # Per level, at most layers + 1 resnets of two 3x3 convolutions, in the encoder and in the decoder.
        levels = self.block_out_channels + (self.decoder_block_out_channels or self.block_out_channels)
        count = sum(18 * (self.layers_per_block + 1) * c * c for c in levels)
        bounds.parameters(count, file=source, key=key("block_out_channels"), what="autoencoder")
        return self

    def to_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {
            "_class_name": "AutoencoderKLFlux2",
            "act_fn": "silu",
            "down_block_types": [_DOWN_BLOCK] * len(self.block_out_channels),
            "up_block_types": [_UP_BLOCK] * len(self.decoder_block_out_channels or self.block_out_channels),
            **d,
        }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_list(value: object) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_int(v) and v > 0 for v in value)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class _Attention(nn.Module):
    """Single-head self-attention over all pixels, with its own pre-norm and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers names it to_out.0

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)[:, None]  # (B, 1 head, HW, C)
        out = F.scaled_dot_product_attention(self.to_q(t), self.to_k(t), self.to_v(t))
        return x + self.to_out[0](out[:, 0]).transpose(1, 2).reshape(b, c, h, w)


class _MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([_Attention(channels, groups)] if attention else [])
        self.resnets = nn.ModuleList([_ResBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class _Resample(nn.Module):
    def __init__(self, channels: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(channels, channels, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric right/bottom padding (not padding=1) is what the checkpoints were trained with.
        x = F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class _Level(nn.Module):
    """One resolution level: res blocks, then an optional resample (DownEncoderBlock2D / UpDecoderBlock2D)."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, down: bool, resample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([_ResBlock(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        self._samplers = "downsamplers" if down else "upsamplers"  # the attribute name is part of the key
        setattr(self, self._samplers, nn.ModuleList([_Resample(cout, down)]) if resample else None)

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        samplers = getattr(self, self._samplers)
        return x if samplers is None else samplers[0](x)


class Coder(nn.Module):
    """Encoder (down=True) or decoder: conv_in, levels, mid block, norm/act/conv_out."""

    def __init__(self, cin: int, cout: int, channels: tuple[int, ...], cfg: AutoencoderConfig, down: bool):
        super().__init__()
        groups, n = cfg.norm_num_groups, len(channels)
        chans = list(channels) if down else list(reversed(channels))
        self.conv_in = nn.Conv2d(cin, chans[0], 3, padding=1)
        # LDM-style decoders carry one res block per level more than the encoder; the checkpoint layout relies on it.
        layers = cfg.layers_per_block if down else cfg.layers_per_block + 1
        self._levels = "down_blocks" if down else "up_blocks"
        setattr(self, self._levels, nn.ModuleList(
            _Level(chans[max(i - 1, 0)], chans[i], layers, groups, down, resample=i < n - 1) for i in range(n)
        ))
        self.mid_block = _MidBlock(channels[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = _norm(chans[-1], groups)
        self.conv_out = nn.Conv2d(chans[-1], cout, 3, padding=1)
        self.down = down

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        if not self.down:
            x = self.mid_block(x)
        for level in getattr(self, self._levels):
            x = level(x)
        if self.down:
            x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
