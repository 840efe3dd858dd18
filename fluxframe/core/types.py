"""Plain data passed between the stages of a run: the request, what the model works on, the result."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class GenerationRequest:
    """One image to make. Fields left as None take the config's [sampler] defaults, then the model's.

    prompt_embeds: a file written by `fluxframe encode`, used instead of ``prompt`` (the text encoder is not loaded).
    upsample_prompt: let the model's text encoder rewrite the prompt into a detailed one first (FLUX.2).
    output: the file to write (its suffix names the format); default: the config's [output] folder and name.
    overwrite: replace ``output`` if it exists (never a file the deployment itself reads or writes).
    request_id: 1-128 letters, digits, "-" or "_"; it names the output file by default.
    """

    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    output: Path | None = None
    # Per-request conditioner inputs, by conditioner name: {"reference": {"images": [...]}}.
    conditioning: dict[str, dict[str, Any]] = field(default_factory=dict)
    prompt_embeds: Path | None = None  # the runner reads it once into a fluxframe.core.inputs.InputFile
    upsample_prompt: bool = False
    overwrite: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    client: str | None = None  # who asked (a service's token name): recorded in the audit line


@dataclass
class TextConditioning:
    """Prompt embeddings and their position ids, as the model family's encoder produced them."""

    embeds: torch.Tensor  # (B, L, D)
    ids: torch.Tensor  # (L, axes)
    negative: TextConditioning | None = None  # the negative prompt's, when the model runs true CFG


@dataclass
class Latents:
    """Image tokens being denoised, with the grid they came from."""

    tokens: torch.Tensor  # (B, N, C)
    ids: torch.Tensor  # (N, axes)
    grid: tuple[int, int]  # (h, w) in tokens


@dataclass
class Conditioning:
    """What conditioners add to the model input. The model family decides how to use each part.

    extra_tokens: (tokens (B, M, C), ids (M, axes)) appended after the image tokens; the
        prediction for them is cut away (FLUX.2 reference images).
    channels: named per-token channel groups (B, N, C') the family concatenates to the image
        tokens in its own fixed order (Flex.2: "inpaint", "mask", "control"); a family fills in
        its defaults for groups nobody set. Families that take them are ChannelConditioned.
    step_hooks: called as hook(step, num_steps, conditioning) before each step, e.g. to switch
        control channels off after a fraction of the steps.
    info: what each conditioner did, for the result and the audit record.
    """

    extra_tokens: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    channels: dict[str, torch.Tensor] = field(default_factory=dict)
    step_hooks: list[Any] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepInfo:
    """Passed to the per-step callback (progress bars, previews, cancellation)."""

    step: int
    num_steps: int
    sigma: float
    latents: torch.Tensor
    request_ids: tuple[str, ...] = ()  # the requests this step ran for (a batch of generate_many: all of them)


@dataclass
class GenerationResult:
    """A finished run: the image, where it was written and what produced it."""

    request_id: str
    image: Any  # PIL.Image.Image
    path: Path | None
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    prompt: str | None
    model_family: str
    timings: dict[str, float] = field(default_factory=dict)
    verdicts: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    latents: Any = None  # the denoised latent tokens (B, N, C), before decoding
    audit: dict | None = None  # the audit record written for this request
    upsampled_prompt: str | None = None  # what the model rewrote the prompt into, when asked to
    # [sampler.cache]: its settings and the DiT evaluations computed in full and reused (None: no step cache)
    step_cache: dict | None = None
    # [model] compile: how the DiT's blocks ran (None: compile not asked for; see ModelFamily.describe)
    compile: dict | None = None
