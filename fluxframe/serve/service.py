"""One loaded deployment behind a durable queue: what `fluxframe serve` runs (the HTTP face is fluxframe.serve.app).

``Service`` owns the job store (fluxframe.serve.store), the pipeline (loaded in the background, so the server
answers /healthz at once and /readyz once weights and required filters are ready) and one worker thread. The worker
claims up to ``max_batch_size`` compatible queued jobs (same size, steps, guidance and conditioners), waiting up to
``batch_wait_ms`` for more to arrive, and runs them with ``Pipeline.generate_many``: each job is filtered, made,
watermarked, signed, released and audited exactly as ``fluxframe generate`` would, its audit line naming the token
that asked for it.

Exactly once. A job's request id is its job id. The worker records a job's end after the pipeline has released
and audited it; a process killed in between leaves the job ``running``. On start, ``recover`` looks up every such
job in the audit log (the source of truth): released or blocked there → finished from that record; otherwise it
is queued again, in its old place, and runs from the start (its seed was drawn when it was accepted, so it makes
the same image). Where a kill left the file in place but no audit line, the rerun replaces that unreleased file.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fluxframe.core.batch import audited
from fluxframe.core.inputs import InputFile, no_paths
from fluxframe.core.types import GenerationRequest, StepInfo
from fluxframe.errors import Blocked, Cancelled, FluxframeError, RequestError
from fluxframe.serve.metrics import Metrics
from fluxframe.serve.store import Job, Store, new_job_id

log = logging.getLogger("fluxframe.serve")

#: Request fields a client may set (besides ``conditioning`` and the ``references`` shortcut).
FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height")


class OverLimit(RequestError):
    """A request over one of [serve]'s size limits (prompt length, reference count, pixels): HTTP 413."""


@dataclasses.dataclass
class Upload:
    """An image a client sent: for ``conditioner``'s input ``key`` (``position`` in a list, -1 for one value)."""

    conditioner: str
    key: str
    position: int
    data: bytes

    @property
    def name(self) -> str:
        where = f"{self.conditioner}.{self.key}" + (f"[{self.position}]" if self.position >= 0 else "")
        return f"upload:{where}"


def decode_base64(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise RequestError(f"must be a base64 string, got {type(text).__name__}", field=where)
    if text.startswith("data:") and "," in text:  # a data: URL, as a browser's FileReader makes it
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("is not valid base64", field=where) from None


def check_image_header(data: bytes, where: str, max_pixels: int) -> None:
    """The image's size from its header (nothing decoded yet): a RequestError naming ``where`` when it is not an
    image or has more than ``max_pixels`` pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as exc:
        raise OverLimit(f"refused, too many pixels ({exc})", field=where) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise RequestError(f"not a readable image ({exc})", field=where) from None
    if width * height > max_pixels:
        raise OverLimit(f"has {width}x{height} = {width * height} pixels, more than the {max_pixels} allowed",
                           field=where)


class Service:
    """The deployment ``config`` served from the job store in its state folder. ``start`` loads the pipeline
    (in a thread unless ``wait``) and starts the worker; ``stop`` ends the worker after its current batch."""

    def __init__(self, config: Any, *, worker_id: str = "serve", pipeline: Any = None,
                 load: Callable[[Any], Any] | None = None, audit_logs: Callable[[], list[Path]] | None = None,
                 lease: float = 60.0, sweep_seconds: float = 60.0):
        """``lease``: seconds a claimed job stays this worker's without a renewal (each step renews it);
        ``sweep_seconds``: how often ``housekeeping`` looks for other workers' expired leases."""
        self.config = config
        self.settings = config.serve
        self.state_dir = config.serve_state_dir
        self.store = Store.for_config(config)
        self.worker_id = worker_id
        self.pipeline = pipeline
        self._load = load
        self._audit_logs = audit_logs
        self.load_error: str | None = None
        self.metrics = Metrics(self.store)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_step: dict[tuple[str, ...], float] = {}
        self._last_sweep = 0.0
        self.lease, self.sweep_seconds = lease, sweep_seconds
        self.max_batch_size = self.settings.max_batch_size or config.sampler.max_batch_size

    # -- life ------------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.pipeline is not None and self.load_error is None

    def start(self, *, wait: bool = False) -> None:
        def boot() -> None:
            try:
                if self.pipeline is None:
                    if self._load is not None:
                        self.pipeline = self._load(self.config)
                    else:
                        from fluxframe import api

                        self.pipeline = api.load(self.config)
                self.recover(self.store.stale(worker=self.worker_id))
            except Exception as exc:  # the server stays up and says why on /readyz
                self.load_error = str(exc) if isinstance(exc, FluxframeError) else f"{type(exc).__name__}: {exc}"
                log.error("the deployment could not be loaded: %s", self.load_error)
                return
            log.info("deployment loaded; the worker starts")
            self._spawn(self._work, "fluxframe-worker")

        if wait:
            boot()
        else:
            self._spawn(boot, "fluxframe-load")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Let the worker finish its current batch (up to ``timeout`` s); what is still running after that is
        run again from the start by the next server."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)

    # -- accepting jobs --------------------------------------------------------------------------------

    def submit(self, body: dict[str, Any], uploads: list[Upload], *, client: str | None) -> tuple[str, int | None]:
        """Check a request (before anything is decoded: field names and types, prompt length, reference count,
        each upload's pixel count; then the settings as the pipeline checks them) and queue it. (job id, queue
        position); position None means the queue is full (nothing stored). RequestError names the field."""
        s = self.settings
        unknown = sorted(set(body) - {*FIELDS, "conditioning", "references"})
        if unknown:
            raise RequestError("unknown field", field=unknown[0])
        for key in ("prompt", "negative_prompt"):
            text = body.get(key)
            if text is not None and not isinstance(text, str):
                raise RequestError(f"must be text, got {type(text).__name__}", field=key)
            if isinstance(text, str) and len(text) > s.max_prompt_chars:
                raise OverLimit(f"is {len(text)} characters, more than the {s.max_prompt_chars} allowed",
                                   field=key)
        if not isinstance(body.get("prompt"), str) or not body["prompt"].strip():
            raise RequestError("is required (text)", field="prompt")
        conditioning = body.get("conditioning") or {}
        if not isinstance(conditioning, dict) or not all(isinstance(v, dict) for v in conditioning.values()):
            raise RequestError("must be a table of conditioner name → inputs", field="conditioning")
        conditioning = {name: dict(inputs) for name, inputs in conditioning.items()}
        uploads = list(uploads)
        references = body.get("references")
        if references is not None:
            if not isinstance(references, list):
                raise RequestError("must be a list of base64 images", field="references")
            if "images" in conditioning.get("reference", {}):
                raise RequestError("also given as conditioning.reference.images; give it once", field="references")
            uploads += [Upload("reference", "images", i, decode_base64(v, f"references[{i}]"))
                        for i, v in enumerate(references)]
        pipeline = self.pipeline
        for name, inputs in conditioning.items():  # base64 values of file inputs are uploads too
            for key in self._file_keys(name):
                value = inputs.pop(key, None)
                if isinstance(value, list):
                    uploads += [Upload(name, key, i, decode_base64(v, f"conditioning.{name}.{key}[{i}]"))
                                for i, v in enumerate(value)]
                elif value is not None:
                    uploads.append(Upload(name, key, -1, decode_base64(value, f"conditioning.{name}.{key}")))
        for upload in uploads:
            if upload.key not in self._file_keys(upload.conditioner):
                raise RequestError("is not an image input of this deployment",
                                   field=f"conditioning.{upload.conditioner}.{upload.key}")
        count = sum(1 for u in uploads if u.conditioner == "reference")
        if count > s.max_references:
            raise OverLimit(f"{count} reference images, more than the {s.max_references} allowed",
                               field="references")
        for upload in uploads:
            check_image_header(upload.data, upload.name.removeprefix("upload:"), s.max_image_pixels)
        fields = {k: body.get(k) for k in FIELDS if body.get(k) is not None}
        job_id = new_job_id()
        request = self._request(job_id, fields, conditioning, uploads, client)
        settings = pipeline.check(request)  # RequestError naming the field: size, steps, guidance, seed ...
        fields["seed"] = settings.seed  # drawn once, now: a job run again makes the same image
        key = json.dumps([settings.width, settings.height, settings.steps, settings.guidance,
                          sorted(request.conditioning), bool(fields.get("negative_prompt"))])
        position = self.store.add(
            job_id, request={"fields": fields, "conditioning": conditioning}, settings=dataclasses.asdict(settings),
            batch_key=key, client=client, max_queue=s.max_queue,
            files=[(u.conditioner, u.key, u.position, u.name, u.data) for u in uploads])
        if position is not None:
            self.metrics.accepted.inc()
            self._wake.set()
        return job_id, position

    def _file_keys(self, name: str) -> tuple[str, ...]:
        try:
            return tuple(self.pipeline.file_inputs(name))
        except FluxframeError as exc:
            raise RequestError(str(exc), field=f"conditioning.{name}") from None

    @staticmethod
    def _request(job_id: str, fields: dict[str, Any], conditioning: dict[str, dict[str, Any]],
                 uploads: list[Upload], client: str | None, *, overwrite: bool = False) -> GenerationRequest:
        conditioning = {name: dict(inputs) for name, inputs in conditioning.items()}
        for upload in sorted(uploads, key=lambda u: (u.conditioner, u.key, u.position)):
            inputs = conditioning.setdefault(upload.conditioner, {})
            value = InputFile(upload.name, upload.data)
            if upload.position < 0:
                inputs[upload.key] = value
            else:
                inputs.setdefault(upload.key, []).append(value)
        return GenerationRequest(**fields, conditioning=conditioning, request_id=job_id, client=client,
                                 overwrite=overwrite)

    def job_request(self, job: Job) -> GenerationRequest:
        """The GenerationRequest a stored job runs as. A job run again may replace the file its first run put in
        place without auditing it (killed in between): nothing else can have that job's name."""
        uploads = [Upload(c, k, p, data) for c, k, p, _, data in self.store.inputs(job.id)]
        return self._request(job.id, job.request["fields"], job.request["conditioning"], uploads, job.client,
                             overwrite=job.attempts > 1)

    # -- the worker ------------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                self.housekeeping()
                jobs = self.store.next_batch(self.worker_id, self.max_batch_size,
                                             wait=self.settings.batch_wait_ms / 1000, lease=self.lease)
            except FluxframeError as exc:
                log.error("the job store failed: %s", exc)
                jobs = []
            if not jobs:
                self._wake.wait(min(0.25, max(self.settings.batch_wait_ms / 1000, 0.01)))
                self._wake.clear()
                continue
            self.run_jobs(jobs)

    def run_jobs(self, jobs: list[Job]) -> None:
        """Run claimed jobs through the pipeline together and record each one's end."""
        requests, runnable = [], []
        for job in jobs:
            try:
                requests.append(self.job_request(job))
                runnable.append(job)
            except FluxframeError as exc:
                self._finish(job, "error", [str(exc)])
        if not runnable:
            return
        for job in runnable:
            self.metrics.queue_wait.observe(max(0.0, (job.started or time.time()) - job.created))
        started = time.perf_counter()
        try:
            with no_paths("the service takes uploaded images"):  # a client's string is never a server path
                outcomes = self.pipeline.generate_many(requests, progress=self._progress, cancelled=self._cancelled)
        except Exception as exc:  # a bug: the pipeline audited each request as an error
            log.exception("a batch failed")
            outcomes = [exc] * len(runnable)
        wall = time.perf_counter() - started
        for job, outcome in zip(runnable, outcomes, strict=True):
            self.metrics.job_time.observe(wall)
            self._record(job, outcome)

    def _record(self, job: Job, outcome: Any) -> None:
        if isinstance(outcome, Blocked):
            decision = outcome.decision
            verdicts = [dataclasses.asdict(v) for v in getattr(decision, "verdicts", [])]
            for v in verdicts:
                if not v["allowed"]:
                    self.metrics.blocked.labels(filter=v["filter"]).inc()
            reasons = list(getattr(decision, "reasons", None) or [str(outcome)])
            self._finish(job, "blocked", reasons, {"verdicts": verdicts})
        elif isinstance(outcome, Cancelled):
            self._finish(job, "cancelled", [str(outcome)])
        elif isinstance(outcome, BaseException):
            reason = str(outcome) if isinstance(outcome, FluxframeError) else f"{type(outcome).__name__}: {outcome}"
            self._finish(job, "error", [reason], {"field": getattr(outcome, "field", None)})
        else:
            output = (outcome.audit or {}).get("output") or {}
            self._finish(job, "done", [v.reason for v in outcome.verdicts if not v.allowed and v.reason], {
                "output": str(outcome.path) if outcome.path else None, "sha256": output.get("sha256"),
                "format": output.get("format"), "seed": outcome.seed, "steps": outcome.steps,
                "guidance": outcome.guidance, "width": outcome.width, "height": outcome.height,
                "verdicts": [dataclasses.asdict(v) for v in outcome.verdicts], "notes": outcome.notes,
                "timings": outcome.timings})

    def _finish(self, job: Job, status: str, reasons: list[str], result: dict[str, Any] | None = None) -> None:
        if self.store.finish(job.id, status, reasons=reasons, result=result, worker=self.worker_id):
            self.metrics.finished.labels(status=status).inc()
        else:
            log.warning("job %s was no longer this worker's when it ended (%s)", job.id, status)

    def _progress(self, info: StepInfo) -> None:
        now = time.perf_counter()
        last = self._last_step.pop(info.request_ids, None)
        if last is not None:
            self.metrics.step_time.observe(now - last)
        if info.step < info.num_steps:
            self._last_step[info.request_ids] = now
        self.store.progress(info.request_ids, info.step, info.num_steps, lease=self.lease)

    def _cancelled(self, request_id: str) -> bool:
        return bool(self.store.cancel_requested([request_id]))

    # -- recovery and retention ------------------------------------------------------------------------

    def audit_logs(self) -> list[Path] | None:
        return self._audit_logs() if self._audit_logs is not None else None

    def recover(self, jobs: list[Job]) -> None:
        """Jobs whose worker died while running them: finished from the audit log where it released, blocked or
        cancelled them, else queued again (see the module docstring)."""
        if not jobs:
            return
        records = audited(self.pipeline, prefix="j", also=("cancelled",), logs=self.audit_logs())
        for job in jobs:
            record = records.get(job.id)
            if record is None:
                if self.store.requeue(job.id, worker=job.worker):
                    log.warning("job %s was running when its worker stopped: queued again", job.id)
                continue
            status = {"block": "blocked", "cancelled": "cancelled"}.get(record["action"], "done")
            output = record.get("output") or {}
            result = {"output": output.get("path"), "sha256": output.get("sha256"), "format": output.get("format"),
                      "source": "audit", **(record.get("settings") or {})}
            if self.store.finish(job.id, status, reasons=record.get("reasons") or [], result=result,
                                 worker=job.worker):
                log.warning("job %s was %s before its worker stopped (from the audit log)", job.id, status)

    def housekeeping(self, *, now: float | None = None) -> None:
        """Every ``sweep_seconds`` (a minute by default): other workers' jobs whose lease ran out are recovered;
        finished jobs older than ``retention_hours`` are removed with their images (the audit log keeps their lines)."""
        now = time.time() if now is None else now
        if now - self._last_sweep < self.sweep_seconds:
            return
        self._last_sweep = now
        self.recover(self.store.stale())
        for job in self.store.expired(now - self.settings.retention_hours * 3600):
            output = (job.result or {}).get("output")
            if output and job.status == "done" and Path(output).is_relative_to(self.config.output_dir):
                Path(output).unlink(missing_ok=True)
            self.store.remove(job.id)

    # -- reading ---------------------------------------------------------------------------------------

    def describe(self, job: Job) -> dict[str, Any]:
        """A job as the API shows it."""
        out = {"id": job.id, "status": job.status, "position": self.store.position(job),
               "created": job.created, "started": job.started, "finished": job.finished, "attempts": job.attempts,
               "prompt": job.request.get("fields", {}).get("prompt"), "settings": job.settings,
               "reasons": job.reasons, "client": job.client}
        if job.status == "running":
            out["progress"] = {"step": job.step or 0, "steps": job.steps or (job.settings or {}).get("steps")}
        if job.result is not None:
            result = {k: v for k, v in job.result.items() if k != "output"}
            if job.status == "done" and job.result.get("output"):
                result["image"] = f"/v1/jobs/{job.id}/image"
            out["result"] = result
        return out

    def image_path(self, job: Job) -> Path | None:
        if job.status != "done" or not (job.result or {}).get("output"):
            return None
        path = Path(job.result["output"])
        return path if path.is_file() else None

