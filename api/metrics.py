"""API metrics (Prometheus names, base units). With PROMETHEUS_MULTIPROC_DIR set, several uvicorn workers
share one view through files in that folder (made here if missing: on Kubernetes it sits on an empty /tmp;
api.server clears files of an earlier life at start). Queue depth is read from Redis at scrape time, so every
replica reports the same."""

from __future__ import annotations

import os
import time
from collections import Counter as Tally
from collections.abc import Iterator

import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from jobs.redis_memory import SAFE_POLICY, read_memory
from jobs.store import JobStore

MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if MULTIPROC_DIR:
    # before the first metric below: prometheus_client opens its per-process file in this folder at once
    os.makedirs(MULTIPROC_DIR, exist_ok=True)

REQUESTS = Counter("supir_http_requests_total", "HTTP requests", ["route", "method", "status"])
REQUEST_SECONDS = Histogram(
    "supir_http_request_duration_seconds",
    "HTTP request latency",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# every body byte the API read, counted as it streams (api.limits): what clients sent through this process
REQUEST_BODY_BYTES = Counter("supir_http_request_body_bytes_total", "HTTP request body bytes read", ["method"])
JOBS_CREATED = Counter("supir_jobs_created_total", "jobs accepted into the queue")
REJECTED = Counter("supir_requests_rejected_total", "requests refused, by error code", ["code"])
RESULT_CACHE = Counter(
    "supir_result_cache_total", "cacheable requests: answered from a stored result or not", ["outcome"]
)
# the key count of the last keys file an API process loaded (processes re-read it on their next authenticated
# request after a change); `refused` reloads mean a broken keys file: the keys in use were kept (api.keyring)
API_KEYS_LOADED = Gauge("supir_api_keys_loaded", "API keys in the last keys loaded", multiprocess_mode="mostrecent")
API_KEY_RELOADS = Counter(
    "supir_api_key_reloads_total", "SUPIR_API_KEYS_FILE reads after a change: loaded, or refused (kept)", ["result"]
)
for _result in ("loaded", "refused"):
    API_KEY_RELOADS.labels(_result)  # both from 0: increase() then sees a process's first refusal


class QueueCollector(Collector):
    """What Redis says at scrape time: queue depth and ages, worker processes by state, and whether Redis answers.
    Every API replica reports the same values, so dashboards and alerts take `max` over replicas, never `sum`."""

    def __init__(self, store: JobStore, job_time_limit_s: float = 0.0, variants: tuple[str, ...] = ()) -> None:
        self.store, self.job_time_limit_s, self.variants = store, job_time_limit_s, variants

    def collect(self) -> Iterator[Metric]:
        # a setting, exported so that alerts compare job times with the limit in force, not a number retyped
        yield GaugeMetricFamily("supir_job_time_limit_seconds", "SUPIR_JOB_TIME_LIMIT_S", value=self.job_time_limit_s)
        try:
            waiting = {v: self.store.queued_count(v) for v in self.variants}
            running = {v: self.store.running_count(v) for v in self.variants}
            oldest_queued, oldest_running = self.store.oldest_queued_at(), self.store.oldest_running_since()
            beats = self.store.worker_beats()
            load_failures = self.store.load_failures()
        except Exception:  # a scrape must not fail because Redis is down: say so instead
            yield GaugeMetricFamily("supir_redis_up", "1 when the API reached Redis at this scrape", value=0)
            return
        yield GaugeMetricFamily("supir_redis_up", "1 when the API reached Redis at this scrape", value=1)
        # per variant: each has its own queue and worker pool, scaled on its own outstanding jobs
        for name, counts, help_text in (
            ("supir_jobs_waiting", waiting, "jobs queued, not yet started, by SUPIR variant"),
            ("supir_jobs_running", running, "jobs a worker is running, by SUPIR variant"),
        ):
            family = GaugeMetricFamily(name, help_text, labels=["variant"])
            for variant, count in counts.items():
                family.add_metric([variant], count)
            yield family
        serving = GaugeMetricFamily(
            "supir_variant_workers", "ready worker processes serving a variant", labels=["variant"]
        )
        for variant in self.variants:
            ready_for = [b for b in beats.values() if b.get("state") == "ready" and variant in b.get("variants", [])]
            serving.add_metric([variant], len(ready_for))
        yield serving
        now = time.time()
        yield GaugeMetricFamily(
            "supir_oldest_queued_job_age_seconds",
            "how long the job first in line has waited (0: none waiting)",
            value=now - oldest_queued if oldest_queued is not None else 0.0,
        )
        yield GaugeMetricFamily(
            "supir_oldest_running_job_age_seconds",
            "how long the longest run has gone on (0: none running)",
            value=now - oldest_running if oldest_running is not None else 0.0,
        )
        workers = GaugeMetricFamily("supir_workers", "live GPU worker processes by state", labels=["state"])
        states = Tally(str(beat.get("state")) for beat in beats.values())
        for state in sorted(set(states) | {"ready", "loading", "failed"}):
            workers.add_metric([state], states.get(state, 0))
        yield workers
        yield _load_failures_family(self.variants, load_failures)
        ready = [beat["at"] for beat in beats.values() if beat.get("state") == "ready"]
        if ready:
            yield GaugeMetricFamily(
                "supir_worker_last_heartbeat_timestamp_seconds", "newest ready worker heartbeat", value=max(ready)
            )


def _load_failures_family(variants: tuple[str, ...], counts: dict[str, int]) -> CounterMetricFamily:
    """Kept in Redis: a worker whose load fails exits and is restarted (worker/tasks.py), too briefly `failed` in
    its beat for a gauge to show. Every variant from 0, so that increase() sees the first failure."""
    family = CounterMetricFamily(
        "supir_worker_load_failures", "failed loads of the weights by workers serving a variant", labels=["variant"]
    )
    for variant in sorted(set(variants) | set(counts)):
        family.add_metric([variant], counts.get(variant, 0))
    return family


class RedisMemoryCollector(Collector):
    """Redis's eviction policy, memory and evicted keys at scrape time (INFO, allowed on managed Redis): a policy
    other than noeviction deletes accepted jobs when Redis is full, and a full noeviction Redis refuses writes."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            memory = read_memory(self.client)
        except redis.RedisError:  # supir_redis_up says so
            return
        policy = GaugeMetricFamily(
            "supir_redis_evicting_policy",
            "1 when Redis's maxmemory-policy (label) may delete keys, job records among them; 0 for noeviction",
            labels=["policy"],
        )
        policy.add_metric([memory.policy or "unknown"], 0 if memory.policy == SAFE_POLICY else 1)
        yield policy
        yield GaugeMetricFamily("supir_redis_memory_used_bytes", "Redis used_memory", value=memory.used_bytes)
        yield GaugeMetricFamily("supir_redis_memory_max_bytes", "Redis maxmemory (0: no limit)", value=memory.max_bytes)
        yield CounterMetricFamily(
            "supir_redis_evicted_keys", "keys Redis evicted since it started (INFO stats)", value=memory.evicted_keys
        )


def render(store: JobStore, job_time_limit_s: float = 0.0, variants: tuple[str, ...] = ()) -> tuple[bytes, str]:
    registry = CollectorRegistry()
    if MULTIPROC_DIR:
        MultiProcessCollector(registry)
    else:
        for collector in (
            REQUESTS,
            REQUEST_SECONDS,
            REQUEST_BODY_BYTES,
            JOBS_CREATED,
            REJECTED,
            RESULT_CACHE,
            API_KEYS_LOADED,
            API_KEY_RELOADS,
        ):
            registry.register(collector)
    registry.register(QueueCollector(store, job_time_limit_s, variants))
    registry.register(RedisMemoryCollector(store.r))
    return generate_latest(registry), CONTENT_TYPE_LATEST
