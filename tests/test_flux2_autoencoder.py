"""Flux2Autoencoder against diffusers' AutoencoderKLFlux2 and the Flux2 pipeline's latent normalisation.

diffusers is only the oracle, so it is imported inside the tests. Errors are ||ours - ref|| / ||ref||.
"""

from __future__ import annotations

import json

import pytest
import torch

from fluxframe.errors import CheckpointError
from fluxframe.plugins.flux2.autoencoder import AutoencoderConfig, Flux2Autoencoder

TOL = 1e-5

SMALL_CONFIGS = {
    "two_levels": dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1),
    "four_levels": dict(block_out_channels=(16, 32, 32, 32), norm_num_groups=4, latent_channels=8),
    "no_attention_no_quant": dict(
        block_out_channels=(16, 32), decoder_block_out_channels=(24, 32), norm_num_groups=8, layers_per_block=1,
        latent_channels=4, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
    ),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def diffusers_vae(**kwargs):
    """A randomised diffusers AutoencoderKLFlux2 in eval mode, with non-trivial norms, biases and BN stats."""
    from diffusers import AutoencoderKLFlux2

    levels = len(kwargs.get("block_out_channels", (128, 256, 512, 512)))
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels, **kwargs
    ).eval()
    with torch.no_grad():
        for p in vae.parameters():
            if p.ndim == 1:  # GroupNorm affine and biases start at 1/0; move them off the identity
                p.add_(0.1 * torch.randn_like(p))
        vae.bn.running_mean.copy_(0.5 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return vae


def reference_encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Flux2Pipeline._encode_vae_image: posterior mode -> patchify -> BN-normalise."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    z = Flux2Pipeline._patchify_latents(vae.encode(images).latent_dist.mode())
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return (z - mean) / std


def reference_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """The end of Flux2Pipeline.__call__: de-normalise -> unpatchify -> vae.decode."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return vae.decode(Flux2Pipeline._unpatchify_latents(latents * std + mean), return_dict=False)[0]


def ours_from(vae) -> Flux2Autoencoder:
    model = Flux2Autoencoder(AutoencoderConfig.from_dict(dict(vae.config)))
    model.load_state_dict(vae.state_dict())
    return model.eval()


def images(batch=2, h=64, w=96) -> torch.Tensor:
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("name", SMALL_CONFIGS)
@torch.no_grad()
def test_encode_decode_match_diffusers(name):
    vae = diffusers_vae(**SMALL_CONFIGS[name])
    model = ours_from(vae)
    x = images()

    z = model.encode(x)
    assert z.shape == (2, 4 * vae.config.latent_channels, 64 // model.downsample_factor, 96 // model.downsample_factor)
    assert rel_err(z, reference_encode(vae, x)) < TOL
    assert rel_err(model.encode_moments(x), vae.encode(x).latent_dist.parameters) < TOL

    latents = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    out = model.decode(latents)
    assert out.shape == x.shape
    assert rel_err(out, reference_decode(vae, latents)) < TOL


@torch.no_grad()
def test_meta_construction_then_assign_load():
    vae = diffusers_vae(**SMALL_CONFIGS["two_levels"])
    with torch.device("meta"):
        model = Flux2Autoencoder(AutoencoderConfig.from_dict(dict(vae.config)))
    assert all(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(vae.state_dict(), assign=True)
    x = images()
    assert rel_err(model.encode(x), reference_encode(vae, x)) < TOL


def test_full_size_state_dict_matches_diffusers_on_meta():
    from diffusers import AutoencoderKLFlux2

    with torch.device("meta"):
        ours, theirs = Flux2Autoencoder(AutoencoderConfig()), AutoencoderKLFlux2()
    shapes = lambda m: [(k, tuple(v.shape)) for k, v in m.state_dict().items()]  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert ours.downsample_factor == 16
    assert AutoencoderConfig.from_dict(dict(theirs.config)) == AutoencoderConfig()


@torch.no_grad()
def test_config_round_trip_loads_in_diffusers(tmp_path):
    from diffusers import AutoencoderKLFlux2
    from safetensors.torch import save_file

    for kwargs in SMALL_CONFIGS.values():
        vae = diffusers_vae(**kwargs)
        config = AutoencoderConfig.from_dict(dict(vae.config))
        assert AutoencoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
        model = ours_from(vae)

        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config.to_dict()))
        save_file(model.state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
        loaded = AutoencoderKLFlux2.from_pretrained(folder).eval()

        assert AutoencoderConfig.from_dict(dict(loaded.config)) == config
        x = images(batch=1)
        assert torch.equal(reference_encode(loaded, x), reference_encode(vae, x))
        assert rel_err(model.encode(x), reference_encode(loaded, x)) < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_runs(dtype):
    vae = diffusers_vae(**SMALL_CONFIGS["two_levels"])
    model = ours_from(vae)
    half = ours_from(vae).to(dtype)
    x = images()
    z = half.encode(x)  # fp32 images are cast to the parameters' dtype
    assert z.dtype == dtype
    assert rel_err(z, model.encode(x)) < 5e-2
    out = half.decode(z)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, model.decode(z.float())) < 5e-2


@pytest.mark.parametrize(
    "key, value",
    [
        ("act_fn", "gelu"),
        ("down_block_types", ["AttnDownEncoderBlock2D"] * 4),
        ("up_block_types", ["UpDecoderBlock2D"] * 3),
        ("layers_per_block", "2"),
        ("use_quant_conv", 1),
        ("block_out_channels", [128, 256.0]),
        ("patch_size", [2, 1]),
        ("norm_num_groups", 48),
        ("conv_padding", 1),
    ],
)
def test_bad_config_names_the_key(key, value):
    d = AutoencoderConfig().to_dict() | {key: value}
    with pytest.raises(CheckpointError) as caught:
        AutoencoderConfig.from_dict(d, source="vae/config.json")
    assert caught.value.key == key and caught.value.file == "vae/config.json"
    assert key in str(caught.value)


def test_ignored_diffusers_keys():
    d = AutoencoderConfig().to_dict() | {
        "_diffusers_version": "0.36.0", "sample_size": 1024, "force_upcast": True, "act_fn": "silu",
    }
    assert AutoencoderConfig.from_dict(d) == AutoencoderConfig()
