"""Parity of fluxframe's FLUX.2 DiT with diffusers' Flux2Transformer2DModel, and the key mapping."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_diffusers_transformer

from fluxframe.plugins.flux2 import keymap
from fluxframe.plugins.flux2.family import image_ids, text_ids
from fluxframe.plugins.flux2.transformer import Flux2Transformer, TransformerConfig


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def ours_from(ref) -> Flux2Transformer:
    config = TransformerConfig.from_dict(dict(ref.config))
    sd = ref.state_dict()
    with torch.device("meta"):
        model = Flux2Transformer(config)
    mapped = {}
    for key, source in keymap.from_diffusers(config).items():
        mapped[key] = sd[source] if isinstance(source, str) else source[1]([sd[k] for k in source[0]])
    model.load_state_dict(mapped, assign=True)
    return model.eval()


CONFIGS = [
    dict(),
    dict(guidance_embeds=False),
    dict(num_layers=1, num_single_layers=3, attention_head_dim=32, num_attention_heads=3, axes_dims_rope=(8, 8, 8, 8),
         joint_attention_dim=40, in_channels=64, mlp_ratio=2.0),
    dict(num_single_layers=0),  # the last-block shortcut must not apply to a double block
    dict(num_single_layers=1),  # the only single block is the last one
]


@pytest.mark.parametrize("overrides", CONFIGS, ids=["dev-like", "no-guidance", "wider", "no-single", "one-single"])
def test_forward_matches_diffusers(overrides):
    torch.manual_seed(1)
    ref = tiny_diffusers_transformer(**overrides)
    ours = ours_from(ref)
    c = ref.config
    h, w, length = 3, 5, 7  # non-square latent grid
    img = torch.randn(2, h * w, c.in_channels)
    txt = torch.randn(2, length, c.joint_attention_dim)
    t = torch.tensor([0.9, 0.25])
    g = torch.tensor([4.0, 2.5]) if c.guidance_embeds else None
    with torch.no_grad():
        expected = ref(hidden_states=img, encoder_hidden_states=txt, timestep=t, img_ids=image_ids(h, w),
                       txt_ids=text_ids(length), guidance=g, return_dict=False)[0]
        got = ours(img, image_ids(h, w), txt, text_ids(length), t, g)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-5


def test_reference_tokens_with_time_offsets_match():
    """Extra tokens with t = 10 and 20 (how references are placed) go through RoPE identically."""
    torch.manual_seed(2)
    ref = tiny_diffusers_transformer()
    ours = ours_from(ref)
    ids = torch.cat([image_ids(2, 4), image_ids(3, 2, t=10), image_ids(2, 2, t=20)])
    img = torch.randn(1, len(ids), 128)
    txt = torch.randn(1, 5, 96)
    t, g = torch.tensor([0.5]), torch.tensor([3.0])
    with torch.no_grad():
        expected = ref(hidden_states=img, encoder_hidden_states=txt, timestep=t, img_ids=ids, txt_ids=text_ids(5),
                       guidance=g, return_dict=False)[0]
        got = ours(img, ids, txt, text_ids(5), t, g)
    assert rel_err(got, expected) < 1e-5


def test_key_map_round_trips_every_tensor():
    ref = tiny_diffusers_transformer()
    ours = ours_from(ref)
    back = keymap.to_diffusers(ours.state_dict(), ours.config)
    expected = ref.state_dict()
    assert set(back) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(back[key], tensor), key


def test_full_size_dev_shapes_on_meta():
    """FLUX.2 dev at full size: our key map covers diffusers' state dict exactly, name for name and shape for shape."""
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        ref = Flux2Transformer2DModel()
        ours = Flux2Transformer(TransformerConfig.from_dict(dict(ref.config)))
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    as_diffusers = {k: tuple(v.shape) for k, v in keymap.to_diffusers(ours.state_dict(), ours.config).items()}
    assert as_diffusers == theirs
    assert sum(torch.Size(s).numel() for s in mine.values()) == sum(torch.Size(s).numel() for s in theirs.values())
    assert mine["double_blocks.0.img_attn.qkv.weight"] == (3 * 6144, 6144)
    assert mine["single_blocks.47.linear1.weight"] == (3 * 6144 + 2 * 3 * 6144, 6144)
    assert mine["txt_in.weight"] == (6144, 15360)


def test_unknown_config_key_is_named():
    from fluxframe.errors import CheckpointError

    with pytest.raises(CheckpointError, match="num_blocks"):
        TransformerConfig.from_dict({"num_blocks": 3}, source="transformer/config.json")
