"""Fair share across keys (jobs.fairshare) on a real Redis, through JobStore as the API and the workers use it:
which job a free worker starts next, the positions the API shows, and what a lost run or an erase does."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from jobs.record import JobRecord
from jobs.store import JobStore
from tests.paths import REDIS_URL

VARIANT = "v0Q"


@pytest.fixture
def store() -> Iterator[JobStore]:
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"test-fair-{uuid.uuid4().hex[:8]}"
    yield JobStore(client, prefix)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)


def queue(store: JobStore, owner: str, count: int, weight: float | None = None) -> list[str]:
    ids = []
    for _ in range(count):
        record = JobRecord(owner=owner, variant=VARIANT, created_at=time.time())
        store.create(record, weight)
        ids.append(record.id)
    return ids


def take(store: JobStore, worker: str = "host:1") -> str | None:
    """What a free worker does: pick, then start (the start takes the job out of its owner's queue)."""
    picked = store.next_fair(VARIANT)
    if picked is not None:
        outcome, _ = store.start(picked, worker, max_lost=3)
        assert outcome == "started"
        store.finish(picked, "succeeded", worker=worker)
    return picked


def owner_of(store: JobStore, job_id: str) -> str:
    record = store.get(job_id)
    assert record is not None
    return record.owner


def test_one_photo_from_b_starts_within_two_of_a_batch(store: JobStore) -> None:
    a_jobs = queue(store, "a", 200)
    assert [take(store), take(store)] == a_jobs[:2]  # alone, a key's jobs run in their order
    (b_job,) = queue(store, "b", 1)
    assert store.queue_position(b_job, VARIANT, "b") == 0  # next, not 198 jobs back
    assert store.queue_position(a_jobs[2], VARIANT, "a") == 1
    order = [take(store) for _ in range(199)]
    assert order.index(b_job) <= 1
    assert sorted(order) == sorted([*a_jobs[2:], b_job])  # every job once
    assert take(store) is None


def test_weights_share_the_workers_in_proportion(store: JobStore) -> None:
    queue(store, "heavy", 40, weight=3)
    queue(store, "light", 40, weight=1)
    first = [owner_of(store, job) for job in (take(store) for _ in range(40)) if job]
    assert first.count("heavy") == 30 and first.count("light") == 10


def test_an_idle_key_earns_no_credit(store: JobStore) -> None:
    (early,) = queue(store, "b", 1)
    queue(store, "a", 30)
    assert take(store) == early or take(store) == early
    for _ in range(10):
        take(store)  # a alone for a while: b is out of the rotation
    queue(store, "b", 6)
    order = [owner_of(store, job) for job in (take(store) for _ in range(8)) if job]
    # b rejoins at the current virtual time: it alternates with a instead of running its 6 first
    assert order[:6].count("b") == 3, order


def test_positions_are_the_order_jobs_start_in(store: JobStore) -> None:
    rng = random.Random(7)
    for owner, weight in [("ann", 1.0), ("bob", 2.0), ("cy", 0.5), ("dee", 1.0)]:
        queue(store, owner, rng.randint(3, 12), weight)
        take(store)  # passes move apart between keys' arrivals
    queued = store.r.zrange(f"{store.p}:queued:{VARIANT}", 0, -1)
    positions = {}
    for raw in queued:
        job_id = raw.decode()
        positions[job_id] = store.queue_position(job_id, VARIANT, owner_of(store, job_id))
    started = []
    while (job := take(store)) is not None:
        started.append(job)
    assert sorted(started) == sorted(positions)
    assert {job: started.index(job) for job in started} == positions


def test_a_lost_run_goes_back_to_its_place_and_an_erased_job_is_never_picked(store: JobStore) -> None:
    first, second, third = queue(store, "a", 3)
    picked = store.next_fair(VARIANT)
    assert picked == first
    store.start(first, "host:9", max_lost=3)
    assert store.requeue_lost(first, "host:9", attempts=1, max_lost=3) is not None  # the reaper's requeue
    assert store.queue_position(first, VARIANT, "a") == 0
    record = store.get(second)
    assert record is not None
    store.bury(record, "deleted")
    assert [take(store), take(store), take(store)] == [first, third, None]


def test_a_job_canceled_while_queued_leaves_the_rotation(store: JobStore) -> None:
    (job,) = queue(store, "a", 1)
    store.finish(job, "canceled")
    assert store.next_fair(VARIANT) is None
    assert store.queue_position(job, VARIANT, "a") is None
