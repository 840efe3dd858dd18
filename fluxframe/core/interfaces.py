"""The interfaces plugins implement. The core knows only these; every concrete model, sampler,
filter or postprocessor lives in a plugin and reaches the core through a ``register_*`` hook.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from fluxframe.core.config import Config
    from fluxframe.core.inputs import InputFile
    from fluxframe.core.types import (
        Conditioning,
        GenerationRequest,
        Latents,
        StepInfo,
        TextConditioning,
    )


@dataclass(frozen=True)
class ModelLimits:
    """What a model family accepts; the runner checks requests against these before any work."""

    latent_channels: int
    pixel_multiple: int  # width and height must be multiples of this
    max_references: int = 0
    max_text_tokens: int = 512
    min_size: int = 16
    max_size: int = 4096


class ModelFamily(ABC):
    """A loaded model of one family: its denoiser, autoencoder and text encoder(s)."""

    name: ClassVar[str]
    limits: ModelLimits
    default_steps: ClassVar[int] = 50
    default_guidance: ClassVar[float] = 4.0
    #: Whether ``encode_prompts``, ``predict`` (with text, extra tokens and channel groups of batch B) and ``decode``
    #: take B images at once and give each what it gets alone; ``Pipeline.generate_many`` then runs compatible
    #: requests as one batch. False: it runs them one by one.
    batched: ClassVar[bool] = False
    #: Whether ``predict`` takes a ``cache`` (a StepCacheRun, given only when ``[sampler.cache]`` is configured):
    #: the family runs its DiT's first block, then hands the rest to ``cache.run``. False: a configured step cache
    #: is a ConfigError naming ``sampler.cache``.
    takes_step_cache: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def load(cls, config: Config, memory: MemoryStrategy) -> ModelFamily:
        """Load from the config's [model] section (path, dtype, device), placing weights as ``memory`` says."""

    @classmethod
    def check(cls, config: Config) -> list[str]:
        """Cheap checks of the config against the checkpoint (files exist, layout known), without loading
        weights. Returns warnings; raises FluxframeError for what cannot work."""
        return []

    @classmethod
    def limits_for(cls, config: Config) -> ModelLimits | None:
        """The limits this config's checkpoint gives, read from its config files without loading weights
        (``fluxframe config check`` holds the ``[sampler]`` size against them). None: not known before loading."""
        return None

    @property
    @abstractmethod
    def checkpoint_id(self) -> str:
        """A stable identity of the loaded weights (e.g. a hash of the config and weight file headers)."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> TextConditioning:
        """Prompt embeddings for a batch of prompts."""

    @abstractmethod
    def initial_noise(self, seed: int, width: int, height: int) -> Latents:
        """The starting noise for one image, drawn reproducibly from the seed."""

    @abstractmethod
    def sigmas(self, steps: int, image_tokens: int) -> torch.Tensor:
        """The noise levels of the schedule, steps + 1 values from 1 down to 0 (float32)."""

    @abstractmethod
    def predict(
        self,
        latents: torch.Tensor,
        latent_ids: torch.Tensor,
        sigma: torch.Tensor,
        text: TextConditioning,
        conditioning: Conditioning,
        guidance: float,
        cache: StepCacheRun | None = None,
    ) -> torch.Tensor:
        """The velocity of the image tokens (B, N, C) at noise level sigma. ``cache`` is passed only to families
        that declare ``takes_step_cache``, and only when a step cache is configured."""

    @abstractmethod
    def encode_image(self, images: torch.Tensor) -> Latents:
        """Images (B, 3, H, W) in [-1, 1] to latent tokens (used by conditioners)."""

    @abstractmethod
    def decode(self, latents: Latents) -> torch.Tensor:
        """Latent tokens to images (B, 3, H, W) in [-1, 1]."""

    def true_cfg(self, guidance: float) -> bool:
        """Whether this guidance runs true classifier-free guidance, i.e. needs negative prompt embeddings
        (``TextConditioning.negative``). Guidance-distilled models say False and refuse negative prompts."""
        return False

    def upsample_prompt(self, prompt: str, seed: int) -> str:
        """Rewrite a short prompt into a detailed one with the model's own text encoder (optional)."""
        from fluxframe.errors import RequestError

        raise RequestError(f"model family {self.name!r} cannot upsample prompts", field="upsample_prompt")

    def load_prompt_embeds(self, source: InputFile) -> tuple[TextConditioning, str | None, str | None]:
        """Embeddings written by ``fluxframe encode``, read once by the runner (``source.data`` are the file's
        bytes): (conditioning, stored prompt, stored negative prompt). Must refuse files from another encoder and
        must not load the text encoder."""
        from fluxframe.errors import RequestError

        raise RequestError(f"model family {self.name!r} cannot use prompt embeddings files", field="prompt_embeds")

    @classmethod
    def encode_to_file(cls, config: Config, prompt: str, output: Path, negative_prompt: str | None = None) -> Path:
        """Run only the text encoder and write the prompt embeddings file (``fluxframe encode``)."""
        from fluxframe.errors import RequestError

        raise RequestError(f"model family {cls.name!r} cannot encode prompts on their own", field="prompt")

    def apply_loras(self, loras: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Apply LoRAs to the denoiser, replacing those applied before (an empty list removes them). Each is
        a dict with ``path`` (a Path), ``weight``, ``mode`` ("auto", "fuse" or "side") and ``key`` (its config
        key, for messages). Returns one record per LoRA (file, sha256, weight, mode, layers), also kept in
        ``self.loras`` for the audit log and provenance."""
        from fluxframe.errors import ConfigError

        raise ConfigError(f"model family {self.name!r} does not take LoRAs", key="lora")

    #: Records of the LoRAs applied (see ``apply_loras``).
    loras: Sequence[dict[str, Any]] = ()
    #: What ``[model] compile = true`` did, set by the family's ``load``: ``{"enabled": True, "backend", "blocks"}``,
    #: or ``{"enabled": False, "reason"}`` where it ran uncompiled. None: compile was not asked for.
    compiled: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        """Facts for logs and provenance records."""
        facts = {"family": self.name, "checkpoint": self.checkpoint_id}
        if self.loras:
            facts["loras"] = [dict(record) for record in self.loras]
        if self.compiled is not None:
            facts["compile"] = dict(self.compiled)
        return facts


class ChannelConditioned(ABC):
    """What a model family offers conditioners that fill ``Conditioning.channels``: extra input channels per image
    token beside the noisy latents (Flex.2: an inpaint latent, a mask and a control latent). A family opts in by
    subclassing this beside ModelFamily; conditioners reach those channels through these members only
    (``fluxframe.core.channels.require_channels`` checks a model has them). Channel groups may be given on any
    device and in any dtype: the family moves them to its own."""

    @property
    @abstractmethod
    def channel_groups(self) -> dict[str, int]:
        """The channel groups the loaded checkpoint reads, by name, with their width per token, in the order the
        family concatenates them (Flex.2: inpaint 64, mask 4, control 64; none for a plain Flux.1 checkpoint)."""

    @abstractmethod
    def token_grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, columns) of image tokens of a width × height output; channel groups have rows · columns tokens."""

    @abstractmethod
    def encode_tokens(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] as latent tokens (B, N, C) in the token layout the channel groups take
        (VAE-encoded, normalised, packed). ``generator`` samples the VAE posterior; without one, its mean is used."""

    @abstractmethod
    def mask_tokens(self, mask: torch.Tensor, width: int, height: int, *, per_channel: bool = False) -> torch.Tensor:
        """A mask (B, 1, h, w) in [0, 1], of any size with the output's aspect ratio, in the token layout of a
        width × height output: resized (bilinear) to the latent resolution, with one value per latent pixel of each
        token, (B, N, P); with ``per_channel``, each value repeated for every latent channel of its pixel, (B, N, C),
        lined up with ``encode_tokens``' channels (so ``tokens * (1 - mask)`` blanks the masked latent pixels)."""


class Conditioner(ABC):
    """Turns request inputs (reference images, masks, control images ...) into conditioning."""

    name: ClassVar[str]
    #: Model family names this conditioner works with; empty means any.
    families: ClassVar[tuple[str, ...]] = ()
    #: Input keys whose values are files (a path, or a list of paths). The runner reads each file once into
    #: memory (``fluxframe.core.inputs.InputFile``) before any filter runs and hands the conditioner those
    #: objects instead of the paths, so the filters, the audit hashes and the model all use the same bytes.
    file_inputs: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def prepare(
        self, model: ModelFamily, request: GenerationRequest, inputs: dict[str, Any], conditioning: Conditioning
    ) -> None:
        """Add to ``conditioning`` from this request's ``inputs`` (``{}`` when the request gave none:
        then use the configured options, or do nothing)."""

    def input_images(self, inputs: dict[str, Any]) -> list[Any]:
        """Every image this conditioner will feed the model for these inputs (PIL images), so the
        input filters check exactly what the model sees."""
        return []


class Sampler(ABC):
    """The denoising loop over a sigma schedule."""

    name: ClassVar[str]
    #: Whether a step cache may serve this sampler's model calls: it calls ``velocity`` once per step, in step
    #: order, so "the last fully computed step" means what the cache assumes. False: ``[sampler.cache]`` is a
    #: ConfigError naming ``sampler.cache``.
    takes_step_cache: ClassVar[bool] = False

    @abstractmethod
    def sample(
        self,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        velocity: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
        callback: Callable[[StepInfo], None] | None = None,
    ) -> torch.Tensor:
        """Integrate from sigmas[0] to sigmas[-1]; ``velocity(x, sigma, step)`` calls the model."""


class StepCacheRun(ABC):
    """One denoising run's step-cache state (``StepCache.start``), handed to ``ModelFamily.predict``. Per image of
    the batch and per ``stream`` (the positive and the negative pass of true CFG each keep their own), it decides
    whether the DiT's remaining blocks run or their residual from the last fully computed step is reused."""

    #: What the model family probes with: "first-block" — it runs the first double block and hands ``run`` that
    #: block's residual as the probe, its output as ``hidden`` and the remaining blocks as ``rest``;
    #: "modulated-input" — it runs no block first and hands the first double block's timestep-modulated image input
    #: as the probe, the blocks' input as ``hidden`` and all the blocks as ``rest``.
    probe: ClassVar[str] = "first-block"

    @abstractmethod
    def run(self, stream: str, probe: torch.Tensor | None, hidden: torch.Tensor,
            rest: Callable[[torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
        """The image-token hidden states (B, N, D) after every block. ``probe`` (B, ...) is what the first block(s)
        changed (their output minus their input; None: the family cannot probe, so everything runs), ``hidden`` the
        hidden states after them, ``rest(rows)`` runs the remaining blocks for those rows of the batch (a tensor of
        indices; None: all) and returns their hidden states after the last block."""

    @abstractmethod
    def invalidate(self, rows: Sequence[int]) -> None:
        """The conditioning of these images changed since the last step (e.g. control switched off): their next
        step is computed in full, in every stream."""

    @abstractmethod
    def counts(self) -> list[dict[str, int]]:
        """Per image of the batch: ``{"computed": n, "reused": m}``, DiT evaluations (true CFG: two per step)."""


class StepCache(ABC):
    """A step cache (``[sampler.cache] method = NAME``): skips most of the DiT on steps where its first block's
    output barely changed since the last step computed in full. The factory's keyword parameters are its options."""

    name: ClassVar[str]

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """The method and its options (``{"method": "first-block", "threshold": 0.1}``), for the result, the audit
        line and the C2PA generation assertion."""

    @abstractmethod
    def start(self, batch: int) -> StepCacheRun:
        """Fresh state for one denoising run of ``batch`` images."""


@dataclass
class OutputContext:
    """What postprocessors and output filters know about the image being finished."""

    request: GenerationRequest
    model: dict[str, Any]
    config: Config
    verdicts: list[Any] = field(default_factory=list)
    records: dict[str, Any] = field(default_factory=dict)  # what each postprocessor did, for the audit log
    step_cache: dict[str, Any] | None = None  # the step cache's settings and counts, when one is configured


class Postprocessor(ABC):
    """Runs on the decoded image and then on the written file, in ascending ``order``.

    The order is fixed by the core: pixel watermarks (100-199) before metadata and signing (200-299).
    """

    name: ClassVar[str]
    order: ClassVar[int] = 100

    def check_size(self, width: int, height: int) -> None:
        """Raise RequestError (naming ``width`` or ``height``) when this step cannot finish an image of this size.
        Called before any model work, so a request it cannot finish is refused, not generated and then not finished."""

    def process_image(self, image: Any, context: OutputContext) -> Any:
        """Change the PIL image before it is encoded (e.g. embed a watermark)."""
        return image

    def process_file(self, path: Path, media_type: str, context: OutputContext) -> None:
        """Change the encoded file in place before it is released (e.g. sign it)."""


@dataclass
class Verdict:
    """A filter's decision on one prompt or image."""

    filter: str
    version: str
    allowed: bool
    target: str  # "prompt", "negative_prompt", "input_image", "output_image"
    scores: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None
    reason: str = ""
    action: str = "allow"  # allow | block | modify


class Filter(ABC):
    """A safety filter: checks prompts, input images and/or the output image."""

    name: ClassVar[str]
    version: ClassVar[str] = "0"
    targets: ClassVar[frozenset[str]] = frozenset()

    def check_prompt(self, text: str, target: str) -> Verdict:
        raise NotImplementedError

    def check_image(self, image: Any, target: str) -> Verdict:
        raise NotImplementedError


class MemoryStrategy(ABC):
    """Decides where weights live and when they move.

    A *placement* strategy (``placement = True``) decides where the weights of the components it ``handles``
    live; a non-placement one (e.g. ``vae-tiling``) only changes how a component runs and leaves its weights
    where a placement strategy put them. Strategies compose (``[memory] strategy = ["group-offload",
    "vae-tiling"]``) through ``ComposedStrategy``.
    """

    name: ClassVar[str]
    placement: ClassVar[bool] = True
    #: A non-placement strategy that replaces a component's weights (``quantize``): composed, its ``place``
    #: runs before the placement strategy's, so that one moves the new weights, and where no placement
    #: strategy handles the component, its ``load_device`` says where to load it.
    rewrites_weights: ClassVar[bool] = False

    def handles(self, component: str) -> bool:
        """Whether this strategy places ``component`` when it is composed with others (standalone, a strategy
        places every component it is given)."""
        return True

    def load_device(self, component: str, device: Any) -> Any:
        """Where a model family should load ``component``'s weights before ``place`` (an offloading strategy
        says the CPU, so the weights never pass through the accelerator's memory)."""
        return device

    def while_loading(self, component: str, module: Any) -> Callable[[str], None] | None:
        """Called with ``component``'s module as built, before any weight is read (families build on the meta
        device); may return a function the loader then calls with each state-dict key as soon as that tensor
        is in place. ``quantize`` uses it to rewrite each layer the moment it is whole, so the full-precision
        weights are never all in memory at once. None: nothing to do while loading."""
        return None

    @abstractmethod
    def place(self, component: str, module: Any, device: Any) -> Any:
        """Called once per component after loading; returns the module to use."""

    def before_use(self, component: str, module: Any, device: Any) -> None:
        """Called before a component runs (e.g. move it to the device)."""

    def after_use(self, component: str, module: Any, device: Any) -> None:
        """Called after a component ran (e.g. move it back to the CPU)."""

    @contextmanager
    def using(self, component: str, module: Any, device: Any) -> Iterator[Any]:
        """``with memory.using("vae", vae, device):`` brackets one use of a component."""
        self.before_use(component, module, device)
        try:
            yield module
        finally:
            self.after_use(component, module, device)


#: The components the built-in model families place and use.
COMPONENTS = ("text_encoder", "transformer", "vae")


class ComposedStrategy(MemoryStrategy):
    """Several strategies at once. Each component is placed by the first placement strategy in the list that
    ``handles`` it (none handling it: kept on the device, as ``none`` does); then every non-placement strategy
    wraps it, in list order, except those that rewrite weights, which run first. ``before_use`` runs in list
    order, ``after_use`` in reverse."""

    name = "composed"

    def __init__(self, strategies: list[MemoryStrategy]):
        placers = [s for s in strategies if s.placement]
        for i, strategy in enumerate(placers):
            if not any(strategy.handles(c) and not any(p.handles(c) for p in placers[:i]) for c in COMPONENTS):
                raise ValueError(f"memory strategy {strategy.name!r} would place nothing: every component it "
                                 f"handles is placed by a strategy listed before it")
        self.strategies = list(strategies)
        self.name = "+".join(s.name for s in strategies)

    def _placer(self, component: str) -> MemoryStrategy | None:
        return next((s for s in self.strategies if s.placement and s.handles(component)), None)

    def _involved(self, component: str) -> list[MemoryStrategy]:
        placer = self._placer(component)
        return [s for s in self.strategies if s is placer or not s.placement]

    def load_device(self, component, device):
        placer = self._placer(component)
        if placer is not None:
            return placer.load_device(component, device)
        return next((s.load_device(component, device) for s in self.strategies if s.rewrites_weights), device)

    def while_loading(self, component, module):
        hooks = [h for s in self.strategies if (h := s.while_loading(component, module)) is not None]
        if not hooks:
            return None

        def loaded(key: str) -> None:
            for hook in hooks:
                hook(key)

        return loaded

    def place(self, component, module, device):
        for strategy in self.strategies:
            if not strategy.placement and strategy.rewrites_weights:
                module = strategy.place(component, module, device)
        placer = self._placer(component)
        module = module.to(device) if placer is None else placer.place(component, module, device)
        for strategy in self.strategies:
            if not strategy.placement and not strategy.rewrites_weights:
                module = strategy.place(component, module, device)
        return module

    def before_use(self, component, module, device):
        for strategy in self._involved(component):
            strategy.before_use(component, module, device)

    def after_use(self, component, module, device):
        for strategy in reversed(self._involved(component)):
            strategy.after_use(component, module, device)
