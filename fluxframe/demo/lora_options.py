"""The train-lora command's arguments (torch-free, so ``fluxframe --help`` stays fast)."""

from __future__ import annotations

import argparse
from pathlib import Path

# diffusers' train_dreambooth_lora_flux2.py: the attention projections of the double blocks and the fused
# qkv + MLP-in projection of the single blocks (PEFT matches each as a suffix of a module name)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, metavar="TOML",
                        help="the deployment: its base model and its safety filters")
    parser.add_argument("--data", type=Path, required=True, metavar="DIR",
                        help="images with same-name .txt captions, or a metadata.jsonl (file_name, text)")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE.safetensors",
                        help="the LoRA to write (diffusers/PEFT layout); a training record goes beside it")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (at most a target layer's width)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="LoRA alpha: the update is scaled by alpha/rank (None: alpha = rank, scale 1)")
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps in all (a resumed run included)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=1, help="images per optimiser step")
    parser.add_argument("--resolution", type=int, default=512,
                        help="square side the images are resized and centre-cropped to (a multiple of 16)")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help="comma-separated diffusers module names (suffixes) to adapt")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the LoRA's initialisation, the batches, noise and timesteps")
    parser.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                        help="save the resumable state every N steps (the same command continues from it)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first item the safety filters block (default: skip and list it)")
