"""LoRA on the FLUX.2 and Flux.1 (Flex.2) DiTs: every key format lands where merging the update into the weights
by hand puts it; unfusing restores the weights bit for bit; several LoRAs at once; quantised layers take the
side path; bad files are refused naming the file and key."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fluxframe.errors import CheckpointError, ConfigError
from fluxframe.plugins.flex2 import keymap as flex2_keymap
from fluxframe.plugins.flex2.family import image_ids as flux1_image_ids
from fluxframe.plugins.flex2.family import text_ids as flux1_text_ids
from fluxframe.plugins.flex2.transformer import Flux1Config, Flux1Transformer
from fluxframe.plugins.flux2 import keymap as flux2_keymap
from fluxframe.plugins.flux2.family import image_ids, text_ids
from fluxframe.plugins.flux2.transformer import Flux2Transformer, TransformerConfig
from fluxframe.plugins.lora import LoraLinear, LoraSpec, apply_loras, lora_targets
from fluxframe.plugins.memory.quantize import quantize_blocks

FLUX2 = TransformerConfig(in_channels=32, num_layers=2, num_single_layers=2, attention_head_dim=16,
                          num_attention_heads=4, joint_attention_dim=24, axes_dims_rope=(4, 4, 4, 4))
FLUX1 = Flux1Config(in_channels=48, out_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))

# Layers each format adapts: diffusers names (parts of fused q/k/v, the fused single-block projection, the
# swapped final modulation, embedders) and original names (kohya / ai-toolkit).
FLUX2_DIFFUSERS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.1.attn.add_v_proj",
                   "transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.ff.linear_in",
                   "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.1.attn.to_out",
                   "norm_out.linear", "x_embedder", "double_stream_modulation_img.linear",
                   "time_guidance_embed.timestep_embedder.linear_1"]
FLUX2_ORIGINAL = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2", "single_blocks.1.linear1",
                  "single_blocks.0.linear2", "final_layer.adaLN_modulation.1", "img_in", "single_stream_modulation.lin"]
FLUX1_DIFFUSERS = ["transformer_blocks.0.attn.to_v", "transformer_blocks.1.attn.add_q_proj",
                   "transformer_blocks.0.norm1.linear", "transformer_blocks.1.ff_context.net.0.proj",
                   "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.attn.to_k",
                   "single_transformer_blocks.1.proj_out", "norm_out.linear", "context_embedder"]
FLUX1_ORIGINAL = ["double_blocks.1.txt_attn.qkv", "double_blocks.0.img_mod.lin", "single_blocks.0.linear1",
                  "single_blocks.1.linear2", "final_layer.linear", "vector_in.in_layer"]


class Family:
    def __init__(self, name):
        self.name = name
        self.keymap = flux2_keymap if name == "flux2" else flex2_keymap
        self.config = FLUX2 if name == "flux2" else FLUX1

    def model(self, seed=0) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = (Flux2Transformer if self.name == "flux2" else Flux1Transformer)(self.config).eval()
        with torch.no_grad():  # default inits leave some layers near zero; make every weight matter
            for p in model.parameters():
                p.normal_(0, 0.5 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.2).add_(1.0 if p.ndim == 1 else 0)
        return model

    def inputs(self):
        g = torch.Generator().manual_seed(5)
        c = self.config
        h, w, length = 3, 4, 5
        img = torch.randn(1, h * w, c.in_channels, generator=g)
        txt = torch.randn(1, length, c.joint_attention_dim, generator=g)
        t, guidance = torch.tensor([0.7]), torch.tensor([3.5])
        if self.name == "flux2":
            return (img, image_ids(h, w), txt, text_ids(length), t, guidance)
        pooled = torch.randn(1, c.pooled_projection_dim, generator=g)
        return (img, flux1_image_ids(h, w), txt, flux1_text_ids(length), pooled, t, guidance)

    def run(self, model):
        with torch.no_grad():
            return model(*self.inputs())

    def targets(self, model):
        return lora_targets(self.keymap.rules(self.config), model, self.config.hidden_size)

    def diffusers_state(self, model):
        return self.keymap.to_diffusers(model.state_dict(), self.config)

    def from_diffusers_state(self, sd):
        out = {}
        for ours, source in self.keymap.from_diffusers(self.config).items():
            out[ours] = sd[source] if isinstance(source, str) else source[1]([sd[k] for k in source[0]])
        return out


FAMILIES = [Family("flux2"), Family("flex2")]


def _factors(out_features, in_features, rank, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, in_features, generator=g) * std, torch.randn(out_features, rank, generator=g) * std


def write_lora(path, layers: dict[str, tuple[torch.Tensor, torch.Tensor]], fmt: str, alpha: float | None = None):
    """layers: name -> (down, up), saved in ``fmt``: peft (diffusers names), kohya or aitoolkit (original
    names)."""
    tensors = {}
    for name, (down, up) in layers.items():
        if fmt == "peft":
            tensors[f"transformer.{name}.lora_A.weight"] = down
            tensors[f"transformer.{name}.lora_B.weight"] = up
        elif fmt == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = down
            tensors[f"{stem}.lora_up.weight"] = up
            tensors[f"{stem}.alpha"] = torch.tensor(float(alpha if alpha is not None else down.shape[0]))
        elif fmt == "aitoolkit":
            tensors[f"diffusion_model.{name}.lora_A.weight"] = down
            tensors[f"diffusion_model.{name}.lora_B.weight"] = up
        else:
            raise ValueError(fmt)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def make_lora(family, model, names, fmt, seed, rank=3, std=0.3):
    """Random factors for ``names`` (in the naming of ``fmt``), shaped from the model's own weights."""
    sd = family.diffusers_state(model) if fmt == "peft" else model.state_dict()
    return {name: _factors(*sd[f"{name}.weight"].shape, rank, seed + i, std) for i, name in enumerate(names)}


def merged_by_hand(family, model, loras):
    """A copy of ``model`` with each (layers, fmt, scale) LoRA merged into its weights in the layout the LoRA
    names: diffusers' (then loaded back through the key table) or the original."""
    merged = family.model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for layers, fmt, scale in loras:
        if fmt == "peft":
            dsd = family.keymap.to_diffusers(sd, family.config)
            for name, (down, up) in layers.items():
                dsd[f"{name}.weight"] = dsd[f"{name}.weight"] + scale * (up @ down)
            sd = family.from_diffusers_state(dsd)
        else:
            for name, (down, up) in layers.items():
                sd[f"{name}.weight"] = sd[f"{name}.weight"] + scale * (up @ down)
    merged.load_state_dict(sd)
    return merged


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_bits(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key].flatten().view(torch.uint8), value.flatten().view(torch.uint8)), key


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("fmt", ["peft", "kohya", "aitoolkit"])
@pytest.mark.parametrize("mode", ["fuse", "side"])
def test_each_format_matches_merging_by_hand(family, fmt, mode, tmp_path):
    model = family.model()
    names = {"flux2": FLUX2_DIFFUSERS if fmt == "peft" else FLUX2_ORIGINAL,
             "flex2": FLUX1_DIFFUSERS if fmt == "peft" else FLUX1_ORIGINAL}[family.name]
    layers = make_lora(family, model, names, fmt, seed=10)
    alpha = 1.5 if fmt == "kohya" else None  # kohya's alpha/rank scaling: 1.5 / 3
    path = write_lora(tmp_path / "a.safetensors", layers, fmt, alpha=alpha)
    weight = 0.8
    scale = weight * (alpha / 3 if alpha else 1.0)

    base = family.run(model)
    expected = family.run(merged_by_hand(family, model, [(layers, fmt, scale)]))
    before = snapshot(model)
    applied = apply_loras(model, family.targets(model), [LoraSpec(path, weight, mode)], device="cpu")
    got = family.run(model)

    assert applied.records[0]["layers"] == len(names)
    assert applied.records[0]["fused" if mode == "fuse" else "side"] == len(names)
    assert rel(expected, base) > 1e-2  # the LoRA changes the output visibly ...
    print(f"{family.name} {fmt} {mode}: rel. difference to merging by hand {rel(got, expected):.1e}")
    assert rel(got, expected) < 2e-6  # ... exactly as merging it by hand does
    applied.remove()
    assert_same_bits(model, before)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert torch.equal(family.run(model), base)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_several_loras_with_weights(family, tmp_path):
    model = family.model()
    names_d = FLUX2_DIFFUSERS if family.name == "flux2" else FLUX1_DIFFUSERS
    names_o = FLUX2_ORIGINAL if family.name == "flux2" else FLUX1_ORIGINAL
    a = make_lora(family, model, names_d, "peft", seed=20)
    b = make_lora(family, model, names_o, "kohya", seed=40, rank=2)
    c = make_lora(family, model, names_o[:3], "aitoolkit", seed=60, rank=4)
    specs = [LoraSpec(write_lora(tmp_path / "a.safetensors", a, "peft"), 0.7),
             LoraSpec(write_lora(tmp_path / "b.safetensors", b, "kohya", alpha=1.0), -0.5, "side"),
             LoraSpec(write_lora(tmp_path / "c.safetensors", c, "aitoolkit"), 1.2)]
    expected = family.run(merged_by_hand(family, model, [(a, "peft", 0.7), (b, "kohya", -0.25), (c, "aitoolkit", 1.2)]))
    before = snapshot(model)
    applied = apply_loras(model, family.targets(model), specs, device="cpu")
    assert rel(family.run(model), expected) < 2e-6
    applied.remove()
    assert_same_bits(model, before)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_unfuse_is_exact_in_bfloat16(family, tmp_path):
    """bf16 keeps 8 bits of mantissa, so W + Δ - Δ misses W where the fused value changed binade; the elements
    kept at fuse time put those back. An update of ~5-10 % of the weights (a strong LoRA) is used."""
    model = family.model().to(torch.bfloat16)
    names = FLUX2_ORIGINAL if family.name == "flux2" else FLUX1_ORIGINAL
    layers = make_lora(family, model, names, "aitoolkit", seed=7, std=0.06)
    before = snapshot(model)
    applied = apply_loras(model, family.targets(model), [LoraSpec(write_lora(tmp_path / "l.safetensors", layers,
                                                                             "aitoolkit"), 1.0)], device="cpu")
    restored_by_record = sum(record.fix_index.numel() for _, record in applied._fused)
    assert restored_by_record > 0  # without them, unfusing would not be exact
    changed = sum((model.state_dict()[k] != v).sum().item() for k, v in before.items())
    print(f"{family.name}: {changed} weights changed by fusing, {restored_by_record} kept to unfuse exactly")
    assert changed > 10 * restored_by_record  # the record is a small fraction of the weights, not a copy
    applied.remove()
    assert_same_bits(model, before)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_quantised_layers_take_the_side_path(family, tmp_path):
    model = family.model()
    names = FLUX2_ORIGINAL if family.name == "flux2" else FLUX1_ORIGINAL
    layers = make_lora(family, model, names, "aitoolkit", seed=3)
    path = write_lora(tmp_path / "l.safetensors", layers, "aitoolkit")
    expected = family.run(merged_by_hand(family, model, [(layers, "aitoolkit", 1.0)]))
    reference = family.run(model)

    quantize_blocks(model, "int8")
    quantised = family.run(model)
    with pytest.raises(ConfigError, match="cannot be fused"):
        apply_loras(model, family.targets(model), [LoraSpec(path, 1.0, "fuse", key="lora.0")], device="cpu")
    applied = apply_loras(model, family.targets(model), [LoraSpec(path, 1.0)], device="cpu")
    blocks = [n for n in names if "blocks" in n]
    assert applied.records[0]["side"] == len(blocks) and applied.records[0]["fused"] == len(names) - len(blocks)
    got = family.run(model)
    int8_error = rel(quantised, reference)
    print(f"{family.name}: int8 error {int8_error:.2e}, int8 + LoRA vs merged fp32 {rel(got, expected):.2e}, "
          f"LoRA effect {rel(got, quantised):.2e}")
    assert rel(got, expected) < 10 * int8_error  # int8 + LoRA is about as close to the merged model as int8 is
    assert rel(got, quantised) > 100 * int8_error  # and the LoRA's effect is far above that
    applied.remove()
    assert torch.equal(family.run(model), quantised)


def test_lora_side_path_through_group_offload_matches_none(tmp_path):
    from fluxframe.plugins.memory import GroupOffload

    family = FAMILIES[0]
    names = FLUX2_ORIGINAL
    model = family.model()
    path = write_lora(tmp_path / "l.safetensors", make_lora(family, model, names, "aitoolkit", seed=1), "aitoolkit")
    applied = apply_loras(model, family.targets(model), [LoraSpec(path, 1.0, "side")], device="cpu")
    expected = family.run(model)
    applied.remove()

    offload = GroupOffload(blocks_per_group=1)
    model = offload.place("transformer", model, torch.device("cpu"))
    applied = apply_loras(model, family.targets(model), [LoraSpec(path, 1.0, "side")], device="cpu")
    with offload.using("transformer", model, torch.device("cpu")):
        assert torch.equal(family.run(model), expected)


# -- refusals ------------------------------------------------------------------------------------------------


def _apply(family, model, path, **spec):
    return apply_loras(model, family.targets(model), [LoraSpec(path, **spec)], device="cpu")


def test_a_lora_for_something_else_names_the_first_unmatched_keys(tmp_path):
    family = FAMILIES[0]
    model = family.model()
    before = snapshot(model)
    down, up = _factors(8, 8, 2, 0)
    path = tmp_path / "te.safetensors"
    save_file({f"lora_te1_text_model_encoder_layers_{i}_mlp_fc1.lora_down.weight": down.clone() for i in range(7)}
              | {f"lora_te1_text_model_encoder_layers_{i}_mlp_fc1.lora_up.weight": up.clone() for i in range(7)},
              str(path))
    with pytest.raises(CheckpointError) as info:
        _apply(family, model, path)
    message = str(info.value)
    assert "7 of 7 LoRA layers match nothing in the DiT" in message
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1" in message and "and 2 more" in message
    assert str(path) in message
    assert_same_bits(model, before)


def test_partly_unmatched_lora_changes_nothing(tmp_path):
    family = FAMILIES[0]
    model = family.model()
    layers = make_lora(family, model, FLUX2_ORIGINAL[:2], "aitoolkit", seed=0)
    layers["double_blocks.9.img_attn.qkv"] = tuple(t.clone() for t in layers["double_blocks.0.img_attn.qkv"])  # no such block
    path = write_lora(tmp_path / "l.safetensors", layers, "aitoolkit")
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"1 of 3 LoRA layers match nothing.*double_blocks\.9"):
        _apply(family, model, path)
    assert_same_bits(model, before)


def test_a_lora_for_another_size_names_the_key(tmp_path):
    family = FAMILIES[0]
    path = write_lora(tmp_path / "l.safetensors", {"double_blocks.0.img_attn.qkv": _factors(3 * 96, 96, 4, 0)},
                      "aitoolkit")
    with pytest.raises(CheckpointError, match=r"diffusion_model\.double_blocks\.0\.img_attn\.qkv\.lora_A\.weight.*"
                                              r"does not fit layer.*\(192, 64\)"):
        _apply(family, family.model(), path)


@pytest.mark.parametrize("tensors, match", [
    ({"transformer.x_embedder.weight": torch.zeros(2, 2)}, "not a LoRA matrix"),
    ({"transformer.x_embedder.lora_A.weight": torch.zeros(2, 32)}, "has no up matrix"),
    ({"transformer.x_embedder.lora_A.weight": torch.zeros(2, 32),
      "transformer.x_embedder.lora_B.weight": torch.zeros(64, 3)}, "are not the two factors"),
    ({"lora_unet_img_in.lora_down.weight": torch.zeros(2, 32), "lora_unet_img_in.lora_up.weight": torch.zeros(64, 2),
      "lora_unet_img_in.alpha": torch.tensor(float("nan"))}, "alpha must be one finite number"),
    ({"transformer.x_embedder.lora_A.weight": torch.zeros(2, 32, dtype=torch.int8),
      "transformer.x_embedder.lora_B.weight": torch.zeros(64, 2, dtype=torch.int8)}, "floating point"),
])
def test_malformed_files_are_refused_naming_the_key(tmp_path, tensors, match):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=match) as info:
        _apply(FAMILIES[0], FAMILIES[0].model(), path)
    assert str(path) in str(info.value)


def test_missing_and_pickled_files(tmp_path):
    family = FAMILIES[0]
    with pytest.raises(CheckpointError, match="does not exist"):
        _apply(family, family.model(), tmp_path / "nope.safetensors")
    pickled = tmp_path / "lora.pt"
    torch.save({"a": torch.zeros(1)}, pickled)
    with pytest.raises(CheckpointError, match="pickle"):
        _apply(family, family.model(), pickled)
