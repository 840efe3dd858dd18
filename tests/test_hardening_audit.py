"""Issue 22, class 3 (audit log failures): a log that cannot be appended safely is refused up front with one
line naming the file, never a traceback and never a line written on trust.

* What the log is: a directory, a symlink (to /dev/null, to a file, dangling), a FIFO, a device, a path under a
  file, a head that is a directory or a symlink, a read-only log or folder (permission bits where the tests do
  not run as root; an emulated EACCES/EROFS everywhere).
* Its tail: half-written, edited, cut, or out of step with the head; a head missing beside a non-empty log
  (the "truncate the tail and delete the head" attack); keys that do not match the log.
* The audited way out (re-anchoring) and its refusals; the key wired from ``[safety] audit_key_env``.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import stat

import pytest

from fluxframe.cli import main
from fluxframe.core.audit import (
    DEFAULT_KEY_ENV,
    AuditLog,
    audit_key_warnings,
    audit_log_for,
    head_path,
    sha256_bytes,
    verify_log,
)
from fluxframe.core.config import parse_config
from fluxframe.errors import AuditError, ConfigError

ROOT = os.geteuid() == 0
root_skip = pytest.mark.skipif(ROOT, reason="runs as root, which ignores permission bits: the emulated "
                               "EACCES/EROFS tests cover the same paths")


def write_log(path, n=4, key=None):
    log = AuditLog(path, key=key)
    for i in range(1, n + 1):
        log.append({"request_id": f"r{i}", "action": "allow"})
    return log


def lines(path):
    return path.read_bytes().split(b"\n")[:-1]


def rewrite(path, new_lines):
    path.write_bytes(b"".join(line + b"\n" for line in new_lines))


def canonical(record):
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def snapshot(folder):
    return {p.name: (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(folder.iterdir())}


def refused(log: AuditLog, match: str) -> AuditError:
    """Both preflight and append refuse, with one line naming a file, and neither changes anything."""
    folder = log.path.parent
    before = snapshot(folder) if folder.is_dir() else None
    with pytest.raises(AuditError, match=match) as first:
        log.preflight()
    with pytest.raises(AuditError, match=match) as second:
        log.append({"request_id": "after"})
    for info in (first, second):
        assert "\n" not in str(info.value) and info.value.path and str(info.value).startswith(info.value.path)
    if before is not None:
        assert snapshot(folder) == before  # no line, no head, no temporary file left
    return second.value


# -- what the log is -----------------------------------------------------------------------------------


def test_log_that_is_a_directory(tmp_path):
    (tmp_path / "audit.jsonl").mkdir()
    refused(AuditLog(tmp_path / "audit.jsonl"), "directory")
    (tmp_path / "audit.jsonl" / "x").write_text("")  # a non-empty one too
    refused(AuditLog(tmp_path / "audit.jsonl"), "directory")


def test_log_symlinked_to_dev_null(tmp_path):
    (tmp_path / "audit.jsonl").symlink_to("/dev/null")
    refused(AuditLog(tmp_path / "audit.jsonl"), "symbolic link")


def test_log_symlinked_to_a_regular_log(tmp_path):
    real = tmp_path / "real" / "audit.jsonl"
    write_log(real, 3)
    kept = real.read_bytes()
    (tmp_path / "audit.jsonl").symlink_to(real)
    head_path(tmp_path / "audit.jsonl").symlink_to(head_path(real))
    refused(AuditLog(tmp_path / "audit.jsonl"), "symbolic link")
    assert real.read_bytes() == kept


def test_dangling_symlink_is_not_created_through(tmp_path):
    (tmp_path / "audit.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    refused(AuditLog(tmp_path / "audit.jsonl"), "symbolic link")
    assert not (tmp_path / "elsewhere.jsonl").exists()


def test_log_that_is_a_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "audit.jsonl")
    refused(AuditLog(tmp_path / "audit.jsonl"), "FIFO")


def test_log_that_is_a_device():
    log = AuditLog("/dev/null")
    with pytest.raises(AuditError, match="a device, not a regular file"):
        log.preflight()
    with pytest.raises(AuditError, match="a device"):
        log.append({"request_id": "r"})
    assert not os.path.exists("/dev/null.head")


def test_folder_under_a_file(tmp_path):
    (tmp_path / "logs").write_text("a file, not a folder")
    with pytest.raises(AuditError, match="cannot create the audit log's folder"):
        AuditLog(tmp_path / "logs" / "sub" / "audit.jsonl").preflight()
    with pytest.raises(AuditError, match="cannot create the audit log's folder"):
        AuditLog(tmp_path / "logs" / "audit.jsonl").append({"request_id": "r"})


@pytest.mark.parametrize("existing", [False, True])
def test_head_that_is_a_directory(tmp_path, existing):
    log_path = tmp_path / "audit.jsonl"
    if existing:
        write_log(log_path, 2)
        head_path(log_path).unlink()
    head_path(log_path).mkdir()
    refused(AuditLog(log_path), "head file is a directory")


def test_head_that_is_a_symlink(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, 2)
    (tmp_path / "elsewhere.head").write_bytes(head_path(log_path).read_bytes())
    head_path(log_path).unlink()
    head_path(log_path).symlink_to(tmp_path / "elsewhere.head")
    refused(AuditLog(log_path), "symbolic link")


@root_skip
def test_read_only_log_file(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, 2)
    log_path.chmod(0o444)
    refused(AuditLog(log_path), "cannot open the audit log for appending: Permission denied")


@root_skip
@pytest.mark.parametrize("n", [0, 2])
def test_read_only_folder_with_a_writable_log(tmp_path, n):
    """The issue's case: the log is writable but the head cannot be replaced; no line may be appended."""
    folder = tmp_path / "logs"
    log_path = folder / "audit.jsonl"
    if n:
        write_log(log_path, n)
    else:
        folder.mkdir()
    folder.chmod(0o555)
    try:
        # with no log yet, append already fails to create it; with one, the head's temporary file stops it
        refused(AuditLog(log_path), "not writable" if n else "not writable|cannot open the audit log.*Permission")
        assert not n or len(lines(log_path)) == n
    finally:
        folder.chmod(0o755)


@root_skip
def test_read_only_folder_that_must_be_created(tmp_path):
    tmp_path.joinpath("ro").mkdir(mode=0o555)
    try:
        with pytest.raises(AuditError, match="cannot create the audit log's folder"):
            AuditLog(tmp_path / "ro" / "logs" / "audit.jsonl").preflight()
    finally:
        tmp_path.joinpath("ro").chmod(0o755)


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_unwritable_folder_emulated(tmp_path, monkeypatch, code):
    """What a read-only folder or file system does to the head's temporary file, for any user (root too)."""
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, 2)
    real_open = os.open

    def deny(path, flags, *args, **kwargs):
        if ".head.tmp-" in str(path) and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    error = refused(AuditLog(log_path), "not writable, so its head file cannot be replaced")
    assert os.strerror(code) in str(error)
    assert len(lines(log_path)) == 2 and verify_log(log_path).ok


def test_write_failures_are_audit_errors(tmp_path, monkeypatch):
    log_path = tmp_path / "audit.jsonl"
    log = write_log(log_path, 2)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(AuditError, match="cannot append to the audit log: No space left") as info:
        log.append({"request_id": "r3"})
    assert info.value.path == str(log_path)
    monkeypatch.undo()
    assert len(lines(log_path)) == 2 and verify_log(log_path).ok  # the failed line was taken back

    real_write = os.write

    def half(fd, data):  # a disk that fills up halfway through the line
        real_write(fd, bytes(data[:10]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half)
    with pytest.raises(AuditError, match="No space left"):
        log.append({"request_id": "r3"})
    monkeypatch.undo()
    assert len(lines(log_path)) == 2 and log_path.read_bytes().endswith(b"\n") and verify_log(log_path).ok

    def no_rename(src, dst):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(AuditError, match="was written but the head file could not be replaced") as info:
        log.append({"request_id": "r4"})
    assert info.value.path == str(head_path(log_path))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl", "audit.jsonl.head"]  # temporaries gone
    log.append({"request_id": "r5"})  # the head one behind (as after a crash) is accepted once
    check = verify_log(log_path)
    assert check.ok and check.lines == 4, check.reason


# -- preflight writes nothing ----------------------------------------------------------------------------


def test_preflight_writes_no_line(tmp_path):
    fresh = AuditLog(tmp_path / "new" / "deeper" / "audit.jsonl")
    fresh.preflight()
    assert fresh.path.parent.is_dir() and list(fresh.path.parent.iterdir()) == []  # the folder only
    log_path = tmp_path / "audit.jsonl"
    log = write_log(log_path, 3)
    before = snapshot(tmp_path)
    log.preflight()
    log.preflight()
    assert snapshot(tmp_path) == before
    keyed = tmp_path / "keyed.jsonl"
    write_log(keyed, 2, key="k")
    AuditLog(keyed, key="k").preflight()


# -- the tail -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["cut mid-line", "newline only missing", "fragment after"])
def test_half_written_last_line(tmp_path, damage):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path)
    data = log_path.read_bytes()
    data = {"cut mid-line": data[:-20], "newline only missing": data[:-1],
            "fragment after": data + b'{"action":"allow","request_id":"r5","se'}[damage]
    log_path.write_bytes(data)
    error = refused(AuditLog(log_path), "the last line is incomplete")
    assert "--discard-incomplete-tail" in str(error)


def test_last_line_edited_out_of_canonical_form(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path)
    raw = lines(log_path)
    raw[-1] = raw[-1].replace(b'"action":"allow"', b'"action": "allow"')
    rewrite(log_path, raw)
    refused(AuditLog(log_path), "not in the log's canonical form")
    rewrite(log_path, raw[:-1] + [b'not json'])
    refused(AuditLog(log_path), "not in the log's canonical form")
    record = json.loads(lines(log_path)[0])
    rewrite(log_path, raw[:-1] + [canonical({**record, "seq": "4"})])
    refused(AuditLog(log_path), "canonical form")


def test_last_line_edited_canonically_disagrees_with_the_head(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path)
    raw = lines(log_path)
    raw[-1] = canonical({**json.loads(raw[-1]), "action": "block"})
    rewrite(log_path, raw)
    refused(AuditLog(log_path), r"the head \(seq 4\) does not match the log's last line")


def test_line_before_the_last_edited(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path)
    raw = lines(log_path)
    raw[-2] = canonical({**json.loads(raw[-2]), "action": "block"})
    rewrite(log_path, raw)
    refused(AuditLog(log_path), "does not follow the line before it")


def test_lone_line_that_does_not_start_the_chain(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path)
    rewrite(log_path, lines(log_path)[-1:])  # all but the last line deleted
    refused(AuditLog(log_path), "does not start the chain")


@pytest.mark.parametrize("drop", [1, 2, 3])
def test_deleted_tail_with_the_head_kept(tmp_path, drop):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, 5)
    rewrite(log_path, lines(log_path)[:-drop])
    if drop == 1:  # one line short looks like the head is one ahead: still refused, not taken for a crash
        refused(AuditLog(log_path), "head records seq 5 but the log ends at seq 4")
    else:
        refused(AuditLog(log_path), f"head records seq 5 but the log ends at seq {5 - drop}")


@pytest.mark.parametrize("drop", [0, 1, 2])
def test_deleted_tail_and_head(tmp_path, drop):
    """The issue's attack: cut the tail, delete the head, run again. The head is not re-created."""
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, 5)
    rewrite(log_path, lines(log_path)[:5 - drop])
    head_path(log_path).unlink()
    error = refused(AuditLog(log_path), "head file audit.jsonl.head is missing beside a non-empty log")
    assert "fluxframe audit reanchor" in str(error)
    assert not head_path(log_path).exists()


def test_missing_head_beside_an_empty_or_missing_log_is_a_fresh_start(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    AuditLog(empty).preflight()
    assert AuditLog(empty).append({"request_id": "r"})["seq"] == 1
    missing = AuditLog(tmp_path / "missing.jsonl")
    missing.preflight()
    assert not missing.path.exists()
    assert missing.append({"request_id": "r"})["seq"] == 1
    assert verify_log(empty).ok and verify_log(missing.path).ok


def test_head_beside_an_empty_or_missing_log(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, 3)
    log_path.write_bytes(b"")
    refused(AuditLog(log_path), "the log is empty but its head file")
    log_path.unlink()
    error = refused(AuditLog(log_path), "the log is missing but its head file")
    assert "move the head aside" in str(error) and not log_path.exists()


@pytest.mark.parametrize("head", [
    lambda h: {**h, "hash": "0" * 64},                    # wrong hash, same seq
    lambda h: {**h, "seq": h["seq"] - 2},                 # two behind
    lambda h: {**h, "seq": h["seq"] - 1},                 # one behind with the last line's hash
])
def test_head_that_disagrees(tmp_path, head):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path)
    head_path(log_path).write_text(json.dumps(head(json.loads(head_path(log_path).read_text()))))
    refused(AuditLog(log_path), "does not match the log's last line")


@pytest.mark.parametrize("text", ["", "{", "[]", '{"seq": "4", "hash": "x"}', '{"seq": 4}'])
def test_head_that_is_not_a_head(tmp_path, text):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path)
    head_path(log_path).write_text(text)
    refused(AuditLog(log_path), "is not a head")


def test_head_one_behind_after_a_crash_is_still_accepted(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    log = write_log(log_path, 3)
    head = head_path(log_path).read_bytes()
    log.append({"request_id": "r4"})
    head_path(log_path).write_bytes(head)
    log.preflight()
    log.append({"request_id": "r5"})
    assert verify_log(log_path).ok


# -- keys -----------------------------------------------------------------------------------------------


def test_key_configured_but_log_written_without_it(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path)
    error = refused(AuditLog(log_path, key="k"), "the log was written without the key")
    assert "start a new one" in str(error)


def test_wrong_key(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, key="right")
    refused(AuditLog(log_path, key="wrong"), "HMAC does not match the configured key")


def test_keyed_log_appended_without_the_key(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, key="k")
    refused(AuditLog(log_path), "carry an HMAC but no key is configured")


def test_head_without_mac_beside_a_keyed_log(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, key="k")
    head = json.loads(head_path(log_path).read_text())
    del head["mac"]
    head_path(log_path).write_text(json.dumps(head))
    refused(AuditLog(log_path, key="k"), "head file audit.jsonl.head has no HMAC or one that does not match")


def test_keyed_writers_and_preflights_at_once_keep_one_chain(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(log_path, w, 20)) for w in range(3)]
    procs += [ctx.Process(target=_preflight_many, args=(log_path, 40)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    check = verify_log(log_path, key="k")
    assert check.ok and check.lines == 60, check.reason


def _append_many(path, worker, n):
    log = AuditLog(path, key="k")
    for i in range(n):
        log.append({"request_id": f"w{worker}-{i}"})


def _preflight_many(path, n):
    for _ in range(n):
        AuditLog(path, key="k").preflight()


# -- re-anchoring ----------------------------------------------------------------------------------------


def test_reanchor_after_a_deleted_tail_and_head(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    log = write_log(log_path, 6)
    rewrite(log_path, lines(log_path)[:4])
    head_path(log_path).unlink()
    written = log.reanchor("tail lost in the 3 May restore; checked against backup 12")
    assert written["event"] == "re-anchor" and written["seq"] == 5 and written["previous_head"] is None
    assert written["lines"] == 4 and written["last_hash"] == sha256_bytes(lines(log_path)[3])
    assert written["prev"] == written["last_hash"]
    log.preflight()
    log.append({"request_id": "next"})
    check = verify_log(log_path)
    assert check.ok and check.reanchors == [5], check.reason
    assert "1 re-anchor (line 5: the head was missing)" in check.reason


def test_reanchor_records_what_the_head_said(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    log = write_log(log_path, 6)
    rewrite(log_path, lines(log_path)[:3])
    stale = json.loads(head_path(log_path).read_text())
    written = log.reanchor("tail cut by the disk-full incident")
    assert written["previous_head"] == stale and written["lines"] == 3
    log.append({"request_id": "next"})
    raw = lines(log_path)
    edited = canonical({**json.loads(raw[-1]), "action": "block"})  # a canonical edit of the last line
    rewrite(log_path, raw[:-1] + [edited])
    log.reanchor("last line edited by a misconfigured logrotate")
    check = verify_log(log_path)
    assert check.ok and check.reanchors == [4, 6], check.reason
    assert "2 re-anchors (line 4: the head recorded seq 6: lines 4..6 were lost; line 6: the head recorded seq 5 " \
           "with another hash: line 5 or the head was edited)" in check.reason


def test_reanchor_of_a_broken_chain_is_refused(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    log = write_log(log_path, 5)
    raw = lines(log_path)
    rewrite(log_path, raw[:1] + raw[2:])  # line 2 deleted: the chain is broken
    head_path(log_path).unlink()
    before = log_path.read_bytes()
    with pytest.raises(AuditError, match="the chain does not verify .*line 2.*not re-anchored"):
        log.reanchor("trying to paper over it")
    assert log_path.read_bytes() == before and not head_path(log_path).exists()


def test_reanchor_of_an_incomplete_tail_only_when_asked(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    log = write_log(log_path, 3)
    fragment = b'{"action":"allow","request_id":"r4","se'
    log_path.write_bytes(log_path.read_bytes() + fragment)
    with pytest.raises(AuditError, match="discard-incomplete-tail"):
        log.reanchor("crash during write")
    written = log.reanchor("crash during write", discard_incomplete_tail=True)
    assert written["discarded_tail"] == {"bytes": len(fragment), "sha256": sha256_bytes(fragment),
                                         "text": fragment.decode()}
    assert written["previous_head"]["seq"] == 3 and written["lines"] == 3
    check = verify_log(log_path)
    assert check.ok and "an incomplete last line was cut off" in check.reason
    assert fragment not in log_path.read_bytes().replace(canonical(written), b"")


def test_reanchor_with_keys(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, 3, key="k")
    head_path(log_path).unlink()
    with pytest.raises(AuditError, match="carry an HMAC: re-anchor it with its key"):
        AuditLog(log_path).reanchor("no key")
    with pytest.raises(AuditError, match="HMAC does not match"):
        AuditLog(log_path, key="wrong").reanchor("wrong key")
    written = AuditLog(log_path, key="k").reanchor("head lost")
    assert "mac" in written and verify_log(log_path, key="k").ok
    assert not verify_log(log_path, key="wrong").ok


def test_reanchor_refusals(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    with pytest.raises(AuditError, match="no audit log here"):
        AuditLog(log_path).reanchor("nothing")
    log_path.write_bytes(b"")
    with pytest.raises(AuditError, match="nothing to re-anchor"):
        AuditLog(log_path).reanchor("nothing")
    log = write_log(log_path, 2)
    with pytest.raises(AuditError, match="needs a reason"):
        log.reanchor("  ")
    with pytest.raises(ValueError, match="re-anchor lines are written by AuditLog.reanchor"):
        log.append({"event": "re-anchor", "reason": "forged through append"})
    head_path(log_path).unlink()
    head_path(log_path).mkdir()
    with pytest.raises(AuditError, match="head file is a directory"):
        log.reanchor("head is a folder")


def test_cli_reanchor_writes_an_audited_line(tmp_path, capsys):
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, 4)
    rewrite(log_path, lines(log_path)[:2])
    head_path(log_path).unlink()
    assert main(["audit", "verify", str(log_path)]) == 1
    capsys.readouterr()
    assert main(["audit", "reanchor", str(log_path), "--reason", "restored from backup, ticket 42"]) == 0
    out = capsys.readouterr().out
    assert "re-anchored at line 3 after 2 lines (no head file)" in out
    line = json.loads(lines(log_path)[-1])
    assert (line["event"], line["reason"], line["lines"], line["previous_head"]) == \
        ("re-anchor", "restored from backup, ticket 42", 2, None)
    assert main(["audit", "verify", str(log_path)]) == 0
    assert "1 re-anchor (line 3: the head was missing)" in capsys.readouterr().out
    raw = lines(log_path)
    rewrite(log_path, raw[:1] + raw[2:])
    assert main(["audit", "reanchor", str(log_path), "--reason", "again"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fluxframe: error:") and "chain does not verify" in err and err.count("\n") == 1


# -- the key from the config ---------------------------------------------------------------------------


def config_for(tmp_path, **safety):
    return parse_config({"model": {"preset": "tiny"}, "safety": safety}, source=str(tmp_path / "deploy.toml"),
                        base_dir=tmp_path)


def write_config(tmp_path, **safety):
    body = "".join(f'{k} = "{v}"\n' for k, v in safety.items())
    path = tmp_path / "deploy.toml"
    path.write_text(f'[model]\npreset = "tiny"\n[safety]\n{body}')
    return path


@pytest.mark.parametrize("env", [{}, {"AUDIT_KEY": ""}, {"OTHER": "x"}])
def test_config_key_variable_unset(tmp_path, env):
    config = config_for(tmp_path, audit_log="audit.jsonl", audit_key_env="AUDIT_KEY")
    with pytest.raises(ConfigError, match="AUDIT_KEY is (not set|empty)") as info:
        audit_log_for(config, env)
    assert info.value.key == "safety.audit_key_env" and info.value.path == str(tmp_path / "deploy.toml")


@pytest.mark.parametrize("safety,words", [
    ({"audit_key_env": "AUDIT_KEY"}, "no audit_log to key"),
    ({"audit_log": "a.jsonl", "audit_key_env": "AUDIT KEY"}, "environment variable's name"),
    ({"audit_log": "a.jsonl", "audit_key_env": ""}, "environment variable's name"),
    ({"audit_log": "a.jsonl", "audit_key_env": 3}, "valid string"),
])
def test_config_key_variable_is_checked(tmp_path, safety, words):
    with pytest.raises(ConfigError, match=words) as info:
        config_for(tmp_path, **safety)
    assert info.value.key == "safety.audit_key_env"


def test_config_key_is_used_for_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(DEFAULT_KEY_ENV, raising=False)
    config = config_for(tmp_path, audit_log="logs/audit.jsonl", audit_key_env="AUDIT_KEY")
    log = audit_log_for(config, {"AUDIT_KEY": "s3cret"})
    assert log.path == tmp_path / "logs" / "audit.jsonl" and log.key == b"s3cret"
    log.preflight()
    for i in range(3):
        assert "mac" in log.append({"request_id": f"r{i}"})
    assert all("mac" in json.loads(line) for line in lines(log.path))
    assert audit_log_for(config_for(tmp_path), {}) is None
    assert audit_log_for(config_for(tmp_path, audit_log="a.jsonl"), {"AUDIT_KEY": "x"}).key is None

    monkeypatch.setenv("AUDIT_KEY", "s3cret")
    assert main(["audit", "verify", str(log.path), "--key-env", "AUDIT_KEY"]) == 0
    assert "HMACs checked with the key in AUDIT_KEY" in capsys.readouterr().out
    cfg = write_config(tmp_path, audit_log="logs/audit.jsonl", audit_key_env="AUDIT_KEY")
    assert main(["audit", "verify", "--config", str(cfg)]) == 0  # the log and its key from the config
    capsys.readouterr()
    monkeypatch.setenv("AUDIT_KEY", "wrong")
    assert main(["audit", "verify", str(log.path), "--key-env", "AUDIT_KEY"]) == 1
    assert "HMAC does not match" in capsys.readouterr().err
    assert main(["audit", "verify", "--config", str(cfg)]) == 1
    capsys.readouterr()
    monkeypatch.delenv("AUDIT_KEY")
    assert main(["audit", "verify", "--config", str(cfg)]) == 1
    assert "safety.audit_key_env: the environment variable AUDIT_KEY is not set" in capsys.readouterr().err
    assert main(["audit", "verify", str(log.path), "--key-env", "AUDIT_KEY"]) == 1
    assert "--key-env AUDIT_KEY: the variable is not set" in capsys.readouterr().err
    assert main(["audit", "verify", str(log.path)]) == 0  # no key: the chain and head only, and it says so
    assert "no key: HMACs not checked" in capsys.readouterr().out


def test_cli_verify_and_reanchor_need_a_log(tmp_path, capsys):
    assert main(["audit", "verify"]) == 1
    assert "name the log, or give --config" in capsys.readouterr().err
    cfg = write_config(tmp_path)
    assert main(["audit", "reanchor", "--config", str(cfg), "--reason", "x"]) == 1
    assert "has no [safety] audit_log" in capsys.readouterr().err


def test_cli_reanchor_with_the_config_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AUDIT_KEY", "k")
    cfg = write_config(tmp_path, audit_log="audit.jsonl", audit_key_env="AUDIT_KEY")
    write_log(tmp_path / "audit.jsonl", 2, key="k")
    head_path(tmp_path / "audit.jsonl").unlink()
    assert main(["audit", "reanchor", "--config", str(cfg), "--reason", "head lost"]) == 0
    assert "signed with the key in AUDIT_KEY" in capsys.readouterr().out
    assert "mac" in json.loads(lines(tmp_path / "audit.jsonl")[-1])
    assert main(["audit", "verify", "--config", str(cfg)]) == 0


@pytest.mark.parametrize("safety,env,warned", [
    ({"audit_log": "a.jsonl"}, {DEFAULT_KEY_ENV: "k"}, "written without an HMAC"),
    ({"audit_log": "a.jsonl"}, {}, None),
    ({}, {DEFAULT_KEY_ENV: "k"}, None),
    ({"audit_log": "a.jsonl", "audit_key_env": DEFAULT_KEY_ENV}, {DEFAULT_KEY_ENV: "k"}, None),
    ({"audit_log": "a.jsonl", "audit_key_env": "MINE"}, {DEFAULT_KEY_ENV: "k", "MINE": "k"}, None),
    ({"audit_log": "a.jsonl", "audit_key_env": "MINE"}, {DEFAULT_KEY_ENV: "k", "MINE": "j"}, "different keys"),
])
def test_key_warnings(tmp_path, safety, env, warned):
    warnings = audit_key_warnings(config_for(tmp_path, **safety), env)
    assert (warnings == []) if warned is None else (len(warnings) == 1 and warned in warnings[0])


def test_log_file_mode_is_not_world_readable(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    old = os.umask(0)
    try:
        write_log(log_path, 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o640
    assert stat.S_IMODE(head_path(log_path).stat().st_mode) == 0o640
