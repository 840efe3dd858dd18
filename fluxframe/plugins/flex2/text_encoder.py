"""Flux.1's two text encoders through transformers: T5 (the per-token embeddings, 512 tokens) and CLIP-L
(the pooled vector), prompted as diffusers' FluxPipeline prompts them: both padded to their maximum
length, no attention mask, CLIP's pooled output taken at its end-of-text token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxframe.errors import CheckpointError
from fluxframe.plugins.common.bounds import text_encoder_config
from fluxframe.plugins.common.loading import require_safetensors

T5_TOKENS = 512
CLIP_TOKENS = 77


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not folder.is_dir():
        raise CheckpointError("the tokenizer folder does not exist", file=str(folder))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception:  # noqa: BLE001 - AutoTokenizer may want a class this folder lacks
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot load the tokenizer: {exc}", file=str(folder)) from exc
    if tokenizer.pad_token_id is None:
        raise CheckpointError("the tokenizer has no pad token", file=str(folder))
    return tokenizer


def _model(cls, folder: Path, model_type: str, dtype, device):
    from safetensors import SafetensorError
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise CheckpointError("the text encoder folder has no config.json", file=str(folder))
    require_safetensors(folder)
    text_encoder_config(folder)  # sizes within sane bounds before transformers builds anything from them
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"unreadable text encoder config: {exc}", file=str(folder / "config.json")) from exc
    if config.model_type not in model_type.split("|"):
        raise CheckpointError(f"expected model_type {model_type!r}, got {config.model_type!r}",
                              file=str(folder / "config.json"), key="model_type")
    try:
        model = cls.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"cannot load the text encoder weights: {exc}", file=str(folder)) from exc
    return model.to(device).eval().requires_grad_(False)


class Flux1PromptEncoder(torch.nn.Module):
    """prompts -> (T5 embeddings (B, max_length, D), CLIP pooled (B, 768))."""

    def __init__(self, clip, clip_tokenizer, t5, t5_tokenizer, *, max_length: int = T5_TOKENS):
        super().__init__()
        self.clip, self.t5 = clip, t5
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        self.max_length = max_length
        self.clip_length = min(clip_tokenizer.model_max_length, clip.config.max_position_embeddings)

    @classmethod
    def from_folder(cls, folder: Path, *, dtype, device, max_length: int = T5_TOKENS) -> Flux1PromptEncoder:
        """From a diffusers Flux folder: text_encoder/ + tokenizer/ (CLIP), text_encoder_2/ + tokenizer_2/ (T5)."""
        from transformers import CLIPTextModel, T5EncoderModel

        clip = _model(CLIPTextModel, folder / "text_encoder", "clip_text_model|clip", dtype, device)
        t5 = _model(T5EncoderModel, folder / "text_encoder_2", "t5|umt5", dtype, device)
        return cls(clip, _tokenizer(folder / "tokenizer"), t5, _tokenizer(folder / "tokenizer_2"),
                   max_length=max_length)

    @property
    def embed_dim(self) -> int:
        return self.t5.config.d_model

    @property
    def pooled_dim(self) -> int:
        return self.clip.config.hidden_size

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.t5.device
        clip_ids = self.clip_tokenizer(prompts, padding="max_length", max_length=self.clip_length, truncation=True,
                                       return_tensors="pt").input_ids
        pooled = self.clip(clip_ids.to(self.clip.device), output_hidden_states=False).pooler_output
        t5_ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                   return_tensors="pt").input_ids
        embeds = self.t5(t5_ids.to(device), output_hidden_states=False)[0]
        return embeds, pooled
