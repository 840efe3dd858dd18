"""`fluxframe batch` (fluxframe.core.batch): file formats, results.jsonl, exit codes, bad input, kill -9 + --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from fluxframe.cli import main
from fluxframe.core import batch
from fluxframe.core.audit import verify_log
from fluxframe.errors import RequestError

DEPLOY = """[model]\npreset = "tiny"\ndtype = "float32"\ndevice = "cpu"
[sampler]\nsteps = 1\nwidth = 64\nheight = 64
[safety]\naudit_log = "audit.jsonl"\nrequire = ["prompt-nsfw"]
[output]\ndir = "out"
"""


@pytest.fixture
def deploy(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text(DEPLOY)
    return path


def results(tmp_path) -> list[dict]:
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "status" in r]


def audit(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def test_txt_run_with_a_blocked_item_exits_3_and_streams_results(deploy, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\n\n# a comment\n  a blue square  \na n4ked w o m a n, nsfw\n")
    assert main(["batch", "--config", str(deploy), str(tmp_path / "p.txt")]) == 3
    rows = results(tmp_path)
    assert [(r["line"], r["status"]) for r in rows] == [(1, "ok"), (4, "ok"), (5, "blocked")]
    for r in rows[:2]:
        assert Path(r["output"]).is_file() and Path(r["output"]).parent == tmp_path / "out"
        assert isinstance(r["seed"], int) and r["timings"]["total"] > 0
    assert "prompt-nsfw" in rows[2]["reasons"][0] and rows[2]["output"] is None
    assert {a["request_id"]: a["action"] for a in audit(tmp_path)} == {r["request_id"]: {"ok": "allow"}.get(
        r["status"], "block") for r in rows}
    assert verify_log(tmp_path / "audit.jsonl").ok
    err = capsys.readouterr().err
    assert "[3/3] line 5 blocked" in err and "2 written, 1 blocked, 0 failed" in err


def test_jsonl_and_csv_with_relative_paths_and_a_bad_item_exit_1(deploy, tmp_path):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "in" / "ref.png")
    (tmp_path / "in" / "r.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "a cat", "seed": 7, "references": ["ref.png"], "output": "cat.png"},
        {"prompt": "a dog", "conditioning": {"reference": {"images": ["ref.png"]}}, "steps": 1},
        {"prompt": "a fox", "references": ["missing.png"]},
        {"prompt": "too big", "width": 100000},
    ]) + "\n")
    assert main(["batch", "--config", str(deploy), str(tmp_path / "in" / "r.jsonl"), "--no-progress"]) == 1
    rows = results(tmp_path)
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "error"]
    assert rows[0]["output"] == str(tmp_path / "out" / "cat.png") and rows[0]["seed"] == 7
    assert "missing.png: no such file" in rows[2]["error"] and rows[2]["field"] == "conditioning.reference.images[0]"
    assert rows[3]["error"].startswith("line 4: width:") and rows[3]["field"] == "width"
    by_id = {a["request_id"]: a for a in audit(tmp_path)}
    assert [f["role"] for f in by_id[rows[0]["request_id"]]["input_files"]] == ["reference.images[0]"]
    assert by_id[rows[1]["request_id"]]["input_files"][0]["role"] == "reference.images[0]"

    (tmp_path / "in" / "r.csv").write_text('prompt,seed,output\n"a cat, sitting",3,c1.png\na dog,,\n')
    assert main(["batch", "--config", str(deploy), str(tmp_path / "in" / "r.csv"), "--no-progress",
                 "--results", str(tmp_path / "csv-results.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "csv-results.jsonl").read_text().splitlines()][1:]
    assert [(r["line"], r["status"], r["seed"] == 3) for r in rows] == [(2, "ok", True), (3, "ok", False)]
    assert (tmp_path / "out" / "c1.png").is_file()


def test_fail_fast_stops_at_the_first_error_not_at_a_block(deploy, tmp_path):
    (tmp_path / "r.jsonl").write_text('{"prompt": "a n4ked w o m a n, nsfw"}\n{"prompt": "x", "steps": 0}\n'
                                      '{"prompt": "a cat"}\n')
    assert main(["batch", "--config", str(deploy), str(tmp_path / "r.jsonl"), "--fail-fast", "--no-progress"]) == 1
    assert [r["status"] for r in results(tmp_path)] == ["blocked", "error"]


@pytest.mark.parametrize("name, text, message", [
    ("e.txt", "\n# only a comment\n", "no requests in the file"),
    ("e.jsonl", "", "no requests in the file"),
    ("e.csv", "seed,width\n1,64\n", "line 1: the CSV header has no prompt column"),
    ("e.csv", "prompt,colour\na,red\n", "line 1: unknown column 'colour'"),
    ("e.yaml", "prompt: a\n", "is .txt, .jsonl or .csv"),
])
def test_a_file_that_cannot_run_stops_before_the_model_loads(deploy, tmp_path, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    assert main(["batch", "--config", str(deploy), str(tmp_path / name)]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "preset 'tiny'" not in err  # nothing loaded
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line, field, message", [
    ("not json", None, "not valid JSON"),
    ('{"prompt": "a", "colour": "red"}', "colour", "unknown field"),
    ('{"prompt": "a", "seed": "7"}', "seed", "must be an integer"),
    ('{"seed": 1}', "prompt", "needs a prompt"),
    ('{"prompt": "a", "output": "../x.png"}', "output", "not a path"),
    ('{"prompt": "a", "output": "a/b.png"}', "output", "not a path"),
    ('{"prompt": "a", "output": "/tmp/x.png"}', "output", "not a path"),
    ('{"prompt": "a", "output": "x.gif"}', "output", "must end in"),
    ('{"prompt": "a", "output": "first.png"}', "output", "also the output of line 1"),
    ('{"prompt": "a", "references": ["r.png"], "conditioning": {"reference": {"images": []}}}', "references",
     "give it once"),
])
def test_a_bad_line_is_recorded_with_its_line_and_field_and_the_rest_go_on(deploy, tmp_path, capsys, line, field,
                                                                         message):
    (tmp_path / "r.jsonl").write_text(f'{{"prompt": "a cat", "output": "first.png"}}\n{line}\n{{"prompt": "a dog"}}\n')
    assert main(["batch", "--config", str(deploy), str(tmp_path / "r.jsonl"), "--no-progress"]) == 1
    rows = results(tmp_path)
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["line"] == 2 and rows[1]["field"] == field and message in rows[1]["error"]
    assert rows[1]["error"].startswith("line 2: ") and "\n" not in rows[1]["error"]
    assert f"fluxframe: error: line 2: {field + ': ' if field else ''}" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(
        Path(r["output"]).name for r in rows if r["output"])
    assert verify_log(tmp_path / "audit.jsonl").ok


def test_an_existing_results_file_needs_resume(deploy, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.jsonl").write_text('{"event": "start"}\n')
    assert main(["batch", "--config", str(deploy), str(tmp_path / "p.txt")]) == 1
    assert "--resume to continue" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["audit log", "a link to the audit log", "config", "requests", "folder",
                                    "not jsonl"])
def test_results_may_not_be_a_file_the_deployment_reads_or_writes(deploy, tmp_path, capsys, target):
    """A run appends to its results file and --resume cuts a torn last line off it: pointed at the audit log, the
    config or the requests file it would break the chain or the deployment. Refused before the model loads, with
    every file as it was."""
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n')
    assert main(["batch", "--config", str(deploy), str(tmp_path / "p.jsonl")]) == 0
    results = {"audit log": tmp_path / "audit.jsonl", "a link to the audit log": tmp_path / "link.jsonl",
               "config": deploy, "requests": tmp_path / "p.jsonl", "folder": tmp_path / "out.jsonl",
               "not jsonl": tmp_path / "results.txt"}[target]
    if target == "a link to the audit log":
        results.symlink_to(tmp_path / "audit.jsonl")
    if target == "folder":
        results.mkdir()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["batch", "--config", str(deploy), str(tmp_path / "p.jsonl"), "--results", str(results),
                 "--resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fluxframe: error: --results: ") and str(results) in err and "\n" not in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert verify_log(tmp_path / "audit.jsonl").ok
    if target == "audit log":  # the Python API refuses it as well, by the loaded pipeline's guard
        from fluxframe import api

        with pytest.raises(RequestError, match="a file this deployment reads or writes"):
            batch.run_batch(api.load(api.load_config(deploy)), tmp_path / "p.jsonl", results=results,
                            output_dir=tmp_path / "out", resume=True)
        assert verify_log(tmp_path / "audit.jsonl").ok


class Stub:
    """Any object with generate_many will do: a pipeline that answers at once."""

    config_hash = "stub"

    def __init__(self):
        self.groups: list[int] = []

    def generate_many(self, requests):
        self.groups.append(len(requests))
        return [SimpleNamespace(path=r.output, seed=r.seed, verdicts=[], timings={"total": 0.0}) for r in requests]


def test_a_100000_line_file_is_streamed_in_groups(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as fh:
        for i in range(100_000):
            fh.write(json.dumps({"prompt": f"prompt number {i} " + "x" * 100, "seed": i}) + "\n")
    assert batch.scan(path) == 100_000
    stub = Stub()
    tracemalloc.start()
    summary = batch.run_batch(stub, path, results=tmp_path / "results.jsonl", output_dir=tmp_path, batch_size=4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert summary.done == 100_000 and summary.exit_code == 0
    assert set(stub.groups) == {4} and len(stub.groups) == 25_000
    assert peak < 5_000_000, peak  # the file is ~12 MB: not read whole
    with open(tmp_path / "results.jsonl") as fh:
        assert sum(1 for _ in fh) == 100_001


def test_batch_size_is_capped_by_max_batch_size(tmp_path):
    (tmp_path / "p.txt").write_text("".join(f"p{i}\n" for i in range(7)))
    stub = Stub()
    stub.config = SimpleNamespace(sampler=SimpleNamespace(max_batch_size=3, seed=None))
    batch.run_batch(stub, tmp_path / "p.txt", results=tmp_path / "r.jsonl", output_dir=tmp_path, batch_size=8)
    assert stub.groups == [3, 3, 1]


def test_read_items_is_lazy_and_keys_depend_on_line_and_text(tmp_path):
    (tmp_path / "p.txt").write_text("a\na\n")
    items = batch.read_items(tmp_path / "p.txt", "cfg")
    first, second = next(items), next(items)
    assert first.key != second.key and first.request_id.startswith("b1-") and len(first.request_id) <= 128
    assert batch.read_items(tmp_path / "p.txt", "other").__next__().key != first.key
    (tmp_path / "p.csv").write_text("seed\n1\n")
    with pytest.raises(RequestError, match="no prompt column"):
        next(batch.read_items(tmp_path / "p.csv"))


SLOW_RUN = """
import sys, time
from fluxframe.core.pipeline import Pipeline
from fluxframe.cli import main
release, count = Pipeline.release, [0]
def slow(self, run):
    release(self, run)
    count[0] += 1
    if count[0] >= 2:
        print("RELEASED", count[0], file=sys.stderr, flush=True)
        time.sleep(30)
Pipeline.release = slow
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_then_resume_releases_every_item_exactly_once(deploy, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"picture {i}", **({"seed": i} if i % 2 else {})}) + "\n"
                               for i in range(6)))
    args = ["batch", "--config", str(deploy), str(prompts), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, *args], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # killed inside generate, after the 2nd release (file + audit line), before its result
        if line.startswith("RELEASED") or time.monotonic() > deadline:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = results(tmp_path)
    assert [r["status"] for r in first] == ["ok"]  # the 2nd item's results line never came
    assert main([*args, "--resume"]) == 0
    rows = results(tmp_path)
    assert sorted(r["line"] for r in rows) == list(range(1, 7)) and {r["status"] for r in rows} == {"ok"}
    assert [r.get("source") for r in rows if r["line"] == 2] == ["audit"]  # found in the audit log, not re-run
    released = [a for a in audit(tmp_path) if a.get("event") == "request"]
    assert len(released) == 6 and len({a["request_id"] for a in released}) == 6
    assert all(a["action"] == "allow" and a["output"] for a in released)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(
        Path(a["output"]["path"]).name for a in released)
    assert verify_log(tmp_path / "audit.jsonl").ok
    by_id = {a["request_id"]: a["settings"]["seed"] for a in released}
    assert all(r["seed"] == by_id[r["request_id"]] for r in rows)
    assert {r["line"]: r["seed"] for r in rows if r["line"] % 2 == 0} == {2: 1, 4: 3, 6: 5}
    nonces = {json.loads(x)["nonce"] for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()
              if '"start"' in x}
    assert len(nonces) == 1  # the resumed run kept the first run's nonce: seedless items draw the same seed
    assert main([*args, "--resume"]) == 0  # nothing left: no new audit line
    assert len([a for a in audit(tmp_path) if a.get("event") == "request"]) == 6


def test_a_terminal_gets_a_progress_bar_with_done_blocked_failed_and_eta(deploy, tmp_path):
    """On a real terminal (a pty), a tqdm bar over the items, with the counts; an error line stays readable."""
    import pty
    import select

    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle"}\n{"prompt": "a n4ked w o m a n, nsfw"}\n'
                                      '{"prompt": "x", "width": 63}\n{"prompt": "a blue square"}\n')
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal 160 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "fluxframe.cli", "batch", "--config", str(deploy),
                             str(tmp_path / "p.jsonl")], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    seen, deadline = b"", time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
    finally:
        proc.kill() if proc.poll() is None else None
        proc.wait(30)
        os.close(master)
    text = seen.decode(errors="replace")
    assert proc.returncode == 1
    assert "batch: 100%" in text and "4/4" in text, text
    assert "blocked=1" in text and "done=2" in text and "failed=1" in text
    assert "<" in text.split("4/4")[-1]  # tqdm's [elapsed<remaining]: the ETA
    assert "line 3: width: must be a multiple of 16" in text
    assert "[1/4] line" not in text  # not the plain lines a pipe gets


def test_resume_replaces_the_unreleased_file_a_kill_left_under_an_items_own_name(deploy, tmp_path, capsys):
    """Killed between putting the file in place and writing its audit line: no audit line, a file under the
    item's request-id name. A plain run refuses it (it exists); --resume releases the item over it, once."""
    from fluxframe.core.config import load_config
    from fluxframe.core.pipeline import _config_hash

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    items = list(batch.read_items(prompts, _config_hash(load_config(deploy))))
    orphan = tmp_path / "out" / f"{items[1].request_id}.png"
    orphan.parent.mkdir()
    orphan.write_bytes(b"unreleased")
    args = ["batch", "--config", str(deploy), str(prompts), "--no-progress"]
    assert main(args) == 1
    assert "exists" in capsys.readouterr().err and orphan.read_bytes() == b"unreleased"
    assert main([*args, "--resume"]) == 0
    assert Image.open(orphan).size == (64, 64)
    lines = [a for a in audit(tmp_path) if a.get("request_id") == items[1].request_id]
    assert [a["action"] for a in lines] == ["error", "allow"]  # the refused run's line, then the one release
    assert verify_log(tmp_path / "audit.jsonl").ok
