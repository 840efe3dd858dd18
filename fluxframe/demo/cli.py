"""The command this package adds to the `fluxframe` CLI through ``register_commands`` (see fluxframe.demo):
``train-demo``, which trains the shipped demo model.

Nothing heavy is imported until the command runs, so ``fluxframe --help`` stays fast.
"""

from __future__ import annotations

import argparse

from .options import add_arguments


def register_commands(register) -> None:
    register(
        "train-demo", add_arguments, cmd_train_demo,
        help="train the small demo model on the synthetic shapes data set (CPU, about 90 minutes)",
        description="Render the synthetic shapes data set, train a small FLUX.2 autoencoder, then a small FLUX.2 "
                    "klein-style transformer on it by flow matching, and write a checkpoint folder in the diffusers "
                    "layout that fluxframe loads like any other (models/shapes-v1 was made this way). Resumable: "
                    "run the same command again after an interruption.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)


    from .lora_options import add_arguments as lora_arguments

    register(
        "train-lora", lora_arguments, cmd_train_lora,
        help="train a LoRA for the deployment's FLUX.2 model on a folder of captioned images",
        description="Train a LoRA on images with captions (same-name .txt files or a metadata.jsonl) by flow "
                    "matching on the deployment's own FLUX.2 base, after every image and caption passed the "
                    "deployment's input filters. Writes a diffusers/PEFT-layout safetensors file (diffusers' "
                    "load_lora_weights and fluxframe --lora both read it) and a training record beside it. "
                    "Resumable: run the same command again after an interruption.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def cmd_train_lora(args) -> int:
    from .train_lora import run

    return run(args)


def cmd_train_demo(args) -> int:
    from .train import run

    return run(args)
