"""What the safety filters add to one request, per 1024x1024 image, on CPU.

    .venv/bin/python bench/safety.py [--runs 30] [--names 1000] [--images 100] [--semantic]

Each row is the median of --runs timed calls after warm-up calls. "all built-in filters" is what a
request with a prompt and one output pays through SafetyPolicy (worker threads and timeouts included):
prompt-nsfw and ip on the prompt, then image-nsfw and ip on the output. Input images (references,
control, inpaint) each add about one "image-nsfw + ip image" row. Loading the filters is not counted.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import median_ms as _median_ms  # noqa: E402

from fluxframe.core.policy import ConfiguredFilter, SafetyPolicy, blur_image  # noqa: E402
from fluxframe.safety.image_nsfw import ImageNSFWFilter  # noqa: E402
from fluxframe.safety.ip import IPFilter  # noqa: E402
from fluxframe.safety.prompt_nsfw import PromptNSFWFilter  # noqa: E402

PROMPT = ("a photograph of a red vintage sports car parked outside a small cafe in Paris at golden hour, "
          "people walking past, shallow depth of field, 35mm film, highly detailed")
TARGET_MS = 300.0


def median_ms(fn, runs: int) -> float:
    return _median_ms(fn, runs, warmup=3)


def test_image(size: int = 1024) -> Image.Image:
    try:
        from skimage import data

        return Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BICUBIC)
    except ImportError:
        rng = np.random.default_rng(0)
        return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def synthetic_names(n: int) -> list[str]:
    rng = np.random.default_rng(1)
    syll = ["ka", "to", "mi", "ra", "ven", "dor", "li", "sa", "bel", "gar", "nu", "zo", "pre", "stan", "qu", "el"]
    return [" ".join("".join(rng.choice(syll, size=rng.integers(2, 4))).capitalize()
                     for _ in range(rng.integers(1, 4))) for _ in range(n)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--names", type=int, default=1000, help="protected names in the IP list")
    parser.add_argument("--images", type=int, default=100, help="protected reference images in the IP registry")
    parser.add_argument("--semantic", action="store_true", help="also time prompt-nsfw with the semantic check")
    args = parser.parse_args(argv)

    image = test_image()
    rng = np.random.default_rng(2)
    with tempfile.TemporaryDirectory() as tmp:
        hashes = Path(tmp) / "hashes.txt"
        hashes.write_text("".join(f"{int(rng.integers(0, 2**63)):016x} ref{i}\n" for i in range(args.images * 4)))
        t0 = time.perf_counter()
        prompt_f = PromptNSFWFilter()
        image_f = ImageNSFWFilter()
        ip_f = IPFilter(names=synthetic_names(args.names) + ["Mickey Mouse"], hashes_file=str(hashes))
        load_s = time.perf_counter() - t0

    rows: list[tuple[str, float]] = [
        ("prompt-nsfw (lexicon) on the prompt", median_ms(lambda: prompt_f.check_prompt(PROMPT, "prompt"), args.runs)),
        (f"ip on the prompt ({args.names} names)", median_ms(lambda: ip_f.check_prompt(PROMPT, "prompt"), args.runs)),
        ("image-nsfw on a 1024² image", median_ms(lambda: image_f.check_image(image, "output_image"), args.runs)),
        (f"ip on a 1024² image ({args.images * 4} hashes)",
         median_ms(lambda: ip_f.check_image(image, "output_image"), args.runs)),
    ]
    policy = SafetyPolicy([ConfiguredFilter("prompt-nsfw", prompt_f, True),
                           ConfiguredFilter("image-nsfw", image_f, True),
                           ConfiguredFilter("ip", ip_f, True)])

    def request():
        assert policy.check_prompts({"prompt": PROMPT}).allowed
        assert policy.check_output(image).allowed

    total = median_ms(request, args.runs)
    extras = [("blur (only when an output is blurred)", median_ms(lambda: blur_image(image), max(5, args.runs // 3)))]
    if args.semantic:
        sem = PromptNSFWFilter(semantic=True)
        extras.append(("prompt-nsfw with semantic check (optional)",
                       median_ms(lambda: sem.check_prompt(PROMPT, "prompt"), args.runs)))

    import onnxruntime

    cpu = platform.processor() or platform.machine()
    print(f"fluxframe safety filters, median of {args.runs} runs after 3 warm-up runs; {cpu}, "
          f"{os.cpu_count()} CPUs, onnxruntime {onnxruntime.__version__}; filters loaded in {load_s:.2f} s")
    width = max(len(name) for name, _ in rows + extras) + 2
    print(f"{'step':<{width}} {'ms':>8}")
    print("-" * (width + 9))
    for name, ms in rows:
        print(f"{name:<{width}} {ms:8.1f}")
    print("-" * (width + 9))
    print(f"{'all built-in filters (prompt + 1024² output)':<{width}} {total:8.1f}   target < {TARGET_MS:.0f} ms: "
          f"{'met' if total < TARGET_MS else 'MISSED'}")
    for name, ms in extras:
        print(f"{name:<{width}} {ms:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
