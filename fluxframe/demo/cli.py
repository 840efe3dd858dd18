"""The commands this package adds to the `fluxframe` CLI through ``register_commands`` (see fluxframe.demo):
``train-demo``, which trains the shipped demo model, ``train-lora``, and ``demo-data``, which writes a folder of
the shapes data set's images with captions (the outline style's: the demo's style LoRA was trained on it).

Nothing heavy is imported until the command runs, so ``fluxframe --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

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


    register(
        "demo-data", demo_data_arguments, cmd_demo_data,
        help="write shapes data-set images with .txt captions (e.g. the outline style, for train-lora)",
        description="Draw scenes of the demo's synthetic shapes data set (training triples only: the held-out "
                    "ones stay unseen) as NNNN.png with the caption in NNNN.txt, the folder layout train-lora "
                    "reads. --style outline draws every shape as a thick outline, a style no image shapes-v1 "
                    "was trained on had.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def demo_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder to write (created)")
    parser.add_argument("--style", choices=("outline",), default="outline", help="how the shapes are drawn")
    parser.add_argument("--count", type=int, default=192, help="images to write (the 128 training triples in turn)")
    parser.add_argument("--balanced", action="store_true",
                        help="the four shapes equally often (default: stars and triangles first, so 192 images "
                             "draw those twice and circles and squares once)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the position and size jitter")
    parser.add_argument("--masks", action="store_true",
                        help="also write each image's shape region (and a margin) as masks/NNNN.png, for "
                             "train-lora --loss-masks")


def cmd_demo_data(args) -> int:
    """Write the folder whole or not at all: drawn into a hidden sibling folder, renamed into place at the end;
    an existing non-empty folder (or a file) at --out is refused rather than mixed into."""
    import os
    import shutil
    import sys
    import tempfile

    from .shapes import outline_scenes, write_dataset

    out = args.out
    if args.count < 1:
        print("fluxframe: error: --count must be at least 1", file=sys.stderr)
        return 2
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a folder that is not empty" if out.is_dir() else "not a folder"
        print(f"fluxframe: error: --out {out}: {what}; give a new or empty folder", file=sys.stderr)
        return 2
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        print(f"fluxframe: error: --out {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        written = write_dataset(outline_scenes(args.count, args.seed, balanced=args.balanced), staging,
                                masks=args.masks)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {written} images with captions{' and masks' if args.masks else ''} to {out}")
    return 0


def cmd_train_lora(args) -> int:
    from .train_lora import run

    return run(args)


def cmd_train_demo(args) -> int:
    from .train import run

    return run(args)
