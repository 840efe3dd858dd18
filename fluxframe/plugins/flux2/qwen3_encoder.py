"""FLUX.2 klein prompt encoder: Qwen3 (4B for klein 4B, 8B for klein 9B) through transformers.

Each prompt is a single user message rendered with the checkpoint's chat template with the generation prompt and
thinking switched off, padded and truncated to 512 tokens; the hidden states after decoder layers 9, 18 and 27 are
concatenated per token into (B, 512, 3 * hidden). This matches diffusers' `Flux2KleinPipeline._get_qwen3_prompt_embeds`.
Same API as `MistralPromptEncoder`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxframe.errors import CheckpointError

from .text_encoder import HiddenStateEncoder, _load_tokenizer, generate_text, read_encoder_config


class Qwen3PromptEncoder(HiddenStateEncoder):
    """Turns prompts into FLUX.2 klein text embeddings with a Qwen3 model and its tokenizer."""

    hidden_layers = (9, 18, 27)
    tapped_by = "FLUX.2 klein"
    model_type = "qwen3"

    def __init__(self, model, tokenizer, *, max_length: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._text_config = model.config
        self.check_layers(self._text_config, None)
        if getattr(tokenizer, "chat_template", None) is None:
            raise CheckpointError("the tokenizer has no chat template")
        self._backbone = getattr(model, "model", model)  # hidden states without the B x L x vocab logits
        self._trim_padding_keys()

    @classmethod
    def from_pretrained(cls, text_encoder_dir: Path, tokenizer_dir: Path, *, dtype: torch.dtype,
                        device: torch.device) -> Qwen3PromptEncoder:
        from safetensors import SafetensorError
        from transformers import Qwen3ForCausalLM

        text_encoder_dir, tokenizer_dir = Path(text_encoder_dir), Path(tokenizer_dir)
        config_file = text_encoder_dir / "config.json"
        config = read_encoder_config(text_encoder_dir, cls.model_type, "Qwen3")
        cls.check_layers(config, str(config_file))
        tokenizer = _load_tokenizer(tokenizer_dir)
        try:
            model = Qwen3ForCausalLM.from_pretrained(text_encoder_dir, config=config, dtype=dtype, use_safetensors=True,
                                                     local_files_only=True, device_map=torch.device(device))
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(f"cannot load the text encoder weights: {exc}", file=str(text_encoder_dir)) from exc
        return cls(model.eval(), tokenizer)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_length, embed_dim) embeddings, in the model's dtype and on its device."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=False)
                 for p in prompts]
        batch = self.tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                               max_length=self.max_length)
        return self._stacked_taps(batch["input_ids"], batch["attention_mask"])

    def upsample(self, prompt: str, system_message: str, *, max_new_tokens: int = 512, temperature: float = 0.15,
                 seed: int = 0) -> str:
        messages = [{"role": "system", "content": system_message}, {"role": "user", "content": prompt}]
        return generate_text(self.model, self.tokenizer, messages, max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed, enable_thinking=False)
