"""Usage per key per UTC day: jobs.usage.UsageBook against the real Redis, and `GET /v1/usage` through the real API
(no workers: usage is recorded here with the book, as the worker and the cache path do)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from jobs.settings import Settings
from jobs.storage import LocalStore
from jobs.usage import DayUsage, UsageBook, day_end, utc_day
from tests.paths import REDIS_URL
from tests.servers import Service, running
from worker.runtime import Runtime

DAY_S = 86_400
RETENTION_S = 30 * DAY_S  # the API's below keeps usage a month, so the route tests can place days in the past


def noon(day: date) -> float:
    return datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp()


class CountingRedis(redis.Redis):
    """Counts direct commands and pipelines, to show a read is one round trip whatever the range."""

    commands = 0
    pipelines = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands += 1
        return super().execute_command(*args, **options)

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        self.pipelines += 1
        return super().pipeline(*args, **kwargs)


@pytest.fixture
def client() -> Iterator[CountingRedis]:
    r = CountingRedis.from_url(REDIS_URL)
    yield r
    r.close()


@pytest.fixture
def book(client: CountingRedis) -> Iterator[UsageBook]:
    prefix = f"test-usage-{uuid.uuid4().hex[:10]}"
    yield UsageBook(client, prefix, RETENTION_S)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def test_records_add_up_per_owner_and_day_with_zero_days_around(book: UsageBook) -> None:
    today = utc_day(time.time())
    d1, d2 = today - timedelta(days=3), today - timedelta(days=2)
    book.record("alice", images=2, gpu_seconds=10.5, cached=False, at=noon(d1))
    book.record("alice", images=1, gpu_seconds=0.0, cached=True, at=noon(d1) + 3600)
    book.record("alice", jobs=2, images=4, gpu_seconds=3.25, cached=False, at=noon(d2))
    book.record("bob", images=9, gpu_seconds=99.0, cached=False, at=noon(d1))

    days = book.read("alice", d1 - timedelta(days=1), d2 + timedelta(days=1))
    assert days == [
        DayUsage(d1 - timedelta(days=1)),
        DayUsage(d1, jobs=2, images=3, cached_jobs=1, gpu_seconds=10.5),
        DayUsage(d2, jobs=2, images=4, cached_jobs=0, gpu_seconds=3.25),
        DayUsage(d2 + timedelta(days=1)),
    ]
    assert sum(d.jobs for d in days) == 4 and sum(d.images for d in days) == 7
    assert book.read("bob", d1, d2) == [DayUsage(d1, jobs=1, images=9, gpu_seconds=99.0), DayUsage(d2)]
    assert book.read("carol", d1, d1) == [DayUsage(d1)]


def test_a_day_starts_and_ends_at_utc_midnight(book: UsageBook) -> None:
    day = utc_day(time.time()) - timedelta(days=1)
    start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
    book.record("alice", images=1, gpu_seconds=1.0, cached=False, at=start - 0.001)  # the day before
    book.record("alice", images=1, gpu_seconds=1.0, cached=False, at=start)
    book.record("alice", images=1, gpu_seconds=1.0, cached=False, at=start + DAY_S - 0.001)
    previous, this = book.read("alice", day - timedelta(days=1), day)
    assert (previous.jobs, this.jobs) == (1, 2)


def test_gpu_seconds_accumulate_as_floats(book: UsageBook) -> None:
    day = utc_day(time.time())
    for _ in range(10):
        book.record("alice", images=1, gpu_seconds=0.1, cached=False, at=noon(day))
    book.record("alice", images=1, gpu_seconds=1e-3, cached=False, at=noon(day))
    (usage,) = book.read("alice", day, day)
    assert usage.gpu_seconds == pytest.approx(1.001, abs=1e-9)
    assert (usage.jobs, usage.images) == (11, 11)


def test_a_day_expires_retention_after_it_ends(book: UsageBook, client: CountingRedis) -> None:
    yesterday = utc_day(time.time()) - timedelta(days=1)
    book.record("alice", images=1, gpu_seconds=2.0, cached=False, at=noon(yesterday))
    key = f"{book.p}:usage:alice:{yesterday.isoformat()}"
    end = datetime.combine(yesterday + timedelta(days=1), datetime.min.time(), UTC).timestamp()
    assert day_end(yesterday) == end
    assert client.expiretime(key) == end + RETENTION_S
    book.record("alice", images=1, gpu_seconds=2.0, cached=True, at=noon(yesterday) + 60)
    assert client.expiretime(key) == end + RETENTION_S  # later records of the day keep the same deadline

    # a day whose retention ended before it was recorded is gone at once: it reads as zeros
    old = yesterday - timedelta(days=RETENTION_S // DAY_S + 1)
    book.record("alice", images=1, gpu_seconds=2.0, cached=False, at=noon(old))
    assert book.read("alice", old, old) == [DayUsage(old)]


def test_a_read_is_one_round_trip_whatever_the_range(book: UsageBook, client: CountingRedis) -> None:
    today = utc_day(time.time())
    client.commands = client.pipelines = 0
    days = book.read("alice", today - timedelta(days=365), today)
    assert len(days) == 366 and (client.commands, client.pipelines) == (0, 1)
    client.pipelines = 0
    book.record("alice", images=1, gpu_seconds=0.5, cached=False)
    assert (client.commands, client.pipelines) == (0, 1)
    assert book.read("alice", today, today)[0].jobs in (0, 1)  # 1, unless the UTC day ended just now


# ---------------------------------------------------------------------------------------------------------
# GET /v1/usage through the real API


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("usage-api")
    with running(tmp, tmp, {"alice": {}, "bob": {}}, with_workers=False, retention_hours=RETENTION_S / 3600) as svc:
        yield svc


@pytest.fixture(scope="module")
def api_book(api: Service) -> Iterator[UsageBook]:
    r = redis.Redis.from_url(REDIS_URL)
    yield UsageBook(r, api.prefix, RETENTION_S)
    r.close()


def test_the_default_range_is_today(api: Service, api_book: UsageBook) -> None:
    now = time.time()
    # the same usage today and tomorrow: whichever the API's today is (the test may run across midnight), it is there
    for at in (now, now + DAY_S):
        api_book.record("alice", images=3, gpu_seconds=1.23456, cached=False, at=at)
        api_book.record("alice", images=1, gpu_seconds=0.0, cached=True, at=at)
    with api.client("alice") as client:
        response = client.get("/v1/usage")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["to"] in (utc_day(now).isoformat(), utc_day(now + DAY_S).isoformat())
    assert body["from"] == body["to"]
    counts = {"jobs": 2, "images": 4, "cached_jobs": 1, "gpu_seconds": 1.235}
    assert body == {"key": "alice", "from": body["to"], "to": body["to"], "days": [{"date": body["to"], **counts}],
                    "total": counts}  # fmt: skip


def test_an_explicit_range_lists_every_day_and_the_total(api: Service, api_book: UsageBook) -> None:
    today = utc_day(time.time())
    first, last = today - timedelta(days=8), today - timedelta(days=5)
    api_book.record("alice", images=2, gpu_seconds=0.1, cached=False, at=noon(first + timedelta(days=1)))
    api_book.record("alice", images=2, gpu_seconds=0.2, cached=False, at=noon(last))
    with api.client("alice") as client:
        body = client.get("/v1/usage", params={"from": first.isoformat(), "to": last.isoformat()}).json()
    assert (body["from"], body["to"]) == (first.isoformat(), last.isoformat())
    assert [d["date"] for d in body["days"]] == [(first + timedelta(days=i)).isoformat() for i in range(4)]
    assert [d["jobs"] for d in body["days"]] == [0, 1, 0, 1]
    assert body["total"] == {"jobs": 2, "images": 4, "cached_jobs": 0, "gpu_seconds": 0.3}  # 0.1 + 0.2, rounded

    with api.client("alice") as client:  # only `from`: up to today
        body = client.get("/v1/usage", params={"from": first.isoformat()}).json()
    assert body["from"] == first.isoformat() and len(body["days"]) in (9, 10)  # 10 if the day ended meanwhile


def test_a_key_sees_only_its_own_usage(api: Service, api_book: UsageBook) -> None:
    day = utc_day(time.time()) - timedelta(days=12)
    api_book.record("alice", images=5, gpu_seconds=7.0, cached=False, at=noon(day))
    with api.client("bob") as client:
        body = client.get("/v1/usage", params={"from": day.isoformat(), "to": day.isoformat()}).json()
    zero = {"jobs": 0, "images": 0, "cached_jobs": 0, "gpu_seconds": 0.0}
    assert body == {"key": "bob", "from": day.isoformat(), "to": day.isoformat(),
                    "days": [{"date": day.isoformat(), **zero}], "total": zero}  # fmt: skip
    with api.client(None) as anonymous:
        response = anonymous.get("/v1/usage")
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    ("params", "status", "code", "field", "says"),
    [
        ({"from": "2026-03-02", "to": "2026-03-01"}, 422, "invalid_parameter", "from", "is after to"),
        ({"from": "2025-01-01", "to": "2026-01-02"}, 422, "invalid_parameter", "from", "367 days; at most 366"),
        ({"from": "2026-13-01"}, 400, "invalid_request", "from", "month value"),
        ({"to": "2026-02-30"}, 400, "invalid_request", "to", "day value"),
        ({"from": "yesterday"}, 400, "invalid_request", "from", "YYYY-MM-DD"),
        # pydantic alone would take these two as dates
        ({"to": "2026-03-01T00:00:00"}, 400, "invalid_request", "to", "YYYY-MM-DD"),
        ({"from": "1772323200"}, 400, "invalid_request", "from", "YYYY-MM-DD"),
    ],
)
def test_bad_dates_and_ranges_are_json_errors(
    api: Service, params: dict[str, str], status: int, code: str, field: str, says: str
) -> None:
    with api.client("alice") as client:
        response = client.get("/v1/usage", params=params)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == (code, field) and says in error["message"], error


def test_a_leap_year_is_the_longest_range(api: Service) -> None:
    with api.client("alice") as client:
        body = client.get("/v1/usage", params={"from": "2024-01-01", "to": "2024-12-31"}).json()
    assert len(body["days"]) == 366 and body["total"]["jobs"] == 0


def test_the_openapi_document_lists_get_usage(api: Service) -> None:
    with api.client(None) as client:
        document = client.get("/openapi.json").json()
    operation = document["paths"]["/v1/usage"]["get"]
    assert operation["operationId"] == "getUsage" and operation["security"] == [{"bearer": []}]
    assert [p["name"] for p in operation["parameters"]] == ["from", "to"]
    assert {"200", "400", "401", "422", "429"} <= set(operation["responses"])
    usage = document["components"]["schemas"]["Usage"]
    assert set(usage["required"]) == {"key", "from", "to", "days", "total"}


def test_usage_outlives_the_jobs_retention(api: Service, tmp_path: Path) -> None:
    """A monthly bill needs last month: a day 40 days back is still there, though this deployment keeps jobs for
    RETENTION_S (30 days); usage stays SUPIR_USAGE_RETENTION_DAYS (400 by default) after each day."""
    settings = Settings(redis_url=REDIS_URL, key_prefix=api.prefix, retention_hours=RETENTION_S / 3600)
    runtime = Runtime(settings, objects=LocalStore(tmp_path, "http://test", "secret"))  # the worker's books
    assert runtime.store.retention_s == RETENTION_S and runtime.usage.retention_s == 400 * DAY_S
    day = utc_day(time.time()) - timedelta(days=40)
    runtime.usage.record("bob", images=2, gpu_seconds=3.0, cached=False, at=noon(day))
    with redis.Redis.from_url(REDIS_URL) as r:
        assert r.expiretime(f"{api.prefix}:usage:bob:{day.isoformat()}") == day_end(day) + 400 * DAY_S
    with api.client("bob") as client:
        body = client.get("/v1/usage", params={"from": day.isoformat(), "to": day.isoformat()}).json()
    assert body["days"] == [{"date": day.isoformat(), "jobs": 1, "images": 2, "cached_jobs": 0, "gpu_seconds": 3.0}]
