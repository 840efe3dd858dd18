"""The command this package adds to the `fluxframe` CLI: ``train-demo``, which trains the shipped demo model.

Nothing heavy is imported until the command runs, so ``fluxframe --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_MINUTES = 88.0  # what models/shapes-v1 was trained with; TrainConfig.minutes defaults to it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data set and of every initialisation")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help="wall-clock budget, split between the autoencoder and the transformer")
    parser.add_argument("--work", type=Path, metavar="DIR",
                        help="resumable intermediate state (default: a hidden folder beside --out)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run at 64 px (for tests)")


def add_commands(subparsers) -> dict:
    parser = subparsers.add_parser(
        "train-demo", help="train the small demo model on the synthetic shapes data set (CPU, about 90 minutes)",
        description="Render the synthetic shapes data set, train a small FLUX.2 autoencoder, then a small FLUX.2 "
                    "klein-style transformer on it by flow matching, and write a checkpoint folder in the diffusers "
                    "layout that fluxframe loads like any other (models/shapes-v1 was made this way). Resumable: "
                    "run the same command again after an interruption.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return {"train-demo": cmd_train_demo}


def cmd_train_demo(args) -> int:
    from .train import run

    return run(args)
