"""`fluxframe serve` in process (fastapi's TestClient): auth, limits, errors naming the field, the job life
(queued → running → done/blocked/cancelled), events, the signed image, verification, recovery after a crash
and retention. Real servers, load and kill -9 are in test_serve_load.py; the web page in test_serve_web.py."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fluxframe import api
from fluxframe.cli import main
from fluxframe.core.audit import verify_log
from fluxframe.core.config import load_config
from fluxframe.core.hashing import sha256_file
from fluxframe.core.types import GenerationRequest
from fluxframe.errors import Cancelled, ConfigError
from fluxframe.serve import check_auth, lock_state
from fluxframe.serve.app import create_app
from fluxframe.serve.service import Service

DEPLOY = """[model]\npreset = "tiny"\ndtype = "float32"\ndevice = "cpu"
[sampler]\nsteps = 2\nwidth = 64\nheight = 64
[safety]\naudit_log = "audit.jsonl"\nrequire = ["prompt-nsfw"]
[output]\ndir = "out"
"""
BLOCKED = "a n4ked w o m a n, nsfw"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "deploy.toml").write_text(DEPLOY)
    config = load_config(root / "deploy.toml")
    return root, config, api.load(config)


def _service(deployment, tmp_path, **serve) -> Service:
    """A Service over the module's loaded pipeline, its own state folder and [serve] settings."""
    root, config, pipeline = deployment
    settings = config.serve.model_copy(update={"state_dir": str(tmp_path / "state"), "batch_wait_ms": 0, **serve})
    return Service(config.model_copy(update={"serve": settings}), pipeline=pipeline)


def _client(service: Service, *, start: bool = True) -> tuple[TestClient, dict]:
    token = service.store.add_token("alice")
    if start:
        service.start(wait=True)
    return TestClient(create_app(service, start=False)), {"Authorization": f"Bearer {token}"}


def _audit(deployment, job_id=None) -> list[dict]:
    lines = [json.loads(x) for x in (deployment[0] / "audit.jsonl").read_text().splitlines()]
    return [x for x in lines if job_id is None or x.get("request_id") == job_id]


def _png(size=(64, 64), colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def _wait(service, job_id, statuses=("done", "blocked", "error", "cancelled"), timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = service.store.get(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {service.store.get(job_id).status}")


# -- tokens and start-up -----------------------------------------------------------------------------------


def test_token_add_prints_it_once_and_stores_only_its_hash(tmp_path, capsys):
    (tmp_path / "deploy.toml").write_text(DEPLOY)
    config = str(tmp_path / "deploy.toml")
    assert main(["serve", "token", "add", "alice", "--config", config]) == 0
    token = capsys.readouterr().out.split()[-1]
    assert token.startswith("ff_") and len(token) > 30
    db = tmp_path / "out" / ".fluxframe-serve" / "jobs.sqlite"
    for path in db.parent.iterdir():  # the token itself is nowhere in the state folder
        assert token.encode() not in path.read_bytes()
    rows = sqlite3.connect(db).execute("SELECT name, sha256 FROM tokens").fetchall()
    assert rows[0][0] == "alice" and len(rows[0][1]) == 64
    assert main(["serve", "token", "add", "alice", "--config", config]) == 1
    assert "exists already" in capsys.readouterr().err
    assert main(["serve", "token", "add", "bad name", "--config", config]) == 1
    assert "NAME" in capsys.readouterr().err
    assert main(["serve", "token", "list", "--config", config]) == 0
    assert capsys.readouterr().out.split() == ["alice"]
    assert main(["serve", "token", "remove", "alice", "--config", config]) == 0
    assert main(["serve", "token", "remove", "alice", "--config", config]) == 1


def test_secure_by_default():
    with pytest.raises(ConfigError, match="no API tokens"):
        check_auth("127.0.0.1", tokens=[], insecure_no_auth=False)
    with pytest.raises(ConfigError, match="loopback"):
        check_auth("0.0.0.0", tokens=[], insecure_no_auth=True)
    with pytest.raises(ConfigError, match="loopback"):
        check_auth("192.168.1.5", tokens=["a"], insecure_no_auth=True)
    check_auth("127.0.0.1", tokens=[], insecure_no_auth=True)
    check_auth("::1", tokens=[], insecure_no_auth=True)
    check_auth("0.0.0.0", tokens=["alice"], insecure_no_auth=False)


def test_serve_refuses_to_start_without_tokens(tmp_path, capsys):
    (tmp_path / "deploy.toml").write_text(DEPLOY)
    assert main(["serve", "--config", str(tmp_path / "deploy.toml"), "--port", "0"]) == 1
    assert "no API tokens" in capsys.readouterr().err


def test_one_server_per_state_folder(tmp_path):
    held = lock_state(tmp_path / "state")
    try:
        with pytest.raises(ConfigError, match="another `fluxframe serve`"):
            lock_state(tmp_path / "state")
    finally:
        held.close()
    lock_state(tmp_path / "state").close()


def test_probes_before_and_after_loading(deployment, tmp_path):
    service = _service(deployment, tmp_path)
    pipeline, service.pipeline = service.pipeline, None  # not loaded yet
    client = TestClient(create_app(service, start=False))
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 503
    token = service.store.add_token("alice")
    refused = client.post("/v1/images", json={"prompt": "x"}, headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 503 and refused.headers["retry-after"]
    service.pipeline = pipeline
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["required_filters"] == ["prompt-nsfw"]
    assert "fluxframe_ready 1.0" in client.get("/metrics").text


# -- the job life ------------------------------------------------------------------------------------------


def test_a_job_is_made_signed_audited_and_served_as_written(deployment, tmp_path):
    service = _service(deployment, tmp_path)
    client, auth = _client(service)
    try:
        assert client.post("/v1/images", json={"prompt": "a red circle"}).status_code == 401
        wrong = client.post("/v1/images", json={"prompt": "a red circle"}, headers={"Authorization": "Bearer ff_x"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        done = client.post("/v1/images?wait=60", json={"prompt": "a red circle", "seed": 5}, headers=auth)
        assert done.status_code == 200, done.json()
        job = done.json()
        assert job["status"] == "done" and job["client"] == "alice" and job["settings"]["seed"] == 5
        image = client.get(job["result"]["image"], headers=auth)
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        path = deployment[1].output_dir / f"{job['id']}.png"
        assert image.content == path.read_bytes()  # the exact file released
        (line,) = _audit(deployment, job["id"])
        assert line["action"] == "allow" and line["client"] == "alice"
        assert line["output"]["sha256"] == sha256_file(path) == job["result"]["sha256"]
        assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["status"] == "done"
        # another token sees none of it
        other = {"Authorization": f"Bearer {service.store.add_token('bob')}"}
        assert client.get(f"/v1/jobs/{job['id']}", headers=other).status_code == 404
        assert client.get(f"/v1/jobs/{job['id']}/image", headers=other).status_code == 404
        assert client.get("/v1/jobs", headers=other).json() == {"jobs": []}
        assert [j["id"] for j in client.get("/v1/jobs", headers=auth).json()["jobs"]] == [job["id"]]
        assert verify_log(deployment[0] / "audit.jsonl").ok
    finally:
        service.stop()


def test_a_blocked_request_is_a_blocked_job_never_an_image(deployment, tmp_path):
    service = _service(deployment, tmp_path)
    client, auth = _client(service)
    try:
        queued = client.post("/v1/images", json={"prompt": BLOCKED}, headers=auth)
        assert queued.status_code == 202 and queued.headers["location"] == f"/v1/jobs/{queued.json()['id']}"
        job_id = queued.json()["id"]
        with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth) as stream:
            events = [line.removeprefix("event: ") for line in stream.iter_lines() if line.startswith("event:")]
        assert events[-1] == "blocked"
        job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
        assert job["status"] == "blocked" and "prompt-nsfw" in job["reasons"][0] and "image" not in job["result"]
        assert client.get(f"/v1/jobs/{job_id}/image", headers=auth).status_code == 404
        assert [x["action"] for x in _audit(deployment, job_id)] == ["block"]
        assert not list(deployment[1].output_dir.glob(f"{job_id}*"))
        assert 'fluxframe_blocked_total{filter="prompt-nsfw"} 1.0' in client.get("/metrics").text
    finally:
        service.stop()


def test_events_follow_a_job_from_the_queue_to_its_steps_and_end(deployment, tmp_path):
    service = _service(deployment, tmp_path)
    client, auth = _client(service, start=False)
    job_id = client.post("/v1/images", json={"prompt": "a blue square", "steps": 3}, headers=auth).json()["id"]
    events = []

    def listen():
        with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth) as stream:
            name = None
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    name = line.removeprefix("event: ")
                elif line.startswith("data:"):
                    events.append((name, json.loads(line.removeprefix("data: "))))

    model = service.pipeline.stages.model
    predict = model.predict

    def slow(*args, **kwargs):  # steps slow enough for the events' 0.1 s polling to see each one
        time.sleep(0.3)
        return predict(*args, **kwargs)

    listener = threading.Thread(target=listen)
    listener.start()
    time.sleep(0.5)
    model.predict = slow
    try:
        service.start(wait=True)
        listener.join(60)
    finally:
        service.stop()
        del model.predict
    names = [name for name, _ in events]
    assert names[0] == "queued" and events[0][1]["position"] == 0
    assert names[-1] == "done" and events[-1][1]["result"]["image"].endswith("/image")
    steps = [data["step"] for name, data in events if name == "step"]
    assert steps in ([1, 2], [1, 2, 3])  # the last step may end the job before the next poll sees it


def test_bad_requests_are_refused_naming_the_field(deployment, tmp_path):
    service = _service(deployment, tmp_path, max_prompt_chars=50, max_references=1, max_image_pixels=128 * 128,
                       max_body_bytes=64 * 1024)
    client, auth = _client(service, start=False)

    def refused(body, status, field, headers=None, **kwargs):
        headers = {**auth, **(headers or {})}
        answer = client.post("/v1/images", json=body, headers=headers, **kwargs) if body is not None else \
            client.post("/v1/images", headers=headers, **kwargs)
        assert answer.status_code == status, answer.json()
        assert answer.json()["field"] == field, answer.json()
        return answer.json()["error"]

    assert "unknown field" in refused({"prompt": "x", "bogus": 1}, 422, "bogus")
    assert "multiple of 16" in refused({"prompt": "x", "width": 63}, 422, "width")
    assert refused({"prompt": "x", "steps": 0}, 422, "steps")
    assert refused({"prompt": 3}, 422, "prompt")
    assert refused({"negative_prompt": "x"}, 422, "prompt")
    assert "51 characters" in refused({"prompt": "x" * 51}, 413, "prompt")
    assert "2 reference images" in refused({"prompt": "x", "references": [base64.b64encode(_png()).decode()] * 2},
                                           413, "references")
    assert "base64" in refused({"prompt": "x", "references": ["not base64!"]}, 422, "references[0]")
    big = base64.b64encode(_png((200, 200))).decode()
    assert "200x200" in refused({"prompt": "x", "references": [big]}, 413, "reference.images[0]")
    assert "not a readable image" in refused({"prompt": "x", "references": [base64.b64encode(b"GIF8").decode()]},
                                             422, "reference.images[0]")
    assert refused(None, 413, "body", content=b"{" + b" " * 70 * 1024 + b"}",
                   headers={"content-type": "application/json"})
    assert "not valid JSON" in refused(None, 422, "body", content=b"{nope",
                                       headers={"content-type": "application/json"})
    assert refused(None, 415, "content-type", content=b"x", headers={"content-type": "text/plain"})
    assert "nested" in refused(None, 422, "body", content=b"[" * 30000 + b"]" * 30000,
                               headers={"content-type": "application/json"})
    assert refused({"prompt": "x"}, 422, "wait", params={"wait": "nan"})
    assert refused({"prompt": "x"}, 422, "wait", params={"wait": 100000})
    assert service.store.counts()["queued"] == 0  # nothing half-accepted


def test_uploads_as_multipart_reach_the_model_as_sent(deployment, tmp_path):
    service = _service(deployment, tmp_path)
    client, auth = _client(service)
    try:
        data = _png(colour=(10, 200, 10))
        answer = client.post("/v1/images?wait=60", headers=auth,
                             data={"request": json.dumps({"prompt": "make it blue", "seed": 3})},
                             files=[("references", ("ref.png", data, "image/png"))])
        assert answer.status_code == 200, answer.json()
        (line,) = _audit(deployment, answer.json()["id"])
        assert line["input_files"] == [{"role": "reference.images[0]", "sha256": line["input_files"][0]["sha256"],
                                        "bytes": len(data)}]
        from fluxframe.core.hashing import sha256_bytes

        assert line["input_files"][0]["sha256"] == sha256_bytes(data)
        # the same request as base64 JSON gives the same image
        again = client.post("/v1/images?wait=60", headers=auth, json={
            "prompt": "make it blue", "seed": 3, "references": [base64.b64encode(data).decode()]}).json()
        first = client.get(answer.json()["result"]["image"], headers=auth).content
        second = client.get(again["result"]["image"], headers=auth).content
        assert Image.open(io.BytesIO(first)).tobytes() == Image.open(io.BytesIO(second)).tobytes()
        bad = client.post("/v1/images", headers=auth, data={"request": json.dumps({"prompt": "x"})},
                          files=[("photo", ("a.png", data, "image/png"))])
        assert bad.status_code == 422 and bad.json()["field"] == "photo"
        two = client.post("/v1/images?wait=60", headers=auth, data={"request": json.dumps({"prompt": "x"})},
                          files=[("conditioning.reference.images", (f"{i}.png", data, "image/png")) for i in (0, 1)])
        assert two.status_code == 200 and two.json()["status"] == "done", two.json()
        assert len(_audit(deployment, two.json()["id"])[0]["input_files"]) == 2
        for field, files in (("conditioning.nothere", [("conditioning.nothere.image", ("a.png", data, "image/png"))]),
                             ("conditioning.reference.mask", [("conditioning.reference.mask", ("a.png", data))])):
            bad = client.post("/v1/images", headers=auth, data={"request": json.dumps({"prompt": "x"})}, files=files)
            assert bad.status_code == 422 and bad.json()["field"] == field, bad.json()
    finally:
        service.stop()


# -- limits ------------------------------------------------------------------------------------------------


def test_a_full_queue_answers_429_with_retry_after(deployment, tmp_path):
    service = _service(deployment, tmp_path, max_queue=2)
    client, auth = _client(service, start=False)  # no worker: the queue only fills
    for _ in range(2):
        assert client.post("/v1/images", json={"prompt": "x"}, headers=auth).status_code == 202
    full = client.post("/v1/images", json={"prompt": "x"}, headers=auth)
    assert full.status_code == 429 and int(full.headers["retry-after"]) > 0 and "queue is full" in full.json()["error"]
    assert service.store.counts()["queued"] == 2
    assert "fluxframe_queue_length 2.0" in client.get("/metrics").text


def test_per_token_rate_and_job_limits(deployment, tmp_path):
    service = _service(deployment, tmp_path, rate_limit_per_minute=3, max_jobs_per_token=2)
    client, auth = _client(service, start=False)
    assert [client.post("/v1/images", json={"prompt": "x"}, headers=auth).status_code for _ in range(3)] == \
        [202, 202, 429]  # the third: two jobs already queued
    limited = client.post("/v1/images", json={"prompt": "x"}, headers=auth)
    assert limited.status_code == 429 and "a minute" in limited.json()["error"] and limited.headers["retry-after"]
    other = {"Authorization": f"Bearer {service.store.add_token('bob')}"}
    assert client.post("/v1/images", json={"prompt": "x"}, headers=other).status_code == 202


# -- cancelling --------------------------------------------------------------------------------------------


def test_cancelling_a_queued_job_removes_it(deployment, tmp_path):
    service = _service(deployment, tmp_path)
    client, auth = _client(service, start=False)
    job_id = client.post("/v1/images", json={"prompt": "x"}, headers=auth).json()["id"]
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "cancelled"
    assert service.store.next_batch("serve", 8) == []
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "cancelled"
    assert _audit(deployment, job_id) == []  # it never ran


def test_cancelling_a_running_job_stops_it_writes_nothing_and_is_audited(deployment, tmp_path):
    service = _service(deployment, tmp_path)
    client, auth = _client(service, start=False)
    ids = [client.post("/v1/images", json={"prompt": f"shape {i}", "steps": 3}, headers=auth).json()["id"]
           for i in range(2)]
    jobs = service.store.next_batch("serve", 8)  # both running, as one batch
    assert [j.id for j in jobs] == ids
    assert client.delete(f"/v1/jobs/{ids[0]}", headers=auth).json() == {"id": ids[0], "status": "running",
                                                                          "cancelling": True}
    service.run_jobs(jobs)
    assert service.store.get(ids[0]).status == "cancelled" and service.store.get(ids[1]).status == "done"
    assert [x["action"] for x in _audit(deployment, ids[0])] == ["cancelled"]
    assert not list(deployment[1].output_dir.glob(f"{ids[0]}*"))
    assert [x["action"] for x in _audit(deployment, ids[1])] == ["allow"]


def test_generate_many_stops_a_cancelled_request_at_the_next_step(deployment):
    pipeline = deployment[2]
    asked, seen = [], []
    requests = [GenerationRequest(prompt="a", seed=1, steps=4, request_id="c1"),
                GenerationRequest(prompt="b", seed=2, steps=4, request_id="c2")]

    def cancelled(request_id):
        asked.append(request_id)
        return request_id == "c1" and len(seen) >= 1  # after the first step

    out = pipeline.generate_many(requests, write=False, progress=lambda info: seen.append(info.request_ids),
                                 cancelled=cancelled)
    assert isinstance(out[0], Cancelled) and out[1].image is not None
    assert seen[0] == ("c1", "c2")
    alone = pipeline.generate(GenerationRequest(prompt="b", seed=2, steps=4), write=False)
    gap = np.abs(np.asarray(alone.image, dtype=int) - np.asarray(out[1].image, dtype=int)).max()
    assert gap <= 1  # the other request is untouched: its image is the one it gets alone (within 1/255, batched)
    # all of a batch cancelled: the batch stops
    steps = []
    out = pipeline.generate_many(requests, write=False, progress=lambda info: steps.append(info.step),
                                 cancelled=lambda rid: bool(steps))
    assert all(isinstance(o, Cancelled) for o in out) and steps == [1]


# -- batching, recovery, retention -------------------------------------------------------------------------


def test_the_worker_takes_compatible_jobs_together(deployment, tmp_path):
    service = _service(deployment, tmp_path, max_batch_size=3)
    client, auth = _client(service, start=False)
    ids = [client.post("/v1/images", json={"prompt": f"p{i}", **extra}, headers=auth).json()["id"]
           for i, extra in enumerate([{}, {"width": 32}, {}, {}, {}])]
    first = service.store.next_batch("serve", 3)
    assert [j.id for j in first] == [ids[0], ids[2], ids[3]]  # the odd size waits for its own batch
    assert [j.id for j in service.store.next_batch("serve", 3)] == [ids[1]]
    assert [j.id for j in service.store.next_batch("serve", 3)] == [ids[4]]
    # with a wait, a lone fresh job is not taken yet: more may come to share its batch
    late = client.post("/v1/images", json={"prompt": "late"}, headers=auth).json()["id"]
    assert service.store.next_batch("serve", 3, wait=30) == []
    assert [j.id for j in service.store.next_batch("serve", 3)] == [late]


def test_a_job_running_when_the_server_died_runs_again_once(deployment, tmp_path):
    service = _service(deployment, tmp_path)
    client, auth = _client(service, start=False)
    lost = client.post("/v1/images", json={"prompt": "lost mid-run"}, headers=auth).json()["id"]
    released = client.post("/v1/images", json={"prompt": "released, not recorded"}, headers=auth).json()["id"]
    jobs = service.store.next_batch("serve", 8)  # both claimed; then the process "dies":
    (second,) = [j for j in jobs if j.id == released]
    service.pipeline.generate(service.job_request(second))  # released and audited, but the store never heard
    restarted = _service(deployment, tmp_path)
    restarted.start(wait=True)
    try:
        assert _wait(restarted, lost).status == "done" and restarted.store.get(lost).attempts == 2
        assert restarted.store.get(released).status == "done"
        assert restarted.store.get(released).result["source"] == "audit"
        for job_id in (lost, released):
            assert [x["action"] for x in _audit(deployment, job_id)] == ["allow"]  # exactly once each
    finally:
        restarted.stop()


def test_finished_jobs_and_images_go_after_retention_the_audit_stays(deployment, tmp_path):
    service = _service(deployment, tmp_path, retention_hours=1)
    client, auth = _client(service)
    try:
        job = client.post("/v1/images?wait=60", json={"prompt": "kept a while"}, headers=auth).json()
        path = deployment[1].output_dir / f"{job['id']}.png"
        assert path.is_file()
        service.housekeeping(now=time.time() + 1800)
        assert path.is_file() and service.store.get(job["id"]) is not None
        service.housekeeping(now=time.time() + 7200)
        assert not path.exists() and service.store.get(job["id"]) is None
        assert client.get(f"/v1/jobs/{job['id']}", headers=auth).status_code == 404
        assert len(_audit(deployment, job["id"])) == 1
    finally:
        service.stop()


# -- verification and plugins ------------------------------------------------------------------------------


def test_verify_and_plugins(deployment, tmp_path):
    service = _service(deployment, tmp_path)
    client, auth = _client(service, start=False)
    report = client.post("/v1/verify", headers=auth, files={"file": ("x.png", _png(), "image/png")})
    assert report.status_code == 200
    assert report.json()["ok"] is False and report.json()["manifest_present"] is False
    raw = client.post("/v1/verify", headers={**auth, "content-type": "image/png"}, content=_png())
    assert raw.json()["file"] == "upload"
    bad = client.post("/v1/verify", headers=auth, files={"file": ("x.txt", b"hello", "text/plain")})
    assert bad.status_code == 422 and bad.json()["field"] == "file" and "not a PNG" in bad.json()["error"]
    assert client.post("/v1/verify", files={"file": ("x.png", _png(), "image/png")}).status_code == 401
    names = [p["name"] for p in client.get("/v1/plugins", headers=auth).json()["plugins"]]
    assert "flux2" in names and "safety" in names
    schema = client.get("/openapi.json").json()
    assert {"/v1/images", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/verify"} <= set(schema["paths"])


def test_a_clients_string_is_never_read_as_a_server_path(deployment, tmp_path, monkeypatch):
    """A conditioner input its plugin forgot to declare as a file passes through as the client's string: the
    service's runs refuse every path, so it cannot make the server read one of its own files."""
    from fluxframe.conditioning.reference import ReferenceConditioner
    from fluxframe.core.inputs import no_paths, read_input
    from fluxframe.errors import RequestError

    secret = tmp_path / "secret.png"
    secret.write_bytes(_png(colour=(1, 2, 3)))
    with pytest.raises(RequestError, match="not accepted here"), no_paths("testing"):
        read_input(secret, "x")
    assert read_input(secret, "x").data == secret.read_bytes()  # outside the block, paths are read as before

    monkeypatch.setattr(ReferenceConditioner, "file_inputs", ())  # as if undeclared
    service = _service(deployment, tmp_path)
    client, auth = _client(service)
    try:
        job = client.post("/v1/images?wait=60", headers=auth,
                          json={"prompt": "x", "conditioning": {"reference": {"images": [str(secret)]}}}).json()
        assert job["status"] == "error" and "file path is not accepted here" in job["reasons"][0], job
        (line,) = _audit(deployment, job["id"])
        assert line["action"] == "error" and line["input_files"] == [] and line["inputs"] == []
    finally:
        service.stop()
