"""The train-demo command's arguments, shared by ``fluxframe train-demo`` and ``python -m fluxframe.demo.train``
(torch-free, so the CLI stays fast)."""

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
