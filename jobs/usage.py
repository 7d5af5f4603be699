"""What each API key has used, per UTC day: jobs finished, images delivered, GPU seconds, and how many jobs the
result cache answered. Torch-free and FastAPI-free: the worker records a job when it succeeds, the API when the
cache answers one, and `GET /v1/usage` reads.

Keys (under the settings' key_prefix, `p`):
    p:usage:<owner>:<YYYY-MM-DD>   hash {jobs, images, cached_jobs, gpu_seconds}; expires `retention` after the
                                   end of its day, so a day stays readable for the whole retention window after it
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import redis

FIELDS = ("jobs", "images", "cached_jobs", "gpu_seconds")


@dataclass(frozen=True)
class DayUsage:
    date: date
    jobs: int = 0
    images: int = 0  # results delivered (samples), cached ones included
    cached_jobs: int = 0  # answered from the result cache: images, but no GPU seconds
    gpu_seconds: float = 0.0


def utc_day(at: float) -> date:
    return datetime.fromtimestamp(at, UTC).date()


def day_end(day: date) -> int:
    """The epoch second at which the UTC day ends (midnight after it)."""
    return int(datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC).timestamp())


class UsageBook:
    def __init__(self, client: redis.Redis, prefix: str = "supir", retention_s: float = 86_400) -> None:
        self.r: Any = client  # redis-py's sync/async union return types only add noise here
        self.p = prefix
        self.retention_s = int(retention_s)

    def _day(self, owner: str, day: date) -> str:
        return f"{self.p}:usage:{owner}:{day.isoformat()}"

    def record(
        self,
        owner: str,
        *,
        jobs: int = 1,
        images: int,
        gpu_seconds: float,
        cached: bool,
        at: float | None = None,
    ) -> None:
        """Count finished jobs on the UTC day of `at` (now by default): one round trip, one transaction. `cached`:
        answered from the result cache (they count as cached_jobs; pass gpu_seconds=0, no GPU ran)."""
        day = utc_day(time.time() if at is None else at)
        key = self._day(owner, day)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, "jobs", jobs)
            pipe.hincrby(key, "images", images)
            if cached:
                pipe.hincrby(key, "cached_jobs", jobs)
            if gpu_seconds:
                pipe.hincrbyfloat(key, "gpu_seconds", gpu_seconds)
            # absolute, so every record of the day sets the same expiry: the day's end + retention
            pipe.expireat(key, day_end(day) + self.retention_s)
            pipe.execute()

    def read(self, owner: str, first: date, last: date) -> list[DayUsage]:
        """Every day from `first` to `last` (inclusive), zeros where nothing was recorded; one round trip."""
        days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
        with self.r.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hmget(self._day(owner, day), FIELDS)
            rows = pipe.execute()
        return [_day_usage(day, row) for day, row in zip(days, rows, strict=True)]


def _day_usage(day: date, row: list[bytes | str | None]) -> DayUsage:
    jobs, images, cached_jobs, gpu_seconds = (v.decode() if isinstance(v, bytes) else v for v in row)
    return DayUsage(
        date=day,
        jobs=int(jobs or 0),
        images=int(images or 0),
        cached_jobs=int(cached_jobs or 0),
        gpu_seconds=float(gpu_seconds or 0.0),
    )
