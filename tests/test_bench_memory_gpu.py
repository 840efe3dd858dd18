"""bench/memory_gpu.py (issue 7's GPU benchmark) has no GPU in CI; its smoke run on the CPU checks that every
configuration, fluxframe's and diffusers', builds, places and runs on the same weights: the offloading ones give
fluxframe:none's output exactly, diffusers' equivalent model the same output to float32 rounding (so the weight
mapping is right), the 8-bit and 4-bit ones within their quantisation error."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "memory_gpu.py"


def test_every_configuration_runs_on_the_same_weights(tmp_path):
    results = tmp_path / "run.json"
    argv = [sys.executable, str(BENCH), "--device", "cpu", "--shape", "tiny", "--dtype", "float32", "--size", "128",
            "--text", "16", "--steps", "2", "--in-process", "--json", "--results", str(results)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    rows = {r["config"]: r for r in report["rows"]}
    spec = importlib.util.spec_from_file_location("memory_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert list(rows) == list(bench.CONFIGS) and len(rows) == 13
    err = {name: row["rel_err"] for name, row in rows.items()}
    print("\n" + "\n".join(f"{k:40} {v:.1e}" for k, v in err.items()))
    for name in ("fluxframe:model-offload", "fluxframe:group-offload"):
        assert err[name] == 0.0, name
    assert err["fluxframe:int8+group-offload"] == err["fluxframe:int8+group-offload+resident"] == err["fluxframe:int8"]
    for name in ("diffusers:none", "diffusers:model-offload", "diffusers:group-offload"):
        assert err[name] < 1e-5, name
    assert 0 < err["fluxframe:int8"] < 1e-3 and 0 < err["fluxframe:fp8"] < 1e-2 and 0 < err["fluxframe:nf4"] < 2e-2
    assert 0 < err["diffusers:fp8-storage"] == err["diffusers:fp8-storage+group-offload"] < 0.1
    assert all(r["step_s"] > 0 and r["peak_gb"] is None for r in rows.values())  # no memory figures off CUDA
    # a later run of a subset merges into the results, compared with the same reference
    argv[argv.index("--json")] = "--markdown"
    done = subprocess.run([*argv, "--configs", "fluxframe:group-offload"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| fluxframe:") == 8 and "| fluxframe:group-offload | — | — |" in done.stdout
    assert len(json.loads(results.read_text())["rows"]) == len(rows)
