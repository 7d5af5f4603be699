"""A worker whose weights cannot load: real Celery workers, real Redis, the API over HTTP, the tiny model of
fixture A. The bad worker is pointed at a truncated copy of the SUPIR file and given a job to hold while it loads;
after its tries it exits with status 1 (the kubelet or Docker restarts it with back-off), the job it held goes
back to the queue untouched, and a healthy worker then runs that same job once. The failed loads are counted
where the alert SupirWorkerWeightsFailed reads them (the API's /metrics)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from jobs.store import JobStore
from tests.paths import REDIS_URL
from tests.servers import FAST, Service, free_port, submit, wait_for_status, wait_until

TRIES = 3
BACKOFF_S = 1.0  # then 2 s: the whole back-off is 3 s


@pytest.fixture
def svc(tmp_path: Path, fixture_a: Path) -> Iterator[Service]:
    service = Service(tmp_path, fixture_a, {"alice": {}}, rate_limit_per_minute=100_000)
    try:
        yield service.start(with_workers=False)  # the API alone: jobs stay queued until a worker comes
    finally:
        service.stop()


def corrupt_copy(fixture: Path, tmp: Path) -> Path:
    """The SUPIR file cut to half its length, as an interrupted copy leaves it."""
    bad = tmp / "supir-truncated.ckpt"
    shutil.copyfile(fixture / "supir.ckpt", bad)
    with bad.open("r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    return bad


def broker_messages(service: Service) -> tuple[int, int]:
    """(messages waiting in the variant's queue, messages delivered and not acknowledged) in the broker."""
    r = redis.Redis.from_url(REDIS_URL)
    keys = f"{service.prefix}:celery:"
    return int(r.llen(f"{keys}{service.prefix}-v0Q")), int(r.hlen(f"{keys}unacked"))


def test_a_worker_that_cannot_load_its_weights_exits_and_leaves_its_job_to_a_healthy_worker(
    svc: Service, fixture_a: Path
) -> None:
    store = JobStore(redis.Redis.from_url(REDIS_URL), svc.prefix)
    with svc.client("alice") as client:
        job_id = submit(client, FAST).json()["id"]
        bad_env = {
            "SUPIR_CHECKPOINT": str(corrupt_copy(fixture_a, svc.tmp)),
            "SUPIR_WORKER_LOAD_TRIES": str(TRIES),
            "SUPIR_WORKER_LOAD_BACKOFF_S": str(BACKOFF_S),
            "SUPIR_WORKER_HEALTH_PORT": str(free_port()),
        }
        bad = svc.start_worker(bad_env)
        assert bad.wait(180) == 1  # exited by itself, with a failure status: restarted with back-off
        log = (svc.tmp / "worker-0.log").read_text(errors="replace")
        assert [int(n) for n in re.findall(r"loading the weights failed \(try (\d) of 3\)", log)] == [1, 2, 3]
        assert "trying again in 1 s" in log and "trying again in 2 s" in log
        assert "the weights failed to load 3 times (SUPIR_WORKER_LOAD_TRIES): exiting with status 1" in log
        assert re.search(r"Task supir\.restore\[\S+\] received", log)  # it held the job while loading…
        assert "Canceling queue" in log  # …stopped consuming once its tries were spent…
        assert "reject requeue=True: the weights are not loaded in this worker" in log  # …and handed the job back

        record = store.get(job_id)  # untouched: never started, no attempt counted
        assert record is not None
        assert (record.status, record.attempts, record.started_at, record.worker) == ("queued", 0, None, None)
        assert broker_messages(svc) == (1, 0)  # its message waits in the queue, once, and none is held
        assert store.load_failures() == {"v0Q": TRIES}
        metrics = httpx.get(f"{svc.url}/metrics", timeout=30).text
        assert 'supir_worker_load_failures_total{variant="v0Q"} 3.0' in metrics  # the alert's signal

        svc.start_worker()  # the fixture's good file
        done = wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=180)
    assert done["status"] == "succeeded", done.get("error")
    record = store.get(job_id)
    assert record is not None and record.attempts == 1
    wait_until(lambda: broker_messages(svc) == (0, 0), 30, 0.25, "the message to be acknowledged")
