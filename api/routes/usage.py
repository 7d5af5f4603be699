"""`/v1/usage`: what the calling key has used, per UTC day (jobs.usage keeps the counts, for the usage retention)."""

from __future__ import annotations

import re
import time
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, BeforeValidator, Field

from jobs.usage import FIELDS, UsageBook, utc_day

from ..deps import CallerDep, ServicesDep
from ..errors import ApiError
from ..openapi import errors

router = APIRouter(prefix="/v1/usage", tags=["usage"])
MAX_DAYS = 366  # a leap year at once; a longer report is several requests
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _iso_date(value: object) -> object:
    """Only YYYY-MM-DD: pydantic would also take timestamps and datetimes at midnight, which hide mistakes."""
    if isinstance(value, str) and not ISO_DATE.fullmatch(value):
        raise ValueError(f"a date as YYYY-MM-DD, not {value[:40]!r}")
    return value


Day = Annotated[date, BeforeValidator(_iso_date)]


class UsageTotals(BaseModel):
    jobs: int = Field(description="jobs that succeeded, cached ones included")
    images: int = Field(description="results delivered (samples)")
    cached_jobs: int = Field(description="jobs answered from the result cache: images, but no GPU seconds")
    gpu_seconds: float = Field(description="GPU time of the jobs, to the millisecond")


class UsageDay(UsageTotals):
    date: date


class Usage(BaseModel):
    """A key's usage, day by day (UTC) over an inclusive range, with its total."""

    key: str = Field(description="the API key's id")
    first: date = Field(alias="from")
    last: date = Field(alias="to")
    days: list[UsageDay] = Field(description="every day of the range, oldest first; zeros where nothing ran")
    total: UsageTotals


@router.get("", operation_id="getUsage", response_model=Usage, responses=errors(400, 401, 422, 429, 503))
def get_usage(
    caller: CallerDep,
    services: ServicesDep,
    first: Annotated[Day | None, Query(alias="from", description="first day (UTC), YYYY-MM-DD; default: `to`")] = None,
    last: Annotated[Day | None, Query(alias="to", description="last day (UTC), YYYY-MM-DD; default: today")] = None,
) -> dict[str, Any]:
    """Your key's jobs, images and GPU seconds per UTC day, from `from` to `to` inclusive (at most 366 days).
    Days are kept SUPIR_USAGE_RETENTION_DAYS (400) after they end, whatever the jobs' own retention; older days
    read as zeros."""
    last = last or utc_day(time.time())
    first = first or last
    if first > last:
        raise ApiError("invalid_parameter", f"from ({first}) is after to ({last})", field="from")
    span = (last - first).days + 1
    if span > MAX_DAYS:
        raise ApiError(
            "invalid_parameter", f"from {first} to {last} is {span} days; at most {MAX_DAYS} at a time", field="from"
        )
    settings = services.settings
    book = UsageBook(services.store.r, settings.key_prefix, settings.usage_retention_s)
    days = book.read(caller.id, first, last)  # the caller's own keys only: no key reads another's usage
    return {
        "key": caller.id,
        "from": first,
        "to": last,
        "days": [{"date": d.date, **_counts({f: getattr(d, f) for f in FIELDS})} for d in days],
        "total": _counts({f: sum(getattr(d, f) for d in days) for f in FIELDS}),
    }


def _counts(counts: dict[str, Any]) -> dict[str, Any]:
    return {**counts, "gpu_seconds": round(counts["gpu_seconds"], 3)}  # sums of floats: no float noise on the wire
