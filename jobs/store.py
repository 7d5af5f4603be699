"""Job records in Redis: atomic lifecycle transitions, queue positions, progress events, cancel flags.

Keys (all under the settings' key_prefix, `p`):
    p:job:<id>             the JobRecord as JSON (expires at its expires_at: its expires_after, or `retention`,
                           after it ends)
    p:expiring             sorted set of ended job ids by expires_at: the expiry sweep erases their objects
    p:deleted:<id>         tombstone of an erased job {owner, reason, at}: its reads answer 410 for `retention`
    p:delivered:<id>       set of the sample indexes downloaded (SUPIR_DELETE_AFTER_DELIVERY)
    p:owner:<owner>        sorted set of the owner's job ids by creation time
    p:slots:<owner>        sorted set of the owner's queued + running job ids by claim time (quota)
    p:queued               sorted set of queued ids by creation time
    p:queued:<variant>     the same, per SUPIR variant (each has its own Celery queue: positions and depth)
    p:fair…, p:fairq…      fair share across keys: per-owner queues of each variant (jobs.fairshare)
    p:running              set of running ids
    p:running:<variant>    the same, per variant
    p:cache:<key>          result cache: the id of the job whose stored result answers a repeated request
    p:variant:<name>       what the workers of a variant load: {model_id, numerics, supir_sha256, sdxl_sha256, at}
    p:filehash:<digest>    sha256 of a weights file by path, size and mtime (hashed once per cluster)
    p:cancel:<id>          cancel flag, read by the worker between sampler steps
    p:events:<id>          pub/sub channel: the record after each change, with its "version"
    p:version:<id>         the record's change counter: +1 in the same transaction as each publish
    p:idem:<owner>:<key>   idempotency key → {job id, request hash, state pending|created, claimed at}
    p:workers              sorted set of worker processes by last heartbeat (their beats say in what state)
    p:worker:<host:pid>    a worker process's beat {state, job, at}; expires unless renewed
    p:lock:<name>          cluster-wide lock of periodic work (the reaper)
    p:load_failures        hash variant → failed loads of the weights by its workers (a counter that outlives them)
"""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import redis

from .batches import BatchBook
from .fairshare import FairQueue
from .record import ACTIVE, JobError, JobProgress, JobRecord, Status

WATCH_RETRIES = 20
RATE_WINDOW_S = 60


class RateWindow(NamedTuple):
    """A key's request count in the current minute, as the RateLimit headers tell it."""

    limit: int  # requests the window allows
    remaining: int  # left in it after this one
    reset_s: int  # seconds until the next window
    exceeded: bool  # this request was over the limit


WORKERS_KEPT_S = 3600.0  # how long a silent worker stays in p:workers (its beat expires far sooner)


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "supir", retention_s: float = 86_400) -> None:
        self.r: Any = client  # redis-py's sync/async union return types only add noise here
        self.p = prefix
        self.retention_s = int(retention_s)
        self.fair = FairQueue(client, prefix)
        self.batches = BatchBook(client, prefix, self.retention_s)

    # keys
    def _job(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def channel(self, job_id: str) -> str:
        return f"{self.p}:events:{job_id}"

    def version_key(self, job_id: str) -> str:
        return f"{self.p}:version:{job_id}"

    # reading
    def get(self, job_id: str) -> JobRecord | None:
        raw = self.r.get(self._job(job_id))
        return JobRecord.model_validate_json(raw) if raw else None

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        """Records in one round trip, in order (None where a job is gone)."""
        raws = self.r.mget([self._job(i) for i in job_ids]) if job_ids else []
        return [JobRecord.model_validate_json(raw) if raw else None for raw in raws]

    def _queued(self, variant: str | None = None) -> str:
        return f"{self.p}:queued:{variant}" if variant else f"{self.p}:queued"

    def _running(self, variant: str | None = None) -> str:
        return f"{self.p}:running:{variant}" if variant else f"{self.p}:running"

    def queue_position(self, job_id: str, variant: str | None = None, owner: str | None = None) -> int | None:
        """Jobs that start before this one in its variant's queue (the only queue its workers read): in the
        fair-share order when the owner is known, else in order of creation."""
        if variant and owner:
            ahead = self.fair.position(variant, owner, job_id)
            if ahead is not None:
                return ahead
        rank = self.r.zrank(self._queued(variant), job_id)
        return None if rank is None else int(rank)

    def next_fair(self, variant: str) -> str | None:
        """The queued job of `variant` a free worker should start, round-robin across keys (jobs.fairshare)."""
        return self.fair.pick(variant)

    def queued_count(self, variant: str | None = None) -> int:
        return int(self.r.zcard(self._queued(variant)))

    def running_count(self, variant: str | None = None) -> int:
        return int(self.r.scard(self._running(variant)))

    def oldest_queued_at(self) -> float | None:
        """Creation time of the job longest in the queue."""
        first = self.r.zrange(f"{self.p}:queued", 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    def oldest_running_since(self) -> float | None:
        """Start time of the run that has gone on longest (one read per running job: as many as workers)."""
        ids = [i.decode() for i in self.r.smembers(f"{self.p}:running")]
        raws = self.r.mget([self._job(i) for i in ids]) if ids else []
        starts = [JobRecord.model_validate_json(raw).started_at for raw in raws if raw is not None]
        return min((s for s in starts if s is not None), default=None)

    def active_count(self, owner: str) -> int:
        return int(self.r.zcard(self._slots(owner)))

    def _slots(self, owner: str) -> str:
        return f"{self.p}:slots:{owner}"

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
    def create(self, record: JobRecord, share_weight: float | None = None) -> None:
        """Store a queued job. `share_weight`: its key's weight in the fair share (None: the key's last)."""
        with self.r.pipeline() as pipe:
            pipe.set(self._job(record.id), record.model_dump_json())
            pipe.zadd(f"{self.p}:owner:{record.owner}", {record.id: record.created_at})
            if not record.batch_id:  # a batch's jobs hold no active-job slots (the batch limit bounds them)
                pipe.zadd(self._slots(record.owner), {record.id: record.created_at})
            pipe.zadd(f"{self.p}:queued", {record.id: record.created_at})
            if record.variant:
                pipe.zadd(self._queued(record.variant), {record.id: record.created_at})
                self.fair.enqueue(pipe, record.variant, record.owner, record.id, record.created_at, share_weight)
            pipe.execute()

    def create_finished(self, record: JobRecord) -> JobRecord:
        """A job that is born ended (answered from the result cache): listed, never queued, kept for retention."""
        record = self._with_expiry(record)
        with self.r.pipeline() as pipe:
            pipe.set(self._job(record.id), record.model_dump_json())
            pipe.zadd(f"{self.p}:owner:{record.owner}", {record.id: record.created_at})
            self._expire_at(pipe, record)
            pipe.execute()
        if record.batch_id:
            self.batches.job_ended(record.batch_id, record.id)
        return record

    def _with_expiry(self, record: JobRecord) -> JobRecord:
        """An ended record's expires_at, fixed once, when it ends: its own expires_after or the retention, later."""
        if record.status in ACTIVE or record.expires_at is not None:
            return record
        ended = record.finished_at or time.time()
        # whole seconds (views show it so), rounded up: never before the job's own expires_after has passed
        expires_at = math.ceil(ended + (record.expires_after or self.retention_s))
        return record.model_copy(update={"expires_at": float(expires_at)})

    def _expire_at(self, pipe: redis.client.Pipeline, record: JobRecord) -> None:
        """The ended record's keys expire at its expires_at, and the expiry sweep erases its objects then."""
        assert record.expires_at is not None
        at_ms = math.ceil(record.expires_at * 1000)
        pipe.pexpireat(self._job(record.id), at_ms)
        pipe.pexpireat(self.version_key(record.id), at_ms)
        pipe.zadd(self._expiring, {record.id: record.expires_at})

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
                    record = self._with_expiry(record)
                    # safe to read here: the version only changes with the watched record, in this transaction
                    version = int(pipe.get(self.version_key(job_id)) or 0) + 1
                    pipe.multi()
                    pipe.set(key, record.model_dump_json(), keepttl=True)
                    pipe.set(self.version_key(job_id), version)
                    self._index(pipe, record)
                    # the version rides along as an extra key (JobRecord ignores it): event streams number
                    # their events with it, so a client can resume after the last one it saw
                    published = f'{{"version":{version},' + record.model_dump_json()[1:]
                    pipe.publish(self.channel(job_id), published)
                    pipe.execute()
                except redis.WatchError:
                    continue
            if record.batch_id and record.terminal:
                # after the change (a crash between the two is caught by the batches' sweep)
                self.batches.job_ended(record.batch_id, record.id)
            return record
        raise RuntimeError(f"job {job_id}: too many concurrent updates")

    def _index(self, pipe: redis.client.Pipeline, record: JobRecord) -> None:
        for variant in {None, record.variant or None}:
            if record.status == "queued":  # a requeued job keeps its place
                pipe.zadd(self._queued(variant), {record.id: record.created_at})
            else:
                pipe.zrem(self._queued(variant), record.id)
            if record.status == "running":
                pipe.sadd(self._running(variant), record.id)
            else:
                pipe.srem(self._running(variant), record.id)
        if record.variant and record.status == "queued":
            self.fair.enqueue(pipe, record.variant, record.owner, record.id, record.created_at, None)
        elif record.variant:
            self.fair.dequeue(pipe, record.variant, record.owner, record.id)
        if record.status not in ACTIVE:
            pipe.zrem(self._slots(record.owner), record.id)
            self._expire_at(pipe, record)

    def start(self, job_id: str, worker: str, max_lost: int) -> tuple[str, JobRecord | None]:
        """Take job_id for `worker`: ("started", record), or ("ended" | "busy" | "lost", record or None).

        A job still marked running by another process is taken over only when that process is gone (its run
        counts as lost, and the max_lost-th loss ends the job failed/worker_lost); while it lives, "busy".
        """
        outcome = "started"

        def change(record: JobRecord) -> JobRecord | None:
            nonlocal outcome
            outcome = "ended"
            if record.terminal:
                return None
            lost = record.lost
            if record.status == "running" and record.worker not in (None, worker):
                if self.running_job_of(record.worker) == job_id:
                    outcome = "busy"
                    return None
                lost += 1
                if lost >= max_lost:
                    outcome = "lost"
                    return _lost(record, lost)
            outcome = "started"
            return record.model_copy(
                update={
                    "status": "running",
                    "started_at": time.time(),
                    "attempts": record.attempts + 1,
                    "lost": lost,
                    "worker": worker,
                    "progress": JobProgress(stage="starting"),
                }
            )

        record = self.update(job_id, change)
        return outcome, record

    def finish(self, job_id: str, status: Status, worker: str | None = None, **fields: object) -> JobRecord | None:
        """→ a terminal status, once: a job that has already ended keeps its first ending. With `worker`, only
        while that process still holds the job (a run taken over by another attempt cannot end it)."""

        def change(record: JobRecord) -> JobRecord | None:
            if record.terminal or (worker is not None and record.worker != worker):
                return None
            return record.model_copy(update={"status": status, "finished_at": time.time(), **fields})

        return self.update(job_id, change)

    def set_progress(self, job_id: str, progress: JobProgress, worker: str | None = None) -> JobRecord | None:
        def change(record: JobRecord) -> JobRecord | None:
            if record.status != "running" or (worker is not None and record.worker != worker):
                return None
            return record.model_copy(update={"progress": progress})

        return self.update(job_id, change)

    def requeue_lost(self, job_id: str, worker: str, attempts: int, max_lost: int) -> JobRecord | None:
        """The run `attempts` of job_id by `worker` is lost: queue the job again, or end it at the max_lost-th loss.

        Changes nothing unless that exact run still holds the job (it may have ended, or been taken over)."""

        def change(record: JobRecord) -> JobRecord | None:
            if record.status != "running" or record.worker != worker or record.attempts != attempts:
                return None
            if record.lost + 1 >= max_lost:
                return _lost(record, record.lost + 1)
            return record.model_copy(
                update={"status": "queued", "lost": record.lost + 1, "worker": None, "progress": JobProgress()}
            )

        return self.update(job_id, change)

    def running_ids(self) -> list[str]:
        return [i.decode() if isinstance(i, bytes) else i for i in self.r.smembers(f"{self.p}:running")]

    # quota: one atomic check-and-claim, so concurrent creates cannot pass the check together
    _CLAIM = """
    if redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 1 end
    if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
    redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
    return 1
    """

    def claim_slot(self, owner: str, job_id: str, quota: int) -> bool:
        """Reserve one of the owner's `quota` active-job slots for job_id; False when all are taken."""
        return bool(self.r.eval(self._CLAIM, 1, self._slots(owner), quota, job_id, time.time()))

    def release_slot(self, owner: str, job_id: str) -> None:
        """Give back a slot whose job was never created (the create failed after the claim)."""
        self.r.zrem(self._slots(owner), job_id)

    def free_orphan_slots(self, owner: str, older_than_s: float = 300.0) -> int:
        """Slots held by ids with no active record (an API process died between claim and create)."""
        cutoff = time.time() - older_than_s
        ids = [i.decode() if isinstance(i, bytes) else i for i in self.r.zrangebyscore(self._slots(owner), 0, cutoff)]
        orphans = [
            i
            for i, raw in zip(ids, self.r.mget([self._job(i) for i in ids]) if ids else [], strict=True)
            if raw is None or JobRecord.model_validate_json(raw).status not in ACTIVE
        ]
        return int(self.r.zrem(self._slots(owner), *orphans)) if orphans else 0

    # expiry and erasure (jobs.retention erases the objects)
    @property
    def _expiring(self) -> str:
        return f"{self.p}:expiring"

    def _tombstone(self, job_id: str) -> str:
        return f"{self.p}:deleted:{job_id}"

    def expired_ids(self, now: float, limit: int = 500) -> list[str]:
        """Ended jobs whose expires_at has passed, oldest first, whose objects are still to be erased."""
        ids = self.r.zrangebyscore(self._expiring, 0, now, start=0, num=limit)
        return [i.decode() if isinstance(i, bytes) else i for i in ids]

    def forget_expired(self, job_id: str) -> None:
        self.r.zrem(self._expiring, job_id)

    def tombstone(self, job_id: str) -> dict[str, Any] | None:
        """{owner, reason, at} of an erased job (reads answer 410), or None."""
        raw = self.r.get(self._tombstone(job_id))
        return None if raw is None else dict(json.loads(raw))

    def bury(self, record: JobRecord, reason: str) -> None:
        """Leave a tombstone and drop the record and every index entry at once (one transaction), flag a run to
        stop, and tell open event streams: no reader finds the job after this, and its worker writes nothing
        more (worker.execute looks for the tombstone around every object it writes)."""
        job_id = record.id
        stone = json.dumps({"owner": record.owner, "reason": reason, "at": time.time()})
        with self.r.pipeline() as pipe:
            pipe.set(self._tombstone(job_id), stone, ex=self.retention_s)
            pipe.set(f"{self.p}:cancel:{job_id}", 1, ex=self.retention_s)
            pipe.delete(self._job(job_id), self.version_key(job_id), f"{self.p}:delivered:{job_id}")
            pipe.zrem(f"{self.p}:owner:{record.owner}", job_id)
            pipe.zrem(self._slots(record.owner), job_id)
            for variant in {None, record.variant or None}:
                pipe.zrem(self._queued(variant), job_id)
                pipe.srem(self._running(variant), job_id)
            if record.variant:
                self.fair.dequeue(pipe, record.variant, record.owner, job_id)
            pipe.zrem(self._expiring, job_id)
            pipe.publish(self.channel(job_id), json.dumps({"deleted": reason}))
            pipe.execute()
        if record.batch_id:
            self.batches.job_ended(record.batch_id, job_id)

    def end_finished_batches(self, older_than_s: float = 60.0) -> int:
        """Batches whose jobs have all ended (or gone) but which were not ended: an ending whose process died
        between the job's change and the batch's count. Returns how many this ended."""
        ended = 0
        for batch_id in self.batches.open_ids(older_than_s):
            batch = self.batches.get(batch_id)
            if batch is None:
                continue
            raws = self.r.mget([self._job(i) for i in batch.job_ids]) if batch.job_ids else []
            for job_id, raw in zip(batch.job_ids, raws, strict=True):
                if raw is None or JobRecord.model_validate_json(raw).terminal:
                    ended += self.batches.job_ended(batch_id, job_id)
        return ended

    def mark_delivered(self, job_id: str, index: int) -> int:
        """Sample `index` of the job was downloaded: how many of its samples have been."""
        key = f"{self.p}:delivered:{job_id}"
        with self.r.pipeline() as pipe:
            pipe.sadd(key, index)
            pipe.expire(key, self.retention_s)
            pipe.scard(key)
            return int(pipe.execute()[2])

    # cancel flags
    def request_cancel(self, job_id: str) -> None:
        self.r.set(f"{self.p}:cancel:{job_id}", 1, ex=self.retention_s)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.exists(f"{self.p}:cancel:{job_id}"))

    # idempotency: one atomic claim per (owner, key), made before any work, so concurrent creates with one key
    # make one job; the value says which job and request won, and when it was claimed (to spot dead claims)
    _CLAIM_KEY = """
    if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return false end
    return redis.call('GET', KEYS[1])
    """
    _RELEASE_KEY = """
    local raw = redis.call('GET', KEYS[1])
    if raw and cjson.decode(raw)['job'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
    return 0
    """
    _CONFIRM_KEY = """
    local raw = redis.call('GET', KEYS[1])
    if raw and cjson.decode(raw)['job'] == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL') end
    return 0
    """

    def _idem(self, owner: str, key: str) -> str:
        return f"{self.p}:idem:{owner}:{key}"

    def claim_idempotency_key(self, owner: str, key: str, job_id: str, request_hash: str) -> dict[str, Any] | None:
        """Claim key for job_id (state "pending", kept for the retention window); None when this call won,
        else the holder's value {job, hash, state, at}."""
        value = json.dumps({"job": job_id, "hash": request_hash, "state": "pending", "at": time.time()})
        raw = self.r.eval(self._CLAIM_KEY, 1, self._idem(owner, key), value, self.retention_s)
        return None if raw is None else dict(json.loads(raw))

    def confirm_idempotency_key(self, owner: str, key: str, job_id: str, request_hash: str) -> None:
        """The claimed job's record exists: state "created" (same TTL)."""
        value = json.dumps({"job": job_id, "hash": request_hash, "state": "created", "at": time.time()})
        self.r.eval(self._CONFIRM_KEY, 1, self._idem(owner, key), job_id, value)

    def release_idempotency_key(self, owner: str, key: str, job_id: str) -> bool:
        """Drop the claim if job_id still holds it (never another create's newer claim)."""
        return bool(self.r.eval(self._RELEASE_KEY, 1, self._idem(owner, key), job_id))

    # rate limits: a fixed window of a minute per owner
    def count_request(self, owner: str, limit_per_minute: int) -> RateWindow:
        """Count a request in the current minute: the window's limit, what is left of it and when it resets."""
        now = time.time()
        window = int(now // RATE_WINDOW_S)
        name = f"{self.p}:rate:{owner}:{window}"
        with self.r.pipeline() as pipe:
            pipe.incr(name)
            pipe.expire(name, RATE_WINDOW_S + 1)
            count = int(pipe.execute()[0])
        # rounded up: a client that waits this long is in the next window
        reset_s = max(1, int(RATE_WINDOW_S - now % RATE_WINDOW_S) + 1)
        return RateWindow(limit_per_minute, max(0, limit_per_minute - count), reset_s, count > limit_per_minute)

    def hit_rate_limit(self, owner: str, limit_per_minute: int) -> int | None:
        """Count a request in the current minute; return seconds to wait when over the limit, else None."""
        counted = self.count_request(owner, limit_per_minute)
        return counted.reset_s if counted.exceeded else None

    # workers: each worker process ("host:pid") keeps a short-lived beat naming the job it runs
    def _beat(self, worker: str) -> str:
        return f"{self.p}:worker:{worker}"

    def heartbeat(
        self,
        worker: str,
        state: str = "ready",
        job: str | None = None,
        ttl_s: float = 30.0,
        variants: list[str] | None = None,
    ) -> None:
        now = time.time()
        beat = json.dumps({"state": state, "job": job, "at": now, "variants": variants or []})
        with self.r.pipeline() as pipe:
            pipe.set(self._beat(worker), beat, px=int(ttl_s * 1000))
            pipe.zadd(f"{self.p}:workers", {worker: now})
            pipe.zremrangebyscore(f"{self.p}:workers", 0, now - WORKERS_KEPT_S)  # long gone: forgotten
            pipe.execute()

    def drop_heartbeat(self, worker: str) -> None:
        with self.r.pipeline() as pipe:
            pipe.delete(self._beat(worker))
            pipe.zrem(f"{self.p}:workers", worker)
            pipe.execute()

    def worker_beats(self) -> dict[str, dict[str, Any]]:
        """The live worker processes (beat not expired) and their beats: {state, job, at}."""
        names = [n.decode() for n in self.r.zrangebyscore(f"{self.p}:workers", time.time() - WORKERS_KEPT_S, "+inf")]
        raws = self.r.mget([self._beat(n) for n in names]) if names else []
        return {name: json.loads(raw) for name, raw in zip(names, raws, strict=True) if raw is not None}

    def count_load_failure(self, variants: list[str]) -> None:
        """One failed load of the weights by a worker serving `variants`; kept in Redis, since the process that
        failed exits (and is restarted) long before a scrape of its own metrics could be relied on."""
        with self.r.pipeline() as pipe:
            for variant in variants:
                pipe.hincrby(f"{self.p}:load_failures", variant, 1)
            pipe.execute()

    def load_failures(self) -> dict[str, int]:
        """Failed loads of the weights so far, by variant (a counter: it only grows, until Redis loses it)."""
        raw = self.r.hgetall(f"{self.p}:load_failures")
        return {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}

    def running_job_of(self, worker: str) -> str | None:
        """The job `worker` says it runs, or None when it runs none or is gone (no beat, or a dead local pid)."""
        raw = self.r.get(self._beat(worker))
        if raw is None or not _process_may_live(worker):
            return None
        job = json.loads(raw).get("job")
        return str(job) if job else None

    def last_heartbeat(self) -> float | None:
        """When a live, ready worker last beat (None: no ready worker)."""
        ready = [beat["at"] for beat in self.worker_beats().values() if beat.get("state") == "ready"]
        return max(ready) if ready else None

    # result cache: a request's key → the job whose result answers it, for the retention window
    def cached_job(self, key: str) -> str | None:
        raw = self.r.get(f"{self.p}:cache:{key}")
        return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)

    def remember_result(self, key: str, job_id: str) -> None:
        self.r.set(f"{self.p}:cache:{key}", job_id, ex=self.retention_s)

    def forget_result(self, key: str, job_id: str) -> None:
        """Drop an entry whose job or result has gone (only if it still names that job)."""
        if self.cached_job(key) == job_id:
            self.r.delete(f"{self.p}:cache:{key}")

    # variants: what the workers of each load, so the API can key the cache on the model before any job runs
    def publish_variant(self, name: str, info: dict[str, Any]) -> None:
        self.r.set(f"{self.p}:variant:{name}", json.dumps({**info, "at": time.time()}))

    def variant_info(self, name: str) -> dict[str, Any] | None:
        raw = self.r.get(f"{self.p}:variant:{name}")
        return None if raw is None else dict(json.loads(raw))

    def file_hash(self, digest: str) -> dict[str, Any] | None:
        raw = self.r.get(f"{self.p}:filehash:{digest}")
        return None if raw is None else dict(json.loads(raw))

    def remember_file_hash(self, digest: str, info: dict[str, Any]) -> None:
        self.r.set(f"{self.p}:filehash:{digest}", json.dumps(info))

    def redis_uptime_s(self) -> float:
        """Seconds since the Redis server started (INFO server, which managed Redis allows); infinite when the
        server does not say, so that nothing waits on it for ever."""
        try:
            return float(self.r.info("server").get("uptime_in_seconds", math.inf))
        except redis.ResponseError:  # INFO refused
            return math.inf

    def take_lock(self, name: str, ttl_s: float) -> bool:
        """One holder cluster-wide for ttl_s (periodic work several processes offer to do)."""
        return bool(self.r.set(f"{self.p}:lock:{name}", 1, nx=True, px=int(ttl_s * 1000)))


def _lost(record: JobRecord, lost: int) -> JobRecord:
    message = f"the worker running this job was lost {lost} times; the photo is kept for inspection"
    return record.model_copy(
        update={
            "status": "failed",
            "finished_at": time.time(),
            "lost": lost,
            "error": JobError(code="worker_lost", message=message),
        }
    )


def _process_may_live(worker: str) -> bool:
    """False only when `worker` ("host:pid") is a process of this host that has exited (or is a zombie)."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine: its beat's expiry tells
    return pid_alive(int(pid))


def pid_alive(pid: int) -> bool:
    """True when pid is a running process of this machine (not a zombie awaiting its parent)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
