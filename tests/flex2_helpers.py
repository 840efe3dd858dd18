"""Tiny random Flux.1 / Flex.2 checkpoints for the flex2 tests, made with diffusers (the oracle) offline."""

from __future__ import annotations

import torch


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tiny_flux_transformer(**overrides):
    from diffusers import FluxTransformer2DModel

    config = dict(in_channels=196, out_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                  axes_dims_rope=(4, 6, 6))
    config.update(overrides)
    model = FluxTransformer2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():  # default inits leave some layers near zero; make every weight matter
            p.normal_(0, 0.5 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.2).add_(1.0 if p.ndim == 1 else 0.0)
    return model


def tiny_flux_vae(**overrides):
    from diffusers import AutoencoderKL

    config = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=16,
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                  use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    config.update(overrides)
    vae = AutoencoderKL(**config).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vae


def build_flux_folder(root, *, in_channels=196, seed=0, class_name="FluxPipeline"):
    """A complete tiny Flux.1 (64) or Flex.2 (196) checkpoint written by diffusers' FluxPipeline.save_pretrained."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    from fluxframe.plugins.flex2.tiny import build_tiny_text_encoders

    text_root = root / "text"
    build_tiny_text_encoders(text_root, seed=seed)
    torch.manual_seed(seed)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096),
        vae=tiny_flux_vae(),
        text_encoder=CLIPTextModel.from_pretrained(text_root / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(text_root / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(text_root / "text_encoder_2"),
        tokenizer_2=AutoTokenizer.from_pretrained(text_root / "tokenizer_2"),
        transformer=tiny_flux_transformer(in_channels=in_channels, out_channels=64),
    )
    folder = root / "ckpt"
    pipe.save_pretrained(folder)
    if class_name != "FluxPipeline":
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = class_name
        (folder / "model_index.json").write_text(json.dumps(index))
    return folder


# -- a tiny ONNX model written by hand (protobuf wire format), so the tests need no `onnx` package -----------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _tensor_type(shape) -> bytes:
    dims = b"".join(_field(1, _field(1, d) if isinstance(d, int) else _field(2, d)) for d in shape)
    return _field(1, _field(1, 1) + _field(2, dims))  # TypeProto.tensor_type: elem_type FLOAT, shape


def write_reduce_mean_onnx(path, *, input_shape=(1, 3, "h", "w"), output_shape=(1, 1, "h", "w")) -> None:
    """An ONNX model y = mean over channels of x: a stand-in depth estimator (one-channel map out)."""
    attribute = _field(1, "axes") + _field(20, 7) + _field(8, 1)  # AttributeProto: ints [1], type INTS
    node = _field(1, "x") + _field(2, "y") + _field(3, "mean") + _field(4, "ReduceMean") + _field(5, attribute)
    graph = (_field(1, node) + _field(2, "tiny-depth")
             + _field(11, _field(1, "x") + _field(2, _tensor_type(input_shape)))
             + _field(12, _field(1, "y") + _field(2, _tensor_type(output_shape))))
    model = _field(1, 8) + _field(8, _field(1, "") + _field(2, 13)) + _field(7, graph)
    with open(path, "wb") as fh:
        fh.write(model)
