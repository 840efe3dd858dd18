"""Tiny random stand-ins for Flux.1's CLIP-L and T5 text encoders and their tokenizers, built offline.

Tests use them to make a complete Flux.1/Flex.2 folder in the diffusers layout in a second or two: the real
loading code runs, the embeddings mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxframe.plugins.common.tiny import CORPUS


def build_tiny_tokenizer(out_dir: Path, *, kind: str) -> int:
    """A byte-level BPE saved as a fast tokenizer: ``kind`` "clip" (<|startoftext|> ... <|endoftext|>, 77 tokens)
    or "t5" (... </s>, 512 tokens). Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|startoftext|>", "<|endoftext|>"] if kind == "clip" else ["<pad>", "</s>", "<unk>"]
    backend = Tokenizer(models.BPE(unk_token=specials[-1] if kind == "t5" else None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    if kind == "clip":
        bos, eos = backend.token_to_id(specials[0]), backend.token_to_id(specials[1])
        backend.post_processor = processors.TemplateProcessing(
            single=f"{specials[0]} $A {specials[1]}", special_tokens=[(specials[0], bos), (specials[1], eos)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=specials[0], eos_token=specials[1],
                                            pad_token=specials[1], unk_token=specials[1], model_max_length=77)
    else:
        eos = backend.token_to_id("</s>")
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>",
                                            unk_token="<unk>", model_max_length=512)
    tokenizer.save_pretrained(Path(out_dir))
    return len(tokenizer)


def build_tiny_clip(out_dir: Path, *, vocab_size: int, eos_token_id: int, seed: int = 0, hidden: int = 32) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=hidden, eos_token_id=eos_token_id, bos_token_id=0, pad_token_id=eos_token_id)
    torch.manual_seed(seed)
    CLIPTextModel(config).eval().save_pretrained(Path(out_dir), safe_serialization=True)


def build_tiny_t5(out_dir: Path, *, vocab_size: int, seed: int = 0, d_model: int = 32) -> None:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    T5EncoderModel(config).eval().save_pretrained(Path(out_dir), safe_serialization=True)


def build_tiny_text_encoders(root: Path, seed: int = 0) -> Path:
    """text_encoder/, tokenizer/ (CLIP) and text_encoder_2/, tokenizer_2/ (T5) under ``root``."""
    from transformers import AutoTokenizer

    root = Path(root)
    clip_vocab = build_tiny_tokenizer(root / "tokenizer", kind="clip")
    eos = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True).eos_token_id
    build_tiny_clip(root / "text_encoder", vocab_size=clip_vocab, eos_token_id=eos, seed=seed)
    t5_vocab = build_tiny_tokenizer(root / "tokenizer_2", kind="t5")
    build_tiny_t5(root / "text_encoder_2", vocab_size=t5_vocab, seed=seed + 1)
    return root
