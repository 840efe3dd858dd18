"""One audit log per replica (`fluxframe serve --ray`): where each is, `fluxframe audit verify FOLDER` checking
each chain, and a job whose replica died after releasing it finished from that replica's log by another one."""

from __future__ import annotations

import json

import pytest

from fluxframe.cli import main
from fluxframe.core.audit import AuditLog, replica_log_path, replica_logs, verify_logs

DEPLOY = """[model]\npreset = "tiny"\ndtype = "float32"\ndevice = "cpu"
[sampler]\nsteps = 1\nwidth = 64\nheight = 64
[safety]\naudit_log = "audit/audit.jsonl"\nrequire = ["prompt-nsfw"]
[output]\ndir = "out"
[serve]\nstate_dir = "state"
"""


def test_replica_logs_sit_beside_the_configured_log(tmp_path):
    base = tmp_path / "audit.jsonl"
    assert replica_log_path(base, "ab12cd") == tmp_path / "audit-ab12cd.jsonl"
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            replica_log_path(base, bad)
    assert replica_logs(base) == []
    for name in ("b2", "a1"):
        AuditLog(replica_log_path(base, name)).append({"event": "x"})
    AuditLog(base).append({"event": "x"})
    (tmp_path / "other.jsonl").write_text("")
    assert replica_logs(base) == [base, tmp_path / "audit-a1.jsonl", tmp_path / "audit-b2.jsonl"]  # no heads


def test_audit_verify_a_folder_checks_each_chain(tmp_path, capsys):
    folder = tmp_path / "audit"
    for name in ("r1", "r2"):
        log = AuditLog(replica_log_path(folder / "audit.jsonl", name))
        for i in range(3):
            log.append({"event": "x", "i": i})
    (folder / "notes.txt").write_text("not a log")
    assert main(["audit", "verify", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "audit-r1.jsonl: ok: 3 lines" in out and "audit-r2.jsonl: ok: 3 lines" in out
    assert "2 logs, 2 intact, 0 broken" in out
    assert [c.ok for _, c in verify_logs(folder)] == [True, True]

    broken = folder / "audit-r2.jsonl"
    lines = broken.read_text().splitlines()
    lines[1] = lines[1].replace('"i":1', '"i":5')
    broken.write_text("\n".join(lines) + "\n")
    assert main(["audit", "verify", str(folder)]) == 1
    captured = capsys.readouterr()
    assert "audit-r1.jsonl: ok" in captured.out
    assert "audit-r2.jsonl: BROKEN at line 2" in captured.err and "2 logs, 1 intact, 1 broken" in captured.err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["audit", "verify", str(empty)]) == 1
    assert "no audit logs matching *.jsonl" in capsys.readouterr().err
    assert main(["audit", "verify", str(folder), "--glob", "*-r1.jsonl"]) == 0


def test_a_job_released_by_a_dead_replica_is_finished_from_its_log_by_another(tmp_path):
    from fluxframe import api
    from fluxframe.core.config import load_config
    from fluxframe.core.pipeline import _config_hash
    from fluxframe.core.types import GenerationRequest
    from fluxframe.serve.service import Service
    from fluxframe.serve.store import new_job_id

    (tmp_path / "deploy.toml").write_text(DEPLOY)
    config = load_config(tmp_path / "deploy.toml")
    base = config.resolve(config.safety.audit_log)
    pipeline = api.load(config, replica="dead1")
    assert pipeline.stages.audit.path == base.with_name("audit-dead1.jsonl")
    assert pipeline.config_hash == _config_hash(config)  # the same deployment: its records count for every replica

    survivor = Service(config, worker_id="ray:alive:2", pipeline=pipeline, sweep_seconds=0,
                       audit_logs=lambda: replica_logs(base))
    store = survivor.store
    released, lost = new_job_id(), new_job_id()
    for job_id in (released, lost):
        store.add(job_id, request={"fields": {"prompt": "a red circle", "seed": 1}, "conditioning": {}},
                  settings={}, batch_key="k", client="c")
    assert [j.id for j in store.claim([released, lost], "ray:dead1:1", lease=-1)] == [released, lost]
    # the dead replica released one job (its audit line is in its own log) and died before recording it
    pipeline.generate(GenerationRequest(prompt="a red circle", seed=1, request_id=released))
    assert not base.exists()

    survivor.housekeeping()  # both leases ran out
    done = store.get(released)
    assert done.status == "done" and done.result["source"] == "audit" and done.attempts == 1
    assert store.get(lost).status == "queued"  # never released: it runs again
    lines = [json.loads(x) for x in base.with_name("audit-dead1.jsonl").read_text().splitlines()]
    assert sum(1 for r in lines if r.get("request_id") == released) == 1
