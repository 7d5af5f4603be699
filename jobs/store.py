"""Job records in Redis: atomic lifecycle transitions, queue positions, progress events, cancel flags.

Keys (all under the settings' key_prefix, `p`):
    p:job:<id>             the JobRecord as JSON (expires `retention` after it ends)
    p:owner:<owner>        sorted set of the owner's job ids by creation time
    p:active:<owner>       set of the owner's queued + running job ids (quota)
    p:queued               sorted set of queued ids by creation time (queue position)
    p:running              set of running ids
    p:cancel:<id>          cancel flag, read by the worker between sampler steps
    p:events:<id>          pub/sub channel: the record after each change
    p:idem:<owner>:<key>   idempotency key → job id and request hash
    p:workers              sorted set of worker names by last heartbeat
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis

from .record import ACTIVE, JobProgress, JobRecord, Status

WATCH_RETRIES = 20


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "supir", retention_s: float = 86_400) -> None:
        self.r: Any = client  # redis-py's sync/async union return types only add noise here
        self.p = prefix
        self.retention_s = int(retention_s)

    # keys
    def _job(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def channel(self, job_id: str) -> str:
        return f"{self.p}:events:{job_id}"

    # reading
    def get(self, job_id: str) -> JobRecord | None:
        raw = self.r.get(self._job(job_id))
        return JobRecord.model_validate_json(raw) if raw else None

    def queue_position(self, job_id: str) -> int | None:
        rank = self.r.zrank(f"{self.p}:queued", job_id)
        return None if rank is None else int(rank)

    def queued_count(self) -> int:
        return int(self.r.zcard(f"{self.p}:queued"))

    def running_count(self) -> int:
        return int(self.r.scard(f"{self.p}:running"))

    def active_count(self, owner: str) -> int:
        return int(self.r.scard(f"{self.p}:active:{owner}"))

    def list_jobs(self, owner: str, status: str | None, offset: int, limit: int) -> tuple[list[JobRecord], int | None]:
        """The owner's jobs, newest first, optionally of one status: (page, next offset or None)."""
        index = f"{self.p}:owner:{owner}"
        found: list[JobRecord] = []
        position = offset
        while len(found) < limit:
            ids = self.r.zrevrange(index, position, position + 2 * limit - 1)
            if not ids:
                return found, None
            for raw in self.r.mget([self._job(i.decode() if isinstance(i, bytes) else i) for i in ids]):
                position += 1
                if raw is None:
                    continue  # expired; the retention sweep drops it from the index
                record = JobRecord.model_validate_json(raw)
                if status is None or record.status == status:
                    found.append(record)
                    if len(found) == limit:
                        break
        return found, position

    def sweep(self, owners: list[str]) -> int:
        """Drop expired jobs from the owners' indexes; returns how many were dropped."""
        dropped = 0
        for owner in owners:
            index = f"{self.p}:owner:{owner}"
            ids = [i.decode() if isinstance(i, bytes) else i for i in self.r.zrange(index, 0, -1)]
            gone = [i for i, exists in zip(ids, self._exist(ids), strict=True) if not exists]
            if gone:
                dropped += int(self.r.zrem(index, *gone))
        return dropped

    def _exist(self, ids: list[str]) -> list[bool]:
        with self.r.pipeline() as pipe:
            for job_id in ids:
                pipe.exists(self._job(job_id))
            return [bool(x) for x in pipe.execute()]

    def owners(self) -> list[str]:
        prefix = f"{self.p}:owner:"
        return [
            k.decode()[len(prefix) :] if isinstance(k, bytes) else k[len(prefix) :]
            for k in self.r.scan_iter(prefix + "*")
        ]

    # writing
    def create(self, record: JobRecord) -> None:
        with self.r.pipeline() as pipe:
            pipe.set(self._job(record.id), record.model_dump_json())
            pipe.zadd(f"{self.p}:owner:{record.owner}", {record.id: record.created_at})
            pipe.sadd(f"{self.p}:active:{record.owner}", record.id)
            pipe.zadd(f"{self.p}:queued", {record.id: record.created_at})
            pipe.execute()

    def update(self, job_id: str, change: Callable[[JobRecord], JobRecord | None]) -> JobRecord | None:
        """Apply `change` atomically (optimistic WATCH); it returns None to leave the record as it is."""
        key = self._job(job_id)
        for _ in range(WATCH_RETRIES):
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        return None
                    record = change(JobRecord.model_validate_json(raw))
                    if record is None:
                        return None
                    pipe.multi()
                    pipe.set(key, record.model_dump_json(), keepttl=True)
                    self._index(pipe, record)
                    pipe.publish(self.channel(job_id), record.model_dump_json())
                    pipe.execute()
                    return record
                except redis.WatchError:
                    continue
        raise RuntimeError(f"job {job_id}: too many concurrent updates")

    def _index(self, pipe: redis.client.Pipeline, record: JobRecord) -> None:
        if record.status != "queued":
            pipe.zrem(f"{self.p}:queued", record.id)
        if record.status == "running":
            pipe.sadd(f"{self.p}:running", record.id)
        else:
            pipe.srem(f"{self.p}:running", record.id)
        if record.status not in ACTIVE:
            pipe.srem(f"{self.p}:active:{record.owner}", record.id)
            pipe.expire(self._job(record.id), self.retention_s)

    def start(self, job_id: str) -> JobRecord | None:
        """queued → running (or running again after a redelivery); None if the job has ended or is gone."""

        def change(record: JobRecord) -> JobRecord | None:
            if record.terminal:
                return None
            now = time.time()
            return record.model_copy(
                update={
                    "status": "running",
                    "started_at": now,
                    "attempts": record.attempts + 1,
                    "progress": JobProgress(stage="starting"),
                }
            )

        return self.update(job_id, change)

    def finish(self, job_id: str, status: Status, **fields: object) -> JobRecord | None:
        """→ a terminal status, once: a job that has already ended keeps its first ending."""

        def change(record: JobRecord) -> JobRecord | None:
            if record.terminal:
                return None
            return record.model_copy(update={"status": status, "finished_at": time.time(), **fields})

        return self.update(job_id, change)

    def set_progress(self, job_id: str, progress: JobProgress) -> JobRecord | None:
        def change(record: JobRecord) -> JobRecord | None:
            return record.model_copy(update={"progress": progress}) if record.status == "running" else None

        return self.update(job_id, change)

    # cancel flags
    def request_cancel(self, job_id: str) -> None:
        self.r.set(f"{self.p}:cancel:{job_id}", 1, ex=self.retention_s)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.exists(f"{self.p}:cancel:{job_id}"))

    # idempotency
    def claim_idempotency_key(self, owner: str, key: str, job_id: str, request_hash: str) -> tuple[str, str] | None:
        """Store key → (job, hash) unless the key is taken; returns the existing (job id, hash) if it is."""
        name = f"{self.p}:idem:{owner}:{key}"
        value = json.dumps({"job": job_id, "hash": request_hash})
        if self.r.set(name, value, nx=True, ex=self.retention_s):
            return None
        existing = json.loads(self.r.get(name) or value)
        return existing["job"], existing["hash"]

    def release_idempotency_key(self, owner: str, key: str) -> None:
        self.r.delete(f"{self.p}:idem:{owner}:{key}")

    # rate limits
    def hit_rate_limit(self, owner: str, limit_per_minute: int) -> int | None:
        """Count a request in the current minute; return seconds to wait when over the limit, else None."""
        now = time.time()
        window = int(now // 60)
        name = f"{self.p}:rate:{owner}:{window}"
        with self.r.pipeline() as pipe:
            pipe.incr(name)
            pipe.expire(name, 61)
            count = pipe.execute()[0]
        if count > limit_per_minute:
            return max(1, int(60 - now % 60) + 1)
        return None

    # workers
    def heartbeat(self, worker: str) -> None:
        self.r.zadd(f"{self.p}:workers", {worker: time.time()})

    def last_heartbeat(self) -> float | None:
        newest = self.r.zrevrange(f"{self.p}:workers", 0, 0, withscores=True)
        return float(newest[0][1]) if newest else None

    # events
    def events(self, job_id: str, timeout_s: float = 15.0) -> Iterator[JobRecord | None]:
        """The record now, then after every change; None every timeout_s of silence (for keep-alives)."""
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.channel(job_id))  # subscribe first so no change between get and listen is lost
        try:
            record = self.get(job_id)
            yield record
            while record is not None and not record.terminal:
                message = pubsub.get_message(timeout=timeout_s)
                if message is None:
                    yield None
                    continue
                record = JobRecord.model_validate_json(message["data"])
                yield record
        finally:
            pubsub.close()
