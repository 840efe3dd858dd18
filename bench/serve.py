"""Issue 25's service benchmark: throughput and latency of `fluxframe serve` at 1, 4 and 16 concurrent clients
against `fluxframe batch` on the same prompts and seeds, with the same deployment (bench/batch.py's: 256², 4 steps,
the demo deployment's three required filters, watermark, C2PA signature and audit log), on the tiny FLUX.2 preset
and the demo model.

    .venv/bin/python bench/serve.py [--models tiny demo] [--requests 32] [--steps 4] [--rounds 2] [--json]

Both sides are measured warm, since a server is started once: `fluxframe batch --batch-size B` (B = the
deployment's max_batch_size, 8, which is also the most jobs the server runs together) gets B warm-up items first,
and its throughput is the measured items over the time from the last warm-up item's results line to the last
item's. Batch runs and service runs alternate (``--rounds`` rounds of batch, then the service at each
concurrency, and a last batch run); each round's service figures are compared with the mean of the batch runs
either side of it, so drift in the machine's load moves both sides alike, and the table gives medians over rounds.
The server (a `fluxframe serve` subprocess on 127.0.0.1, one token) gets one warm-up
batch, then for each concurrency C, C client threads each send requests one after another (POST /v1/images?wait=,
the answer is the finished job) until all the prompts are done; throughput is prompts over wall time, latency is
each request's round trip. "batch size" is how many jobs the server ran together on average (jobs claimed
together share one start time). Overhead at C = 16: 1 - service / batch throughput (the target is at most 10%).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from batch import EXE, deployment, prompts

HOST = "127.0.0.1"
SERVE = """
[serve]
max_jobs_per_token = 1000
rate_limit_per_minute = 100000
"""


def _time(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


def run_batch(folder: Path, model: str, steps: int, items: list[dict], warm: int, batch_size: int) -> dict:
    """One `fluxframe batch` over ``warm`` warm-up items then ``items``: steady throughput and the wall time."""
    folder.mkdir(parents=True)
    config = deployment(folder, model, steps)
    requests = folder / "requests.jsonl"
    warmups = [{"prompt": "a small white star at the top, on a black background", "seed": 10_000 + i}
               for i in range(warm)]
    requests.write_text("".join(json.dumps(x) + "\n" for x in warmups + items))
    started = time.perf_counter()
    done = subprocess.run([str(EXE), "batch", "--config", str(config), str(requests), "--batch-size",
                           str(batch_size), "--no-progress", "--results", str(folder / "results.jsonl")],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"fluxframe batch failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    lines = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]
    rows = [x for x in lines if "status" in x]
    if [x["status"] for x in rows] != ["ok"] * len(rows) or len(rows) != warm + len(items):
        sys.exit(f"fluxframe batch: {sum(x['status'] == 'ok' for x in rows)} of {warm + len(items)} released")
    span = _time(rows[-1]["time"]) - _time(rows[warm - 1]["time"])
    return {"images_per_s": len(items) / span, "seconds": span, "wall_s": wall}


class Server:
    """A `fluxframe serve` subprocess for ``config`` on a free loopback port, with one token."""

    def __init__(self, config: Path):
        import httpx

        done = subprocess.run([str(EXE), "serve", "token", "add", "bench", "--config", str(config)],
                              capture_output=True, text=True, check=True)
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        self.log = open(config.parent / "serve.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([str(EXE), "serve", "--config", str(config), "--host", HOST, "--port",
                                      str(port)], stdout=self.log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=f"http://{HOST}:{port}", timeout=600.0,
                                   headers={"Authorization": f"Bearer {done.stdout.split()[-1]}"},
                                   limits=httpx.Limits(max_connections=64))
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                sys.exit(f"fluxframe serve did not start: {(config.parent / 'serve.log').read_text()[-2000:]}")
            try:
                if self.client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def generate(self, item: dict) -> dict:
        response = self.client.post("/v1/images", params={"wait": 600}, json=item)
        job = response.json()
        if response.status_code != 200 or job.get("status") != "done":
            raise RuntimeError(f"request failed ({response.status_code}): {response.text[:500]}")
        return job

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def load(server: Server, items: list[dict], concurrency: int) -> dict:
    """``concurrency`` clients sending ``items`` one request after another each."""
    queue = list(reversed(items))
    lock = threading.Lock()
    latencies, jobs, errors = [], [], []

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                item = queue.pop()
            started = time.perf_counter()
            try:
                job = server.generate(item)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(str(exc))
                return
            with lock:
                latencies.append(time.perf_counter() - started)
                jobs.append(job)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        sys.exit(f"serve at concurrency {concurrency}: {errors[0]}")
    starts: dict[float, int] = {}
    for job in jobs:
        starts[job["started"]] = starts.get(job["started"], 0) + 1
    cuts = statistics.quantiles(latencies, n=20, method="inclusive")
    return {"images_per_s": len(items) / wall, "seconds": wall, "p50_s": statistics.median(latencies),
            "p95_s": cuts[18], "mean_batch": statistics.mean(starts.values()), "max_batch": max(starts.values())}


def measure(model: str, n: int, steps: int, rounds: int, work: Path) -> dict:
    """``rounds`` rounds of (batch, service at each concurrency), then a last batch run; each round's service
    figures are compared with the mean of the batch runs either side of it. Figures are medians over rounds."""
    items = [{"prompt": p, "seed": i} for i, p in enumerate(prompts(n))]
    batch_size = 8  # [sampler] max_batch_size's default: the most jobs the server runs together too
    folder = work / model / "serve"
    folder.mkdir(parents=True)
    config = deployment(folder, model, steps)
    config.write_text(config.read_text() + SERVE)
    batches, serves = [], []
    server = Server(config)
    try:
        warm = [{"prompt": "a small white star at the top, on a black background", "seed": 10_000 + i}
                for i in range(batch_size)]
        load(server, warm, batch_size)
        for r in range(rounds):
            batches.append(run_batch(work / model / f"batch{r}", model, steps, items, batch_size, batch_size))
            serves.append({f"serve c={c}": load(server, items, c) for c in (1, 4, 16)})
    finally:
        server.close()
    batches.append(run_batch(work / model / f"batch{rounds}", model, steps, items, batch_size, batch_size))
    references = [statistics.mean([batches[r]["images_per_s"], batches[r + 1]["images_per_s"]])
                  for r in range(rounds)]
    for r, rows in enumerate(serves):
        for row in rows.values():
            row["vs_batch"] = row["images_per_s"] / references[r]
    median = lambda values: statistics.median(values)  # noqa: E731
    rows = {"batch": {k: median([b[k] for b in batches]) for k in ("images_per_s", "seconds", "wall_s")}}
    rows["batch"]["vs_batch"] = 1.0
    for label in serves[0]:
        rows[label] = {k: median([s[label][k] for s in serves]) for k in serves[0][label]}
    return {"rows": rows, "rounds": {"batch": batches, "serve": serves},
            "batch_images_per_s": median(references), "overhead_c16": 1 - rows["serve c=16"]["vs_batch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "demo"], choices=["tiny", "demo"])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: measure(m, args.requests, args.steps, args.rounds, Path(tmp)) for m in args.models}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for model, result in results.items():
        print(f"\n{model}: {args.requests} requests, 256², {args.steps} steps, full safety + provenance, medians of "
              f"{args.rounds} rounds "
              f"(load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)")
        print(f"  {'run':<14}{'img/s':>8}{'vs batch':>10}{'p50 s':>8}{'p95 s':>8}{'batch size':>12}")
        for label, row in result["rows"].items():
            extra = (f"{row['p50_s']:8.2f}{row['p95_s']:8.2f}{row['mean_batch']:8.1f} (max {row['max_batch']})"
                     if "p50_s" in row else f"   (steady; wall with start-up {row['wall_s']:.1f} s)")
            print(f"  {label:<14}{row['images_per_s']:8.2f}{row['vs_batch']:9.2f}x{extra}")
        per_round = ", ".join(f"{r['serve c=16']['vs_batch']:.2f}x" for r in result["rounds"]["serve"])
        batch_runs = ", ".join(f"{b['images_per_s']:.2f}" for b in result["rounds"]["batch"])
        print(f"  per round: serve c=16 vs batch {per_round}; batch runs {batch_runs} img/s")
        print(f"  service overhead at concurrency 16: {100 * result['overhead_c16']:.1f}% of batch throughput "
              f"({result['batch_images_per_s']:.2f} img/s; target <= 10%)")


if __name__ == "__main__":
    main()
