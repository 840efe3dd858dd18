"""The audit log: an intact log verifies; editing, inserting or deleting any line (the last one too) is
detected at the right line; concurrent writers keep one chain; an HMAC key stops whole rewrites."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from fluxframe.core.audit import GENESIS, AuditLog, head_path, verify_log
from fluxframe.core.hashing import sha256_bytes, sha256_file, sha256_image, sha256_text
from fluxframe.errors import AuditError


def write_log(path, n=6, key=None):
    log = AuditLog(path, key=key)
    return [log.append({"request_id": f"r{i}", "action": "allow", "prompt_sha256": sha256_text(f"p{i}"),
                        "verdicts": [{"filter": "prompt-nsfw", "scores": {"sexual": 0.1 * i}}]})
            for i in range(1, n + 1)]


def lines(path):
    return path.read_bytes().split(b"\n")[:-1]


def rewrite(path, new_lines):
    path.write_bytes(b"".join(line + b"\n" for line in new_lines))


def test_intact_log_verifies(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    records = write_log(log_path)
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0]["prev"] == GENESIS and "time" in records[0]
    raw = lines(log_path)
    assert records[1]["prev"] == sha256_bytes(raw[0])
    assert json.loads(raw[2]) == records[2]
    check = verify_log(log_path)
    assert check.ok and check.lines == 6 and check.broken_at is None
    assert json.loads(head_path(log_path).read_text()) == {"seq": 6, "hash": sha256_bytes(raw[5])}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_edited_line_is_found(tmp_path, k):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path)
    raw = lines(log_path)
    record = json.loads(raw[k - 1])
    record["action"] = "block"  # re-encoded in the log's own canonical form: only the chain can tell
    raw[k - 1] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    rewrite(log_path, raw)
    check = verify_log(log_path)
    assert not check.ok and check.broken_at == k, check.reason
    assert "edited" in check.reason


def test_edit_that_changes_the_bytes_only_is_found(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path)
    raw = lines(log_path)
    raw[2] = raw[2].replace(b'"action":"allow"', b'"action": "allow"')
    rewrite(log_path, raw)
    check = verify_log(log_path)
    assert (check.ok, check.broken_at) == (False, 3)


def test_edited_last_line_is_found_through_the_head(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path)
    raw = lines(log_path)
    raw[-1] = raw[-1].replace(b'"action":"allow"', b'"action":"flag"')
    rewrite(log_path, raw)
    check = verify_log(log_path)
    assert (check.ok, check.broken_at) == (False, 6) and "head" in check.reason
    assert verify_log(log_path, head=False).ok  # what the chain alone cannot see


@pytest.mark.parametrize("k", [1, 3, 5])
def test_deleted_line_is_found(tmp_path, k):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path)
    raw = lines(log_path)
    del raw[k - 1]
    rewrite(log_path, raw)
    check = verify_log(log_path)
    assert not check.ok and check.broken_at == k, check.reason
    assert "deleted" in check.reason


@pytest.mark.parametrize("drop", [1, 2])
def test_deleted_last_lines_are_found_through_the_head(tmp_path, drop):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path)
    rewrite(log_path, lines(log_path)[:-drop])
    check = verify_log(log_path)
    assert not check.ok and check.broken_at == 7 - drop and "deleted" in check.reason, check.reason
    assert verify_log(log_path, head=False).ok


def test_inserted_copy_of_a_line_is_found(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path)
    raw = lines(log_path)
    raw.insert(3, raw[0])  # a replayed earlier record becomes line 4
    rewrite(log_path, raw)
    check = verify_log(log_path)
    assert (check.ok, check.broken_at) == (False, 4), check.reason


def test_inserted_well_formed_line_is_found(tmp_path):
    """A forged line with the right prev and seq still breaks the chain of the line after it."""
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path)
    raw = lines(log_path)
    forged = {"request_id": "forged", "action": "allow", "seq": 3, "prev": sha256_bytes(raw[1]), "time": "x"}
    raw.insert(2, json.dumps(forged, sort_keys=True, separators=(",", ":")).encode())
    rewrite(log_path, raw)
    check = verify_log(log_path)
    assert (check.ok, check.broken_at) == (False, 3) and "inserted" in check.reason, check.reason


def test_missing_head_and_partial_last_line(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, 3)
    head = head_path(log_path).read_bytes()
    head_path(log_path).unlink()
    check = verify_log(log_path)
    assert not check.ok and "head file" in check.reason
    assert verify_log(log_path, head=False).ok
    with pytest.raises(AuditError, match="head file audit.jsonl.head is missing"):  # not silently re-created
        AuditLog(log_path).append({"request_id": "after"})
    head_path(log_path).write_bytes(head)
    log_path.write_bytes(log_path.read_bytes() + b'{"request_id":"cut sh')  # a write cut short
    check = verify_log(log_path, head=False)
    assert (check.ok, check.broken_at) == (False, 4)
    before = log_path.read_bytes()
    with pytest.raises(AuditError, match="incomplete"):  # no appending after the damage...
        AuditLog(log_path).append({"request_id": "after"})
    assert log_path.read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["audit.jsonl", "audit.jsonl.head"]  # no temporaries
    check = verify_log(log_path, head=False)
    assert (check.ok, check.broken_at) == (False, 4)  # ...and the damage stays visible


def test_head_one_behind_after_a_crash_is_accepted(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, 3)
    head = head_path(log_path).read_bytes()
    AuditLog(log_path).append({"request_id": "r4"})
    head_path(log_path).write_bytes(head)  # as if the process died between the line and the head
    check = verify_log(log_path)
    assert check.ok and "did not update the head" in check.reason


def test_hmac_key_stops_a_whole_rewrite(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, 4, key="s3cret")
    assert verify_log(log_path, key="s3cret").ok
    assert not verify_log(log_path, key="other").ok
    # Someone without the key edits line 2, then recomputes every later prev and the head:
    records = [json.loads(line) for line in lines(log_path)]
    records[1]["action"] = "block"
    forged, prev = [], GENESIS
    for record in records:
        record["prev"] = prev
        line = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        forged.append(line)
        prev = sha256_bytes(line)
    rewrite(log_path, forged)
    head_path(log_path).write_text(json.dumps({"seq": 4, "hash": prev}))
    assert verify_log(log_path).ok  # the plain chain is consistent again...
    check = verify_log(log_path, key="s3cret")
    assert not check.ok and check.broken_at == 2 and "HMAC" in check.reason  # ...the keyed one is not


def _append_many(path, worker, n):
    log = AuditLog(path)
    for i in range(n):
        log.append({"request_id": f"w{worker}-{i}"})


def test_concurrent_writers_keep_one_chain(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(log_path, w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    check = verify_log(log_path)
    assert check.ok and check.lines == 100, check.reason
    ids = {json.loads(line)["request_id"] for line in lines(log_path)}
    assert len(ids) == 100


def test_reserved_keys_and_helpers(tmp_path):
    with pytest.raises(ValueError, match="seq"):
        AuditLog(tmp_path / "a.jsonl").append({"seq": 9})
    f = tmp_path / "file.bin"
    f.write_bytes(b"abc")
    assert sha256_file(f) == sha256_bytes(b"abc") == sha256_text("abc")
    from PIL import Image

    a, b = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    assert sha256_image(a) == sha256_image(a.copy()) != sha256_image(b) != sha256_image(Image.new("RGB", (2, 8)))
    assert verify_log(tmp_path / "missing.jsonl").ok is False
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert verify_log(empty).ok
    assert not (tmp_path / "a.jsonl").exists()


class _Died(BaseException):
    """Stands for the process dying at that instant (nothing after it runs but the finally blocks)."""


@pytest.mark.parametrize("key", [None, b"k" * 32])
def test_dying_around_a_new_logs_first_line_leaves_a_log_that_continues(tmp_path, monkeypatch, key):
    """A new log gets a genesis head (seq 0) before its first line, so dying between the first line and its head,
    or before the first line, leaves a state the next writer accepts (one line behind, or empty), not a log
    without a head (which is refused: lines may have been deleted with it)."""
    import os

    import fluxframe.core.audit as audit

    path = tmp_path / "audit.jsonl"
    replace, calls = os.replace, []

    def dies_on_the_second_replace(src, dst):  # 1st: the genesis head; 2nd: the head after line 1
        calls.append(dst)
        if len(calls) == 2:
            raise _Died()
        replace(src, dst)

    monkeypatch.setattr(audit.os, "replace", dies_on_the_second_replace)
    with pytest.raises(_Died):
        AuditLog(path, key=key).append({"n": 1})
    monkeypatch.setattr(audit.os, "replace", replace)
    assert len(path.read_bytes().splitlines()) == 1
    assert json.loads(head_path(path).read_bytes())["seq"] == 0
    check = verify_log(path, key=key)
    assert check.ok and "after the head's seq 0" in check.reason
    AuditLog(path, key=key).preflight()
    AuditLog(path, key=key).append({"n": 2})
    assert verify_log(path, key=key).ok and verify_log(path, key=key).lines == 2

    # dying after the genesis head, before the first line: an empty log that starts afresh
    other = tmp_path / "other.jsonl"
    write = os.write

    def dies_writing(fd, data):
        raise _Died()

    monkeypatch.setattr(audit.os, "write", dies_writing)
    with pytest.raises(_Died):
        AuditLog(other, key=key).append({"n": 1})
    monkeypatch.setattr(audit.os, "write", write)
    assert other.read_bytes() == b"" and verify_log(other, key=key).ok
    AuditLog(other, key=key).append({"n": 1})
    assert verify_log(other, key=key).ok and verify_log(other, key=key).lines == 1


def test_a_genesis_head_does_not_excuse_a_longer_log_or_another_key(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for n in range(3):
        log.append({"n": n})
    head_path(path).write_bytes(b'{"hash":"' + GENESIS.encode() + b'","seq":0}\n')  # rolled back to a new log's
    with pytest.raises(AuditError, match="does not match"):
        log.append({"n": 4})
    assert not verify_log(path).ok
    keyed = tmp_path / "keyed.jsonl"
    AuditLog(keyed, key=b"a" * 32).append({"n": 1})
    head_path(keyed).write_bytes(b'{"hash":"' + GENESIS.encode() + b'","seq":0}\n')  # no MAC
    with pytest.raises(AuditError, match="HMAC"):
        AuditLog(keyed, key=b"a" * 32).append({"n": 2})
