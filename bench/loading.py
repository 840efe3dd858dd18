"""Checkpoint loading on CPU: peak resident memory and time, fluxframe against diffusers.

Writes a synthetic FLUX.2 DiT checkpoint in the diffusers layout (sharded, with an index; default
about 2.1 GB in bfloat16: hidden 2048, 4 double + 8 single blocks), then loads it in a fresh
subprocess per run with fluxframe's ``load_transformer`` and with diffusers'
``Flux2Transformer2DModel.from_pretrained`` (``low_cpu_mem_usage`` default, accelerate installed).

Memory is the peak RSS (``getrusage`` ``ru_maxrss``) minus the RSS right after the imports, so
the libraries' own footprint is not counted. It is taken twice: once when the load call returns
("load") and once after every parameter has been read ("ready": what a first forward pass would
touch). The second matters because a tensor left backed by a memory-mapped file costs nothing in
RSS until its pages are touched, so "load" alone can flatter a loader that keeps the file mapped;
the run also reports whether the checkpoint is still mapped into the process after loading. Time is
taken at both points too: a lazy loader's "load" is nearly free and its reading is done by "ready".

    .venv/bin/python bench/loading.py                       # write 2 GB to a temp folder, compare, clean up
    .venv/bin/python bench/loading.py --folder /tmp/ck --keep --json
    .venv/bin/python bench/loading.py write FOLDER [--dtype float32] [--layers 4 --single-layers 7]
    .venv/bin/python bench/loading.py --quantize int8 --quantize nf4   # also fluxframe quantising while loading
    .venv/bin/python bench/loading.py load FOLDER --impl fluxframe --dtype bfloat16   # one run, JSON out
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DTYPES = ("bfloat16", "float32", "float16")


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


# ---------------------------------------------------------------------------------------------- write


def write_checkpoint(folder: Path, *, dtype: str = "bfloat16", hidden: int = 2048, layers: int = 4,
                     single_layers: int = 8, joint_dim: int = 256, max_shard_bytes: int = 500_000_000) -> int:
    """A random FLUX.2 DiT in the diffusers layout, written shard by shard so that at most one shard is in
    memory. Returns the bytes of tensor data written."""
    import torch
    from safetensors.torch import save_file

    from fluxframe.plugins.flux2 import keymap
    from fluxframe.plugins.flux2.transformer import Flux2Transformer, TransformerConfig

    config = TransformerConfig(num_layers=layers, num_single_layers=single_layers, attention_head_dim=128,
                               num_attention_heads=hidden // 128, joint_attention_dim=joint_dim)
    with torch.device("meta"):
        shapes = {k: tuple(t.shape) for k, t in keymap.to_diffusers(Flux2Transformer(config).state_dict(),
                                                                      config).items()}
    torch_dtype = getattr(torch, dtype)
    size = torch.empty((), dtype=torch_dtype).element_size()
    shards: list[list[str]] = [[]]
    used = 0
    for key, shape in shapes.items():
        n = size * int(torch.Size(shape).numel())
        if shards[-1] and used + n > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += n
    folder.mkdir(parents=True, exist_ok=True)
    base, count, total, weight_map = "diffusion_pytorch_model", len(shards), 0, {}
    gen = torch.Generator().manual_seed(0)
    for i, keys in enumerate(shards, 1):
        name = f"{base}-{i:05d}-of-{count:05d}.safetensors"
        tensors = {k: torch.randn(shapes[k], generator=gen, dtype=torch_dtype).mul_(0.02) for k in keys}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(folder / name), {"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{base}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return total


# ----------------------------------------------------------------------------------------------- load


def load_once(folder: Path, impl: str, dtype: str, quantize: str | None = None) -> dict:
    """Load in this process (meant to be a fresh one) and measure; ``quantize`` (fluxframe only): the
    ``quantize`` memory strategy's format, applied while loading as a pipeline with that strategy does."""
    import torch

    if impl == "fluxframe":
        from fluxframe.plugins.flux2.family import load_transformer
        from fluxframe.plugins.memory import Quantize

        memory = Quantize(quantize) if quantize else None

        def load():
            return load_transformer(folder, getattr(torch, dtype), torch.device("cpu"), memory)
    elif impl == "diffusers":
        from diffusers import Flux2Transformer2DModel
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()

        def load():
            return Flux2Transformer2DModel.from_pretrained(folder, torch_dtype=getattr(torch, dtype))
    else:
        raise ValueError(impl)
    if quantize and impl != "fluxframe":
        raise ValueError("--quantize: fluxframe's loader only")
    gc.collect()
    baseline = _rss_kib()
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    gc.collect()
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with torch.no_grad():
        checksum = sum(int(t.reshape(-1).view(torch.uint8).max())
                       for t in model.state_dict().values())  # touches every page, copies nothing
    ready_seconds = time.perf_counter() - t0
    peak_ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    resolved = str(folder.resolve())
    with open("/proc/self/maps") as f:
        mapped = sum(1 for line in f if resolved in line)
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}.values()  # quantised weights are buffers
    return {
        "impl": impl + (f"+{quantize}" if quantize else ""), "dtype": dtype, "seconds": seconds,
        "ready_seconds": ready_seconds,
        "baseline_bytes": baseline * 1024,
        "peak_load_bytes": (peak_load - baseline) * 1024,
        "peak_ready_bytes": (peak_ready - baseline) * 1024,
        "model_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "file_mappings_after_load": mapped,
        "checksum": checksum,
    }


def run_child(folder: Path, impl: str, dtype: str, threads: int | None = None, quantize: str | None = None) -> dict:
    """``load_once`` in a fresh interpreter; returns its JSON result."""
    cmd = [sys.executable, __file__, "load", str(folder), "--impl", impl, "--dtype", dtype]
    if threads:
        cmd += ["--threads", str(threads)]
    if quantize:
        cmd += ["--quantize", quantize]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------- main


def _gib(n: float) -> str:
    return f"{n / 2**30:6.2f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    w = sub.add_parser("write", help="write a synthetic checkpoint and print its size")
    w.add_argument("folder", type=Path)
    ld = sub.add_parser("load", help="load once in this process, print JSON")
    ld.add_argument("folder", type=Path)
    ld.add_argument("--impl", choices=("fluxframe", "diffusers"), required=True)
    ld.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    ld.add_argument("--threads", type=int)
    ld.add_argument("--quantize", choices=("int8", "fp8", "nf4"), help="fluxframe: quantise while loading")
    for q in (p, w):
        q.add_argument("--dtype", dest="file_dtype", choices=DTYPES, default="bfloat16",
                       help="dtype of the checkpoint file")
        q.add_argument("--hidden", type=int, default=2048)
        q.add_argument("--layers", type=int, default=4)
        q.add_argument("--single-layers", type=int, default=8)
    p.add_argument("--folder", type=Path, help="where to write the checkpoint (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint folder")
    p.add_argument("--load-dtype", choices=DTYPES, default=None, help="target dtype (default: the file's)")
    p.add_argument("--repeat", type=int, default=1, help="runs per loader; the median time is shown")
    p.add_argument("--quantize", action="append", choices=("int8", "fp8", "nf4"),
                   help="also load with fluxframe quantising while it loads (repeatable)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    if args.cmd == "load":
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(load_once(args.folder, args.impl, args.dtype, args.quantize)))
        return 0
    shape = dict(dtype=args.file_dtype, hidden=args.hidden, layers=args.layers, single_layers=args.single_layers)
    if args.cmd == "write":
        print(write_checkpoint(args.folder, **shape))
        return 0

    folder = args.folder or Path(tempfile.mkdtemp(prefix="fluxframe-loading-"))
    try:
        if not (folder / "config.json").exists():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "write", str(folder), "--dtype", args.file_dtype,
                            "--hidden", str(args.hidden), "--layers", str(args.layers),
                            "--single-layers", str(args.single_layers)], check=True, capture_output=True)
            print(f"wrote {folder} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        size = checkpoint_bytes(folder)
        load_dtype = args.load_dtype or args.file_dtype
        loaders = {"fluxframe": ("fluxframe", None), "diffusers": ("diffusers", None)}
        loaders.update({f"fluxframe+{q}": ("fluxframe", q) for q in args.quantize or []})
        runs: dict[str, list[dict]] = {name: [] for name in loaders}
        for _ in range(args.repeat):
            for name, (impl, quantize) in loaders.items():  # alternate, so page-cache and load drift hit all
                runs[name].append(run_child(folder, impl, load_dtype, quantize=quantize))
        rows = {}
        for name, rs in runs.items():
            rs.sort(key=lambda r: r["seconds"])
            rows[name] = dict(rs[len(rs) // 2], peak_ready_bytes=max(r["peak_ready_bytes"] for r in rs),
                              peak_load_bytes=max(r["peak_load_bytes"] for r in rs))
        theirs = rows["diffusers"]
        ratios = {name: {"peak_ready": r["peak_ready_bytes"] / theirs["peak_ready_bytes"],
                         "peak_load": r["peak_load_bytes"] / max(1, theirs["peak_load_bytes"]),
                         "seconds": r["seconds"] / theirs["seconds"],
                         "ready_seconds": r["ready_seconds"] / theirs["ready_seconds"]}
                  for name, r in rows.items() if name != "diffusers"}
        result = {"checkpoint_bytes": size, "file_dtype": args.file_dtype, "load_dtype": load_dtype,
                  "runs": rows, "ratios_over_diffusers": ratios}
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"checkpoint {size / 1e9:.2f} GB ({args.file_dtype}) -> {load_dtype}, "
                  f"peak RSS above the post-import baseline, GiB")
            print(f"{'loader':<15} {'load s':>7} {'ready s':>8} {'peak@load':>10} {'peak@ready':>11} {'/ckpt':>6} "
                  f"{'model':>7} {'mapped':>7}")
            for name, r in rows.items():
                print(f"{name:<15} {r['seconds']:7.2f} {r['ready_seconds']:8.2f} {_gib(r['peak_load_bytes']):>10} "
                      f"{_gib(r['peak_ready_bytes']):>11} {r['peak_ready_bytes'] / size:6.2f} "
                      f"{_gib(r['model_bytes']):>7} {r['file_mappings_after_load']:>7}")
            for name, q in ratios.items():
                print(f"{name} / diffusers: peak@ready {q['peak_ready']:.2f}, peak@load {q['peak_load']:.2f}, "
                      f"load time {q['seconds']:.2f}, time to ready {q['ready_seconds']:.2f}")
    finally:
        if not args.keep and args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
