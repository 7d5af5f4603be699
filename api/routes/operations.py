"""Health, readiness and metrics: no key needed (see api.openapi.PUBLIC)."""

from __future__ import annotations

import time

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .. import metrics
from ..deps import ServicesDep

router = APIRouter(tags=["operations"])
HEARTBEAT_FRESH_S = 60


@router.get("/healthz", operation_id="healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    operation_id="readyz",
    responses={503: {"description": "Redis or storage unreachable, or no ready worker seen"}},
)
def readyz(services: ServicesDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        services.store.r.ping()
        checks["redis"] = "ok"
        beat = services.store.last_heartbeat()
        fresh = beat is not None and time.time() - beat < HEARTBEAT_FRESH_S
        checks["worker"] = "ok" if fresh else "no ready worker seen in the last minute"
    except redis.RedisError as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    try:
        services.objects.ping()
        checks["storage"] = "ok"
    except Exception as exc:  # the type only: messages name buckets, paths and hosts
        checks["storage"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}},
)
def prometheus(services: ServicesDep) -> Response:
    body, content_type = metrics.render(services.store)
    return Response(body, media_type=content_type)
