"""`fluxframe serve --ray`: the same HTTP API, scaled out over Ray Serve replicas of the model ([serve.ray]).

Two deployments, one machine, one state folder:

* ``FluxframeIngress`` (one replica, no CPU reserved) serves the FastAPI app of fluxframe.serve.app over a
  Service that loads no model: tokens, limits, job listing, events, images, cancelling and verification read and
  write the SQLite job store in the state folder, exactly as `fluxframe serve` does. A request is checked by a
  model replica (``Pipeline.check``, through a deployment handle), accepted into the store (committed before the
  answer), and then pushed to the model deployment by its job id.
* ``FluxframeModel`` (``replicas``, or autoscaling between ``min_replicas`` and ``max_replicas``; each with
  ``num_cpus`` / ``num_gpus``) loads the pipeline. Its ``run(job_id)`` goes through ``@serve.batch`` (up to
  [serve.ray] ``max_batch_size``, else [serve] ``max_batch_size``, waiting up to [serve] ``batch_wait_ms``): the
  batch's jobs that are still queued are claimed in the store with a lease (``Store.claim``) and run together with
  ``Pipeline.generate_many``, as the plain service runs them. Ray routes the pushes, so replicas share the
  requests, and Serve's autoscaler sees them as ongoing requests.

Nothing lives only in a replica. The queue and every job's state are in the store; a replica holds a lease on the
jobs it runs, renewed at every step and by a heartbeat thread (every third of ``lease_seconds``). Each replica
also polls the store: jobs queued for longer than ``ORPHAN_SECONDS`` without being claimed (a push lost with its
replica, jobs queued before a restart) are claimed by whichever replica is idle; and every half lease it runs
``Service.housekeeping``, which recovers the jobs whose lease ran out (a replica killed, or its machine gone):
``Service.recover`` first looks each one up in the audit logs of *all* replicas (fluxframe.core.batch.audited,
the source of truth): released or blocked there → finished from that record; otherwise queued again, to run from
the start with the seed drawn when it was accepted. So a job is released once, whichever replica dies when.

Audit logs: each replica appends to its own log, its own hash chain, beside the configured ``[safety] audit_log``:
``<stem>-<replica id><suffix>`` (fluxframe.core.audit.replica_log_path; a replacement replica gets a new id, so a
new file). The pipeline is the same deployment otherwise, with the same config hash, so a record in any replica's
log is found by all. ``fluxframe audit verify FOLDER`` checks every log in the folder.

Limits: one machine. The store is SQLite (shared by processes on one machine, not over a network file system) and
released images are files in the output folder the ingress reads, so with ``address`` (an existing cluster) the
replicas must run on the node that holds the state and output folders. A replica that hangs without dying keeps
renewing its lease; Ray's health checks are what end it. Per-process metrics (/metrics) are the ingress's; the
queue gauges read the store.

Ray is imported here only, lazily: ``pip install 'fluxframe[ray]'``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fluxframe.errors import ConfigError, FluxframeError
from fluxframe.serve.service import Service

log = logging.getLogger("fluxframe.serve")

APP_NAME = "fluxframe"
ORPHAN_SECONDS = 2.0  # a queued job nobody claimed for this long is claimed by any idle replica
POLL_SECONDS = 0.25  # how often an idle replica looks at the store
DESCRIBE_TIMEOUT = 10.0  # per try, while the ingress waits for a model replica
GRACEFUL_SHUTDOWN = 30.0  # Serve's graceful_shutdown_timeout_s for a model replica
SHUTDOWN_WAIT = GRACEFUL_SHUTDOWN - 5  # how long a stopping replica lets its running batch finish


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ConfigError("`fluxframe serve --ray` needs Ray Serve: pip install 'fluxframe[ray]'",
                          key="serve.ray") from None
    return ray, serve


def _audit_base(config: Any) -> Path | None:
    safety = config.safety
    return config.resolve(safety.audit_log) if safety is not None and safety.audit_log else None


def batch_size(config: Any) -> int:
    """Jobs one replica runs together: [serve.ray] max_batch_size, else [serve]'s, else [sampler]'s."""
    return config.serve.ray.max_batch_size or config.serve.max_batch_size or config.sampler.max_batch_size


# -- the model replicas --------------------------------------------------------------------------------


class _ReplicaService(Service):
    """A Service whose batches run one at a time, whichever path claimed them (a push or the store poll)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.running = threading.RLock()

    def run_jobs(self, jobs: list) -> None:
        with self.running:
            super().run_jobs(jobs)


class FluxframeModel:
    """One model replica (a Ray Serve deployment; see the module docstring)."""

    def __init__(self, config: Any):
        from ray import serve

        from fluxframe import api
        from fluxframe.core.audit import replica_logs

        self.replica = serve.get_replica_context().replica_id.unique_id
        self.worker_id = f"ray:{self.replica}:{os.getpid()}"
        settings = config.serve.ray
        self.lease = settings.lease_seconds
        base = _audit_base(config)
        pipeline = api.load(config, replica=self.replica)
        self.service = _ReplicaService(
            config, worker_id=self.worker_id, pipeline=pipeline, lease=self.lease,
            sweep_seconds=min(60.0, self.lease / 2),
            audit_logs=(lambda: replica_logs(base)) if base is not None else None)
        self.store = self.service.store
        self.max_batch_size = batch_size(config)
        self.batch_wait = config.serve.batch_wait_ms / 1000
        self._stop = threading.Event()

        async def run_batch(job_ids: list[str]) -> list[dict[str, Any]]:
            return await asyncio.to_thread(self._run, job_ids)

        self._run_batch = serve.batch(max_batch_size=self.max_batch_size,
                                      batch_wait_timeout_s=self.batch_wait)(run_batch)
        for target, name in ((self._heartbeat, "fluxframe-heartbeat"), (self._poll, "fluxframe-poll")):
            threading.Thread(target=target, name=name, daemon=True).start()
        log.info("replica %s (pid %d) ready: audit log %s", self.replica, os.getpid(),
                 getattr(pipeline.stages.audit, "path", None))

    def _run(self, job_ids: list[str]) -> list[dict[str, Any]]:
        with self.service.running:  # claimed only once this replica is free to run them
            jobs = self.store.claim(job_ids, self.worker_id, lease=self.lease)
            if jobs:
                self.service.run_jobs(jobs)
        claimed = {job.id for job in jobs}
        out = []
        for job_id in job_ids:
            job = self.store.get(job_id)
            out.append({"id": job_id, "status": job.status if job else None, "ran_here": job_id in claimed,
                        "replica": self.replica})
        return out

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                self.store.renew(self.worker_id, lease=self.lease)
            except FluxframeError as exc:
                log.error("replica %s: the lease could not be renewed: %s", self.replica, exc)

    def _poll(self) -> None:
        """Housekeeping (expired leases), and jobs no push brought here: queued unclaimed for ORPHAN_SECONDS."""
        while not self._stop.wait(POLL_SECONDS):
            try:
                self.service.housekeeping()
                if not self.service.running.acquire(blocking=False):
                    continue
                try:
                    jobs = self.store.next_batch(self.worker_id, self.max_batch_size, wait=ORPHAN_SECONDS,
                                                 lease=self.lease)
                    if jobs:
                        self.service.run_jobs(jobs)
                finally:
                    self.service.running.release()
            except FluxframeError as exc:
                log.error("replica %s: the job store failed: %s", self.replica, exc)
            except Exception:  # keep polling: a failing batch is recorded by run_jobs
                log.exception("replica %s: polling failed", self.replica)

    async def run(self, job_id: str) -> dict[str, Any]:
        """Run a queued job here, batched with others arriving together; what became of it."""
        return await self._run_batch(job_id)

    def check(self, request: Any) -> Any:
        """``Pipeline.check``; an error comes back as the value (not raised: Ray would wrap it)."""
        try:
            return self.service.pipeline.check(request)
        except FluxframeError as exc:
            return _Raised(exc)

    def file_inputs(self, conditioner: str) -> Any:
        try:
            return self.service.pipeline.file_inputs(conditioner)
        except FluxframeError as exc:
            return _Raised(exc)

    def describe(self) -> dict[str, Any]:
        import fluxframe

        pipeline = self.service.pipeline
        return {"model": pipeline.stages.model.name, "plugins": pipeline.host.report(), "replica": self.replica,
                "worker": self.worker_id, "pid": os.getpid(), "fluxframe": fluxframe.__file__,
                "audit_log": str(getattr(pipeline.stages.audit, "path", None))}

    def __del__(self) -> None:
        """Serve stopping this replica (scaled down, redeployed, shut down): no new claims, and the batch that
        runs now (pushed or polled: Serve does not count the latter) may finish first."""
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            if self.service.running.acquire(timeout=SHUTDOWN_WAIT):
                self.service.running.release()


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


# -- the ingress ---------------------------------------------------------------------------------------


class _RemotePipeline:
    """What the ingress's Service asks of a pipeline, answered by a model replica."""

    def __init__(self, handle: Any, info: dict[str, Any], timeout: float = 120.0):
        self._handle, self._timeout = handle, timeout
        self.stages = SimpleNamespace(model=SimpleNamespace(name=info["model"]))
        self.host = SimpleNamespace(report=lambda: info["plugins"])
        self._file_inputs: dict[str, tuple[str, ...]] = {}

    def _call(self, method: str, *args: Any) -> Any:
        value = getattr(self._handle, method).remote(*args).result(timeout_s=self._timeout)
        if isinstance(value, _Raised):
            raise value.exc
        return value

    def check(self, request: Any) -> Any:
        return self._call("check", request)

    def file_inputs(self, conditioner: str) -> tuple[str, ...]:
        if conditioner not in self._file_inputs:
            self._file_inputs[conditioner] = self._call("file_inputs", conditioner)
        return self._file_inputs[conditioner]


class _IngressService(Service):
    """The ingress's Service: no model and no worker; an accepted job is pushed to the model deployment."""

    def __init__(self, config: Any, *, dispatch: Any):
        super().__init__(config, worker_id="ray-ingress")
        self._dispatch = dispatch

    def submit(self, body: dict[str, Any], uploads: list, *, client: str | None) -> tuple[str, int | None]:
        job_id, position = super().submit(body, uploads, client=client)
        if position is not None:
            self._dispatch(job_id)
        return job_id, position


class FluxframeIngress:
    """The HTTP face (a Ray Serve ingress deployment; see the module docstring)."""

    def __init__(self, config: Any, model: Any, insecure_no_auth: bool = False):
        self._config, self._model, self._insecure = config, model, insecure_no_auth
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pushes: set[asyncio.Task] = set()
        self.service = _IngressService(config, dispatch=self._dispatch)
        threading.Thread(target=self._connect, name="fluxframe-connect", daemon=True).start()

    def _connect(self) -> None:
        """Ready once a model replica answers (the weights are loaded): /readyz says 503 until then."""
        while True:
            try:
                info = self._model.describe.remote().result(timeout_s=DESCRIBE_TIMEOUT)
            except Exception as exc:  # a timeout while replicas load, or a replica that failed to start
                log.info("waiting for a model replica (%s)", type(exc).__name__)
                time.sleep(1.0)
                continue
            self.service.pipeline = _RemotePipeline(self._model, info)
            log.info("model replicas ready (%s)", info["model"])
            return

    async def __serve_build_asgi_app__(self) -> Any:
        from fluxframe.serve.app import create_app

        self._loop = asyncio.get_running_loop()  # the loop the app runs on: pushes are its tasks
        return create_app(self.service, insecure_no_auth=self._insecure, start=False)

    def _dispatch(self, job_id: str) -> None:  # called from the thread Service.submit runs in
        self._loop.call_soon_threadsafe(self._push, job_id)

    def _push(self, job_id: str) -> None:
        task = self._loop.create_task(self._drive(job_id))
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)

    async def _drive(self, job_id: str) -> None:
        try:
            await self._model.run.remote(job_id)
        except Exception as exc:  # its replica died: the job is in the store, and runs again after its lease
            log.warning("job %s: its model replica failed (%s); it runs again once its lease ends", job_id,
                        type(exc).__name__)


# -- building and serving ------------------------------------------------------------------------------


def deployment_options(config: Any) -> dict[str, Any]:
    """The model deployment's Ray Serve options from [serve.ray]."""
    settings = config.serve.ray
    size = batch_size(config)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        "max_ongoing_requests": max(2 * size, 4),
        "health_check_period_s": 10, "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN}
    if settings.min_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": settings.min_replicas,
                                         "max_replicas": settings.max_replicas, "target_ongoing_requests": size}
    else:
        options["num_replicas"] = settings.replicas
    return options


def build_app(config: Any, *, insecure_no_auth: bool = False) -> Any:
    """The Ray Serve application: the ingress bound to the model deployment (``serve.run`` it)."""
    _, serve = _ray()
    model = serve.deployment(FluxframeModel, name="FluxframeModel", **deployment_options(config))
    ingress = serve.deployment(serve.ingress()(FluxframeIngress), name="FluxframeIngress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    return ingress.bind(config, model.bind(config), insecure_no_auth)


def serve_ray(config: Any, *, host: str | None = None, port: int | None = None, insecure_no_auth: bool = False,
              ) -> None:
    """Run the application for ``config`` on Ray Serve until interrupted (a local Ray unless [serve.ray] address)."""
    from fluxframe.serve import announce, open_server

    ray, serve = _ray()
    # one server per state folder (its replicas share it)
    host, port, lock = open_server(config, host, port, insecure_no_auth=insecure_no_auth)
    try:
        ray.init(address=config.serve.ray.address)
        try:
            serve.start(http_options={"host": host, "port": port})
            serve.run(build_app(config, insecure_no_auth=insecure_no_auth), name=APP_NAME, route_prefix="/")
            announce("fluxframe serve --ray", host, port)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        lock.close()

