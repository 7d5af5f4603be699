"""Health, readiness, status and metrics: no key needed (see api.openapi.PUBLIC). `/status` and `/metrics` answer
on the admin port only (SUPIR_API_ADMIN_PORT, api.admin), which the clients' Service does not expose; the probes
answer on both. `/v1/service` is the clients' part of `/status` (variants, test model, defaults: the web page's).

Readiness is about this process only (can it serve? Redis answers, it is not shutting down), so a gap in GPU
workers (weights loading, scale to zero, a rollout) never takes the API out of its Service: clients can still
create and poll jobs. Worker and storage health are in `/status` and the metrics, for people and alerts."""

from __future__ import annotations

import time
from typing import Any

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from jobs.redis_memory import read_memory

from .. import metrics
from ..deps import ServicesDep, StreamsDep
from ..services import Services

router = APIRouter(tags=["operations"])
TEST_MODEL_NOTICE = (
    "this service runs the tiny test model (random weights, for trying the service out): every result is noise. "
    "For real restorations set SUPIR_SDXL_CHECKPOINT and SUPIR_CHECKPOINT to the official weights "
    "(`supir weights list`; a GPU with about 12 GB)."
)


@router.get("/healthz", operation_id="healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    operation_id="readyz",
    responses={503: {"description": "Redis does not answer, or the process is shutting down"}},
)
def readyz(services: ServicesDep, streams: StreamsDep) -> JSONResponse:
    """Readiness: Redis answers within a fraction of a second, and the server is not shutting down."""
    checks: dict[str, str] = {}
    try:
        services.probe.ping()
        checks["redis"] = "ok"
    except redis.RedisError as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    checks["server"] = "shutting down" if streams.shutting_down.is_set() else "ok"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get("/status", operation_id="status", include_in_schema=False)  # the admin port's, not the clients'
def status(services: ServicesDep) -> dict[str, Any]:
    """The service as a whole, for people and dashboards: Redis, storage, GPU workers by state, the queue, the
    model served (`test_model`: true when the workers loaded the tiny test model, whose results are noise) and
    this deployment's parameter defaults (`default_params`, SUPIR_DEFAULT_PARAMS). `redis` is `ok`, `nearly full`
    (new jobs refused), `full` (Redis refuses writes), `evicting: …` or `unreachable: …`; `redis_memory` has the
    policy and memory use. Always 200: each part says how it is."""
    report: dict[str, Any] = {
        "redis": "ok",
        "redis_memory": None,
        "storage": "ok",
        "workers": None,
        "jobs": None,
        "variants": None,
        "test_model": None,
        "notice": None,
        "default_params": services.settings.default_params,
    }
    try:
        beats = services.store.worker_beats()
        report["workers"] = {
            "ready": sum(1 for b in beats.values() if b.get("state") == "ready"),
            "loading": sum(1 for b in beats.values() if b.get("state") == "loading"),
            "failed": sum(1 for b in beats.values() if b.get("state") == "failed"),
            "busy": sum(1 for b in beats.values() if b.get("job")),
        }
        oldest = services.store.oldest_queued_at()
        report["jobs"] = {
            "waiting": services.store.queued_count(),
            "running": services.store.running_count(),
            "oldest_waiting_s": round(time.time() - oldest, 1) if oldest is not None else None,
        }
        report.update(_served(services, beats))
        report["redis"], report["redis_memory"] = redis_memory_report(services)
    except redis.RedisError as exc:
        report["redis"] = f"unreachable: {type(exc).__name__}"
    try:
        services.objects.ping()
    except Exception as exc:  # the type only: messages name buckets, paths and hosts
        report["storage"] = f"unreachable: {type(exc).__name__}"
    return report


@router.get("/v1/service", operation_id="service")
def service(services: ServicesDep) -> dict[str, Any]:
    """What this deployment serves, for clients and the web page: its variants (workers ready, jobs queued and
    running), whether it runs the tiny test model, and its parameter defaults. No key needed."""
    return {"default_params": services.settings.default_params, **_served(services, services.store.worker_beats())}


def _served(services: Services, beats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The variants, test_model and notice fields of /status and /v1/service."""
    default = services.settings.default_variant
    models = {name: services.store.variant_info(name) or {} for name in services.settings.variant_files}
    variants = [
        {
            "name": name,
            "default": name == default,
            # what this variant's workers last published they loaded (null before any has)
            "test_model": models[name].get("test_model"),
            "unet_parameters": models[name].get("unet_parameters"),
            "queued": services.store.queued_count(name),
            "running": services.store.running_count(name),
            "workers": sum(1 for b in beats.values() if b.get("state") == "ready" and name in b.get("variants", [])),
        }
        for name in services.settings.variant_files
    ]
    known = [bool(m["test_model"]) for m in models.values() if m.get("test_model") is not None]
    test_model = any(known) if known else None
    return {"variants": variants, "test_model": test_model, "notice": TEST_MODEL_NOTICE if test_model else None}


def redis_memory_report(services: Services) -> tuple[str, dict[str, Any]]:
    """Redis's state in a word, and its memory: `evicting` (its policy may delete accepted jobs), `full` (it
    refuses writes: at maxmemory with noeviction), `nearly full` (new jobs refused, the reserve kept for the jobs
    accepted), else `ok`."""
    memory = read_memory(services.store.r)
    takes_jobs = memory.takes_jobs(services.settings.redis_memory_reserve)
    if memory.policy is None:
        state = "unchecked: INFO memory gives no maxmemory_policy"
    elif memory.evicting:
        state = f"evicting: maxmemory-policy {memory.policy} may delete jobs; set noeviction"
    elif memory.refuses_writes:
        state = "full"
    else:
        state = "ok" if takes_jobs else "nearly full"
    fraction = memory.used_fraction
    return state, {
        "policy": memory.policy,
        "used_bytes": memory.used_bytes,
        "max_bytes": memory.max_bytes or None,
        "used_fraction": round(fraction, 3) if fraction is not None else None,
        "evicted_keys": memory.evicted_keys,
        "refuses_writes": memory.refuses_writes,
        "takes_jobs": takes_jobs,
    }


@router.get(
    "/metrics",
    operation_id="metrics",
    include_in_schema=False,  # the admin port's
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}},
)
def prometheus(services: ServicesDep) -> Response:
    settings = services.settings
    body, content_type = metrics.render(services.store, settings.job_time_limit_s, tuple(settings.variant_files))
    return Response(body, media_type=content_type)
