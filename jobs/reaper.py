"""The reaper: running jobs whose worker is gone go back to the queue at once, instead of waiting for the
broker's visibility timeout (the job time limit plus a margin: tens of minutes).

A run is lost when its worker's beat has expired (the process or its machine died), its pid is dead on this
host, or the worker's beat names another job or none (it dropped the job, e.g. its Redis writes failed while
Redis restarted). Beats missed while Redis was away are no evidence: no pass runs until this process has reached
Redis, and Redis has been up, for lost_after_s. Each loss counts; the max_attempts-th ends the job failed /
worker_lost, so a photo that kills its worker every time cannot take the workers down one after another. Every
change is a fenced transition (`JobStore.requeue_lost`), so a run that ends meanwhile keeps its ending and nothing
is queued twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from .record import JobRecord
from .store import JobStore

log = logging.getLogger("supir.reaper")


def reap(store: JobStore, enqueue: Callable[[str], None], max_attempts: int, lost_after_s: float) -> list[JobRecord]:
    """One pass over the running jobs; returns the records it changed (requeued or failed)."""
    changed: list[JobRecord] = []
    now = time.time()
    for job_id in store.running_ids():
        record = store.get(job_id)
        if record is None or record.status != "running" or record.worker is None:
            continue
        if now - (record.started_at or now) < lost_after_s:
            continue  # a run that has just started may not have named its job in a beat yet
        if store.running_job_of(record.worker) == job_id:
            continue
        updated = store.requeue_lost(job_id, record.worker, record.attempts, max_attempts)
        if updated is None:
            continue
        if updated.status == "queued":
            enqueue(job_id)
            log.warning("job %s: worker %s lost it; queued again (loss %d)", job_id, record.worker, updated.lost)
        else:
            log.error("job %s: worker lost %d times; failed", job_id, updated.lost)
        changed.append(updated)
    return changed


def free_orphan_slots(store: JobStore) -> int:
    """Quota slots whose job was never created (an API process died between claim and create)."""
    return sum(store.free_orphan_slots(owner) for owner in store.owners())


class Reaper:
    """A daemon thread offering to reap every `every_s`; a Redis lock lets one process per interval do it."""

    def __init__(
        self,
        store: JobStore,
        enqueue: Callable[[str], None],
        max_attempts: int,
        lost_after_s: float,
        every_s: float = 5.0,
        on_change: Callable[[JobRecord], None] | None = None,
    ) -> None:
        self.store, self.enqueue, self.every_s, self.on_change = store, enqueue, every_s, on_change
        self.max_attempts, self.lost_after_s = max_attempts, lost_after_s
        self._stop = threading.Event()
        self._passes = 0
        self._reached_since: float | None = None  # monotonic time since which every pass has reached Redis

    def start(self) -> Reaper:
        threading.Thread(target=self._run, name="supir-reaper", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def trusts_beats(self) -> bool:
        """Whether a missing beat is evidence of a lost worker: not until Redis has been reachable (by this process,
        and up on its own clock) for lost_after_s, since beats could not be written while it was away and a
        restarted Redis has none. So an outage, however long, costs no run its attempt."""
        now = time.monotonic()
        if self._reached_since is None:
            self._reached_since = now
        return now - self._reached_since >= self.lost_after_s and self.store.redis_uptime_s() >= self.lost_after_s

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                if not self.trusts_beats() or not self.store.take_lock("reaper", self.every_s * 0.9):
                    continue
                for record in reap(self.store, self.enqueue, self.max_attempts, self.lost_after_s):
                    if self.on_change is not None:
                        self.on_change(record)
                self._passes += 1
                if self._passes % 60 == 0:
                    free_orphan_slots(self.store)
            except redis.RedisError as exc:
                self._reached_since = None
                log.warning("reaper: Redis unavailable (%s)", type(exc).__name__)
            except Exception:
                log.exception("reaper pass failed")
