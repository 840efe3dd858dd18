"""Tiny random stand-ins for the FLUX.2 dev text encoder and its tokenizer.

The built-in `tiny` demo preset and the tests use these instead of the 24B Mistral Small 3.x checkpoint:
they have the real file layout (a transformers `Mistral3ForConditionalGeneration` folder with safetensors,
and a fast tokenizer folder with a Mistral-like chat template), so the real loading code is exercised,
but they build offline in about a second and produce meaningless embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxframe.plugins.common.tiny import CORPUS

SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
)

# Mistral-like: content is either a string or a list of {"type": "text"} parts, as FLUX.2 sends it.
CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}[SYSTEM_PROMPT]{{ text(message['content']) }}[/SYSTEM_PROMPT]"
    "{%- elif message['role'] == 'user' -%}[INST]{{ text(message['content']) }}[/INST]"
    "{%- elif message['role'] == 'assistant' -%}{{ text(message['content']) }}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def build_tiny_tokenizer(out_dir: Path) -> None:
    """Train a ~1000-token byte-level BPE offline and save it as a fast tokenizer folder with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS.splitlines(), trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=list(SPECIAL_TOKENS[4:]),
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)


def build_tiny_mistral3(
    out_dir: Path, *, vocab_size: int, seed: int = 0, hidden_size: int = 32, num_hidden_layers: int = 30
) -> None:
    """Save a randomly initialised tiny `Mistral3ForConditionalGeneration` (safetensors) to `out_dir`."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    heads = 2
    text_config = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=1,
        head_dim=hidden_size // heads,
        max_position_embeddings=4096,
        sliding_window=None,
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        tie_word_embeddings=False,
    )
    # The vision tower is never run for text prompts; it only has to exist so the folder is a real Mistral-3.
    vision_config = PixtralVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=heads,
        image_size=64,
        patch_size=16,
    )
    config = Mistral3Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=SPECIAL_TOKENS.index("[IMG]"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)


# --- FLUX.2 klein: a Qwen3 stand-in ---------------------------------------------------------------------------------

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# Qwen3-like: ChatML turns; with add_generation_prompt and enable_thinking=False an empty think block follows.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)


def build_tiny_qwen_tokenizer(out_dir: Path) -> None:
    """A ~1000-token byte-level BPE with Qwen's special tokens and a Qwen3-like chat template (no BOS, pad = eot)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=list(QWEN_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:2] + QWEN_SPECIAL_TOKENS[3:]),
        chat_template=QWEN_CHAT_TEMPLATE, model_max_length=4096,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)


def tiny_qwen3(*, vocab_size: int, seed: int = 0, hidden_size: int = 32, num_hidden_layers: int = 28,
               residual_scale: float = 1.0):
    """A randomly initialised tiny `Qwen3ForCausalLM` (enough layers for the 9/18/27 taps). ``residual_scale``
    multiplies the attention and MLP output projections, the residual branches, after initialisation."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden_size // 2,
        max_position_embeddings=4096, tie_word_embeddings=False,
        eos_token_id=QWEN_SPECIAL_TOKENS.index("<|im_end|>"), pad_token_id=QWEN_SPECIAL_TOKENS.index("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    if residual_scale != 1.0:
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    weight.mul_(residual_scale)
    return model


def build_tiny_qwen3(out_dir: Path, *, vocab_size: int, seed: int = 0, **kwargs) -> None:
    """Save `tiny_qwen3(...)` (safetensors) to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny_qwen3(vocab_size=vocab_size, seed=seed, **kwargs).save_pretrained(out_dir, safe_serialization=True)
