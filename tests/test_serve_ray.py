"""`fluxframe serve --ray` (fluxframe.serve.ray) on a local Ray with two model replicas of the tiny preset: the
replicas share the requests, each writes its own audit chain, and a replica killed mid-job has its job run again
elsewhere and released once. Loopback only; every wait is bounded; Ray is shut down whatever happens."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from fluxframe.core.audit import replica_logs, verify_logs  # noqa: E402
from fluxframe.core.batch import RELEASED  # noqa: E402
from fluxframe.core.config import load_config  # noqa: E402
from fluxframe.serve.store import FINISHED, Store  # noqa: E402

DEPLOY = """[model]\npreset = "tiny"\ndtype = "float32"\ndevice = "cpu"
[sampler]\nsteps = 1\nwidth = 64\nheight = 64
[safety]\naudit_log = "audit/audit.jsonl"\nrequire = ["prompt-nsfw"]
[output]\ndir = "out"
[serve]\nstate_dir = "state"\nbatch_wait_ms = 50
[serve.ray]\nreplicas = 2\nnum_cpus = 1\nmax_batch_size = 2\nlease_seconds = 3
"""

def load_config_text(text: str):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "deploy.toml").write_text(text)
        return load_config(Path(folder) / "deploy.toml")


START_TIMEOUT = 120  # Ray, Serve and two replicas loading the tiny preset, on two busy cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(what: str, check, timeout: float, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from fluxframe.serve.ray import APP_NAME, build_app

    root = tmp_path_factory.mktemp("serve-ray")
    (root / "deploy.toml").write_text(DEPLOY)
    config = load_config(root / "deploy.toml")
    port = _free_port()
    started = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        errors: list[BaseException] = []

        def run() -> None:
            try:
                serve.run(build_app(config, insecure_no_auth=True), name=APP_NAME, route_prefix="/")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        runner.join(START_TIMEOUT)
        assert not runner.is_alive(), "serve.run did not finish in time"
        assert not errors, errors
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        _until("/readyz", lambda: client.get("/readyz").status_code == 200, 60, every=0.5)
        print(f"\nstart-up: {time.monotonic() - started:.1f}s")
        yield SimpleNamespace(root=root, config=config, client=client,
                              store=Store(config.serve_state_dir / "jobs.sqlite"))
        client.close()
    finally:
        serve.shutdown()
        ray.shutdown()


def test_deployment_options_come_from_serve_ray():
    from fluxframe.serve.ray import batch_size, deployment_options

    config = load_config_text(DEPLOY)
    options = deployment_options(config)
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0} and batch_size(config) == 2
    scaled = load_config_text(DEPLOY.replace("replicas = 2", "min_replicas = 1\nmax_replicas = 4\nnum_gpus = 1")
                              .replace("max_batch_size = 2\n", ""))
    options = deployment_options(scaled)
    assert "num_replicas" not in options and options["ray_actor_options"]["num_gpus"] == 1.0
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}


def _finished(cluster, job_id: str, timeout: float):
    def done():
        job = cluster.store.get(job_id)
        return job if job.status in FINISHED else None

    return _until(f"job {job_id}", done, timeout)


def _audit(cluster) -> dict[Path, list[dict]]:
    return {p: [json.loads(line) for line in p.read_text().splitlines()]
            for p in replica_logs(cluster.root / "audit" / "audit.jsonl")}


def _released(lines: list[dict], job_id: str) -> list[dict]:
    return [r for r in lines if r.get("request_id") == job_id and r.get("action") in RELEASED]


def _submit(cluster, **body) -> str:
    answer = cluster.client.post("/v1/images", json={"prompt": "a red circle", **body})
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def test_two_replicas_share_the_requests_each_with_its_own_audit_chain(cluster):
    started = time.monotonic()
    ids = [_submit(cluster, seed=i) for i in range(6)]
    jobs = [_finished(cluster, job_id, 90) for job_id in ids]
    assert [j.status for j in jobs] == ["done"] * 6, [(j.status, j.reasons) for j in jobs]
    assert all(j.attempts == 1 for j in jobs)
    logs = _audit(cluster)
    assert len(logs) == 2 and all(p.name.startswith("audit-") for p in logs)  # one per replica, none shared
    for lines in logs.values():
        assert any(r.get("request_id") in ids and r.get("action") == "allow" for r in lines)
    for job_id in ids:  # each job released exactly once, across all the logs
        assert sum(len(_released(lines, job_id)) for lines in logs.values()) == 1
    assert len({j.worker for j in jobs}) == 2
    # the API shows it as the plain server does
    shown = cluster.client.get(f"/v1/jobs/{ids[0]}").json()
    assert shown["status"] == "done" and shown["result"]["image"] == f"/v1/jobs/{ids[0]}/image"
    image = cluster.client.get(f"/v1/jobs/{ids[0]}/image")
    assert image.status_code == 200 and hashlib.sha256(image.content).hexdigest() == jobs[0].result["sha256"]
    print(f"\n6 jobs on two replicas: {time.monotonic() - started:.1f}s")


def test_a_replica_killed_mid_job_has_it_rerun_elsewhere_and_released_once(cluster):
    started = time.monotonic()
    job_id = _submit(cluster, seed=7, steps=40)

    def running():
        job = cluster.store.get(job_id)
        return job if job.status == "running" and job.step and job.step < 40 else None

    victim = _until("the job to be running", running, 60, every=0.02)
    pid = int(victim.worker.rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)  # a replica process dies mid-job: no clean-up, no audit line
    killed = time.monotonic()
    job = _finished(cluster, job_id, 90)
    print(f"\nkilled at step {victim.step}/40; rerun and finished {time.monotonic() - killed:.1f}s later "
          f"({time.monotonic() - started:.1f}s in all)")
    assert job.status == "done", job.reasons
    assert job.attempts == 2 and job.worker != victim.worker
    logs = _audit(cluster)
    victim_log = next(p for p in logs if p.stem.endswith(victim.worker.split(":")[1]))
    assert not [r for r in logs[victim_log] if r.get("request_id") == job_id]  # it died before releasing
    released = [r for lines in logs.values() for r in _released(lines, job_id)]
    assert len(released) == 1  # exactly once, across every replica's log
    output = Path(job.result["output"])
    assert output.is_file() and hashlib.sha256(output.read_bytes()).hexdigest() == released[0]["output"]["sha256"]
    assert job.result["sha256"] == released[0]["output"]["sha256"]
    checks = verify_logs(cluster.root / "audit")
    assert len(checks) >= 2 and all(check.ok for _, check in checks), checks
