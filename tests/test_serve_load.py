"""`fluxframe serve` under load, as a real server process on 127.0.0.1 (issue 25): 50 concurrent requests lose
nothing, duplicate nothing, run in dynamic batches and every image verifies; the demo model end to end; kill -9
with jobs running and queued, then a restart on the same state folder finishes each job exactly once; a client
leaving an event stream does not stop its job.

Each server is a `python -m fluxframe.cli serve` subprocess on a free loopback port, killed in a ``finally``. The
tiny preset runs at 256², the smallest size whose images carry a watermark (dwtDct's minimum area), so "verifies"
means a trusted C2PA signature bound to the pixels and a readable mark.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from fluxframe.core.audit import verify_log
from fluxframe.provenance.certs import make_dev_certificates
from fluxframe.provenance.verify import verify

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

TINY = """[model]\npreset = "tiny"\ndtype = "float32"\ndevice = "cpu"
[sampler]\nsteps = 1\nwidth = 256\nheight = 256\nmax_batch_size = 8
[safety]\naudit_log = "audit.jsonl"\nrequire = ["prompt-nsfw"]
[output]\ndir = "out"
[provenance.watermark]\nmethod = "dwtDct"
[provenance.c2pa]\ncertificate = "{certs}/chain.pem"\nprivate_key = "{certs}/key.pem"
[serve]\nmax_jobs_per_token = 100\nrate_limit_per_minute = 1000\nbatch_wait_ms = 100
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_dev_certificates(tmp_path_factory.mktemp("certs"))


def tiny_deployment(folder: Path, certs: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "deploy.toml"
    config.write_text(TINY.format(certs=certs["chain"].parent))
    return config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def add_token(config: Path, name: str = "load") -> str:
    done = subprocess.run([sys.executable, "-m", "fluxframe.cli", "serve", "token", "add", name, "--config",
                           str(config)], capture_output=True, text=True, env=_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1]


@contextmanager
def server(config: Path, token: str):
    """A `fluxframe serve` process for ``config``, ready; an httpx client for it. Killed on the way out."""
    port = free_port()
    log = open(config.parent / f"serve-{port}.log", "w")  # noqa: SIM115 - closed in the finally
    proc = subprocess.Popen([sys.executable, "-m", "fluxframe.cli", "serve", "--config", str(config),
                             "--host", HOST, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=_env())
    client = httpx.Client(base_url=f"http://{HOST}:{port}", headers={"Authorization": f"Bearer {token}"},
                          timeout=httpx.Timeout(120.0), limits=httpx.Limits(max_connections=100))
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (config.parent / f"serve-{port}.log").read_text()
            try:
                ready = client.get("/readyz")
                if ready.status_code == 200:
                    break
                assert "still loading" in ready.json()["error"], ready.json()  # a load error: no point waiting
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready in 120 s"
            time.sleep(0.1)
        client.proc = proc
        yield client
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        log.close()


def audit_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def requests_audited(path: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for record in audit_lines(path):
        if record.get("event", "request") == "request" and record.get("request_id"):
            out.setdefault(record["request_id"], []).append(record)
    return out


def check_exactly_once(client: httpx.Client, folder: Path, ca: Path, ids: set[str], *,
                       flat_images: bool = False) -> dict[str, dict]:
    """Every job the server has is done, released once (one audit line, action allow, one file whose sha256 the
    line names) and its image verifies (trusted signature, readable watermark); the audit chain verifies; no image
    or audit line without a job. With ``flat_images`` (the demo model's flat shapes at 256², where the dwtDct
    fallback mark is not always readable), an unreadable mark passes where the signed manifest records it so.
    The jobs as the API describes them."""
    jobs = {j["id"]: j for j in client.get("/v1/jobs", params={"limit": 500}).json()["jobs"]}
    assert set(jobs) == ids, "the store has other jobs than those accepted, or lost some"
    assert {j["status"] for j in jobs.values()} == {"done"}, {i: j["status"] for i, j in jobs.items()}
    audited = requests_audited(folder / "audit.jsonl")
    assert set(audited) == ids
    assert all(len(lines) == 1 and lines[0]["action"] == "allow" for lines in audited.values()), \
        {i: [x["action"] for x in lines] for i, lines in audited.items() if len(lines) != 1}
    assert verify_log(folder / "audit.jsonl").ok
    assert {p.stem for p in (folder / "out").glob("*.png")} == ids
    for job_id, lines in audited.items():
        path = folder / "out" / f"{job_id}.png"
        assert lines[0]["output"]["path"] == str(path)
        served = client.get(f"/v1/jobs/{job_id}/image")
        assert served.status_code == 200 and served.content == path.read_bytes()
        assert hashlib.sha256(served.content).hexdigest() == lines[0]["output"]["sha256"] == \
            jobs[job_id]["result"]["sha256"]
        report = verify(path, trust=[ca])
        recorded = flat_images and any("watermark did not survive" in note for note in report.notes)
        assert report.ok and report.trusted and (report.watermark.get("detected") or recorded), \
            (job_id, report.reasons, report.notes)
    return jobs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, certs):
    """One tiny-preset server for the load and event-stream tests: (client, folder)."""
    folder = tmp_path_factory.mktemp("tiny")
    config = tiny_deployment(folder, certs)
    with server(config, add_token(config)) as client:
        yield client, folder


def test_50_concurrent_requests_none_lost_none_twice_batched_and_all_verify(tiny, certs):
    client, folder = tiny
    prompts = [f"a {c} {s}, number {i}" for i, (c, s) in enumerate(
        (c, s) for c in ("red", "green", "blue", "yellow", "white") for s in ("circle", "square") for _ in range(5))]
    assert len(prompts) == 50

    def ask(prompt: str) -> dict:
        response = client.post("/v1/images", params={"wait": 120}, json={"prompt": prompt})
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(ask, prompts))
    ids = {a["id"] for a in answers}
    assert len(ids) == 50 and {a["status"] for a in answers} == {"done"}

    jobs = check_exactly_once(client, folder, certs["ca"], ids | set(_other_jobs(client, ids)))
    assert all(jobs[i]["attempts"] == 1 for i in ids)
    # Dynamic batching: a claim marks all the jobs it runs together with one start time.
    batches: dict[float, int] = {}
    for i in ids:
        batches[jobs[i]["started"]] = batches.get(jobs[i]["started"], 0) + 1
    assert max(batches.values()) > 1, f"every job ran alone: {sorted(batches.values())}"
    assert max(batches.values()) <= 8  # [sampler] max_batch_size


def _other_jobs(client: httpx.Client, ids: set[str]) -> list[str]:
    """Jobs of this module's other tests on the shared server (all finished by now)."""
    return [j["id"] for j in client.get("/v1/jobs", params={"limit": 500}).json()["jobs"] if j["id"] not in ids]


def test_a_client_leaving_the_event_stream_leaves_its_job_running(tiny, certs):
    client, folder = tiny
    job = client.post("/v1/images", json={"prompt": "a slow purple star", "steps": 40}).json()
    seen = []
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
        for line in events.iter_lines():
            if line.startswith("event: "):
                seen.append(line.removeprefix("event: "))
                if seen[-1] in ("running", "step"):
                    break
    # the stream is closed here, mid-job
    assert seen[-1] in ("running", "step"), seen
    deadline = time.monotonic() + 120
    while (status := client.get(f"/v1/jobs/{job['id']}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status["status"] == "done" and status["settings"]["steps"] == 40
    assert [r["action"] for r in requests_audited(folder / "audit.jsonl")[job["id"]]] == ["allow"]
    assert verify(folder / "out" / f"{job['id']}.png", trust=[certs["ca"]]).ok
    assert client.get("/healthz").json() == {"status": "ok"}


def test_the_demo_model_end_to_end(tmp_path, certs):
    text = (ROOT / "configs" / "demo.toml").read_text()
    for old, new in (('"../models/shapes-v1"', f'"{ROOT / "models" / "shapes-v1"}"'),
                     ('"../outputs"', f'"{tmp_path / "out"}"'),
                     ('"../outputs/audit.jsonl"', f'"{tmp_path / "audit.jsonl"}"'),
                     ('"protected-names.txt"', f'"{ROOT / "configs" / "protected-names.txt"}"'),
                     ('"../.fluxframe-dev/', f'"{certs["chain"].parent}/')):
        assert old in text, f"configs/demo.toml changed: no {old}"
        text = text.replace(old, new)
    config = tmp_path / "demo.toml"
    config.write_text(text)
    with server(config, add_token(config)) as client:
        ready = client.get("/readyz").json()
        assert sorted(ready["required_filters"]) == ["image-nsfw", "ip", "prompt-nsfw"]
        prompts = ["a large red circle in the centre, on a black background",
                   "a small blue square on the left, on a white background",
                   "a large yellow star at the top, on a purple background"]
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda i: client.post("/v1/images", params={"wait": 300}, json={
                "prompt": prompts[i], "seed": 11 + i}), range(3)))  # fixed seeds: the same images every run
        assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
        ids = {a.json()["id"] for a in answers}
        jobs = check_exactly_once(client, tmp_path, certs["ca"], ids, flat_images=True)
        assert {j["settings"]["steps"] for j in jobs.values()} == {24}
        report = client.post("/v1/verify", files={"file": ("x.png", client.get(
            f"/v1/jobs/{answers[0].json()['id']}/image").content, "image/png")}).json()
        assert report["manifest_present"] and report["signature_valid"] and report["ai_generated"]


def test_kill_9_mid_queue_then_restart_runs_each_job_exactly_once(tmp_path, certs):
    config = tiny_deployment(tmp_path, certs)
    token = add_token(config)
    audit = tmp_path / "audit.jsonl"
    with server(config, token) as client:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda i: client.post("/v1/images", json={"prompt": f"a red circle {i}"}),
                                    range(12)))
        assert [a.status_code for a in answers] == [202] * 12
        ids = {a.json()["id"] for a in answers}
        before = set(requests_audited(audit))
        # Kill at the first release while a batch is running: the release's own batch, normally (the store
        # records a batch's ends after its last image), with the next one queued. It is the audit log's first
        # line, so the kill may fall before that line's head too (the log's genesis head covers it).
        store = sqlite3.connect(tmp_path / "out" / ".fluxframe-serve" / "jobs.sqlite", isolation_level=None)
        deadline = time.monotonic() + 120
        while not (set(requests_audited(audit)) - before
                   and store.execute("SELECT COUNT(*) FROM jobs WHERE status='running'").fetchone()[0]):
            assert time.monotonic() < deadline and client.proc.poll() is None
            time.sleep(0.005)
        client.proc.send_signal(signal.SIGKILL)
        client.proc.wait(30)
        store.close()

    with sqlite3.connect(tmp_path / "out" / ".fluxframe-serve" / "jobs.sqlite") as db:
        at_kill = dict(db.execute("SELECT id, status FROM jobs").fetchall())
    released = set(requests_audited(audit)) - before
    running = {i for i, s in at_kill.items() if s == "running"}
    assert set(at_kill) == ids and released and released < ids
    assert running and {s for s in at_kill.values()} <= {"queued", "running", "done"}

    with server(config, token) as client:
        deadline = time.monotonic() + 120
        while any(j["status"] in ("queued", "running")
                  for j in client.get("/v1/jobs", params={"limit": 100}).json()["jobs"]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        jobs = check_exactly_once(client, tmp_path, certs["ca"], ids)
    for job_id, job in jobs.items():
        if job_id in running and job_id in released:  # released before the kill: finished from its audit line
            assert job["attempts"] == 1 and job["result"]["source"] == "audit"
        elif job_id in running:  # killed mid-run: run again from the start
            assert job["attempts"] == 2 and "source" not in job["result"]
        else:
            assert job["attempts"] == 1
