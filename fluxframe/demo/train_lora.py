"""``fluxframe train-lora``: a LoRA for a deployment's FLUX.2 or Flex.2 (Flux.1) model, trained on a folder of
captioned images.

The run, in order:

1. read the data set (images with same-name ``.txt`` captions, or a ``metadata.jsonl``), every file checked
   before anything is trained: a missing caption, a caption without its image, an unreadable or huge image is a
   TrainingError naming the file; every option is checked too (a TrainingError naming it);
2. load the deployment (``Pipeline.from_config``: its safety policy, its model and memory strategy, ``quantize``
   put first for ``--quantize``) and pass every caption through the prompt filters and every image through the
   input-image filters; blocked items are skipped and listed (``--strict``: the first one stops the run);
3. encode every image (the autoencoder) and caption (the text encoder) once, and for Flex.2 the control maps of
   every image, into a cache beside the output, then free the encoders (the autoencoder stays for samples);
4. flow matching as the family samples (``fluxframe.demo.train.sample_sigmas``: x_t = (1-s)·x0 + s·noise,
   target noise - x0, s logit-normal shifted by the family's own schedule mu for the image's token count;
   ``--low-noise P``: a share P of them drawn uniformly below 0.6 instead, as the demo model's own training does
   at its end, since the nearly clean steps are where small details such as a thin stroke's hole are decided;
   ``--caption-dropout P``: a share P of the items train with the empty prompt, as the demo model's training
   does, so that true CFG's unconditional pass sees the LoRA's style as the conditional one does; ``--loss-masks
   DIR``: each token's squared error weighted by its share of the item's mask, at least ``--unmasked-weight``,
   so that what the mask marks counts more than the rest, as OneTrainer's masked training does), the
   base frozen (and quantised, for ``--quantize``), the LoRA in float32, AdamW, optionally with gradient
   checkpointing over the DiT's blocks; for Flex.2 the inpaint, mask and control channels drawn per item as the
   conditioners fill them at generation, each dropped (left empty) part of the time, the guidance embedder
   bypassed; every ``--checkpoint-every`` steps the LoRA, the optimiser and the random generator's state are
   written atomically, so the same command continues after a kill -9 exactly as an uninterrupted run would have
   gone on; every ``--sample-every`` steps sample images through the deployment's own pipeline with the LoRA
   so far (``draw_samples``);
5. the LoRA written in the diffusers/PEFT layout (``transformer.<module>.lora_A.weight`` / ``lora_B.weight``,
   alpha/rank folded into lora_B, so every reader applies it at scale 1), its safetensors metadata and a training
   record (``<out>.training.json``) naming the data set's hash, the skipped items, the base checkpoint, rank, alpha,
   steps and seed; where the deployment keeps an audit log, a ``train-lora`` line there too, with the filters'
   verdicts on every skipped item.
"""

from __future__ import annotations

import gc
import glob
import json
import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fluxframe.errors import RequestError, TrainingError

from .lora_options import CONTROL_KINDS, DEFAULT_TARGETS, FAMILY_TARGETS, QUANTIZE_FORMATS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # a training image larger than this is refused, not silently downscaled
STATE_VERSION = 1
LOW_NOISE_MAX = 0.6  # --low-noise draws its sigmas uniformly below this (the demo model's own training's bound)


@dataclass
class Item:
    name: str  # the image file's name within the data folder
    image: Path
    caption: str


# --- data ------------------------------------------------------------------------------------------------------------

def read_dataset(folder: Path) -> list[Item]:
    """The data set's items, sorted by name; TrainingError naming the file for anything that is not a pair."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingError(f"{folder}: not a folder")
    metadata = folder / "metadata.jsonl"
    if metadata.exists():
        return _read_metadata(folder, metadata)
    images = {p.stem: p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    captions = {p.stem: p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".txt"}
    if not images and not captions:
        raise TrainingError(f"{folder}: no training images (expected .png/.jpg/.webp files with same-name .txt "
                            "captions, or a metadata.jsonl)")
    for stem, path in sorted(images.items()):
        if stem not in captions:
            raise TrainingError(f"{path}: image without a caption (expected {path.with_suffix('.txt').name})")
    for stem, path in sorted(captions.items()):
        if stem not in images:
            raise TrainingError(f"{path}: caption without an image")
    return [Item(images[s].name, images[s], _caption(captions[s])) for s in sorted(images)]


def _caption(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingError(f"{path}: unreadable caption ({exc})") from None
    if not text:
        raise TrainingError(f"{path}: empty caption")
    return text


def _read_metadata(folder: Path, metadata: Path) -> list[Item]:
    items = []
    for n, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            name, caption = entry["file_name"], entry.get("text", entry.get("caption"))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TrainingError(f"{metadata}:{n}: expected a JSON object with file_name and text") from None
        if not isinstance(caption, str) or not caption.strip():
            raise TrainingError(f"{metadata}:{n}: {name}: image without a caption (no text)")
        path = folder / name
        if not path.is_file():
            raise TrainingError(f"{metadata}:{n}: caption without an image ({path} does not exist)")
        items.append(Item(name, path, caption.strip()))
    if not items:
        raise TrainingError(f"{metadata}: no training items")
    return sorted(items, key=lambda i: i.name)


def open_images(items: list[Item]) -> dict[str, object]:
    """Every image decoded (RGB), with its bytes' SHA-256; TrainingError naming an unreadable or huge one."""
    return {item.name: _open_image(item.image, "RGB", "image") for item in items}


def _open_image(path: Path, mode: str, what: str) -> tuple[object, str]:
    """(the image at ``path`` decoded in ``mode``, its bytes' SHA-256); TrainingError naming the file for an
    unreadable one (``what``: "image", "mask") or one over MAX_IMAGE_PIXELS (read from the header, before
    decoding)."""
    import io

    from PIL import Image

    from fluxframe.core.inputs import read_input

    try:
        data = read_input(path, "data")
        with Image.open(io.BytesIO(data.data)) as probe:
            w, h = probe.size
        if w * h > MAX_IMAGE_PIXELS:
            raise TrainingError(f"{path}: too large ({w}x{h}, more than {MAX_IMAGE_PIXELS} pixels)")
        return data.image("data").convert(mode), data.sha256
    except RequestError as exc:  # "data: <path>: not a readable image (...)" and the like
        raise TrainingError(str(exc).removeprefix("data: ")) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise TrainingError(f"{path}: unreadable {what} ({exc})") from None


def dataset_hash(items: list[Item], images: dict) -> str:
    """SHA-256 over every (name, image bytes' hash, caption): what the record names the data set by."""
    from fluxframe.core.hashing import sha256_json

    return "sha256:" + sha256_json([[i.name, images[i.name][1], i.caption] for i in items])


def read_loss_masks(items: list[Item], folder: Path, images: dict) -> dict[str, object]:
    """Each item's loss mask: the grey image ``folder/<item stem>.<png|jpg|jpeg|webp>`` of the item's size (white
    counts fully, black at ``--unmasked-weight``), with its bytes' SHA-256; TrainingError naming the file for a
    missing, unreadable or mis-sized mask."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingError(f"--loss-masks {folder}: not a folder")
    masks = {}
    for item in items:
        stem = Path(item.name).stem
        found = [p for p in (folder / (stem + suffix) for suffix in IMAGE_SUFFIXES) if p.is_file()]
        if not found:
            raise TrainingError(f"{item.image}: no loss mask (expected {stem}.png in {folder})")
        mask, sha = _open_image(found[0], "L", "mask")
        if mask.size != images[item.name][0].size:
            w, h = images[item.name][0].size
            raise TrainingError(f"{found[0]}: the mask is {mask.size[0]}x{mask.size[1]}, its image {item.image.name} "
                                f"is {w}x{h}")
        masks[item.name] = (mask, sha)
    return masks


def token_weights(mask, resolution: int, ids: torch.Tensor, floor: float) -> torch.Tensor:
    """(tokens,) loss weights of one item: the mask squared and cropped as its image is, each token's weight the
    mean of the mask over the pixels the token covers, raised to at least ``floor`` (``ids``: the tokens'
    (..., row, col, ...) positions, as the family's image ids give them)."""
    import numpy as np

    pixels = torch.from_numpy(np.asarray(square(mask, resolution), dtype=np.float32) / 255.0).clamp(0, 1)
    rows, cols = ids[:, 1].long(), ids[:, 2].long()
    grid = F.adaptive_avg_pool2d(pixels[None, None], (int(rows.max()) + 1, int(cols.max()) + 1))[0, 0]
    return floor + (1 - floor) * grid[rows, cols]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean squared error of (batch, tokens, channels) predictions; with (batch, tokens) ``weights``, each
    token's mean squared error weighted by them, divided by their sum (a weighted mean: the loss keeps its scale
    however much of a picture the masks cover)."""
    if weights is None:
        return F.mse_loss(pred, target)
    return ((pred - target).pow(2).mean(-1) * weights).sum() / weights.sum().clamp_min(1e-12)


def filter_items(policy, items: list[Item], images: dict, strict: bool) -> tuple[list[Item], list[dict]]:
    """(kept items, skipped items with the filters' reasons): each caption through the prompt filters, each image
    through the input-image filters, as a generation request's inputs go."""
    kept, skipped = [], []
    for item in items:
        decision = policy.check_prompts({"prompt": item.caption})
        if decision.allowed:
            decision = policy.check_input_images([(item.name, images[item.name][0])])
        if decision.allowed:
            kept.append(item)
            continue
        reasons = list(decision.reasons) or [decision.action]
        if strict:
            raise TrainingError(f"{item.image}: blocked by the safety filters ({'; '.join(reasons)}); --strict "
                                "stops here")
        skipped.append({"file": item.name, "stage": decision.stage, "reasons": reasons,
                        "decision": decision.to_record()})
    if not kept:
        raise TrainingError(f"every item of the data set was blocked by the safety filters (first: "
                            f"{items[0].image}: {'; '.join(skipped[0]['reasons'])})")
    return kept, skipped


def square(image, resolution: int):
    """The image with its shorter side resized to ``resolution``, then centre-cropped (PIL)."""
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                         Image.Resampling.LANCZOS)
    left, top = (image.size[0] - resolution) // 2, (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_pixels(image, resolution: int) -> torch.Tensor:
    """(3, r, r) in [-1, 1]: the shorter side resized to ``resolution``, then centre-cropped."""
    from fluxframe.core.images import from_pil

    return from_pil(square(image, resolution))[0]


# --- the LoRA --------------------------------------------------------------------------------------------------------

class TrainedLora(nn.Module):
    """One adapted diffusers-named layer: a down (rank, in) and an up (rows, rank) matrix in float32, whose
    update lands on rows ``row:row+rows`` of fluxframe's (possibly fused) linear layer."""

    def __init__(self, name: str, in_features: int, rows: int, row: int, out_features: int, rank: int, scale: float):
        super().__init__()
        self.name, self.row, self.rows, self.out_features, self.scale = name, row, rows, out_features, scale
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.zeros(rows, rank))  # zero: training starts from the base model exactly
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # PEFT's initialisation

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        d = F.linear(F.linear(x.float(), self.down), self.up) * self.scale
        return F.pad(d, (self.row, self.out_features - self.row - self.rows))


class AdaptedLinear(nn.Module):
    """A frozen linear layer plus the trained LoRAs that write into it."""

    def __init__(self, base: nn.Linear, loras: list[TrainedLora]):
        super().__init__()
        self.base, self.loras = base, loras
        # the DiT reads a layer's widths in places (the single blocks' output projection): the wrapper keeps them
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out + sum(lora.delta(x) for lora in self.loras).to(out.dtype)


def select_layers(model, targets: tuple[str, ...]) -> dict[str, list]:
    """diffusers module name -> its segments in fluxframe's DiT, for every name matching a target (as PEFT
    matches target_modules: the name itself or a suffix after a dot)."""
    from fluxframe.plugins.lora import lora_targets

    rules = list(model.lora_rules())
    all_targets = lora_targets(rules, model.transformer, model.transformer.config.hidden_size)
    chosen = {}
    for _, theirs, _ in rules:
        for key in theirs:
            name = key[: -len(".weight")]
            if name in all_targets and any(name == t or name.endswith("." + t) for t in targets):
                chosen[name] = all_targets[name]
    unused = [t for t in targets if not any(n == t or n.endswith("." + t) for n in chosen)]
    if unused:
        raise TrainingError(f"--targets: {', '.join(unused)} names no linear layer of this model (diffusers names, "
                            f"e.g. {', '.join(FAMILY_TARGETS.get(model.name, DEFAULT_TARGETS))})")
    return chosen


def attach(model, layers: dict[str, list], rank: int, alpha: float) -> list[TrainedLora]:
    """Wrap the DiT's linear layers with trainable LoRAs; TrainingError for a rank larger than a layer."""
    modules = dict(model.transformer.named_modules())
    by_module: dict[str, list[TrainedLora]] = {}
    loras = []
    for name, segments in layers.items():
        for seg in segments:
            linear = modules[seg.module]
            if rank > min(linear.in_features, seg.rows):
                raise TrainingError(f"--rank {rank} is larger than layer {name} ({linear.in_features} in, "
                                    f"{seg.rows} out): a LoRA's rank must not exceed either")
            lora = TrainedLora(name, linear.in_features, seg.rows, seg.row, linear.out_features, rank, alpha / rank)
            lora.to(model.device)  # where the DiT computes (an offloading strategy may keep the weights elsewhere)
            by_module.setdefault(seg.module, []).append(lora)
            loras.append(lora)
    wrapped = []
    for module, group in by_module.items():
        parent_name, _, child = module.rpartition(".")
        parent = modules[parent_name] if parent_name else model.transformer
        wrapper = AdaptedLinear(getattr(parent, child), group)
        setattr(parent, child, wrapper)
        wrapped.append((parent, child, wrapper))
    model._train_lora_wrapped = wrapped  # unwrapped while samples are drawn (see unwrapped)
    return loras


@contextmanager
def unwrapped(model):
    """The DiT as it was before ``attach``: its own linear layers back in place, the trained ones set aside."""
    wrapped = model._train_lora_wrapped
    for parent, child, wrapper in wrapped:
        setattr(parent, child, wrapper.base)
    try:
        yield
    finally:
        for parent, child, wrapper in wrapped:
            setattr(parent, child, wrapper)


@contextmanager
def guidance_bypassed(transformer):
    """Flex.2's guidance embedder left out of the forward pass (ai-toolkit's ``bypass_guidance_embedding``): the
    timestep, pooled-text and block paths train; the embedder, which Flex.2 added to a de-distilled base and
    which generation uses as before, is neither trained nor trained around."""
    saved = getattr(transformer, "guidance_in", None)
    if saved is None:
        yield
        return
    transformer.guidance_in = None
    try:
        yield
    finally:
        transformer.guidance_in = saved


def checkpoint_blocks(transformer) -> None:
    """Gradient checkpointing over blocks: each double and single block's forward runs under
    ``torch.utils.checkpoint`` (non-reentrant) whenever gradients are being recorded, so only the blocks'
    inputs are kept and their insides are recomputed in the backward pass. Without gradients (samples) the
    blocks run as they are."""
    from torch.utils.checkpoint import checkpoint

    for block in [*transformer.double_blocks, *transformer.single_blocks]:
        original = block.forward

        def forward(*args, _run=original, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_run, *args, use_reentrant=False, **kwargs)
            return _run(*args, **kwargs)

        block.forward = forward


def lora_tensors(loras: list[TrainedLora]) -> dict[str, torch.Tensor]:
    """The diffusers/PEFT layout, scale folded into lora_B (PEFT files from diffusers carry no alpha)."""
    out = {}
    for lora in loras:
        out[f"transformer.{lora.name}.lora_A.weight"] = lora.down.detach().float().contiguous().clone()
        out[f"transformer.{lora.name}.lora_B.weight"] = (lora.up.detach().float() * lora.scale).contiguous()
    return out


# --- training --------------------------------------------------------------------------------------------------------

def _paths(out: Path) -> dict[str, Path]:
    return {"state": out.with_name(f".{out.name}.train.pt"), "cache": out.with_name(f".{out.name}.cache.pt"),
            "record": out.with_name(f"{out.stem}.training.json")}


def _save_torch(path: Path, obj) -> None:
    from fluxframe.core.files import atomic_write

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def encode_dataset(model, items: list[Item], images: dict, resolution: int, cache: Path, key: dict, *,
                   control: list | None = None, control_kinds: tuple[str, ...] | None = None,
                   keep_vae: bool = False, empty_prompt: bool = False) -> dict:
    """Latent tokens and text embeddings (with CLIP's pooled vector where the family has one) of every kept item,
    and for Flex.2 the control latents of every item under each of ``control``'s preprocessors, from the cache
    when it was made for the same data, base, resolution and control kinds; the text encoder is freed afterwards,
    and the autoencoder too unless ``keep_vae`` (samples decode with it); ``empty_prompt``: the empty prompt's
    embedding too (``--caption-dropout``)."""
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == json.dumps(key, sort_keys=True):
            _free_encoders(model, keep_vae)
            return saved
    from fluxframe.core.images import from_pil

    with torch.no_grad():
        tokens, embeds, pooled, controls = [], [], [], []
        for item in items:
            picture = square(images[item.name][0], resolution)
            latents = model.encode_image(from_pil(picture))
            tokens.append(latents.tokens[0].float().cpu())
            text = model.encode_prompts([item.caption])
            embeds.append(text.embeds[0].float().cpu())
            if getattr(text, "pooled", None) is not None:
                pooled.append(text.pooled[0].float().cpu())
            if control:  # as the control conditioner encodes a map: VAE posterior mean, normalised, packed
                maps = [prepare(picture).convert("RGB").resize(picture.size) for prepare in control]
                for kind, drawn in zip(control_kinds or [""] * len(maps), maps, strict=True):
                    if not drawn.getbbox():  # all black: e.g. no edges at all at this resolution
                        print(f"fluxframe: {item.image}: its {kind} control map is empty at {resolution}x"
                              f"{resolution}; it trains on a blank map there", file=sys.stderr)
                maps = [from_pil(m) for m in maps]
                controls.append(torch.stack([model.encode_tokens(m)[0].float().cpu() for m in maps]))
        saved = {"key": json.dumps(key, sort_keys=True), "tokens": torch.stack(tokens), "embeds": torch.stack(embeds),
                 "image_ids": latents.ids.cpu(), "text_ids": text.ids.cpu()}
        if pooled:
            saved["pooled"] = torch.stack(pooled)
        if empty_prompt:  # what true CFG's unconditional pass and a dropped caption see
            empty = model.encode_prompts([""])
            saved["empty_embeds"] = empty.embeds[0].float().cpu()
            if getattr(empty, "pooled", None) is not None:
                saved["empty_pooled"] = empty.pooled[0].float().cpu()
        if controls:
            saved["control"] = torch.stack(controls)
    _save_torch(cache, saved)
    _free_encoders(model, keep_vae)
    return saved


def _free_encoders(model, keep_vae: bool = False) -> None:
    # training needs the DiT only: the encoders' memory goes back before the first step (the text encoder
    # loads again, lazily, when samples are drawn)
    model._text_encoder = None
    if not keep_vae:
        model.vae = None
    gc.collect()


# --- Flex.2: the conditioning channels, drawn as generation fills them --------------------------------------------

def random_masks(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 1, size, size) inpaint masks, 1 = regenerate: each a rectangle or an ellipse 20-80 % of the side
    wide and high, centred anywhere in the image (so part of it may fall outside)."""
    draws = torch.rand(n, 5, generator=generator).tolist()
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = coords[:, None], coords[None, :]
    masks = []
    for shape, w, h, cx, cy in draws:
        dx, dy = (x - cx) / (0.1 + 0.3 * w), (y - cy) / (0.1 + 0.3 * h)  # half-widths 0.1-0.4 of the side
        inside = (dx * dx + dy * dy <= 1) if shape < 0.5 else (dx.abs() <= 1) & (dy.abs() <= 1)
        masks.append(inside.float())
    return torch.stack(masks)[:, None]


class Flex2Channels:
    """The inpaint, mask and control channels of a training batch. Per item, independently: with probability
    1 - ``inpaint_dropout`` a random mask (``random_masks``) and the image's own latent with the masked part
    zeroed (what the inpaint conditioner feeds: latent · (1 - mask at latent resolution)), else the family's
    "no inpaint" (zeros, mask all ones); with probability 1 - ``control_dropout`` the control latent of one of
    the image's control maps (cached), else zeros ("no control")."""

    def __init__(self, model, resolution: int, inpaint_dropout: float, control_dropout: float,
                 control: torch.Tensor | None):
        self.model, self.resolution = model, resolution
        self.inpaint_dropout, self.control_dropout = inpaint_dropout, control_dropout
        self.control = control  # (items, kinds, tokens, 64) or None (control dropout 1)
        self.per_channel = model.channel_groups["inpaint"] // model.channel_groups["mask"]

    def __call__(self, x0: torch.Tensor, idx: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        b = len(idx)
        inpaint_on = (torch.rand(b, generator=generator) >= self.inpaint_dropout).to(x0.device)[:, None, None]
        control_on = (torch.rand(b, generator=generator) >= self.control_dropout).to(x0.device)[:, None, None]
        kinds = 1 if self.control is None else self.control.shape[1]
        kind = torch.randint(0, kinds, (b,), generator=generator)
        masks = random_masks(b, self.resolution, generator)
        m = self.model.mask_tokens(masks, self.resolution, self.resolution).to(x0)  # (b, tokens, 4), as inference
        keep = 1.0 - m.repeat(1, 1, self.per_channel)  # mask_tokens(per_channel=True): c·4 + p -> mask[p]
        channels = {"inpaint": torch.where(inpaint_on, x0 * keep, torch.zeros_like(x0)),
                    "mask": torch.where(inpaint_on, m, torch.ones_like(m))}
        if self.control is not None:
            control = self.control[idx, kind].to(x0)
            channels["control"] = torch.where(control_on, control, torch.zeros_like(control))
        return channels


def control_preprocessors(pipeline, kinds: tuple[str, ...], source) -> list:
    """The control maps' preprocessors, those of the deployment's control conditioner where it has one (its
    Canny thresholds, its depth and pose estimators), else line with the defaults."""
    from fluxframe.conditioning.preprocess import PREPROCESSORS

    conditioner = pipeline.stages.conditioners.get("control")
    out = []
    for kind in kinds:
        if conditioner is not None:
            try:
                out.append(conditioner.preprocessor(kind))
            except RequestError as exc:
                raise TrainingError(f"--control-kinds {kind}: {source}: {exc}") from None
        elif kind == "line":
            out.append(PREPROCESSORS["line"]())
        else:
            raise TrainingError(f"--control-kinds {kind}: needs a {kind} estimator, and {source} has no control "
                                f"conditioner (add [[conditioners]] name = \"control\" with {kind}_model = "
                                "\"path/to/model.onnx\"), or train on line maps only")
    return out


# --- the deployment: family, quantisation, samples ----------------------------------------------------------------

def with_quantize(config, fmt: str | None):
    """(config, the format the frozen base is quantised to, or None): ``--quantize FORMAT`` puts the ``quantize``
    memory strategy (format FORMAT, the deployment's other [memory.quantize] options kept) before the
    deployment's other strategies; without it, a deployment that quantises already trains on that."""
    from fluxframe.core.config import MemorySection

    memory = config.memory
    configured = dict(memory.options.get("quantize") or {}).get("format", "int8") if "quantize" in memory.names \
        else None
    if fmt is None:
        return config, configured
    if fmt not in QUANTIZE_FORMATS:
        raise TrainingError(f"--quantize: expected one of {', '.join(QUANTIZE_FORMATS)}, got {fmt!r}")
    names = [n for n in memory.names if n not in ("none", "quantize")]
    options = {**memory.options, "quantize": {**dict(memory.options.get("quantize") or {}), "format": fmt}}
    section = MemorySection.model_validate({"strategy": ["quantize", *names], **options})
    return config.model_copy(update={"memory": section}), fmt


def check_flex2_options(model, config, inpaint_dropout, control_dropout, control_kinds):
    """(inpaint dropout, control dropout, control kinds) to train with, or Nones for a model without
    conditioning channels; TrainingError for a Flex.2 option given to another model or out of range."""
    given = [name for name, value in (("--inpaint-dropout", inpaint_dropout), ("--control-dropout", control_dropout),
                                      ("--control-kinds", control_kinds)) if value is not None]
    if not getattr(model, "takes_conditioning", False):
        if given:
            what = f"a {model.name} model" if model.name != "flex2" else "a plain Flux.1 model (64 input channels)"
            raise TrainingError(f"{given[0]}: only for Flex.2 deployments; {config.source} loads {what}, which has "
                                "no inpaint or control channels")
        return None, None, None
    inpaint_dropout = 0.5 if inpaint_dropout is None else inpaint_dropout
    control_dropout = 0.5 if control_dropout is None else control_dropout
    for option, value in (("--inpaint-dropout", inpaint_dropout), ("--control-dropout", control_dropout)):
        if not 0.0 <= value <= 1.0:
            raise TrainingError(f"{option}: a probability from 0 to 1, got {value}")
    kinds = ("line",) if control_kinds is None else tuple(control_kinds)
    bad = [k for k in kinds if k not in CONTROL_KINDS]
    if bad or not kinds or len(set(kinds)) != len(kinds):
        raise TrainingError(f"--control-kinds: expected distinct names among {', '.join(CONTROL_KINDS)}, got "
                            f"{','.join(kinds) or '(none)'}")
    return inpaint_dropout, control_dropout, kinds


def draw_samples(pipeline, loras: list[TrainedLora], prompts: tuple[str, ...], folder: Path, step: int, seed: int,
                 metadata: dict[str, str]) -> list[Path]:
    """The LoRA as it stands written to ``folder/step-NNNNNN.safetensors``, then one image per prompt generated
    with it by the deployment's own pipeline (the LoRA applied as a side path, as ``[[lora]]`` would apply it,
    so the image is filtered, watermarked, signed and audited like any output, its record naming that file);
    afterwards the DiT is as training left it."""
    from safetensors.torch import save_file

    from fluxframe.core.files import atomic_write
    from fluxframe.core.types import GenerationRequest
    from fluxframe.errors import Blocked

    model = pipeline.stages.model
    folder.mkdir(parents=True, exist_ok=True)
    lora_file = folder / f"step-{step:06d}.safetensors"
    tensors = lora_tensors(loras)
    atomic_write(lora_file, lambda tmp: save_file(tensors, str(tmp), metadata={**metadata, "step": str(step)}))
    made = []
    with unwrapped(model):
        model.apply_loras([{"path": lora_file, "weight": 1.0, "mode": "side", "key": "sample"}])
        try:
            for i, prompt in enumerate(prompts):
                path = folder / f"step-{step:06d}-{i}.{pipeline.config.output.format}"
                try:
                    pipeline.generate(GenerationRequest(prompt=prompt, seed=seed, output=path, overwrite=True))
                    made.append(path)
                except Blocked as exc:  # an output filter's verdict: audited by the pipeline, training goes on
                    print(f"fluxframe: sample {path.name} blocked: {exc}", file=sys.stderr)
        finally:
            model.remove_loras()
            model._text_encoder = None  # freed again until the next samples
            gc.collect()
    return made


def train(config, data: Path, out: Path, *, rank: int = 16, alpha: float | None = None, steps: int = 1000,
          lr: float = 1e-4, batch_size: int = 1, resolution: int = 512, targets: tuple[str, ...] | None = None,
          seed: int = 0, checkpoint_every: int = 100, strict: bool = False, quantize: str | None = None,
          gradient_checkpointing: bool = False, sample_every: int = 0, sample_prompts: tuple[str, ...] = (),
          inpaint_dropout: float | None = None, control_dropout: float | None = None,
          control_kinds: tuple[str, ...] | None = None, low_noise: float = 0.0, caption_dropout: float = 0.0,
          loss_masks: Path | None = None, unmasked_weight: float = 0.1, overwrite: bool = False, host=None,
          stop_after: int | None = None, after_backward=None, command: str | None = None) -> Path:
    """Train and write the LoRA ``out``; see the module's docstring. ``stop_after`` (tests): return after that
    many steps of this run, with the checkpoint written, as an interrupted run leaves it. ``after_backward``
    (tests): called with the LoRAs after each backward pass, before clipping and the optimiser step."""
    from safetensors.torch import save_file

    from fluxframe.core.files import atomic_write
    from fluxframe.core.hashing import sha256_file
    from fluxframe.core.pipeline import Pipeline, build_guard
    from fluxframe.core.plugins import PluginHost
    from fluxframe.core.types import Conditioning

    from .train import emphasise_low_noise, sample_sigmas

    out = Path(out)
    if out.suffix != ".safetensors":
        raise TrainingError(f"{out}: the LoRA is written as safetensors; name it *.safetensors")
    paths = _paths(out)
    guard = build_guard(config)
    for path in (out, *paths.values()):  # the LoRA, its record, and the checkpoint and cache beside it
        if (why := guard.problem(path)) is not None:
            raise TrainingError(f"--out {out}: {path} {why}")
    if out.exists() and not paths["state"].exists() and not overwrite:  # a finished training's file
        raise TrainingError(f"--out {out}: exists; pass --overwrite to train again and replace it")
    for option, value in (("--rank", rank), ("--steps", steps), ("--batch-size", batch_size),
                          ("--checkpoint-every", checkpoint_every)):
        if value < 1:
            raise TrainingError(f"{option}: must be at least 1, got {value}")
    if resolution < 16 or resolution % 16:
        raise TrainingError(f"--resolution: must be a positive multiple of 16, got {resolution}")
    if not 0 <= low_noise <= 1:
        raise TrainingError(f"--low-noise: must be a share from 0 to 1, got {low_noise}")
    if not 0 <= caption_dropout <= 1:
        raise TrainingError(f"--caption-dropout: must be a share from 0 to 1, got {caption_dropout}")
    if not lr > 0:
        raise TrainingError(f"--lr: must be positive, got {lr}")
    if not 0 <= unmasked_weight <= 1:
        raise TrainingError(f"--unmasked-weight: must be from 0 to 1, got {unmasked_weight}")
    sample_prompts = tuple(p.strip() for p in (sample_prompts or ()))
    if sample_every < 0:
        raise TrainingError(f"--sample-every: must be 0 (no samples) or more, got {sample_every}")
    if sample_every and not sample_prompts:
        raise TrainingError(f"--sample-every {sample_every}: needs at least one --sample-prompt")
    if sample_prompts and not sample_every:
        raise TrainingError("--sample-prompt: needs --sample-every N (how often to draw the samples)")
    if any(not p for p in sample_prompts):
        raise TrainingError("--sample-prompt: an empty prompt")
    alpha = float(rank if alpha is None else alpha)
    for written in (out, *paths.values()):  # a write a kill -9 cut short (atomic_write's temporaries): never read
        for stale in out.parent.glob(f".{glob.escape(written.name)}.tmp-*"):
            stale.unlink(missing_ok=True)
    samples_dir = out.with_name(f"{out.stem}.samples")
    started = time.time()

    items = read_dataset(data)
    images = open_images(items)
    data_hash = dataset_hash(items, images)
    masks = read_loss_masks(items, loss_masks, images) if loss_masks is not None else None
    for item in items if masks is not None and unmasked_weight == 0 else ():
        if square(masks[item.name][0], resolution).getbbox() is None:
            raise TrainingError(f"--loss-masks: the mask of {item.image} is black where the image is cropped to "
                                f"{resolution}x{resolution}, and --unmasked-weight 0 leaves it nothing to train on")

    if config.lora:
        raise TrainingError(f"{config.source}: the deployment applies [[lora]] entries; train on the bare base "
                            "(remove them from the config used for training)")
    config, quantized = with_quantize(config, quantize)
    if gradient_checkpointing and "group-offload" in config.memory.names:
        raise TrainingError(f"--gradient-checkpointing: {config.source}: not with the group-offload memory "
                            "strategy (it moves blocks in forward hooks, which the recomputation bypasses); use "
                            "model-offload or none")
    pipeline = Pipeline.from_config(config, host or PluginHost.for_config(config))
    model = pipeline.stages.model
    if model.name not in ("flux2", "flex2"):
        raise TrainingError(f"{config.source}: train-lora trains FLUX.2 and Flex.2 (Flux.1) models, not "
                            f"{model.name!r}")
    inpaint_dropout, control_dropout, control_kinds = check_flex2_options(model, config, inpaint_dropout,
                                                                          control_dropout, control_kinds)
    flex2 = inpaint_dropout is not None
    control = control_preprocessors(pipeline, control_kinds, config.source) if flex2 and control_dropout < 1 \
        else None
    for prompt in sample_prompts:  # a sample the filters would block is a mistake to find now, not in an hour
        decision = pipeline.stages.policy.check_prompts({"prompt": prompt})
        if not decision.allowed:
            raise TrainingError(f"--sample-prompt {prompt!r}: blocked by the safety filters "
                                f"({'; '.join(decision.reasons) or decision.action})")
    kept, filtered = filter_items(pipeline.stages.policy, items, images, strict)
    skipped = [{k: v for k, v in entry.items() if k != "decision"} for entry in filtered]
    for entry in skipped:
        print(f"fluxframe: skipped {entry['file']}: {'; '.join(entry['reasons'])}", file=sys.stderr)

    targets = FAMILY_TARGETS[model.name] if targets is None else tuple(targets)
    layers = select_layers(model, targets)
    torch.manual_seed(seed)
    loras = attach(model, layers, rank, alpha)
    settings = {"base": model.checkpoint_id, "dataset_sha256": data_hash, "kept": [i.name for i in kept],
                "rank": rank, "alpha": alpha, "lr": lr, "batch_size": batch_size, "resolution": resolution,
                "targets": list(targets), "seed": seed}
    if quantized:
        settings["quantize"] = quantized
    if low_noise:
        settings["low_noise"] = low_noise
    if caption_dropout:
        settings["caption_dropout"] = caption_dropout
    if masks is not None:
        from fluxframe.core.hashing import sha256_json

        settings["loss_masks"] = {"sha256": "sha256:" + sha256_json([[i.name, masks[i.name][1]] for i in kept]),
                                  "unmasked_weight": unmasked_weight}
    if flex2:
        settings["conditioning"] = {"inpaint_dropout": inpaint_dropout, "control_dropout": control_dropout,
                                    "control_kinds": list(control_kinds) if control else []}
    cache_key = {k: settings[k] for k in ("base", "dataset_sha256", "kept", "resolution")}
    if caption_dropout:
        cache_key["empty_prompt"] = True
    if control:  # the maps depend on the kinds and on the control conditioner's options (thresholds, estimators)
        cache_key["control_kinds"] = list(control_kinds)
        cache_key["control_options"] = [c.options for c in config.conditioners if c.name == "control"]
    cache = encode_dataset(model, kept, images, resolution, paths["cache"], cache_key, control=control,
                           control_kinds=control_kinds, keep_vae=bool(sample_every),
                           empty_prompt=bool(caption_dropout))

    transformer = model.transformer.requires_grad_(False)
    if gradient_checkpointing:
        checkpoint_blocks(transformer)
    params = [p for lora in loras for p in lora.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    state = {"step": 0, "losses": []}
    if paths["state"].exists():
        saved = torch.load(paths["state"], weights_only=False)
        if saved.get("version") != STATE_VERSION or saved.get("settings") != settings:
            raise TrainingError(f"{paths['state']}: a checkpoint of a different training (data, base or options "
                                "differ); delete it to start over")
        for lora, sd in zip(loras, saved["loras"], strict=True):
            lora.load_state_dict(sd)
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["generator"])
        state = saved["state"]
        print(f"fluxframe: resuming {out.name} at step {state['step']} of {steps}", file=sys.stderr)

    def checkpoint() -> None:
        _save_torch(paths["state"], {"version": STATE_VERSION, "settings": settings, "state": state,
                                     "loras": [lora.state_dict() for lora in loras], "opt": opt.state_dict(),
                                     "generator": gen.get_state()})

    tokens, embeds = cache["tokens"].to(model.device), cache["embeds"].to(model.device)
    img_ids, txt_ids = cache["image_ids"].to(model.device), cache["text_ids"].to(model.device)
    weights = None if masks is None else torch.stack([token_weights(masks[i.name][0], resolution, cache["image_ids"],
                                                                    unmasked_weight) for i in kept]).to(model.device)
    if model.name == "flex2":
        from fluxframe.plugins.flex2.family import flux1_mu

        mu = flux1_mu(tokens.shape[1], **model.shift)  # the Flux.1 schedule's shift at this size
        pooled = cache["pooled"].to(model.device)
        channels = Flex2Channels(model, resolution, inpaint_dropout, control_dropout,
                                 cache["control"] if control else None) if flex2 else None
        # Flex.2 trains with its guidance embedder bypassed (see guidance_bypassed); plain Flux.1 dev at the
        # model's default guidance, as FLUX.2 dev does
        guidance = None if flex2 or transformer.guidance_in is None else model.default_guidance
    else:
        from fluxframe.plugins.flux2.family import empirical_mu

        mu = empirical_mu(tokens.shape[1], model.default_steps)  # the shift the sampler's schedule uses here
        pooled = channels = None
        guidance = model.default_guidance if model.embedded_guidance else None

    def predict(x0, noise, sigma, idx, extra=None, dropped=None):
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        g = None if guidance is None else torch.full((len(idx),), float(guidance), device=model.device)
        text = embeds[idx]
        if dropped is not None:  # --caption-dropout: these items see the empty prompt
            text = torch.where(dropped[:, None, None], cache["empty_embeds"].to(text), text)
        if pooled is None:
            return transformer(xt.to(model.dtype), img_ids, text.to(model.dtype), txt_ids, sigma, g)
        vector = pooled[idx]
        if dropped is not None and "empty_pooled" in cache:
            vector = torch.where(dropped[:, None], cache["empty_pooled"].to(vector), vector)
        x = model.model_input(xt.to(model.dtype), Conditioning(channels=extra or {}))
        with guidance_bypassed(transformer) if flex2 else nullcontext():
            return transformer(x, img_ids, text.to(model.dtype), txt_ids, vector.to(model.dtype), sigma, g)

    def probe_loss() -> float:
        """The loss at fixed noise and sigmas (0.25, 0.5, 0.75) on the first items, without inpaint or control:
        unlike the training loss, which varies with the sigmas drawn, it shows what training changed."""
        probe = torch.Generator().manual_seed(seed + 1)
        idx = torch.arange(min(len(tokens), 8))
        total = 0.0
        with torch.no_grad():
            for s in (0.25, 0.5, 0.75):
                x0 = tokens[idx].to(model.dtype)
                noise = torch.randn(x0.shape, generator=probe).to(x0)
                sigma = torch.full((len(idx),), s, device=model.device)
                total += F.mse_loss(predict(x0, noise, sigma, idx).float(), (noise - x0).float()).item() / 3
        return round(total, 6)

    sample_meta = {"fluxframe_lora": "1", "base_checkpoint": settings["base"], "dataset_sha256": data_hash,
                   "rank": str(rank), "alpha": json.dumps(alpha), "alpha_folded_into_lora_B": "true"}
    from tqdm import tqdm

    if "probe_start" not in state:
        state["probe_start"] = probe_loss()
    bar = tqdm(total=steps, initial=state["step"], desc="train-lora", unit="step", disable=not sys.stderr.isatty())
    this_run = 0
    while state["step"] < steps:
        with model.memory.using("transformer", transformer, model.device):
            while state["step"] < steps:
                idx = torch.randint(0, len(tokens), (batch_size,), generator=gen)
                x0 = tokens[idx].to(model.dtype)
                noise = torch.randn(x0.shape, generator=gen).to(x0)
                sigma = sample_sigmas(batch_size, mu, gen)
                if low_noise:
                    sigma = emphasise_low_noise(sigma, low_noise, LOW_NOISE_MAX, gen)
                sigma = sigma.to(model.device)
                extra = channels(x0, idx, gen) if channels is not None else None
                dropped = (torch.rand(batch_size, generator=gen) < caption_dropout).to(model.device) \
                    if caption_dropout else None
                pred = predict(x0, noise, sigma, idx, extra, dropped)
                loss = masked_mse(pred.float(), (noise - x0).float(), None if weights is None else weights[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if after_backward is not None:
                    after_backward(loras)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                state["step"] += 1
                state["losses"].append(round(loss.item(), 6))
                this_run += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if state["step"] % checkpoint_every == 0 and state["step"] < steps:
                    checkpoint()
                if stop_after is not None and this_run >= stop_after and state["step"] < steps:
                    checkpoint()
                    bar.close()
                    return out
                if sample_every and state["step"] % sample_every == 0:
                    break  # the samples run outside the transformer's use: generation brackets its own
        if sample_every and state["step"] % sample_every == 0:
            made = draw_samples(pipeline, loras, sample_prompts, samples_dir, state["step"], seed, sample_meta)
            state.setdefault("samples", []).extend(str(p.name) for p in made)
    bar.close()

    record = {
        "fluxframe_lora": 1, "base_checkpoint": settings["base"], "dataset_sha256": data_hash,
        "items": len(items), "trained_on": len(kept), "skipped": skipped, "rank": rank, "alpha": alpha,
        "alpha_folded_into_lora_B": True, "steps": steps, "lr": lr, "batch_size": batch_size,
        "resolution": resolution, "targets": list(targets), "seed": seed, "schedule_mu": mu,
        "low_noise": {"share": low_noise, "below": LOW_NOISE_MAX} if low_noise else None,
        "caption_dropout": caption_dropout or None, "loss_masks": settings.get("loss_masks"),
        "quantize": quantized, "gradient_checkpointing": gradient_checkpointing or None,
        "conditioning": settings.get("conditioning"),
        "guidance_embedding": "bypassed" if flex2 and transformer.guidance_in is not None else None,
        "final_loss": sum(state["losses"][-10:]) / len(state["losses"][-10:]),
        "probe_loss_start": state["probe_start"], "probe_loss_end": probe_loss(), "command": command,
        "seconds_this_run": round(time.time() - started, 1),
    }
    metadata = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in record.items() if v is not None}
    tensors = lora_tensors(loras)
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    record["lora_sha256"] = "sha256:" + sha256_file(out)
    record["losses"] = state["losses"]
    if sample_every:
        record["samples"] = {"folder": samples_dir.name, "every": sample_every, "prompts": list(sample_prompts),
                             "seed": seed, "files": state.get("samples", [])}
    atomic_write(paths["record"], lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8"))
    if pipeline.stages.audit is not None:  # the deployment's own record: what it trained, on what, what it refused
        pipeline.stages.audit.append({
            "event": "train-lora", "lora": str(out), "lora_sha256": record["lora_sha256"],
            "base_checkpoint": settings["base"], "dataset_sha256": data_hash, "items": len(items),
            "trained_on": len(kept), "rank": rank, "alpha": alpha, "steps": steps, "seed": seed,
            "skipped": [{"file": e["file"], "decision": e["decision"]} for e in filtered]})
    for leftover in (paths["state"], paths["cache"]):
        leftover.unlink(missing_ok=True)
    return out


def run(args) -> int:
    from fluxframe.core.config import load_config

    command = " ".join(["fluxframe train-lora"] + [a if " " not in a else repr(a) for a in sys.argv[2:]]) \
        if len(sys.argv) > 1 and sys.argv[1] == "train-lora" else None
    targets = None if args.targets is None else tuple(t.strip() for t in args.targets.split(",") if t.strip())
    kinds = None if args.control_kinds is None else tuple(k.strip() for k in args.control_kinds.split(",")
                                                          if k.strip())
    out = train(load_config(args.config), args.data, args.out, rank=args.rank, alpha=args.alpha, steps=args.steps,
                lr=args.lr, batch_size=args.batch_size, resolution=args.resolution, targets=targets,
                seed=args.seed, checkpoint_every=args.checkpoint_every, strict=args.strict, quantize=args.quantize,
                gradient_checkpointing=args.gradient_checkpointing, sample_every=args.sample_every,
                sample_prompts=tuple(args.sample_prompt or ()), inpaint_dropout=args.inpaint_dropout,
                control_dropout=args.control_dropout, control_kinds=kinds, low_noise=args.low_noise,
                caption_dropout=args.caption_dropout, loss_masks=args.loss_masks,
                unmasked_weight=args.unmasked_weight, overwrite=args.overwrite, command=command)
    print(f"wrote {out} and {_paths(out)['record'].name}")
    return 0
