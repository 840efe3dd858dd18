"""Parity of the flex2 family's Flux.1 DiT and autoencoder with diffusers (FluxTransformer2DModel, AutoencoderKL),
and the loading of both checkpoint layouts."""

from __future__ import annotations

import pytest
import torch
from flex2_helpers import rel_err, tiny_flux_transformer, tiny_flux_vae

from fluxframe.errors import CheckpointError
from fluxframe.plugins.flex2 import keymap
from fluxframe.plugins.flex2.family import image_ids, load_transformer, pack, text_ids, unpack
from fluxframe.plugins.flex2.transformer import Flux1Config, Flux1Transformer


def ours_from(ref) -> Flux1Transformer:
    config = Flux1Config.from_dict(dict(ref.config))
    sd = ref.state_dict()
    mapped = {k: sd[s] if isinstance(s, str) else s[1]([sd[x] for x in s[0]])
              for k, s in keymap.from_diffusers(config).items()}
    with torch.device("meta"):
        model = Flux1Transformer(config)
    model.load_state_dict(mapped, assign=True, strict=True)
    return model.eval()


CONFIGS = {
    "flex2-196": dict(in_channels=196, out_channels=64),
    "flux1-64": dict(in_channels=64, out_channels=None),
    "no-guidance": dict(in_channels=64, out_channels=None, guidance_embeds=False),
    "wider": dict(in_channels=196, out_channels=64, num_layers=1, num_single_layers=3, attention_head_dim=32,
                  num_attention_heads=3, axes_dims_rope=(8, 12, 12), joint_attention_dim=40, pooled_projection_dim=24),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_transformer_matches_diffusers(name):
    torch.manual_seed(1)
    ref = tiny_flux_transformer(**CONFIGS[name])
    ours = ours_from(ref)
    c = ref.config
    h, w, length = 3, 5, 7
    img, txt = torch.randn(2, h * w, c.in_channels), torch.randn(2, length, c.joint_attention_dim)
    pooled, t = torch.randn(2, c.pooled_projection_dim), torch.tensor([0.9, 0.25])
    g = torch.tensor([3.5, 1.0]) if c.guidance_embeds else None
    with torch.no_grad():
        expected = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                       img_ids=image_ids(h, w), txt_ids=text_ids(length), guidance=g, return_dict=False)[0]
        got = ours(img, image_ids(h, w), txt, text_ids(length), pooled, t, g)
    assert got.shape == expected.shape == (2, h * w, 64)
    assert rel_err(got, expected) < 1e-5


def test_keymap_round_trip():
    ref = tiny_flux_transformer()
    config = Flux1Config.from_dict(dict(ref.config))
    ours = ours_from(ref).state_dict()
    back = keymap.to_diffusers(ours, config)
    assert set(back) == set(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("in_channels,prefix", [(196, ""), (64, "model.diffusion_model.")])
def test_single_file_layout_is_detected_from_shapes(tmp_path, in_channels, prefix):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    ref = tiny_flux_transformer(in_channels=in_channels, out_channels=64)
    ours = ours_from(ref)
    file = tmp_path / "flex2.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in ours.state_dict().items()}, str(file),
              {"axes_dims_rope": "4,6,6"})
    loaded = load_transformer(file, torch.float32, "cpu")
    assert loaded.config.in_channels == in_channels and loaded.config.num_layers == 2
    assert loaded.config.num_attention_heads == 2 and loaded.config.guidance_embeds
    img, txt = torch.randn(1, 6, in_channels), torch.randn(1, 4, 32)
    args = (img, image_ids(2, 3), txt, text_ids(4), torch.randn(1, 32), torch.tensor([0.5]), torch.tensor([3.5]))
    with torch.no_grad():
        assert torch.equal(loaded(*args), ours(*args))
    # and the diffusers folder layout through the same entry point
    ref.save_pretrained(tmp_path / "transformer")
    folder_loaded = load_transformer(tmp_path / "transformer", torch.float32, "cpu")
    with torch.no_grad():
        assert rel_err(folder_loaded(*args), ours(*args)) < 1e-6


def test_unknown_layout_and_wrong_width_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="neither a diffusers"):
        load_transformer(tmp_path / "x.safetensors", torch.float32, "cpu")
    ref = tiny_flux_transformer(in_channels=128, out_channels=64)
    file = tmp_path / "odd.safetensors"
    save_file({k: v.contiguous() for k, v in ours_from(ref).state_dict().items()}, str(file))
    with pytest.raises(CheckpointError, match="128 input channels"):
        load_transformer(file, torch.float32, "cpu")


@pytest.mark.parametrize("overrides", [{}, dict(use_quant_conv=True, use_post_quant_conv=True,
                                                block_out_channels=(8, 16, 16), norm_num_groups=4,
                                                down_block_types=["DownEncoderBlock2D"] * 3,
                                                up_block_types=["UpDecoderBlock2D"] * 3)], ids=["flux1", "quant-conv"])
def test_autoencoder_matches_diffusers(tmp_path, overrides):
    torch.manual_seed(3)
    ref = tiny_flux_vae(**overrides)
    ref.save_pretrained(tmp_path / "vae")
    from fluxframe.plugins.flex2.family import load_autoencoder

    ours = load_autoencoder(tmp_path / "vae", torch.float32, "cpu")
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(images).latent_dist
        expected = (dist.mode() - ref.config.shift_factor) * ref.config.scaling_factor
        got = ours.encode(images)
        assert rel_err(got, expected) < 1e-5
        decoded = ref.decode(expected / ref.config.scaling_factor + ref.config.shift_factor).sample
        assert rel_err(ours.decode(got), decoded) < 1e-5
        # posterior sampling draws from the generator it is given, as diffusers' does
        sampled = dist.sample(torch.Generator().manual_seed(5))
        ours_sampled = ours.encode(images, torch.Generator().manual_seed(5))
        assert rel_err(ours_sampled, (sampled - ref.config.shift_factor) * ref.config.scaling_factor) < 1e-5


def test_pack_is_channel_major_and_inverts():
    x = torch.randn(1, 16, 6, 4)
    tokens = pack(x)
    assert tokens.shape == (1, 6, 64)
    # token (row 1, col 0), channel c·4 + pi·2 + pj  <-  pixel (2·1 + pi, 0 + pj) of channel c
    assert tokens[0, 2, 5 * 4 + 1 * 2 + 1] == x[0, 5, 3, 1]
    assert torch.equal(unpack(tokens, (3, 2)), x)
