"""Train the demo model: a small FLUX.2 klein-architecture checkpoint that draws the shapes data set, on a CPU.

Four stages, each resumable from the work folder:

1. autoencoder -- the FLUX.2 autoencoder's architecture with 5 levels (16x spatial, then the 2x2 patchify: a 256²
   image becomes 8x8 = 64 transformer tokens), trained on crops with an L1 + L2 loss and a little noise on the latents
   (so the decoder forgives the transformer's imprecision); then its batch-norm statistics are computed over the
   patchified latents of the whole data set, as the FLUX.2 autoencoder's BN stores them, and the normalised latents
   of every training image are cached.
2. text encoder -- a word-level tokenizer over the captions' vocabulary (with a Qwen3 chat template) and a tiny
   Qwen3 model (28 layers, for the klein taps 9/18/27) that stays frozen at its seeded random initialisation (its
   residual branches scaled down, so that a word's hidden state stays mostly its own); every caption's embeddings
   are computed once, through the very encoder class fluxframe loads at inference.
3. transformer -- a FLUX.2 DiT of a few million parameters (no guidance embedder: klein-style), trained by flow
   matching (x_t = (1-t)·x0 + t·noise, target noise - x0) with t logit-normal, shifted by the same exponential mu
   the sampler uses for 64 tokens, 10 % of captions dropped to "" (so true CFG works), and an EMA of the weights.
   The prompt encoder pads every prompt to 512 tokens, almost all padding; attending to all of them is most of the
   cost, so the first phase trains on the prompt's tokens plus a random sample of the padding positions (with their
   true position ids), each sampled key's attention logits raised by log(padding / sampled) so that it stands for
   its share of all the padding (``padding_bias``: the prompt is diluted as much as at inference), and the
   second, shorter phase on all 512, as inference sees them.
4. export -- the diffusers folder layout (model_index.json Flux2KleinPipeline with is_distilled false, transformer/,
   vae/, text_encoder/, tokenizer/, scheduler/), written beside the target and renamed into place, after every
   transformer checkpoint, so a stopped run still leaves a usable model.

    python -m fluxframe.demo.train --out models/shapes-v1 --seed 0 --minutes 88
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import shapes
from .options import DEFAULT_MINUTES, add_arguments

MAX_TEXT_TOKENS = 512  # what the klein prompt encoder pads to


@dataclass
class TrainConfig:
    image_size: int = 256
    copies: int = 2  # renders (with different jitter) of every training combination
    # autoencoder
    ae_channels: tuple[int, ...] = (8, 16, 32, 64, 128)
    # Wider at full resolution than the encoder: the decoder's last group norm sees a mostly flat image, and only
    # the pattern across the channels of a group (less its mean and scale) can carry the absolute colour.
    ae_decoder_channels: tuple[int, ...] | None = (16, 32, 64, 64, 128)
    ae_layers: int = 1
    ae_groups: int = 1  # see ae_decoder_channels
    ae_crop: int = 96
    ae_batch: int = 10
    ae_lr: float = 3e-4  # refines the working initial autoencoder (init_autoencoder); more wrecks it
    ae_latent_noise: float = 0.2  # std of the noise added to latents in training, relative to each channel's std
    # Loss weight of the pixels near a colour edge: a small star's points are a few hundred pixels of a crop, and an
    # unweighted loss lets the autoencoder round them off into a disc. Measured after 800 steps, on 40 small shapes of
    # each kind: small stars survive the round trip 0/40 unweighted, 6/40 at 5, 18/40 at 12; triangles 3, 27, 35.
    ae_edge_weight: float = 12.0
    # text encoder
    text_hidden: int = 32
    text_layers: int = 28
    # The encoder's attention and MLP output projections start this much smaller than Qwen3's initialisation, so each
    # layer adds little to the residual stream and a word's hidden state stays mostly its own: at 1.0, 30 % of the
    # difference between two captions' embeddings is interaction between their words (what an unseen combination
    # makes new), at 0.1 8 % (measured on 256 captions: the residual of E(s,c,p) - E(s,c,p') - E(s,c',p) + E(s,c',p')).
    text_residual_scale: float = 0.1
    # transformer: hidden 288, the widest that keeps the shipped folder under 25 MB in float16 (wider denoises the
    # last, nearly clean steps better per minute of training, and generalised better to unseen captions)
    dit_heads: int = 6
    dit_head_dim: int = 48
    dit_double: int = 2
    dit_single: int = 2
    dit_batch: int = 24
    dit_lr: float = 4e-4
    dit_warmup: int = 100
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    # Loss weight of the image tokens that hold the shape (tokens far from the image's median token, the background):
    # a shape covers 4-15 % of the image, and an unweighted loss is learnt background first, shapes much later.
    shape_weight: float = 4.0
    pad_sample: int = 16  # phase 1: padding positions sampled per step
    phase1_share: float = 0.85  # of the transformer's time
    # The last low_noise_share of the transformer's time draws low_noise_fraction of each batch's sigmas uniformly
    # below low_noise_max: the nearly clean steps are where a square's corners are kept or rounded off.
    low_noise_share: float = 0.2
    low_noise_fraction: float = 0.5
    low_noise_max: float = 0.6
    schedule_steps: int = 24  # the sampling step count whose schedule shift the training timesteps follow
    # budget: wall-clock minutes in all. The autoencoder trains a fixed number of steps (a machine busier than
    # expected must not cut it short: its round trip caps what the transformer can draw), or ae_share of the
    # minutes if ae_steps is None; the transformer trains for whatever time is left, unless dit_steps are given.
    minutes: float = DEFAULT_MINUTES
    ae_share: float = 0.12
    ae_steps: int | None = 3000
    dit_steps: tuple[int, int] | None = None  # (phase 1, phase 2)
    checkpoint_minutes: float = 4.0
    weights_dtype: str = "float16"  # what the exported weights are stored in (the loader casts to the config's)
    max_scenes: int | None = None  # a subset, for smoke tests


TINY = dict(image_size=64, copies=1, ae_channels=(8, 8, 8, 16, 16), ae_decoder_channels=None, ae_groups=1, ae_crop=64,
            ae_batch=4, text_hidden=16, dit_heads=1, dit_head_dim=16, dit_double=1, dit_single=1, dit_batch=4,
            pad_sample=8, dit_warmup=2, ae_steps=3, dit_steps=(2, 1), max_scenes=24)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- data ------------------------------------------------------------------------------------------------------------

def render_all(scenes: list[shapes.Scene], size: int) -> torch.Tensor:
    """(N, 3, size, size) uint8."""
    out = torch.empty(len(scenes), 3, size, size, dtype=torch.uint8)
    for i, scene in enumerate(scenes):
        out[i] = torch.from_numpy(np.array(shapes.render(scene, size))).permute(2, 0, 1)
    return out


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


# --- autoencoder -----------------------------------------------------------------------------------------------------

def ae_config(cfg: TrainConfig):
    from fluxframe.plugins.flux2.autoencoder import AutoencoderConfig

    return AutoencoderConfig(block_out_channels=cfg.ae_channels, decoder_block_out_channels=cfg.ae_decoder_channels,
                             layers_per_block=cfg.ae_layers, norm_num_groups=cfg.ae_groups)


def _crops(images: torch.Tensor, scenes: list[shapes.Scene], idx: np.ndarray, crop: int, rng) -> torch.Tensor:
    """Crops of ``crop`` px; half of them placed around the shape (a random crop is mostly background)."""
    size = images.shape[-1]
    out = []
    for k, i in enumerate(idx):
        if k % 2 == 0:
            fx, fy = shapes.POSITIONS[scenes[i].position][1]
            cx, cy = (fx + scenes[i].dx) * size, (fy + scenes[i].dy) * size
            x0 = int(np.clip(cx - crop / 2 + rng.integers(-crop // 3, crop // 3 + 1), 0, size - crop))
            y0 = int(np.clip(cy - crop / 2 + rng.integers(-crop // 3, crop // 3 + 1), 0, size - crop))
        else:
            x0, y0 = (int(v) for v in rng.integers(0, size - crop + 1, size=2))
        out.append(images[i, :, y0:y0 + crop, x0:x0 + crop])
    return to_unit(torch.stack(out))


RGB = 3  # the channels of the colour path that init_autoencoder lays through both halves of the autoencoder


@torch.no_grad()
def init_autoencoder(vae, offset: float = 10.0, lift: float = 10.0, eps: float = 0.1) -> None:
    """Start the autoencoder as a working one: 16x16 box-average in, nearest-neighbour out, colours exact.

    Trained from PyTorch's default initialisation, this architecture needs thousands of steps to learn flat colours:
    its plain path (the convolutions between res blocks) shrinks the signal by about √3 a layer, and the res blocks'
    group norms, which carry the signal instead, erase the colour of a flat image. So here:
    - every convolution is variance-preserving random, scaled by ``eps`` (small, but not zero, so every channel can
      learn), and every residual branch ends at zero (res block conv2, attention output): at first each block is the
      identity;
    - channels 0-2 carry R, G, B along the plain path: conv_in and the 1x1 shortcuts copy them, each downsampling
      conv averages 2x2 pixels, each upsampling conv copies, the latent's channels 0-2 hold the 16x16 block means;
    - the one group norm on the main path of each half (conv_norm_out) is made linear: channels of the last block
      before it get a constant +offset or -offset, which, not the image, set the norm's mean and scale; its affine
      undoes that scale and adds ``lift``, so the SiLU after it is linear too, and conv_out subtracts ``lift`` again.
    Training then only has to add the edges' detail, in the other channels."""
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        conv.weight.normal_(0.0, eps / math.sqrt(fan_in))
        conv.bias.zero_()
    for module in vae.modules():
        if hasattr(module, "conv2") and hasattr(module, "norm2"):  # a res block
            module.conv2.weight.zero_()
        if hasattr(module, "to_out"):  # mid-block attention
            module.to_out[0].weight.zero_()
            module.to_out[0].bias.zero_()

    path = range(RGB + 1)  # R, G, B and -(R + G + B), which cancels their share of the group norm's mean

    def copy(conv, rows=path, scale=1.0):
        k = conv.kernel_size[0]
        conv.weight[list(rows)] = 0.0
        for c in rows:
            conv.weight[c, c, k // 2, k // 2] = scale

    for coder in (vae.encoder, vae.decoder):
        levels = coder.down_blocks if coder.down else coder.up_blocks
        copy(coder.conv_in, rows=range(RGB))
        coder.conv_in.weight[RGB] = 0.0
        coder.conv_in.weight[RGB, :RGB, 1, 1] = -1.0
        for level in levels:
            for resnet in level.resnets:
                if resnet.conv_shortcut is not None:
                    copy(resnet.conv_shortcut)
            samplers = getattr(level, level._samplers)
            if samplers is not None:
                conv = samplers[0].conv
                if coder.down:  # stride 2 over right/bottom padding: taps (0..1, 0..1) are one 2x2 block
                    conv.weight[:RGB + 1] = 0.0
                    for c in path:
                        conv.weight[c, c, :2, :2] = 0.25
                else:
                    copy(conv)
        last = coder.mid_block.resnets[1] if coder.down else levels[-1].resnets[-1]
        width = last.conv2.out_channels
        q = width // 4
        last.conv2.bias[width - 2 * q: width - q] = offset
        last.conv2.bias[width - q:] = -offset
        norm = coder.conv_norm_out
        scale = offset * math.sqrt(2 * q / width)  # the norm's std, set by the constants
        norm.weight[:RGB] = scale
        norm.bias[:RGB] = lift
        norm.weight[RGB] = norm.bias[RGB] = 0.0
        copy(coder.conv_out, rows=range(RGB))
        coder.conv_out.bias[:RGB] = -lift
    for conv in (vae.quant_conv, vae.post_quant_conv):
        if conv is not None:
            copy(conv, rows=range(RGB))


def _ae_forward(vae, x: torch.Tensor, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    lc = vae.config.latent_channels
    z = vae.encode_moments(x)[:, :lc]
    if noise:
        z = z + noise * z.detach().std(dim=(0, 2, 3), keepdim=True) * torch.randn_like(z)
    z = z if vae.post_quant_conv is None else vae.post_quant_conv(z)
    return vae.decoder(z), z


def edge_weight(x: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, 1, H, W): ``weight`` within two pixels of a colour edge of ``x`` (B, 3, H, W), 1 elsewhere."""
    if weight == 1.0:
        return torch.ones_like(x[:, :1])
    edge = (x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)).abs().sum(1, keepdim=True) > 0.05
    return 1.0 + (weight - 1.0) * F.max_pool2d(edge.float(), 5, 1, 2)


def _lr(step: int, progress: float, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``base`` to base/10 as ``progress`` goes 0 -> 1
    (progress is the fraction of the step count, or of the time budget when training runs on a budget)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _save(obj, path: Path) -> None:
    """torch.save to a temporary name, then renamed: a run stopped while saving leaves the previous file whole, so
    the next run still resumes."""
    from fluxframe.core.checkpoint import atomic_write

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _save_stage(path: Path, parts: dict, state: dict) -> None:
    """A stage's resumable state: the state dicts of ``parts`` (modules, optimiser) by name, and ``state``."""
    _save({**{name: part.state_dict() for name, part in parts.items()}, "state": state}, path)


def _resume_stage(path: Path, parts: dict, state: dict, what: str) -> dict:
    """Restore ``parts`` from a stage's saved file and return its state; ``state`` unchanged if none is saved."""
    if not path.exists():
        return state
    saved = torch.load(path, weights_only=False)
    for name, part in parts.items():
        part.load_state_dict(saved[name])
    log(f"{what}: resumed at step {saved['state']['step']}")
    return saved["state"]


def _summary(state: dict) -> dict:
    """What the training record keeps of a stage's state (all but the loss curve)."""
    return {k: v for k, v in state.items() if k != "losses"}


def train_autoencoder(work: Path, cfg: TrainConfig, images, scenes, seed: int, budget_s: float, stats: dict):
    from fluxframe.plugins.flux2.autoencoder import Flux2Autoencoder

    path = work / "ae.pt"
    torch.manual_seed(seed)
    vae = Flux2Autoencoder(ae_config(cfg)).to(memory_format=torch.channels_last)  # faster convolutions on CPU
    init_autoencoder(vae)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.ae_lr)
    parts = {"model": vae, "opt": opt}
    state = _resume_stage(path, parts, {"step": 0, "total": cfg.ae_steps, "done": False, "losses": [],
                                        "seconds": 0.0}, "autoencoder")
    if state["done"]:
        stats["autoencoder"] = _summary(state)
        return vae.eval()
    rng = np.random.default_rng([seed, 1, state["step"]])
    vae.train()
    started, last_save = time.time(), time.time()
    seconds0 = state["seconds"]
    window = []
    state["budget_s"] = budget_s if cfg.ae_steps is None else None

    def progress() -> float:  # on a budget, time drives the schedule: a machine busier than expected trains less
        return state["step"] / cfg.ae_steps if cfg.ae_steps else state["seconds"] / budget_s

    while progress() < 1:
        step = state["step"]
        for group in opt.param_groups:
            group["lr"] = _lr(step, progress(), cfg.ae_lr, 50)
        idx = rng.integers(0, len(images), size=cfg.ae_batch)
        x = _crops(images, scenes, idx, cfg.ae_crop, rng).contiguous(memory_format=torch.channels_last)
        rec, _ = _ae_forward(vae, x, cfg.ae_latent_noise)
        error = (rec - x).abs()
        weight = edge_weight(x, cfg.ae_edge_weight)
        loss = ((error + error ** 2) * weight).sum() / (weight.sum() * x.shape[1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        window.append(loss.item())
        state["seconds"] = seconds0 + time.time() - started
        if state["step"] % 25 == 0:
            state["losses"].append((state["step"], float(np.mean(window))))
            log(f"autoencoder step {state['step']} ({progress():.0%}) loss {np.mean(window):.4f}")
            window = []
        if time.time() - last_save > cfg.checkpoint_minutes * 60:
            _save_stage(path, parts, state)
            last_save = time.time()
    state["done"] = True
    state["final_loss"] = state["losses"][-1][1] if state["losses"] else float(np.mean(window))
    _save_stage(path, parts, state)
    stats["autoencoder"] = _summary(state)
    return vae.eval()


@torch.no_grad()
def cache_latents(work: Path, vae, images: torch.Tensor, stats: dict) -> torch.Tensor:
    """Set the BN statistics from the patchified latents of all images; returns the normalised latents
    (N, 128, h, w)."""
    from fluxframe.plugins.flux2.autoencoder import patchify

    path = work / "latents.pt"
    if path.exists():
        saved = torch.load(path, weights_only=False)
        vae.bn.load_state_dict(saved["bn"])
        stats["latents"] = saved["stats"]
        return saved["latents"]
    started = time.time()
    lc, p = vae.config.latent_channels, vae.config.patch_size[0]
    raw = torch.cat([patchify(vae.encode_moments(to_unit(images[i:i + 32]))[:, :lc], p)
                     for i in range(0, len(images), 32)])
    mean, var = raw.mean(dim=(0, 2, 3)), raw.var(dim=(0, 2, 3))
    vae.bn.running_mean.copy_(mean)
    vae.bn.running_var.copy_(var)
    vae.bn.num_batches_tracked.fill_(len(images))
    vae = vae.to(memory_format=torch.contiguous_format)
    latents = vae.encode(to_unit(images[:1]))  # the model's own normalisation, checked against ours below
    normalised = (raw - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    mismatch = float((latents - normalised[:1]).abs().max() / normalised[:1].abs().max().clamp_min(1e-6))
    if mismatch > 1e-3:
        raise RuntimeError(f"the autoencoder's own normalisation differs from the cached one by {mismatch:.2e}")
    recon = vae.decode(normalised[:64]).clamp(-1, 1)
    psnr = float(10 * torch.log10(4 / F.mse_loss(recon, to_unit(images[:64]))))
    stats["latents"] = {"count": len(images), "seconds": time.time() - started, "reconstruction_psnr_db": psnr,
                        "shape": list(normalised.shape[1:])}
    log(f"latents: {len(images)} cached in {time.time() - started:.0f} s, reconstruction PSNR {psnr:.1f} dB")
    _save({"bn": vae.bn.state_dict(), "latents": normalised, "stats": stats["latents"]}, path)
    return normalised


# --- text encoder ----------------------------------------------------------------------------------------------------

def caption_vocabulary() -> list[str]:
    words = {"a", "an", "the", "on", "in", "at", "background", ","}
    words |= set(shapes.SHAPES) | set(shapes.COLOURS) | set(shapes.SIZES)
    for phrase, _ in shapes.POSITIONS.values():
        words |= set(phrase.split())
    return sorted(words) + ["user", "assistant", "system"]


def build_tokenizer(out_dir: Path) -> None:
    """A word-level fast tokenizer over the captions' words (lower-cased; anything else is <unk>), with Qwen's
    special tokens and the Qwen3-style chat template of fluxframe's tiny klein stand-in."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fluxframe.plugins.flux2.tiny import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS

    vocab = {tok: i for i, tok in enumerate(list(QWEN_SPECIAL_TOKENS) + ["<unk>"] + caption_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:2] + QWEN_SPECIAL_TOKENS[3:]),
        chat_template=QWEN_CHAT_TEMPLATE, model_max_length=MAX_TEXT_TOKENS,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)


def build_text_encoder(stage: Path, cfg: TrainConfig, seed: int) -> None:
    from transformers import AutoTokenizer

    from fluxframe.plugins.flux2.tiny import build_tiny_qwen3

    if (stage / "text_encoder" / "config.json").exists():
        return
    build_tokenizer(stage / "tokenizer")
    vocab = len(AutoTokenizer.from_pretrained(stage / "tokenizer", local_files_only=True))
    build_tiny_qwen3(stage / "text_encoder", vocab_size=vocab, seed=seed, hidden_size=cfg.text_hidden,
                     num_hidden_layers=cfg.text_layers, residual_scale=cfg.text_residual_scale)


@torch.no_grad()
def encode_captions(work: Path, stage: Path, captions: list[str]) -> tuple[torch.Tensor, int]:
    """Embeddings (len(captions), 512, 3·hidden) of every caption, through fluxframe's own klein prompt encoder;
    and the number of leading positions that hold any caption's tokens."""
    from fluxframe.plugins.flux2.qwen3_encoder import Qwen3PromptEncoder

    path = work / "text.pt"
    if path.exists():
        saved = torch.load(path, weights_only=False)
        if saved["captions"] == captions:
            return saved["embeds"], saved["prompt_tokens"]
    encoder = Qwen3PromptEncoder.from_pretrained(stage / "text_encoder", stage / "tokenizer", dtype=torch.float32,
                                                 device=torch.device("cpu"))
    embeds = torch.cat([encoder.encode(captions[i:i + 64]) for i in range(0, len(captions), 64)])
    texts = [encoder.tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=False) for c in captions]
    prompt_tokens = max(len(ids) for ids in encoder.tokenizer(texts)["input_ids"])
    _save({"captions": captions, "embeds": embeds, "prompt_tokens": prompt_tokens}, path)
    return embeds, prompt_tokens


# --- transformer -----------------------------------------------------------------------------------------------------

def dit_config(cfg: TrainConfig):
    from fluxframe.plugins.flux2.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=cfg.dit_double, num_single_layers=cfg.dit_single, attention_head_dim=cfg.dit_head_dim,
        num_attention_heads=cfg.dit_heads, joint_attention_dim=3 * cfg.text_hidden,
        axes_dims_rope=(cfg.dit_head_dim // 4,) * 4, guidance_embeds=False,
    )


def sample_sigmas(n: int, mu: float, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal sigmas (80 %) or uniform ones (20 %, so no range goes untrained), then shifted as the sampler's
    schedule is: s' = e^mu / (e^mu + 1/s - 1)."""
    u = torch.sigmoid(torch.randn(n, generator=generator))
    uniform = torch.rand(n, generator=generator)
    u = torch.where(torch.rand(n, generator=generator) < 0.2, uniform, u).clamp(1e-4, 1 - 1e-4)
    shift = math.exp(mu)
    return shift / (shift + (1 / u - 1))


def emphasise_low_noise(sigma: torch.Tensor, fraction: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """Replace about ``fraction`` of ``sigma`` by draws uniform in (0, high]."""
    low = (torch.rand(len(sigma), generator=generator) * high).clamp_min(1e-3)
    return torch.where(torch.rand(len(sigma), generator=generator) < fraction, low, sigma)


def padding_bias(prompt_tokens: int, sampled: int, image_tokens: int) -> torch.Tensor:
    """Phase 1 attends to a sample of the padding positions only. The DiT adds this bias (``attn_bias``) to every
    attention's logits per key, over [prompt, sampled padding, image tokens] as the DiT orders them:
    log(padding / sampled) on the sampled padding keys, 0 elsewhere, so each sampled key stands for its share of all
    the padding and the attention mass on padding is, in expectation, what inference (which attends to all 512
    positions) gives. Without it the model learns to read a prompt that 16 padding keys dilute, and meets one that
    ~490 dilute."""
    bias = torch.zeros(prompt_tokens + sampled + image_tokens)
    bias[prompt_tokens:prompt_tokens + sampled] = math.log((MAX_TEXT_TOKENS - prompt_tokens) / sampled)
    return bias


def train_transformer(work: Path, stage: Path, out: Path, cfg: TrainConfig, seed: int, latents: torch.Tensor,
                      caption_index: torch.Tensor, embeds: torch.Tensor, empty_index: int, prompt_tokens: int,
                      deadline: float, vae, stats: dict, meta: dict):
    from fluxframe.plugins.flux2.family import empirical_mu, image_ids, pack, text_ids
    from fluxframe.plugins.flux2.transformer import Flux2Transformer

    path = work / "dit.pt"
    torch.manual_seed(seed + 2)
    model = Flux2Transformer(dit_config(cfg))
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.dit_lr, weight_decay=0.01, betas=(0.9, 0.99))
    parts = {"model": model, "ema": ema, "opt": opt}
    state = _resume_stage(path, parts, {"step": 0, "losses": [], "seconds": 0.0, "done": False, "budget_s": None},
                          "transformer")
    if state["done"]:
        stats["transformer"] = _summary(state)
        return ema
    grid = tuple(latents.shape[-2:])
    tokens = pack(latents)  # (N, h·w, 128)
    img_ids = image_ids(*grid)
    full_ids = text_ids(MAX_TEXT_TOKENS)
    mu = empirical_mu(grid[0] * grid[1], cfg.schedule_steps)
    phase1_bias = padding_bias(prompt_tokens, cfg.pad_sample, tokens.shape[1])
    gen = torch.Generator().manual_seed(seed * 1000 + 3 + state["step"])
    rng = np.random.default_rng([seed, 3, state["step"]])
    started, last_save = time.time(), time.time()
    seconds0 = state["seconds"]
    window: list[float] = []

    if cfg.dit_steps is None and (state["budget_s"] is None or state["seconds"] + deadline - time.time()
                                  > state["budget_s"]):  # a first run, or a resumed one given more time
        state["budget_s"] = state["seconds"] + deadline - time.time()
    n1, n2 = cfg.dit_steps or (None, None)

    def progress() -> float:  # on a budget, time drives the schedule and the switch to phase 2
        return state["step"] / (n1 + n2) if cfg.dit_steps else state["seconds"] / state["budget_s"]

    def one_step(phase: int) -> float:
        step = state["step"]
        for group in opt.param_groups:
            group["lr"] = _lr(step, progress(), cfg.dit_lr, cfg.dit_warmup)
        idx = torch.from_numpy(rng.integers(0, len(tokens), size=cfg.dit_batch))
        cap = caption_index[idx].clone()
        cap[torch.rand(len(idx), generator=gen) < cfg.caption_dropout] = empty_index
        if phase == 1:  # the prompt's positions whole, plus a sample of the padding positions, with their true ids
            pads = torch.from_numpy(np.sort(rng.choice(np.arange(prompt_tokens, MAX_TEXT_TOKENS), cfg.pad_sample,
                                                       replace=False)))
            keep = torch.cat([torch.arange(prompt_tokens), pads])
        else:
            keep = torch.arange(MAX_TEXT_TOKENS)
        txt = embeds[cap][:, keep]
        x0 = tokens[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(len(idx), mu, gen)
        if progress() >= 1 - cfg.low_noise_share:
            sigma = emphasise_low_noise(sigma, cfg.low_noise_fraction, cfg.low_noise_max, gen)
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        pred = model(xt, img_ids, txt, full_ids[keep], sigma, attn_bias=phase1_bias if phase == 1 else None)
        background = x0.median(dim=1, keepdim=True).values
        distance = (x0 - background).norm(dim=-1)  # (B, tokens)
        shape = distance > 0.5 * distance.amax(dim=1, keepdim=True).clamp_min(1e-6)
        weight = 1.0 + (cfg.shape_weight - 1.0) * shape.float()
        loss = (((pred - (noise - x0)) ** 2).mean(-1) * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        state["step"] += 1
        return loss.item()

    model.train()
    while progress() < 1:
        if cfg.dit_steps:
            phase = 1 if state["step"] < n1 else 2
        else:
            phase = 1 if progress() < cfg.phase1_share else 2
        if phase == 2 and "phase2_from" not in state:
            state["phase2_from"] = state["step"]
        window.append(one_step(phase))
        state["seconds"] = seconds0 + time.time() - started
        if state["step"] % 25 == 0:
            state["losses"].append((state["step"], phase, float(np.mean(window))))
            log(f"transformer step {state['step']} ({progress():.0%}, phase {phase}) loss {np.mean(window):.4f}")
            window = []
        if time.time() - last_save > cfg.checkpoint_minutes * 60:
            _save_stage(path, parts, state)
            stats["transformer"] = _summary(state)
            export(out, stage, cfg, vae, ema, {**meta, "stats": stats, "status": f"partial: step {state['step']}"})
            last_save = time.time()
    state["done"] = True
    state["final_loss"] = state["losses"][-1][2] if state["losses"] else float(np.mean(window))
    state["final_loss_phase1"] = next((loss for _, ph, loss in reversed(state["losses"]) if ph == 1), None)
    _save_stage(path, parts, state)
    stats["transformer"] = _summary(state)
    return ema


# --- export ----------------------------------------------------------------------------------------------------------

def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def export(out: Path, stage: Path, cfg: TrainConfig, vae, transformer, meta: dict) -> Path:
    """Write the diffusers-layout folder beside ``out`` and rename it into place (an older one is replaced)."""
    from fluxframe.core.checkpoint import save_sharded
    from fluxframe.core.files import atomic_folder
    from fluxframe.plugins.flux2 import keymap

    dtype = getattr(torch, cfg.weights_dtype)

    def build(work: Path) -> None:
        t_config = transformer.config
        _write_json(work / "transformer" / "config.json", {"_class_name": "Flux2Transformer2DModel",
                                                           **t_config.to_dict()})
        state = keymap.to_diffusers({k: v.to(dtype) for k, v in transformer.state_dict().items()}, t_config)
        save_sharded(state, work / "transformer")
        _write_json(work / "vae" / "config.json", {"_class_name": "AutoencoderKLFlux2", **vae.config.to_dict()})
        save_sharded({k: (v if k.startswith("bn.") or not v.is_floating_point() else v.to(dtype))
                      for k, v in vae.state_dict().items()}, work / "vae")
        shutil.copytree(stage / "text_encoder", work / "text_encoder")
        shutil.copytree(stage / "tokenizer", work / "tokenizer")
        _write_json(work / "scheduler" / "scheduler_config.json", {
            "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
            "use_dynamic_shifting": True, "time_shift_type": "exponential",
        })
        _write_json(work / "model_index.json", {
            "_class_name": "Flux2KleinPipeline", "is_distilled": False,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3ForCausalLM"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "transformer": ["diffusers", "Flux2Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLFlux2"],
        })
        _write_json(work / "training.json", meta)
        (work / "TRAINING.md").write_text(training_notes(meta), encoding="utf-8")

    return atomic_folder(Path(out), build, replace=True)


def training_notes(meta: dict) -> str:
    """TRAINING.md: how this checkpoint was made, for people (training.json has the same for programs)."""
    stats = meta.get("stats", {})
    ae, lat, dit = stats.get("autoencoder", {}), stats.get("latents", {}), stats.get("transformer", {})
    cfg = meta.get("config", {})
    lines = [
        "# shapes-v1: the fluxframe demo model",
        "",
        "A small FLUX.2 klein-architecture checkpoint (Qwen3-style text encoder, no guidance embedder, true CFG)",
        "trained by fluxframe itself on its synthetic shapes data set. It loads like any FLUX.2 checkpoint in the",
        "diffusers layout.",
        "",
        f"- status: {meta.get('status', '?')}",
        f"- command: `{meta.get('command')}`",
        f"- seed: {meta.get('seed')}",
        f"- data set: {meta.get('dataset_version')} (fluxframe/demo/shapes.py), "
        f"{len(meta.get('held_out_triples', []))} (shape, colour, position) triples held out of training",
        f"- machine: {meta.get('cpu')}, {meta.get('threads')} torch threads, torch {meta.get('torch')}",
    ]
    if "wall_minutes" in meta:
        lines.append(f"- wall time: {meta['wall_minutes']} minutes in all")
    if len(meta.get("runs", [])) > 1:
        lines.append("- runs (an interrupted training resumes from its work folder):")
        lines += [f"  - {run['started']}, {run['minutes']} min: `{run['command']}`" for run in meta["runs"]]
    if ae:
        lines.append(f"- autoencoder: {ae.get('step')} steps in {ae.get('seconds', 0) / 60:.1f} min, final loss "
                     f"(L1 + L2, last 25 steps) {ae.get('final_loss', float('nan')):.4f}; channels "
                     f"{cfg.get('ae_channels')}, crops of {cfg.get('ae_crop')} px, batch {cfg.get('ae_batch')}")
    if lat:
        lines.append(f"- latents: {lat.get('count')} images, batch-norm statistics over all of them; reconstruction "
                     f"PSNR {lat.get('reconstruction_psnr_db', float('nan')):.1f} dB")
    if dit:
        lines.append(f"- transformer: {dit.get('step')} steps in {dit.get('seconds', 0) / 60:.1f} min (phase 2, all "
                     f"512 text positions, from step {dit.get('phase2_from', '-')}), batch {cfg.get('dit_batch')}, "
                     f"final flow-matching loss {dit.get('final_loss', float('nan')):.4f} (phase 1: "
                     f"{dit.get('final_loss_phase1') or float('nan'):.4f})")
    if "parameters" in meta:
        lines.append(f"- parameters: transformer {meta['parameters']['transformer']:,}, "
                     f"autoencoder {meta['parameters']['vae']:,}")
    lines += ["", "Everything else (the full config, the held-out triples) is in training.json.", ""]
    return "\n".join(lines)


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train(out: Path, *, seed: int = 0, work: Path | None = None, config: TrainConfig | None = None,
          threads: int | None = 2, command: str | None = None) -> Path:
    """Train the demo model into the diffusers-layout folder ``out``; intermediate state lives in ``work``
    (default: a folder beside ``out``), so an interrupted run resumes where it stopped."""
    cfg = config or TrainConfig()
    out = Path(out)
    work = Path(work) if work else out.parent / f".{out.name}.train"
    work.mkdir(parents=True, exist_ok=True)
    stage = work / "stage"
    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    budget = cfg.minutes * 60  # for this run: a resumed run spends its own --minutes on what is left to do
    command = command or f"fluxframe train-demo --out {out} --seed {seed} --minutes {cfg.minutes:g}"
    runs_file = work / "runs.json"  # every run into this work folder, so the record covers an interrupted training
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else []
    runs.append({"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                 "minutes": 0.0})
    stats: dict = {}
    meta = {
        "command": command, "runs": runs,
        "seed": seed, "dataset_version": shapes.DATASET_VERSION, "config": asdict(cfg),
        "held_out_triples": sorted(" ".join(t) for t in shapes.HELD_OUT),
        "cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": sys.version.split()[0],
    }

    scenes = shapes.training_scenes(seed, cfg.copies)
    if cfg.max_scenes:
        scenes = scenes[: cfg.max_scenes]
    images = render_all(scenes, cfg.image_size)
    log(f"data: {len(scenes)} images of {shapes.DATASET_VERSION} rendered at {cfg.image_size}²")

    vae = train_autoencoder(work, cfg, images, scenes, seed, cfg.ae_share * budget, stats)
    latents = cache_latents(work, vae, images, stats)

    build_text_encoder(stage, cfg, seed)
    captions = sorted({s.caption for s in scenes}) + [""]
    embeds, prompt_tokens = encode_captions(work, stage, captions)
    position = {c: i for i, c in enumerate(captions)}
    caption_index = torch.tensor([position[s.caption] for s in scenes])
    log(f"text: {len(captions) - 1} captions encoded, prompts fill {prompt_tokens} of {MAX_TEXT_TOKENS} positions")

    deadline = started + budget - 60  # leave a minute for the final export
    ema = train_transformer(work, stage, out, cfg, seed, latents, caption_index, embeds, len(captions) - 1,
                            prompt_tokens, deadline, vae, stats, meta)
    runs[-1]["minutes"] = round((time.time() - started) / 60, 2)
    runs_file.write_text(json.dumps(runs, indent=2))
    wall = sum(run["minutes"] for run in runs) * 60
    meta["stats"] = stats
    meta["wall_minutes"] = round(wall / 60, 2)
    meta["parameters"] = {"transformer": sum(p.numel() for p in ema.parameters()),
                          "vae": sum(p.numel() for p in vae.parameters())}
    meta["status"] = "complete"
    export(out, stage, cfg, vae, ema, meta)
    log(f"wrote {out} ({_size_mb(out):.1f} MB) after {wall / 60:.1f} min")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fluxframe.demo.train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args) -> int:
    cfg = TrainConfig(minutes=args.minutes)
    if args.tiny:
        cfg = replace(cfg, **TINY)
    command = " ".join(["fluxframe train-demo", f"--out {args.out}", f"--seed {args.seed}",
                        f"--minutes {args.minutes:g}"] + ([f"--threads {args.threads}"] if args.threads != 2 else [])
                       + (["--tiny"] if args.tiny else []))
    train(args.out, seed=args.seed, work=args.work, config=cfg, threads=args.threads, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
