"""Issue 24's throughput benchmark: the same 16 requests as (a) 16 `fluxframe generate` processes, (b) one
`fluxframe batch --batch-size 1`, (c) `--batch-size 4` and (d) `--batch-size 8`, on the demo model and on the tiny
FLUX.2 preset, at 256² with 4 steps, with the demo deployment's full safety and provenance path (the three
required filters, watermark, C2PA signature, audit log) in every run.

    .venv/bin/python bench/batch.py [--models demo tiny] [--requests 16] [--steps 4] [--json]

Throughput is images per second of wall time, start-up included (a process's imports and model load are what
batch runs save); the ratios are measured in one run, so a noisy machine moves all four together. The per-image
split averages each released item's stage timings (results.jsonl) per configuration. "Steady" throughput counts
from the 8th item's results line to the last (after start-up, model loading and the text encoder's first-use
load, for every batch size alike); give --requests 32 or more for it to mean much. --no-processes skips (a).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).with_name("fluxframe")
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "blue", "green", "yellow")
MODELS = {"demo": f'path = "{ROOT / "models" / "shapes-v1"}"', "tiny": 'preset = "tiny"'}
STAGES = ("input_filters", "text_encoding", "denoising", "decoding", "output_filters", "postprocessing")


def prompts(n: int) -> list[str]:
    return [f"a large {COLOURS[i % 4]} {SHAPES[(i // 4) % 4]} in the centre, on a black background" for i in range(n)]


def deployment(folder: Path, model: str, steps: int) -> Path:
    """The demo config with another [model] and [sampler], its paths made absolute, in ``folder``."""
    certs = folder / "certs"
    if not (certs / "chain.pem").exists():
        subprocess.run([str(EXE), "certs", "dev", "--out", str(certs)], check=True, capture_output=True)
    text = f"""
[model]
{MODELS[model]}
dtype = "float32"
device = "cpu"

[sampler]
steps = {steps}
guidance = 4.0
width = 256
height = 256

[output]
dir = "{folder / 'out'}"

[safety]
require = ["prompt-nsfw", "image-nsfw", "ip"]
audit_log = "{folder / 'out' / 'audit.jsonl'}"

[safety.filters.ip]
names_file = "{ROOT / 'configs' / 'protected-names.txt'}"

[provenance.watermark]
method = "fluxframe-ss"

[provenance.c2pa]
certificate = "{certs / 'chain.pem'}"
private_key = "{certs / 'key.pem'}"
"""
    config = folder / "deploy.toml"
    config.write_text(text)
    return config


def run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv[:3])} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")


WARM = 8  # items every batch size has finished once warm (8 is a whole number of batches of 1, 4 and 8)


def steady(lines: list[dict]) -> float | None:
    """Images a second once warm: from the results line of item WARM to the last one (start-up, model loading and
    the text encoder's first-use load are before it), for every batch size alike."""
    times = sorted(datetime.datetime.fromisoformat(x["time"]).timestamp() for x in lines if x.get("status") == "ok")
    if len(times) <= WARM or times[-1] <= times[WARM - 1]:
        return None
    return (len(times) - WARM) / (times[-1] - times[WARM - 1])


def measure(model: str, n: int, steps: int, work: Path, processes: bool = True) -> dict:
    rows = {}
    items = prompts(n)
    runs = [("generate x16", None)] if processes else []
    for label, batch_size in runs + [("batch 1", 1), ("batch 4", 4), ("batch 8", 8)]:
        folder = work / model / label.replace(" ", "")
        folder.mkdir(parents=True)
        config = deployment(folder, model, steps)
        started = time.perf_counter()
        if batch_size is None:
            for i, prompt in enumerate(items):
                run([str(EXE), "generate", "--config", str(config), "--prompt", prompt, "--seed", str(i),
                     "--no-progress"])
            split = {}
        else:
            requests = folder / "requests.jsonl"
            requests.write_text("".join(json.dumps({"prompt": p, "seed": i}) + "\n" for i, p in enumerate(items)))
            run([str(EXE), "batch", "--config", str(config), str(requests), "--batch-size", str(batch_size),
                 "--no-progress", "--results", str(folder / "results.jsonl")])
            lines = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]
            released = [x for x in lines if x.get("status") == "ok"]
            if len(released) != n:
                sys.exit(f"{model} {label}: {len(released)} of {n} items released")
            split = {s: statistics.mean(x["timings"].get(s, 0.0) for x in released) for s in STAGES}
        wall = time.perf_counter() - started
        rows[label] = {"seconds": wall, "images_per_s": n / wall, "split_s": split,
                       "steady_images_per_s": steady(released) if batch_size else None}
    base = rows["generate x16"]["images_per_s"] if processes else None
    one, one_steady = rows["batch 1"]["images_per_s"], rows["batch 1"]["steady_images_per_s"]
    for row in rows.values():
        row["vs_generate"] = row["images_per_s"] / base if base else None
        row["vs_batch1"] = row["images_per_s"] / one
        row["steady_vs_batch1"] = row["steady_images_per_s"] / one_steady \
            if row["steady_images_per_s"] and one_steady else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "demo"], choices=sorted(MODELS))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-processes", action="store_true", help="skip the generate-per-request runs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: measure(m, args.requests, args.steps, Path(tmp), not args.no_processes) for m in args.models}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for model, rows in results.items():
        print(f"\n{model}: {args.requests} requests, 256², {args.steps} steps, full safety + provenance "
              f"(load average {os.getloadavg()[0]:.1f})")
        print(f"  {'run':<14}{'wall s':>8}{'img/s':>8}{'vs generate':>13}{'vs batch 1':>12}{'steady img/s':>14}"
              f"{'steady vs 1':>13}   per image: " + " ".join(s.split('_')[0][:6] for s in STAGES))
        for label, row in rows.items():
            split = " ".join(f"{row['split_s'][s]:6.2f}" for s in STAGES) if row["split_s"] else "(per process)"
            vs_gen = f"{row['vs_generate']:12.2f}x" if row["vs_generate"] else f"{'—':>13}"
            warm = (f"{row['steady_images_per_s']:14.2f}{row['steady_vs_batch1']:12.2f}x"
                    if row["steady_vs_batch1"] else f"{'—':>14}{'—':>13}")
            print(f"  {label:<14}{row['seconds']:8.1f}{row['images_per_s']:8.2f}{vs_gen}{row['vs_batch1']:11.2f}x"
                  f"{warm}   {split}")


if __name__ == "__main__":
    main()
