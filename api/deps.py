"""The routes' dependencies, as `Annotated` types: the process's services and event streams, the caller (after
authentication and its rate limit) and a job the caller owns. Sync dependencies run in the threadpool, so
their Redis calls never block the event loop."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

import redis
from fastapi import Depends, Request

from jobs.record import JobRecord
from jobs.store import JobStore

from . import metrics
from .auth import authenticate
from .errors import ApiError
from .events import EventStreams
from .ratelimit import announce
from .services import Services

JOB_ID = re.compile(r"job_[0-9a-f]{32}")


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_streams(request: Request) -> EventStreams:
    streams: EventStreams = request.app.state.streams
    return streams


ServicesDep = Annotated[Services, Depends(get_services)]
StreamsDep = Annotated[EventStreams, Depends(get_streams)]


@dataclass(frozen=True)
class Caller:
    id: str  # the API key's id: the owner of the jobs it creates
    max_active_jobs: int  # queued + running jobs it may hold
    share_weight: float = 1.0  # its weight in the fair share of the workers (jobs.fairshare)


def authorize(request: Request, services: ServicesDep) -> Caller:
    """The authenticated caller, after its per-minute rate limit: reads and writes are counted apart, so
    polling a job never uses up the creates."""
    settings = services.settings
    key = authenticate(request, settings, services.store, services.api_keys.keys())
    if request.method in ("GET", "HEAD"):
        kind, bucket = "read", f"{key.id}:read"
        limit = key.read_rate_limit_per_minute or settings.read_rate_limit_per_minute
    else:
        kind, bucket = "write", key.id
        limit = key.rate_limit_per_minute or settings.rate_limit_per_minute
    try:
        window = services.store.count_request(bucket, limit)
    except redis.OutOfMemoryError:
        if kind == "write":
            raise
        window = None  # a full Redis cannot count reads: let them through, so every accepted job stays readable
    if window is not None:
        announce(request, kind, window)  # RateLimit-Policy and RateLimit on the response, whatever it is
    if window is not None and window.exceeded:
        metrics.REJECTED.labels("rate_limited").inc()
        setting = "SUPIR_READ_RATE_LIMIT_PER_MINUTE" if kind == "read" else "SUPIR_RATE_LIMIT_PER_MINUTE"
        field = "read_rate_limit_per_minute" if kind == "read" else "rate_limit_per_minute"
        message = f"over {limit} {kind} requests a minute (the service's {setting}, or the key's {field} in "
        message += "SUPIR_API_KEYS)"
        raise ApiError("rate_limited", message, headers={"Retry-After": str(window.reset_s)})
    return Caller(key.id, key.max_active_jobs or settings.max_active_jobs, key.share_weight)


CallerDep = Annotated[Caller, Depends(authorize)]


def owned_job(job_id: str, caller: CallerDep, services: ServicesDep) -> JobRecord:
    record = services.store.get(job_id)
    if record is None or record.owner != caller.id:  # another key's job does not exist for you
        raise missing_job(services.store, job_id, caller.id)
    return record


ERASED_BECAUSE = {
    "deleted": "was deleted by its owner (DELETE /v1/jobs/{id})",
    "delivered": "was erased once its results were downloaded (the service's SUPIR_DELETE_AFTER_DELIVERY)",
}


def missing_job(store: JobStore, job_id: str, owner: str) -> ApiError:
    """Why the owner finds no job: 410 job_deleted while its tombstone lasts (the retention window), else 404
    (never made, another key's, or past its expiry)."""
    stone = store.tombstone(job_id) if JOB_ID.fullmatch(job_id) else None
    if stone is not None and stone.get("owner") == owner:
        why = ERASED_BECAUSE.get(str(stone.get("reason")), ERASED_BECAUSE["deleted"])
        return ApiError("job_deleted", f"job {job_id} {why}: its record and files are erased")
    return ApiError("not_found", f"no job {job_id}")


OwnedJobDep = Annotated[JobRecord, Depends(owned_job)]
