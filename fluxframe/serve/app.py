"""The HTTP face of a Service: FastAPI routes (versioned under /v1, OpenAPI at /openapi.json, docs at /docs), bearer
token auth, per-token limits, server-sent progress events, Prometheus metrics and the web page at /.

Every refusal is JSON naming the problem: ``{"error": "...", "field": "..."}`` (422 for a bad field, 413 for a
body, image or prompt over its limit, 401 without a valid token, 429 with Retry-After for a full queue or a token
over its limits, 503 before the deployment is ready).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from fluxframe.errors import FluxframeError, ProvenanceError, RequestError
from fluxframe.serve.service import OverLimit, Service, Upload
from fluxframe.serve.store import FINISHED

log = logging.getLogger("fluxframe.serve")

ANONYMOUS = "anonymous"  # the client name audited for requests to a server run with --insecure-no-auth
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ImageRequest(BaseModel):
    """POST /v1/images (JSON, or the JSON in a multipart form's ``request`` field beside uploaded files)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="what to draw")
    negative_prompt: str | None = Field(None, description="true-guidance models only")
    seed: int | None = Field(None, description="drawn once when the job is accepted if absent")
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    references: list[str] | None = Field(None, description="reference images, base64 (FLUX.2)")
    conditioning: dict[str, dict[str, Any]] | None = Field(
        None, description="per-conditioner inputs, e.g. {\"inpaint\": {\"image\": base64, \"mask\": base64}}")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, field: str | None = None, headers: dict | None = None):
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}


class _BodyTooLarge(Exception):
    pass


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": message}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


class _Limits:
    """Per-token request rate (a sliding minute) in this process."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.seen: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def retry_after(self, name: str, now: float | None = None) -> float | None:
        """Seconds until ``name`` may ask again, or None (and the request is counted)."""
        now = time.monotonic() if now is None else now
        seen = self.seen[name]
        while seen and seen[0] <= now - 60:
            seen.popleft()
        if len(seen) >= self.per_minute:
            return seen[0] + 60 - now
        seen.append(now)
        return None


def create_app(service: Service, *, insecure_no_auth: bool = False, start: bool = True) -> FastAPI:
    """The app over ``service`` (started with the app unless ``start`` is false). Without ``insecure_no_auth``,
    every /v1 route needs ``Authorization: Bearer <token>`` (see ``fluxframe serve token add``)."""
    settings = service.settings
    limits = _Limits(settings.rate_limit_per_minute)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start:
            service.start()
        yield
        if start:
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="fluxframe", version="1", lifespan=lifespan,
                  description="Image generation with required safety filters, an invisible watermark, signed C2PA "
                              "metadata and an audit line per request.")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.field, exc.headers)

    @app.exception_handler(_BodyTooLarge)
    async def _too_large(request: Request, exc: _BodyTooLarge):
        service.metrics.rejected.labels(reason="body").inc()
        return _error(413, f"the request body is larger than {settings.max_body_bytes} bytes", "body")

    @app.middleware("http")
    async def _body_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            service.metrics.rejected.labels(reason="body").inc()
            return _error(413, f"the request body is larger than {settings.max_body_bytes} bytes", "body")
        receive, seen = request._receive, 0

        async def counted():  # a body without Content-Length (chunked) is counted as it arrives
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > settings.max_body_bytes:
                raise _BodyTooLarge()
            return message

        request._receive = counted
        return await call_next(request)

    def client(request: Request) -> str:
        if insecure_no_auth:
            return ANONYMOUS
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        name = service.store.token_name(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if name is None:
            service.metrics.rejected.labels(reason="auth").inc()
            raise ApiError(401, "a valid bearer token is required (Authorization: Bearer <token>)",
                           headers={"WWW-Authenticate": "Bearer"})
        return name

    def ready() -> Any:
        if not service.ready:
            raise ApiError(503, service.load_error or "the deployment is still loading",
                           headers={"Retry-After": "5"})
        return service.pipeline

    def own_job(job_id: str, name: str):
        job = service.store.get(job_id)
        if job is None or job.client != name:
            raise ApiError(404, f"no job {job_id!r}", field="id")
        return job

    # -- pages and probes ------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        html = resources.files("fluxframe.serve").joinpath("web/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{AUTH}}", "none" if insecure_no_auth else "bearer"))

    @app.get("/healthz", tags=["probes"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"])
    def readyz() -> JSONResponse:
        if service.ready:
            return JSONResponse({"status": "ready", "model": service.pipeline.stages.model.name,
                                 "required_filters": list(service.config.safety.require if service.config.safety
                                                          else [])})
        return _error(503, service.load_error or "the deployment is still loading")

    @app.get("/metrics", tags=["probes"])
    def metrics() -> Response:
        service.metrics.ready.set(1 if service.ready else 0)
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- jobs ------------------------------------------------------------------------------------------

    @app.post("/v1/images", status_code=202, tags=["jobs"],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": ImageRequest.model_json_schema()},
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "request": {"type": "string", "description": "the JSON request"},
                      "references": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}})
    async def submit(request: Request, wait: float = 0.0) -> JSONResponse:
        """Queue an image job: 202 with its id and queue position, or with ``?wait=SECONDS`` the finished job
        (200) if it ends within that time. A blocked request is a job with status ``blocked`` and its reasons."""
        name = client(request)
        ready()
        if not 0 <= wait <= settings.max_wait_seconds:
            raise ApiError(422, f"must be between 0 and {settings.max_wait_seconds}", field="wait")
        if (retry := limits.retry_after(name)) is not None:
            service.metrics.rejected.labels(reason="rate").inc()
            raise ApiError(429, f"more than {settings.rate_limit_per_minute} requests a minute for this token",
                           headers={"Retry-After": str(max(1, round(retry)))})
        if service.store.active(name) >= settings.max_jobs_per_token:
            service.metrics.rejected.labels(reason="concurrency").inc()
            raise ApiError(429, f"this token has {settings.max_jobs_per_token} jobs queued or running already",
                           headers={"Retry-After": "5"})
        body, uploads = await _read_request(request, settings)
        try:
            job_id, position = await asyncio.to_thread(service.submit, body, uploads, client=name)
        except RequestError as exc:
            service.metrics.rejected.labels(reason="invalid").inc()
            raise ApiError(413 if isinstance(exc, OverLimit) else 422, str(exc), field=exc.field) from None
        except FluxframeError as exc:
            raise ApiError(422, str(exc), field=getattr(exc, "field", None)) from None
        if position is None:
            service.metrics.rejected.labels(reason="queue").inc()
            raise ApiError(429, f"the queue is full ({settings.max_queue} jobs)", headers={"Retry-After": "10"})
        deadline = time.monotonic() + wait
        job = service.store.get(job_id)
        while wait and job.status not in FINISHED and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            job = service.store.get(job_id)
        if job.status in FINISHED:
            return JSONResponse(service.describe(job), status_code=200)
        return JSONResponse({"id": job_id, "status": job.status, "position": service.store.position(job),
                             "links": {"job": f"/v1/jobs/{job_id}", "events": f"/v1/jobs/{job_id}/events"}},
                            status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})

    @app.get("/v1/jobs", tags=["jobs"])
    def list_jobs(request: Request, limit: int = 50) -> dict:
        """This token's newest jobs."""
        name = client(request)
        return {"jobs": [service.describe(j) for j in service.store.jobs(client=name, limit=max(1, min(limit, 500)))]}

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: str, request: Request) -> dict:
        """Status, queue position, settings, reasons and result."""
        return service.describe(own_job(job_id, client(request)))

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"])
    def cancel_job(job_id: str, request: Request) -> dict:
        """A queued job is removed from the queue; a running one stops at its next step, writes nothing and is
        audited as cancelled."""
        own_job(job_id, client(request))
        status = service.store.cancel(job_id)
        return {"id": job_id, "status": status, "cancelling": status == "running"}

    @app.get("/v1/jobs/{job_id}/image", tags=["jobs"])
    def job_image(job_id: str, request: Request) -> FileResponse:
        """The released file as signed: C2PA manifest and watermark intact."""
        job = own_job(job_id, client(request))
        path = service.image_path(job)
        if path is None:
            raise ApiError(404, f"job {job_id} has no image (status {job.status})", field="id")
        media = MEDIA_TYPES.get((job.result or {}).get("format") or "", "application/octet-stream")
        return FileResponse(path, media_type=media, filename=path.name)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"])
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """Server-sent events: ``queued`` (position), ``running``, ``step`` (step of steps), then one of ``done``,
        ``blocked``, ``error``, ``cancelled``. A client leaving does not stop the job."""
        own_job(job_id, client(request))
        return StreamingResponse(_events(service, job_id, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- verification and plugins ----------------------------------------------------------------------

    @app.post("/v1/verify", tags=["provenance"],
              openapi_extra={"requestBody": {"content": {
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "file": {"type": "string", "format": "binary"}}}},
                  "image/png": {}, "image/jpeg": {}, "image/webp": {}}}})
    async def verify(request: Request) -> dict:
        """The `fluxframe verify --json` report of an uploaded image (multipart ``file``, or the raw image)."""
        client(request)
        from fluxframe.provenance.verify import configured_messages, verify_bytes

        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(422, "upload the image as the form's `file` field", field="file")
            data, name = await upload.read(), upload.filename or "upload"
        else:
            data, name = await request.body(), "upload"
        if not data:
            raise ApiError(422, "no image in the request", field="file")
        trust = [service.config.resolve(p) for p in settings.trust]
        try:
            report = await asyncio.to_thread(verify_bytes, data, name=name, trust=trust or None,
                                             messages=configured_messages(service.config))
        except ProvenanceError as exc:
            raise ApiError(422, str(exc), field="file") from None
        return json.loads(report.to_json())

    @app.get("/v1/plugins", tags=["deployment"])
    def plugins(request: Request) -> dict:
        """The loaded plugins and what each provides (as `fluxframe plugins --json`)."""
        client(request)
        return ready().host.report()

    return app


async def _read_request(request: Request, settings: Any) -> tuple[dict[str, Any], list[Upload]]:
    """The request's JSON and its uploaded files (multipart: a ``request`` field holding the JSON, files named
    ``references`` or ``conditioning.NAME.KEY``)."""
    kind = request.headers.get("content-type", "")
    uploads: list[Upload] = []
    if kind.startswith("multipart/form-data"):
        form = await request.form(max_files=64, max_fields=64)
        raw = form.get("request")
        if not isinstance(raw, str):
            raise ApiError(422, "a multipart request needs a `request` field holding the JSON request",
                           field="request")
        body = _json(raw.encode())
        files: dict[tuple[str, str], list[bytes]] = collections.defaultdict(list)
        listed: set[tuple[str, str]] = set()
        for key, value in form.multi_items():
            if isinstance(value, str):
                if key != "request":
                    raise ApiError(422, "unknown form field", field=key)
                continue
            if key == "references":
                target = ("reference", "images")
                listed.add(target)
            elif key.startswith("conditioning.") and key.count(".") == 2:
                target = tuple(key.split(".")[1:])
            else:
                raise ApiError(422, "unknown file field (references, conditioning.NAME.KEY)", field=key)
            files[target].append(await value.read())
        for (name, key), items in files.items():  # one file is one value; several (or references) a list
            many = len(items) > 1 or (name, key) in listed
            uploads += [Upload(name, key, i if many else -1, data) for i, data in enumerate(items)]
    elif kind.startswith("application/json") or not kind:
        body = _json(await request.body())
    else:
        raise ApiError(415, f"send JSON or multipart/form-data, not {kind}", field="content-type")
    if not isinstance(body, dict):
        raise ApiError(422, "the request must be a JSON object", field="body")
    return body, uploads


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ApiError(422, f"not valid JSON ({exc})", field="body") from None
    except RecursionError:
        raise ApiError(422, "JSON nested too deeply", field="body") from None


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def _events(service: Service, job_id: str, request: Request):
    """A job's state changes as server-sent events, read from the store (so they follow a restart too)."""
    last: tuple | None = None
    quiet = time.monotonic()
    while True:
        if await request.is_disconnected():
            return
        job = service.store.get(job_id)
        if job is None:
            yield _sse("error", {"id": job_id, "reasons": ["the job is gone (past its retention)"]})
            return
        position = service.store.position(job)
        state = (job.status, position, job.step, job.attempts)
        if state != last:
            quiet = time.monotonic()
            if job.status == "queued":
                yield _sse("queued", {"id": job_id, "position": position})
            elif job.status == "running":
                if last is None or last[0] != "running" or last[3] != job.attempts:
                    yield _sse("running", {"id": job_id, "attempt": job.attempts})
                if job.step:
                    yield _sse("step", {"id": job_id, "step": job.step, "steps": job.steps})
            else:
                yield _sse(job.status, service.describe(job))
                return
            last = state
        elif time.monotonic() - quiet > 15:
            quiet = time.monotonic()
            yield b": keep-alive\n\n"
        await asyncio.sleep(0.1)


