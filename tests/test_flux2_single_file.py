"""Original single-file FLUX.2 checkpoints: full-size key names and shapes for dev, klein 4B and klein 9B in
both layouts (on the meta device, no memory), and a single-file checkpoint written in the original layout
giving the same image as the same weights in the diffusers layout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from fluxframe import api
from fluxframe.core.checkpoint import save_sharded
from fluxframe.errors import CheckpointError, ConfigError
from fluxframe.plugins.flux2 import keymap, single_file
from fluxframe.plugins.flux2.autoencoder import AutoencoderConfig, Flux2Autoencoder
from fluxframe.plugins.flux2.transformer import Flux2Transformer, TransformerConfig

# hidden, heads, double, single, text width, guidance embedder (REFERENCE.md)
FULL_SIZE = {
    "dev": (6144, 48, 8, 48, 15360, True),
    "klein-4b": (3072, 24, 5, 20, 7680, False),
    "klein-9b": (4096, 32, 8, 24, 12288, False),
}


def _shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def original_dit_layout(hidden, double, single, context, guidance):
    """The published checkpoints' keys and shapes, written out from the architecture (not from fluxframe's code)."""
    h, mlp = hidden, 3 * hidden
    out = {"img_in.weight": (h, 128), "txt_in.weight": (h, context),
           "time_in.in_layer.weight": (h, 256), "time_in.out_layer.weight": (h, h),
           "double_stream_modulation_img.lin.weight": (6 * h, h), "double_stream_modulation_txt.lin.weight": (6 * h, h),
           "single_stream_modulation.lin.weight": (3 * h, h),
           "final_layer.adaLN_modulation.1.weight": (2 * h, h), "final_layer.linear.weight": (128, h)}
    if guidance:
        out |= {"guidance_in.in_layer.weight": (h, 256), "guidance_in.out_layer.weight": (h, h)}
    for n in range(double):
        for s in ("img", "txt"):
            out |= {f"double_blocks.{n}.{s}_attn.qkv.weight": (3 * h, h), f"double_blocks.{n}.{s}_attn.proj.weight": (h, h),
                    f"double_blocks.{n}.{s}_attn.norm.query_norm.scale": (128,),
                    f"double_blocks.{n}.{s}_attn.norm.key_norm.scale": (128,),
                    f"double_blocks.{n}.{s}_mlp.0.weight": (2 * mlp, h), f"double_blocks.{n}.{s}_mlp.2.weight": (h, mlp)}
    for n in range(single):
        out |= {f"single_blocks.{n}.linear1.weight": (3 * h + 2 * mlp, h),
                f"single_blocks.{n}.linear2.weight": (h, h + mlp),
                f"single_blocks.{n}.norm.query_norm.scale": (128,), f"single_blocks.{n}.norm.key_norm.scale": (128,)}
    return out


def original_vae_layout(ch=(128, 256, 512, 512), blocks=2, z=32):
    """The published ae.safetensors layout (latent-diffusion naming; attention as 1×1 convolutions)."""
    out = {}

    def conv(name, cout, cin, k):
        out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def mid(coder, c):
        res(f"{coder}.mid.block_1", c, c), res(f"{coder}.mid.block_2", c, c)
        norm(f"{coder}.mid.attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{coder}.mid.attn_1.{p}", c, c, 1)

    conv("encoder.conv_in", ch[0], 3, 3)
    cin = ch[0]
    for i, c in enumerate(ch):
        for j in range(blocks):
            res(f"encoder.down.{i}.block.{j}", cin, c)
            cin = c
        if i < len(ch) - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    mid("encoder", ch[-1])
    norm("encoder.norm_out", ch[-1]), conv("encoder.conv_out", 2 * z, ch[-1], 3), conv("encoder.quant_conv", 2 * z, 2 * z, 1)
    conv("decoder.post_quant_conv", z, z, 1), conv("decoder.conv_in", ch[-1], z, 3)
    mid("decoder", ch[-1])
    cin = ch[-1]
    for i in reversed(range(len(ch))):
        for j in range(blocks + 1):
            res(f"decoder.up.{i}.block.{j}", cin, ch[i])
            cin = ch[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", ch[i], ch[i], 3)
    norm("decoder.norm_out", ch[0]), conv("decoder.conv_out", 3, ch[0], 3)
    out |= {"bn.running_mean": (4 * z,), "bn.running_var": (4 * z,), "bn.num_batches_tracked": ()}
    return out


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_transformer_layouts_on_meta(name):
    from diffusers import Flux2Transformer2DModel

    hidden, heads, double, single, context, guidance = FULL_SIZE[name]
    config = TransformerConfig(num_layers=double, num_single_layers=single, num_attention_heads=heads,
                               joint_attention_dim=context, guidance_embeds=guidance)
    with torch.device("meta"):
        ours = Flux2Transformer(config)
        theirs = Flux2Transformer2DModel(**{k: v for k, v in config.to_dict().items() if not k.startswith("_")})
    original = original_dit_layout(hidden, double, single, context, guidance)
    assert _shapes(ours.state_dict()) == original  # the original layout loads with no key map
    assert _shapes(keymap.to_diffusers(ours.state_dict(), config)) == _shapes(theirs.state_dict())
    assert single_file.transformer_config(original) == config  # detected from the tensors' shapes alone
    assert single_file.variant(config) == name


def test_full_size_autoencoder_layouts_on_meta():
    from diffusers import AutoencoderKLFlux2

    with torch.device("meta"):
        ours = Flux2Autoencoder(AutoencoderConfig())
        theirs = AutoencoderKLFlux2()
    assert _shapes(ours.state_dict()) == _shapes(theirs.state_dict())
    original = single_file.vae_to_original(ours.state_dict(), ours.config)
    assert _shapes(original) == original_vae_layout()
    assert single_file.autoencoder_config(_shapes(original)) == AutoencoderConfig()
    key_map = single_file.vae_key_map(ours.config)  # the loading direction is the same table read backwards
    assert sorted(v if isinstance(v, str) else v[0][0] for v in key_map.values()) == sorted(original)


# -- a tiny checkpoint in both layouts -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def both_layouts(tmp_path_factory, diffusers_flux2_folder):
    """(diffusers folder, DiT file, ae file) holding the same random weights."""
    root = tmp_path_factory.mktemp("single-file")
    torch.manual_seed(0)
    t_config = TransformerConfig(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                 joint_attention_dim=96, axes_dims_rope=(4, 4, 4, 4))
    transformer = Flux2Transformer(t_config)
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.5 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.2).add_(1.0 if p.ndim == 1 else 0.0)
    # 32 norm groups: the original autoencoder code fixes them, so the file cannot say otherwise
    v_config = AutoencoderConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32)
    vae = Flux2Autoencoder(v_config).eval()
    with torch.no_grad():
        vae.bn.running_mean.normal_(0, 0.2)
        vae.bn.running_var.uniform_(0.5, 2.0)

    folder = root / "diffusers"
    shutil.copytree(diffusers_flux2_folder, folder)
    for sub, state, cfg in (("transformer", keymap.to_diffusers(transformer.state_dict(), t_config), t_config),
                            ("vae", vae.state_dict(), v_config)):
        shutil.rmtree(folder / sub)
        save_sharded(state, folder / sub)
        (folder / sub / "config.json").write_text(json.dumps(cfg.to_dict()))
    dit, ae = root / "flux2-tiny.safetensors", root / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, dit)
    save_file({k: v.contiguous() for k, v in single_file.vae_to_original(vae.state_dict(), v_config).items()}, ae)
    return folder, dit, ae


def _config(path, **model):
    return api.parse_config({"model": {"path": str(path), "dtype": "float32", "device": "cpu", **model},
                             "sampler": {"steps": 2, "guidance": 3.5, "width": 64, "height": 48}})


def test_single_file_gives_the_same_image(both_layouts, host, diffusers_flux2_folder):
    folder, dit, ae = both_layouts
    config = _config(dit, vae=str(ae), text_encoder=str(diffusers_flux2_folder))
    warnings = api.check_config(config, host=host)
    assert any("flux2-tiny.safetensors: not a known FLUX.2 shape" in w for w in warnings)
    request = dict(prompt="a red square", seed=4)
    single = api.load(config, host=host).generate(api.GenerationRequest(**request), write=False)
    folder_run = api.load(_config(folder), host=host).generate(api.GenerationRequest(**request), write=False)
    assert torch.equal(single.latents, folder_run.latents)
    assert single.image.tobytes() == folder_run.image.tobytes()


def test_ae_without_batch_counter_loads(both_layouts, tmp_path):
    from safetensors.torch import load_file

    _, _, ae = both_layouts
    state = load_file(ae)
    state.pop("bn.num_batches_tracked")
    save_file(state, tmp_path / "ae.safetensors")
    vae = single_file.load_autoencoder(tmp_path / "ae.safetensors", torch.float32, torch.device("cpu"))
    assert torch.equal(vae.bn.running_var, state["bn.running_var"])


def test_config_errors(both_layouts, host, diffusers_flux2_folder, tmp_path):
    folder, dit, ae = both_layouts
    with pytest.raises(ConfigError, match="model.vae.*set model.vae"):
        api.check_config(_config(dit, text_encoder=str(diffusers_flux2_folder)), host=host)
    with pytest.raises(ConfigError, match="model.text_encoder"):
        api.check_config(_config(dit, vae=str(ae), text_encoder=str(tmp_path)), host=host)
    with pytest.raises(ConfigError, match="model.path.*single-file"):
        api.check_config(_config(folder, vae=str(ae)), host=host)
    with pytest.raises(ConfigError, match="model.vae.*no such file"):
        api.check_config(_config(dit, vae=str(tmp_path / "nope.safetensors"), text_encoder=str(folder)), host=host)
    with pytest.raises(ConfigError, match="model: .*go with `path`"):
        api.parse_config({"model": {"preset": "tiny", "vae": "ae.safetensors"}})


def test_checkpoint_errors(both_layouts, host, tmp_path):
    folder, dit, ae = both_layouts
    # swapped files: the DiT named as the autoencoder
    with pytest.raises(CheckpointError, match=r"flux2-tiny.safetensors.*encoder.down.0.block.0.conv1.weight.*missing"):
        api.check_config(_config(dit, vae=str(dit), text_encoder=str(folder)), host=host)
    # a diffusers-layout transformer file is not the original layout
    (diffusers_file,) = (folder / "transformer").glob("*.safetensors")
    with pytest.raises(CheckpointError, match="img_in.weight.*original single-file layout"):
        api.check_config(_config(diffusers_file, vae=str(ae), text_encoder=str(folder)), host=host)
    pickled = tmp_path / "flux2.ckpt"
    torch.save({"img_in.weight": torch.zeros(1)}, pickled)
    with pytest.raises(CheckpointError, match="flux2.ckpt.*pickle"):
        api.load(_config(pickled, vae=str(ae), text_encoder=str(folder)), host=host)
