"""The service's Prometheus metrics (prometheus-client), each in the service's own registry."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class _Jobs:
    """Jobs by status and the queue length, read from the job store at each scrape (so they survive restarts)."""

    def __init__(self, store: Any):
        self.store = store

    def collect(self):
        counts = self.store.counts()
        queued = GaugeMetricFamily("fluxframe_queue_length", "Jobs waiting in the queue")
        queued.add_metric([], counts.get("queued", 0))
        jobs = GaugeMetricFamily("fluxframe_jobs", "Jobs in the store by status", labels=["status"])
        for status, n in counts.items():
            jobs.add_metric([status], n)
        return [queued, jobs]


class Metrics:
    def __init__(self, store: Any):
        self.registry = CollectorRegistry()
        self.registry.register(_Jobs(store))
        r = self.registry
        self.accepted = Counter("fluxframe_jobs_accepted", "Jobs accepted into the queue", registry=r)
        self.finished = Counter("fluxframe_jobs_finished", "Jobs finished by this process, by status", ["status"],
                                registry=r)
        self.blocked = Counter("fluxframe_blocked", "Jobs blocked, by the filter that blocked them", ["filter"],
                               registry=r)
        self.rejected = Counter("fluxframe_requests_rejected", "Requests refused before queueing, by reason",
                                ["reason"], registry=r)
        self.step_time = Histogram("fluxframe_step_seconds", "Time of one denoising step (a whole batch)",
                                   buckets=_SECONDS, registry=r)
        self.job_time = Histogram("fluxframe_job_seconds", "Time from a batch's start to its jobs' release",
                                  buckets=_SECONDS, registry=r)
        self.queue_wait = Histogram("fluxframe_queue_wait_seconds", "Time a job waited in the queue",
                                    buckets=_SECONDS, registry=r)
        self.ready = Gauge("fluxframe_ready", "1 once weights and required filters are loaded", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
