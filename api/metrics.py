"""API metrics (Prometheus names, base units). With PROMETHEUS_MULTIPROC_DIR set, several uvicorn workers
share one view; queue depth is read from Redis at scrape time, so every replica reports the same."""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from jobs.store import JobStore

REQUESTS = Counter("supir_http_requests_total", "HTTP requests", ["route", "method", "status"])
REQUEST_SECONDS = Histogram(
    "supir_http_request_duration_seconds",
    "HTTP request latency",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
JOBS_CREATED = Counter("supir_jobs_created_total", "jobs accepted into the queue")
REJECTED = Counter("supir_requests_rejected_total", "requests refused, by error code", ["code"])


class QueueCollector(Collector):
    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            waiting, running = self.store.queued_count(), self.store.running_count()
        except Exception:  # a scrape must not fail because Redis is down; /readyz reports that
            return
        yield GaugeMetricFamily("supir_jobs_waiting", "jobs queued, not yet started", value=waiting)
        yield GaugeMetricFamily("supir_jobs_running", "jobs a worker is running", value=running)
        beat = self.store.last_heartbeat()
        if beat is not None:
            yield GaugeMetricFamily(
                "supir_worker_last_heartbeat_timestamp_seconds", "newest worker heartbeat", value=beat
            )


def render(store: JobStore) -> tuple[bytes, str]:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        for collector in (REQUESTS, REQUEST_SECONDS, JOBS_CREATED, REJECTED):
            registry.register(collector)
    registry.register(QueueCollector(store))
    return generate_latest(registry), CONTENT_TYPE_LATEST
