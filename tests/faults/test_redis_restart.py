"""Redis restarts under a working service: a Redis of the test's own (AOF on, appendfsync everysec, as
docs/service.md asks of production) is stopped and started again while one job runs and others wait."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import RedisServer, Service, submit, wait_until

RUNNING = {"min_size": 128, "steps": 40, "seed": 2}
QUEUED = {"min_size": 64, "steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, fixture_a: Path, own_redis: RedisServer) -> Iterator[Service]:
    service = Service(
        tmp_path_factory.mktemp("redis-restart"),
        fixture_a,
        {"alice": {"max_active_jobs": 100}},
        redis_url=f"redis://127.0.0.1:{own_redis.port}/0",
        rate_limit_per_minute=100_000,
        worker_lost_after_s=10,
    )
    try:
        yield service.start()
    finally:
        service.stop()


def status_of(client: httpx.Client, job_id: str) -> dict | None:
    """The job, or None while the API cannot reach Redis (503) or is reconnecting."""
    with contextlib.suppress(httpx.HTTPError):
        response = client.get(f"/v1/jobs/{job_id}")
        if response.status_code == 200:
            return dict(response.json())
    return None


@pytest.mark.parametrize("how", ["kill -9", "shutdown"])
def test_a_redis_restart_with_one_job_running_and_three_queued_loses_none_and_runs_none_twice(
    svc: Service, own_redis: RedisServer, how: str
) -> None:
    """Injects: Redis stopped (SIGKILL, or a clean SHUTDOWN) and started again from its AOF while a job samples.
    Before, the running job's Redis error became a retry published to the absent broker and was dropped."""
    with svc.client("alice") as client:
        running = submit(client, RUNNING).json()["id"]
        queued = [submit(client, QUEUED).json()["id"] for _ in range(3)]
        wait_until(
            lambda: (status_of(client, running) or {}).get("progress", {}).get("step", 0) >= 1, 120, 0.1, "a step"
        )
        time.sleep(1.5)  # appendfsync everysec: what was written a second ago is on disk
        own_redis.stop(how)
        time.sleep(3)
        own_redis.start()

        def all_ended() -> list[dict] | None:
            jobs = [status_of(client, job_id) for job_id in [running, *queued]]
            if all(j is not None and j["status"] in ("succeeded", "failed", "canceled") for j in jobs):
                return [j for j in jobs if j is not None]
            return None

        jobs = wait_until(all_ended, 300, 0.5, "every job to end")
    assert [j["status"] for j in jobs] == ["succeeded"] * 4, [(j["status"], j["error"]) for j in jobs]
    assert all(j["attempts"] <= 2 for j in jobs), [j["attempts"] for j in jobs]
    results = {p.stem for p in (svc.tmp / "objects" / "results").glob("*.png")}
    assert {running, *queued} <= results
    time.sleep(2)  # a second run would change finished_at
    with svc.client("alice") as client:
        again = [status_of(client, j["id"]) for j in jobs]
    assert [j["finished_at"] for j in jobs] == [a["finished_at"] if a else None for a in again]


def test_a_redis_outage_longer_than_the_lost_after_time_costs_the_running_job_no_attempt(
    svc: Service, own_redis: RedisServer
) -> None:
    """Injects: Redis stopped for twice SUPIR_WORKER_LOST_AFTER_S (10 s here) while a job samples, then started
    again from its AOF. No worker was lost: beats could not be written, so the reaper must not count the missing
    ones; the job ends succeeded on its first run, whether it finished during the outage or after."""
    with svc.client("alice") as client:
        job_id = submit(client, RUNNING).json()["id"]
        wait_until(
            lambda: (status_of(client, job_id) or {}).get("progress", {}).get("step", 0) >= 1, 120, 0.1, "a step"
        )
        time.sleep(1.5)  # appendfsync everysec: what was written a second ago is on disk
        own_redis.stop("shutdown")
        time.sleep(20)
        own_redis.start()

        def ended() -> dict | None:
            job = status_of(client, job_id)
            return job if job is not None and job["status"] in ("succeeded", "failed", "canceled") else None

        job = wait_until(ended, 300, 0.5, "the job to end")
    assert (job["status"], job["attempts"]) == ("succeeded", 1), (job["status"], job["attempts"], job["error"])
