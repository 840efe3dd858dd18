"""Batch runs: a requests file through one loaded pipeline, results streamed per item, resumable after kill -9.

Shared by ``fluxframe batch`` and (later) the service, so it depends on nothing above the core: the pipeline is any
object with ``generate_many(requests)`` (``fluxframe.core.pipeline.Pipeline``, or a stub in tests), plus, where it
has them, ``config_hash``, ``config`` and ``stages.audit``.

The file is streamed: ``read_items`` parses one line at a time, so a file of any length runs in constant memory
apart from what resuming must remember (the keys of finished items, the explicit output names seen, and the
request ids the audit log has released). Structural faults of the file (empty, no ``prompt`` column, an unknown
column, an unknown suffix) raise ``RequestError`` before anything loads; a fault of one line becomes that item's
error (status ``error``, with ``line`` and ``field``) and the rest go on.

Exactly once. Each item has a key: the SHA-256 of the deployment's config hash, its line number and its text. Its
request id (``b<line>-<key prefix>``) is derived from the key, and so is its seed when it gives none (with the
run's nonce, kept in the results file's ``start`` line and reused by ``--resume``). The pipeline releases an image
by putting the file in place and then writing its audit line; the runner then appends the item's results line. On
resume, an item is skipped when a results line says ``ok`` or ``blocked``, or, if that line was lost to the kill,
when the audit log (the source of truth) holds a release (``allow``/``flag``/``blur`` with an output) or a block
for its request id under this config: the missing results line is written from the audit record instead. An item
not released may find a file under its own name, put in place by a run killed before its audit line: when the
``[output] name`` holds ``{request_id}``, ``--resume`` replaces that unreleased file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxframe.core.types import GenerationRequest
from fluxframe.errors import Blocked, FluxframeError, RequestError

#: Fields a jsonl line or csv column may give (anything ``generate`` takes, plus the conditioning shortcuts).
SHORTCUTS = {"references": ("reference", "images"), "inpaint_image": ("inpaint", "image"),
             "mask": ("inpaint", "mask"), "control": ("control", "image"), "control_kind": ("control", "kind"),
             "control_strength": ("control", "strength"), "control_stop": ("control", "stop")}
PATH_SHORTCUTS = ("references", "inpaint_image", "mask", "control")
INTS = ("seed", "steps", "width", "height")
NUMBERS = ("guidance", "control_strength", "control_stop")
TEXTS = ("prompt", "negative_prompt", "output", "prompt_embeds", "control_kind", "inpaint_image", "mask", "control")
FIELDS = frozenset((*INTS, *NUMBERS, *TEXTS, "conditioning", "references", "upsample_prompt"))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
RELEASED = ("allow", "flag", "blur")  # audit actions that come with a released output


@dataclass
class Item:
    """One request of the file: where it is, its key, and the request built from it (or why none could be)."""

    line: int
    key: str
    request_id: str
    fields: dict[str, Any] = field(default_factory=dict)
    error: RequestError | None = None

    @property
    def output(self) -> str | None:
        return self.fields.get("output")


@dataclass
class Outcome:
    """What became of one item: the results line, as written."""

    record: dict[str, Any]

    @property
    def status(self) -> str:
        return self.record["status"]


@dataclass
class Summary:
    done: int = 0
    blocked: int = 0
    failed: int = 0
    skipped: int = 0
    stopped: bool = False  # --fail-fast stopped the run

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 3 if self.blocked else 0


def item_key(config_hash: str, line: int, text: str) -> str:
    return hashlib.sha256(f"{config_hash}\n{line}\n{text}".encode("utf-8", "surrogateescape")).hexdigest()


def _item(config_hash: str, line: int, text: str) -> Item:
    key = item_key(config_hash, line, text)
    return Item(line=line, key=key, request_id=f"b{line}-{key[:24]}")


def _error(item: Item, message: str, field_name: str | None) -> Item:
    item.error = RequestError(message, field=field_name)
    return item


def _check_fields(item: Item, fields: dict[str, Any]) -> Item:
    """Types of every field, checked here: a wrong type must be this item's error, not a crash of the run."""
    for name, value in fields.items():
        if name not in FIELDS:
            return _error(item, f"unknown field; the fields are {', '.join(sorted(FIELDS))}", name)
        if value is None:
            continue
        bad = (name in INTS and (isinstance(value, bool) or not isinstance(value, int))) or \
              (name in NUMBERS and (isinstance(value, bool) or not isinstance(value, (int, float)))) or \
              (name in TEXTS and not isinstance(value, str)) or \
              (name == "upsample_prompt" and not isinstance(value, bool)) or \
              (name == "references" and not (isinstance(value, list) and all(isinstance(v, str) for v in value))) or \
              (name == "conditioning" and not (isinstance(value, dict) and all(isinstance(v, dict)
                                                                               for v in value.values())))
        if bad:
            want = {"references": "a list of paths", "conditioning": "an object {conditioner: {input: value}}",
                    "upsample_prompt": "true or false"}.get(name) or \
                ("an integer" if name in INTS else "a number" if name in NUMBERS else "text")
            return _error(item, f"must be {want}, got {type(value).__name__}", name)
    if fields.get("prompt") is None and fields.get("prompt_embeds") is None:
        return _error(item, "missing: each request needs a prompt (or prompt_embeds)", "prompt")
    if (name := fields.get("output")) is not None and (why := output_name_problem(name)) is not None:
        return _error(item, why, "output")
    item.fields = {k: v for k, v in fields.items() if v is not None}
    return item


def output_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an item's output name: it must be one file name inside the output folder."""
    if not name or "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        return f"{name!r} must be a file name kept inside the output folder, not a path"
    if name.startswith("."):
        return f"{name!r} must not start with '.' (hidden files are not outputs)"
    if not name.lower().endswith(IMAGE_SUFFIXES):
        return f"{name!r} must end in one of {', '.join(IMAGE_SUFFIXES)}"
    return None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        for number, text in enumerate(fh, 1):
            yield number, text.rstrip("\r\n")


def _txt(path: Path, config_hash: str) -> Iterator[Item]:
    for number, text in _lines(path):
        prompt = text.strip()
        if prompt and not prompt.startswith("#"):
            yield _check_fields(_item(config_hash, number, prompt), {"prompt": prompt})


def _jsonl(path: Path, config_hash: str) -> Iterator[Item]:
    for number, text in _lines(path):
        if not text.strip():
            continue
        item = _item(config_hash, number, text)
        try:
            value = json.loads(text)
        except ValueError as exc:
            yield _error(item, f"not valid JSON ({exc})", None)
            continue
        if not isinstance(value, dict):
            yield _error(item, f"must be a JSON object of request fields, got {type(value).__name__}", None)
            continue
        yield _check_fields(item, value)


def _cell(name: str, text: str) -> Any:
    """A CSV cell as the field's value: numbers, conditioning and reference lists are read as JSON (a reference
    may also be one plain path); text fields are kept as text; an empty cell is no value."""
    if text == "":
        return None
    if name in INTS or name in NUMBERS or name in ("conditioning", "upsample_prompt") or \
            (name == "references" and text.lstrip().startswith("[")):
        try:
            return json.loads(text)
        except ValueError:
            return text  # the type check names the field
    return [text] if name == "references" else text


def _csv(path: Path, config_hash: str) -> Iterator[Item]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        check_header(path, header)
        last = reader.line_num
        for row in reader:
            number, last = last + 1, reader.line_num  # the row's first line (a quoted cell may span several)
            if not any(cell.strip() for cell in row):
                continue
            buf = io.StringIO()
            csv.writer(buf).writerow(row)
            item = _item(config_hash, number, buf.getvalue().rstrip("\r\n"))
            if len(row) != len(header):
                yield _error(item, f"has {len(row)} cells, the header {len(header)}", None)
                continue
            yield _check_fields(item, {name: _cell(name, cell) for name, cell in zip(header, row)})


def check_header(path: Path, header: list[str]) -> None:
    if "prompt" not in header and "prompt_embeds" not in header:
        raise RequestError(f"{path}: line 1: the CSV header has no prompt column (it has {', '.join(header)})",
                           field="prompt")
    for name in header:
        if name not in FIELDS:
            raise RequestError(f"{path}: line 1: unknown column {name!r}; the fields are {', '.join(sorted(FIELDS))}",
                               field=name)
    if len(set(header)) != len(header):
        twice = next(h for h in header if header.count(h) > 1)
        raise RequestError(f"{path}: line 1: column {twice!r} appears twice", field=twice)


READERS = {".txt": _txt, ".jsonl": _jsonl, ".csv": _csv}


def read_items(path: str | Path, config_hash: str = "") -> Iterator[Item]:
    """The file's items, one at a time. Each carries its per-line error, if any; duplicate output names are
    per-line errors naming both lines (so the names given are remembered, nothing else)."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise RequestError(f"{path}: a requests file is .txt, .jsonl or .csv", field="REQUESTS")
    names: dict[str, int] = {}
    for item in reader(path, config_hash):
        if item.error is None and (name := item.output) is not None:
            if name in names:
                _error(item, f"{name!r} is also the output of line {names[name]}", "output")
            else:
                names[name] = item.line
        yield item


def scan(path: str | Path) -> int:
    """The number of items, read once through (for the progress bar's total); a RequestError for a file that
    cannot run at all: unreadable, of an unknown kind, a CSV without a prompt column, or no requests."""
    path = Path(path)
    try:
        count = sum(1 for _ in read_items(path))
    except OSError as exc:
        raise RequestError(f"{path}: cannot read ({exc.strerror or exc})", field="REQUESTS") from None
    if count == 0:
        raise RequestError(f"{path}: no requests in the file (blank lines and, in .txt, # comments are skipped)",
                           field="REQUESTS")
    return count


def _resolve(base: Path, value: str) -> str:
    return str(Path(value) if Path(value).is_absolute() else base / value)


def build_request(item: Item, *, base: Path, output_dir: Path, seed: int | None,
                  file_keys: Callable[[str], tuple[str, ...]] = lambda name: ()) -> GenerationRequest:
    """The GenerationRequest an item asks for; paths relative to the requests file's folder ``base``."""
    f = dict(item.fields)
    conditioning = {name: dict(inputs) for name, inputs in f.pop("conditioning", {}).items()}
    for name, inputs in conditioning.items():
        for key in file_keys(name):
            value = inputs.get(key)
            if isinstance(value, str):
                inputs[key] = _resolve(base, value)
            elif isinstance(value, list):
                inputs[key] = [_resolve(base, v) if isinstance(v, str) else v for v in value]
    for short, (name, key) in SHORTCUTS.items():
        if short in f:
            value = f.pop(short)
            if short in PATH_SHORTCUTS:
                value = [_resolve(base, v) for v in value] if isinstance(value, list) else _resolve(base, value)
            if key in conditioning.get(name, {}):
                raise RequestError(f"also given as conditioning.{name}.{key}; give it once", field=short)
            conditioning.setdefault(name, {})[key] = value
    output = f.pop("output", None)
    embeds = f.pop("prompt_embeds", None)
    seed = f.pop("seed", seed)
    return GenerationRequest(**f, seed=seed, conditioning=conditioning, request_id=item.request_id,
                             output=output_dir / output if output is not None else None,
                             prompt_embeds=Path(_resolve(base, embeds)) if embeds is not None else None)


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def check_results(results: Path, requests: Path, guard: Any = None) -> None:
    """The results file must be a ``.jsonl`` file of its own: not the requests file, not a folder, and not a file
    the deployment reads or writes (``guard``: its OutputGuard; the config, the audit log and its head, a key, a
    checkpoint ...), since a run appends to it and ``--resume`` cuts a torn last line off it. RequestError naming
    ``--results`` otherwise."""
    results = Path(results)
    if results.suffix.lower() != ".jsonl":
        raise RequestError(f"{results}: the results file is JSON lines; name it *.jsonl", field="--results")
    if results.is_dir():
        raise RequestError(f"{results}: a folder, not a file", field="--results")
    if results.exists() and Path(requests).exists() and os.path.samefile(results, requests):
        raise RequestError(f"{results}: the requests file itself; give the results another file", field="--results")
    if guard is not None and (why := guard.problem(results)) is not None:
        raise RequestError(f"{results} {why}", field="--results")


class Results:
    """``results.jsonl``: one whole JSON line per item, appended and flushed as each finishes. A ``start`` line
    opens each run (its nonce seeds the items that give no seed). A line cut short by a kill is dropped on resume."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> tuple[str | None, dict[str, dict[str, Any]]]:
        """(the first run's nonce, the results line of every finished item by key), dropping a cut-short tail."""
        nonce, done = None, {}
        if not self.path.exists():
            return nonce, done
        with open(self.path, "rb+") as fh:
            good = 0
            for raw in fh:
                if not raw.endswith(b"\n"):
                    fh.truncate(good)  # a kill cut this line short: never a record, so gone
                    break
                good += len(raw)
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if record.get("event") == "start":
                    nonce = nonce or record.get("nonce")
                elif record.get("status") in ("ok", "blocked") and "key" in record:
                    done[record["key"]] = record
        return nonce, done

    def append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, sort_keys=True, default=str, ensure_ascii=False) + "\n").encode(
            "utf-8", "surrogateescape")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)  # one write of a whole line: a kill leaves either all of it or a cut tail
            os.fsync(fd)
        finally:
            os.close(fd)


def audited(pipeline: Any, *, prefix: str = "b", also: tuple[str, ...] = (),
            logs: list[Path] | None = None) -> dict[str, dict[str, Any]]:
    """The audit log's last record per request id starting with ``prefix`` (batch items; the service's jobs are
    "j") under this config that released an image or was blocked (or has an action in ``also``): what a run
    killed between a release and its own record of it left. ``logs``: the audit logs to read (default: the
    pipeline's). Empty without a log."""
    audit = getattr(getattr(pipeline, "stages", None), "audit", None)
    config_hash = getattr(pipeline, "config_hash", None)
    out: dict[str, dict[str, Any]] = {}
    if logs is None:
        logs = [Path(audit.path)] if getattr(audit, "path", None) is not None else []
    for path in logs:
        if Path(path).exists():
            _audited(Path(path), config_hash, prefix, also, out)
    return out


def _audited(path: Path, config_hash: str | None, prefix: str, also: tuple[str, ...],
             out: dict[str, dict[str, Any]]) -> None:
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            rid = record.get("request_id")
            if not (isinstance(rid, str) and rid.startswith(prefix) and record.get("config_sha256") == config_hash):
                continue
            action = record.get("action")
            if (action in RELEASED and record.get("output")) or action == "block" or action in also:
                out[rid] = {k: record.get(k) for k in ("action", "output", "reasons", "settings", "time", "verdicts")}


def _seed(nonce: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{nonce}:{key}".encode()).digest()[:4], "big")


def _file_keys(pipeline: Any) -> Callable[[str], tuple[str, ...]]:
    """Which inputs of a conditioner are files (their relative paths are resolved against the requests file)."""
    cache: dict[str, tuple[str, ...]] = {}

    def keys(name: str) -> tuple[str, ...]:
        if name not in cache:
            try:
                cache[name] = tuple(pipeline.file_inputs(name))
            except (AttributeError, FluxframeError):
                cache[name] = ()  # the run names an unknown conditioner itself, for this item
        return cache[name]

    return keys


def run_batch(pipeline: Any, requests: str | Path, *, results: str | Path, output_dir: str | Path,
              batch_size: int = 1, resume: bool = False, fail_fast: bool = False,
              report: Callable[[Outcome, Summary], None] | None = None) -> Summary:
    """Run every item of ``requests`` through ``pipeline.generate_many`` in groups of ``batch_size`` consecutive
    items, appending each item's results line to ``results`` as its group finishes. See the module docstring."""
    check_results(Path(results), Path(requests), getattr(getattr(pipeline, "stages", None), "guard", None))
    requests, results_file, output_dir = Path(requests), Results(Path(results)), Path(output_dir)
    base = requests.absolute().parent
    config = getattr(pipeline, "config", None)
    cap = getattr(getattr(config, "sampler", None), "max_batch_size", None)
    batch_size = max(1, min(batch_size, cap or batch_size))
    config_seed = getattr(getattr(config, "sampler", None), "seed", None)
    config_hash = getattr(pipeline, "config_hash", "")
    template = getattr(getattr(config, "output", None), "name", "")
    nonce, done = results_file.read() if resume else (None, {})
    released = audited(pipeline) if resume else {}
    nonce = nonce or secrets.token_hex(16)
    results_file.append({"event": "start", "time": _now(), "requests": str(requests.absolute()), "nonce": nonce,
                         "config_sha256": config_hash, "resume": resume, "batch_size": batch_size})
    summary, group = Summary(), []
    file_keys = _file_keys(pipeline)

    def finish(item: Item, record: dict[str, Any]) -> None:
        record = {"line": item.line, "request_id": item.request_id, "key": item.key, "time": _now(), **record}
        results_file.append(record)
        status = record["status"]
        if status == "ok":
            summary.done += 1
        elif status == "blocked":
            summary.blocked += 1
        else:
            summary.failed += 1
        if report is not None:
            report(Outcome(record), summary)

    def failed(item: Item, exc: FluxframeError, seed: int | None = None) -> None:
        finish(item, {"status": "error", "output": None, "reasons": [str(exc)], "seed": seed,
                      "field": getattr(exc, "field", None), "error": f"line {item.line}: {exc}", "timings": {}})

    def flush() -> None:
        if not group:
            return
        started = time.perf_counter()
        outcomes = pipeline.generate_many([request for _, request in group])
        wall = time.perf_counter() - started
        for (item, request), result in zip(group, outcomes, strict=True):
            if isinstance(result, Blocked):
                reasons = list(getattr(result.decision, "reasons", None) or [str(result)])
                finish(item, {"status": "blocked", "output": None, "reasons": reasons, "seed": request.seed,
                              "timings": {"group": wall}})
            elif isinstance(result, FluxframeError):
                failed(item, result, request.seed)
            else:
                finish(item, {"status": "ok", "output": str(result.path) if result.path else None,
                              "reasons": [v.reason for v in result.verdicts  # a flag or blur says why
                                          if not getattr(v, "allowed", True) and getattr(v, "reason", None)],
                              "seed": result.seed, "timings": {**result.timings, "group": wall}})
        group.clear()

    for item in read_items(requests, config_hash):
        if summary.stopped:
            break
        if item.key in done:
            summary.skipped += 1
            continue
        if (record := released.get(item.request_id)) is not None:  # released, its results line lost to a kill
            output = (record.get("output") or {}).get("path")
            finish(item, {"status": "blocked" if record["action"] == "block" else "ok", "output": output,
                          "reasons": record.get("reasons") or [], "seed": (record.get("settings") or {}).get("seed"),
                          "timings": {}, "source": "audit"})
            continue
        if item.error is not None:
            failed(item, item.error)
        else:
            seed = item.fields.get("seed", _seed(nonce, item.key) if config_seed is None else None)
            try:
                request = build_request(item, base=base, output_dir=output_dir, seed=seed, file_keys=file_keys)
                # A kill between putting a file in place and its audit line leaves an unreleased file under the
                # item's own name: a file named by its request id (derived from its key) can be no other's.
                request.overwrite = resume and request.output is None and "{request_id}" in template
            except RequestError as exc:
                failed(item, exc, seed)
            else:
                group.append((item, request))
                if len(group) >= batch_size:
                    flush()
        if fail_fast and summary.failed:
            summary.stopped = True
    flush()  # with --fail-fast too: the items before the first error are run
    return summary
