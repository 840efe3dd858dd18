"""The train-lora command's arguments (torch-free, so ``fluxframe --help`` stays fast)."""

from __future__ import annotations

import argparse
from pathlib import Path

# diffusers' train_dreambooth_lora_flux2.py: the attention projections of the double blocks and the fused
# qkv + MLP-in projection of the single blocks (PEFT matches each as a suffix of a module name)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj")
# the same layers of Flex.2's (Flux.1's) DiT: the single blocks' fused projection is q, k, v and proj_mlp there
FLEX2_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_mlp")
FAMILY_TARGETS = {"flux2": DEFAULT_TARGETS, "flex2": FLEX2_TARGETS}
QUANTIZE_FORMATS = ("int8", "fp8", "nf4")  # those of the `quantize` memory strategy
CONTROL_KINDS = ("line", "depth", "pose")  # the control conditioner's preprocessors that make a map from a photo


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
    parser.add_argument("--targets", default=None,
                        help="comma-separated diffusers module names (suffixes) to adapt (default: FLUX.2 "
                             f"{','.join(DEFAULT_TARGETS)}; Flex.2 {','.join(FLEX2_TARGETS)})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the LoRA's initialisation, the batches, noise and timesteps")
    parser.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                        help="save the resumable state every N steps (the same command continues from it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if a finished training left it there (an unfinished one continues)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first item the safety filters block (default: skip and list it)")
    parser.add_argument("--quantize", choices=QUANTIZE_FORMATS, default=None,
                        help="quantise the frozen base's block linears (the `quantize` memory strategy) while the "
                             "LoRA trains in float32; without it, a [memory] quantize in the config applies as set")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each DiT block's activations in the backward pass: less memory, one more "
                             "forward pass per step")
    parser.add_argument("--low-noise", type=float, default=0.0, metavar="P",
                        help="draw this share of each batch's noise levels uniformly below 0.6 instead of from the "
                             "shifted logit-normal (more of the nearly clean steps, where fine detail is decided)")
    parser.add_argument("--caption-dropout", type=float, default=0.0, metavar="P",
                        help="train this share of the items with the empty prompt (what true CFG's unconditional "
                             "pass sees), as the demo model was trained")
    parser.add_argument("--loss-masks", type=Path, default=None, metavar="DIR",
                        help="a folder of grey masks named as the images (NAME.png for NAME.jpg, same size): each "
                             "latent token's error counts by the mean of the mask over its pixels, so that what "
                             "the masks mark (a subject, a detail) dominates the loss")
    parser.add_argument("--unmasked-weight", type=float, default=0.1, metavar="W",
                        help="with --loss-masks: the weight of the masks' black parts (0 ignores them, 1 is no "
                             "mask)")
    parser.add_argument("--sample-every", type=int, default=0, metavar="N",
                        help="every N steps, generate an image per --sample-prompt with the LoRA so far, through "
                             "the deployment's pipeline (filtered, watermarked, signed, audited), into "
                             "<out stem>.samples/ beside the LoRA")
    parser.add_argument("--sample-prompt", action="append", default=None, metavar="TEXT",
                        help="a prompt for the samples (repeat the option for several)")
    flex2 = parser.add_argument_group("Flex.2 deployments (inpaint and control channels)")
    flex2.add_argument("--inpaint-dropout", type=float, default=None, metavar="P",
                       help="share of the steps whose inpaint channels are empty (no inpaint); the others see a "
                            "random rectangle or ellipse masked out of the training image (default 0.5)")
    flex2.add_argument("--control-dropout", type=float, default=None, metavar="P",
                       help="share of the steps whose control channels are empty (no control); the others see "
                            "a control map made from the training image (default 0.5)")
    flex2.add_argument("--control-kinds", default=None, metavar="KINDS",
                       help="comma-separated control maps to draw from: line (Canny edges), depth, pose (the "
                            "estimators of the config's control conditioner); default line")
