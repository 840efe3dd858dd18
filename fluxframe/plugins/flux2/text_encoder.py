"""FLUX.2 dev prompt encoder: Mistral Small 3.x through transformers.

Each prompt goes through the checkpoint's chat template as [FLUX.2 system message, user prompt], padded and
truncated to 512 tokens; the hidden states after decoder layers 10, 20 and 30 are concatenated per token into
(B, 512, 3 * hidden). This matches diffusers' `Flux2Pipeline._get_mistral_3_small_prompt_embeds`.

Only the tokenizer of the checkpoint's `tokenizer/` folder (a PixtralProcessor folder) is loaded, never the processor:
the processor pulls in torchvision for images that FLUX.2 text-to-image never gives it.

Also shared by the klein encoder (qwen3_encoder.py): the encoder identity recorded in embeddings files, and one
chat completion for prompt upsampling.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from fluxframe.errors import CheckpointError
from fluxframe.plugins.common import bounds
from fluxframe.plugins.common.loading import require_safetensors

SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)

# The FLUX.2 reference's text-to-image prompt upsampling instruction (diffusers: SYSTEM_MESSAGE_UPSAMPLING_T2I).
UPSAMPLING_SYSTEM_MESSAGE = (
    "You are an expert prompt engineer for FLUX.2 by Black Forest Labs. Rewrite user prompts to be more descriptive "
    "while strictly preserving their core subject and intent.\n\nGuidelines:\n1. Structure: Keep structured inputs "
    "structured (enhance within fields). Convert natural language to detailed paragraphs.\n2. Details: Add concrete "
    "visual specifics - form, scale, textures, materials, lighting (quality, direction, color), shadows, spatial "
    "relationships, and environmental context.\n3. Text in Images: Put ALL text in quotation marks, matching the "
    "prompt's language. Always provide explicit quoted text for objects that would contain text in reality (signs, "
    "labels, screens, etc.) - without it, the model generates gibberish.\n\nOutput only the revised prompt and "
    "nothing else."
)

# Config fields that say how a model was loaded or run, not what it computes; they must not change the identity.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "architectures",
}


def read_encoder_config(folder: Path, model_type: str, label: str):
    """The text encoder's transformers config, checked before any weights are read: the folder and its
    config.json exist, the weights are safetensors, the sizes are within sane bounds, and the model_type is
    the one expected."""
    from transformers import AutoConfig

    config_file = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError("the text encoder folder does not exist", file=str(folder))
    if not config_file.is_file():
        raise CheckpointError("the text encoder folder has no config.json", file=str(config_file))
    require_safetensors(folder)
    bounds.text_encoder_config(folder)  # before transformers builds anything from its sizes
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"unreadable text encoder config: {exc}", file=str(config_file)) from exc
    if config.model_type != model_type:
        raise CheckpointError(f"expected a {label} text encoder (model_type {model_type!r}), got {config.model_type!r}",
                              file=str(config_file), key="model_type")
    return config


TRIMMED_SDPA = "fluxframe-trimmed-sdpa"


def trimmed_sdpa(module, query, key, value, attention_mask, *args, attended_keys: int | None = None, **kwargs):
    """transformers' sdpa attention over the first ``attended_keys`` keys only. Prompts are padded (on the right) to
    512 tokens for a few dozen real ones, and a padding key is masked for every query, so a batch's keys past its
    longest prompt change nothing but cost most of the attention: dropping them gives the same hidden states (up to
    summation order) for a fraction of the work. Without ``attended_keys`` (generation, a cache) it is plain sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attended_keys is not None and attention_mask is not None and attention_mask.shape[-1] == key.shape[2]:
        key, value = key[:, :, :attended_keys], value[:, :, :attended_keys]
        attention_mask = attention_mask[..., :attended_keys]
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def attended_keys(attention_mask: torch.Tensor) -> int:
    """One past the last position any prompt of the batch attends to (its padding mask, (B, L), 1 = token)."""
    columns = attention_mask.any(dim=0).nonzero()
    return int(columns[-1]) + 1 if len(columns) else attention_mask.shape[1]


class HiddenStateEncoder:
    """What the FLUX.2 prompt encoders share: run the language model and stack the hidden states of
    ``hidden_layers`` into (B, L, len(hidden_layers)·hidden) embeddings. Subclasses tokenize."""

    hidden_layers: tuple[int, ...] = ()
    tapped_by = "FLUX.2"  # the model named in messages
    _text_config = None
    _backbone = None
    model = None

    @classmethod
    def check_layers(cls, text_config, config_file: str | None) -> None:
        """CheckpointError naming the config file when the language model is too shallow for the taps."""
        needed = max(cls.hidden_layers)
        if text_config.num_hidden_layers < needed:
            raise CheckpointError(
                f"the text encoder has {text_config.num_hidden_layers} hidden layers; {cls.tapped_by} taps layers "
                f"{list(cls.hidden_layers)}, so it needs at least {needed}",
                file=config_file,
                key="num_hidden_layers",
            )

    @property
    def embed_dim(self) -> int:
        return len(self.hidden_layers) * self._text_config.hidden_size

    @property
    def identity(self) -> dict:
        return encoder_identity(type(self.model).__name__, self._text_config, self.hidden_layers)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _trim_padding_keys(self) -> None:
        """Have the language model's sdpa attention skip the keys no query attends (see ``trimmed_sdpa``); another
        attention implementation (eager, flash) is left as it is."""
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        if getattr(self._text_config, "_attn_implementation", None) == "sdpa":
            AttentionInterface.register(TRIMMED_SDPA, trimmed_sdpa)
            AttentionMaskInterface.register(TRIMMED_SDPA, sdpa_mask)  # the padding mask sdpa gets, so ours too
            self._text_config._attn_implementation = TRIMMED_SDPA

    def _stacked_taps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = self.device
        trimmed = getattr(self._text_config, "_attn_implementation", None) == TRIMMED_SDPA
        extra = {"attended_keys": attended_keys(attention_mask)} if trimmed else {}
        output = self._backbone(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                output_hidden_states=True, use_cache=False, **extra)
        taps = torch.stack([output.hidden_states[i] for i in self.hidden_layers], dim=1)  # (B, 3, L, D)
        b, n, length, d = taps.shape
        return taps.permute(0, 2, 1, 3).reshape(b, length, n * d)

    def to(self, device):
        self.model.to(device)
        return self


class MistralPromptEncoder(HiddenStateEncoder):
    """Turns prompts into FLUX.2 dev text embeddings with a Mistral-3 model and its tokenizer."""

    hidden_layers = (10, 20, 30)
    max_length = 512

    def __init__(self, model, tokenizer, *, max_length: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._text_config = model.config.get_text_config()
        source = getattr(model, "name_or_path", "") or ""
        self.check_layers(self._text_config, str(Path(source) / "config.json") if source else None)
        if getattr(tokenizer, "chat_template", None) is None:
            raise CheckpointError("the tokenizer has no chat template")
        if tokenizer.pad_token_id is None:
            raise CheckpointError("the tokenizer has no pad token, so prompts cannot be padded to a fixed length")
        # The base model returns the same hidden states as the full model without computing B x L x vocab logits.
        self._backbone = getattr(model, "model", model)
        self._trim_padding_keys()

    @classmethod
    def from_pretrained(
        cls, text_encoder_dir: Path, tokenizer_dir: Path, *, dtype: torch.dtype, device: torch.device
    ) -> MistralPromptEncoder:
        from safetensors import SafetensorError
        from transformers import Mistral3ForConditionalGeneration

        text_encoder_dir, tokenizer_dir = Path(text_encoder_dir), Path(tokenizer_dir)
        config_file = text_encoder_dir / "config.json"
        config = read_encoder_config(text_encoder_dir, "mistral3", "Mistral-3")
        # Checked before loading so that a wrong checkpoint fails in milliseconds, not after reading 48 GB.
        cls.check_layers(config.get_text_config(), str(config_file))
        tokenizer = _load_tokenizer(tokenizer_dir)
        device = torch.device(device)
        try:
            model = Mistral3ForConditionalGeneration.from_pretrained(
                text_encoder_dir,
                config=config,
                dtype=dtype,
                use_safetensors=True,
                local_files_only=True,
                # Straight onto the device: staging 48 GB of bf16 weights in host memory first is slow and may not fit.
                device_map=device,
            )
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(f"cannot load the text encoder weights: {exc}", file=str(text_encoder_dir)) from exc
        model.eval()
        return cls(model, tokenizer)

    def upsample(self, prompt: str, system_message: str, *, max_new_tokens: int = 512, temperature: float = 0.15,
                 seed: int = 0) -> str:
        """Rewrite ``prompt`` with the model as a chat LLM, as diffusers' Flux2Pipeline.upsample_prompt does."""
        messages = [{"role": "system", "content": [{"type": "text", "text": system_message}]},
                    {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]}]
        return generate_text(self.model, self.tokenizer, messages, max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_length, embed_dim) embeddings, in the model's dtype and on its device."""
        if isinstance(prompts, str):
            prompts = [prompts]
        conversations = [
            [
                {"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
                # "[IMG]" would be read as an image placeholder with no image behind it.
                {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]},
            ]
            for prompt in prompts
        ]
        batch = self.tokenizer.apply_chat_template(
            conversations,
            add_generation_prompt=False,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
        )
        return self._stacked_taps(batch["input_ids"], batch["attention_mask"])


def encoder_identity(model_class: str, text_config, layers) -> dict:
    """What an embeddings file records about the encoder that made it: its class, the layers tapped and a hash
    of its text config (without the fields that only say how it was loaded). Computable from config.json alone."""
    config = {k: v for k, v in text_config.to_dict().items()
              if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return {
        "class": model_class,
        "hidden_size": text_config.hidden_size,
        "num_hidden_layers": text_config.num_hidden_layers,
        "layers": list(layers),
        "config_sha256": hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
    }


@torch.no_grad()
def generate_text(model, tokenizer, messages: list[dict], *, max_new_tokens: int, temperature: float, seed: int,
                  **template_kwargs) -> str:
    """One chat completion: sampled at ``temperature`` from a generator seeded with ``seed`` (greedy at 0)."""
    batch = tokenizer.apply_chat_template([messages], add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt", **template_kwargs)
    device = model.get_input_embeddings().weight.device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _load_tokenizer(folder: Path):
    """The fast tokenizer of `folder`, with the chat template the PixtralProcessor of that folder would use."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not folder.is_dir():
        raise CheckpointError("the tokenizer folder does not exist", file=str(folder))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception:  # noqa: BLE001 - AutoTokenizer may want a model config or a class this folder lacks
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot load the tokenizer: {exc}", file=str(folder)) from exc

    # Same order as the processor diffusers uses: chat_template.json, then chat_template.jinja (which the tokenizer
    # has already read over tokenizer_config.json's template), then the tokenizer's own.
    template = None
    json_file = folder / "chat_template.json"
    if json_file.is_file():
        try:
            template = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"unreadable chat template: {exc}", file=str(json_file)) from exc
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str) or not template.strip():
        raise CheckpointError(
            "no chat template: none in tokenizer_config.json, chat_template.jinja or chat_template.json",
            file=str(folder),
        )
    tokenizer.chat_template = template
    if tokenizer.pad_token_id is None:
        raise CheckpointError("the tokenizer has no pad token", file=str(folder))
    return tokenizer
