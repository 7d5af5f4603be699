"""Batches: many photos submitted as one request, each a job of its own, followed and ended together.

A batch is a record naming its jobs; the jobs live their usual lives (jobs.store), queued fairly beside other
keys' work (jobs.fairshare). A batch ends when its last job does: whatever ends that job (a worker, a cancel, the
reaper) also ends the batch, and the batch's webhook becomes due exactly once.

Keys (prefix `p`):
    p:batch:<id>          the BatchRecord as JSON (expires at its expires_at once it has ended)
    p:batchdone:<id>      set of its job ids that have ended
    p:batchend:<id>       when it ended (set once: the end and its webhook happen once)
    p:batches:open        sorted set of unended batch ids by creation time (the sweep ends any missed end)
    p:batches:due         sorted set of ended batch ids whose webhook is still to be sent, by end time
    p:batchgone:<id>      tombstone of an erased batch {owner, reason, at}
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any

from pydantic import BaseModel, Field

from .record import rfc3339

BATCH_ID_PREFIX = "bat_"


def new_batch_id() -> str:
    return BATCH_ID_PREFIX + uuid.uuid4().hex


class BatchWebhook(BaseModel):
    url: str
    state: str = Field("pending", description="pending, delivered or failed (after its retries)")
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None


class BatchRecord(BaseModel):
    id: str = Field(default_factory=new_batch_id)
    owner: str
    job_ids: list[str]
    created_at: float = Field(default_factory=time.time)
    variant: str = ""
    webhook: BatchWebhook | None = None
    expires_after: int | None = None  # seconds kept after it ends (None: the deployment's retention)
    request_hash: str = ""


# One job of the batch ended: when it was the last, the batch ends (once) and its webhook becomes due.
_JOB_ENDED = """
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[4])
if ARGV[5] == '1' then redis.call('ZADD', KEYS[4], ARGV[3], ARGV[4]) end
redis.call('PEXPIREAT', KEYS[1], ARGV[6])
redis.call('PEXPIREAT', KEYS[2], ARGV[6])
redis.call('PEXPIREAT', KEYS[5], ARGV[6])
return 1
"""


class BatchBook:
    """Batch records and their ends in Redis (keys in the module docstring)."""

    def __init__(self, client: Any, prefix: str, retention_s: float) -> None:
        self.r = client
        self.p = prefix
        self.retention_s = int(retention_s)

    def _key(self, batch_id: str) -> str:
        return f"{self.p}:batch:{batch_id}"

    def _done(self, batch_id: str) -> str:
        return f"{self.p}:batchdone:{batch_id}"

    def _end(self, batch_id: str) -> str:
        return f"{self.p}:batchend:{batch_id}"

    def _gone(self, batch_id: str) -> str:
        return f"{self.p}:batchgone:{batch_id}"

    @property
    def _open(self) -> str:
        return f"{self.p}:batches:open"

    @property
    def _due(self) -> str:
        return f"{self.p}:batches:due"

    def create(self, batch: BatchRecord, pipe: Any = None) -> None:
        """Store the batch (in `pipe` when given: with its jobs, in one transaction)."""
        target = pipe if pipe is not None else self.r.pipeline()
        target.set(self._key(batch.id), batch.model_dump_json())
        target.zadd(self._open, {batch.id: batch.created_at})
        if pipe is None:
            target.execute()

    def get(self, batch_id: str) -> BatchRecord | None:
        raw = self.r.get(self._key(batch_id))
        return BatchRecord.model_validate_json(raw) if raw else None

    def ended_at(self, batch_id: str) -> float | None:
        raw = self.r.get(self._end(batch_id))
        return float(raw) if raw is not None else None

    def job_ended(self, batch_id: str, job_id: str) -> bool:
        """Count job_id of the batch as ended; True for the one call that ends the batch."""
        batch = self.get(batch_id)
        if batch is None:
            return False
        now = time.time()
        at_ms = math.ceil((now + (batch.expires_after or self.retention_s)) * 1000)
        keys = (self._done(batch_id), self._end(batch_id), self._open, self._due, self._key(batch_id))
        hook = "1" if batch.webhook is not None else "0"
        return bool(self.r.eval(_JOB_ENDED, len(keys), *keys, job_id, len(batch.job_ids), now, batch_id, hook, at_ms))

    def open_ids(self, older_than_s: float = 0.0) -> list[str]:
        cutoff = time.time() - older_than_s
        return [_text(i) for i in self.r.zrangebyscore(self._open, "-inf", cutoff)]

    def due_ids(self) -> list[str]:
        return [_text(i) for i in self.r.zrange(self._due, 0, -1)]

    def claim_due(self, batch_id: str) -> bool:
        """Take the batch's due webhook for sending: True for exactly one caller."""
        return bool(self.r.zrem(self._due, batch_id))

    def mark_due(self, batch_id: str) -> None:
        """Put back a due webhook whose sending failed after `claim_due`."""
        self.r.zadd(self._due, {batch_id: time.time()})

    def set_webhook(self, batch_id: str, webhook: BatchWebhook) -> None:
        batch = self.get(batch_id)
        if batch is not None:
            self.r.set(
                self._key(batch_id), batch.model_copy(update={"webhook": webhook}).model_dump_json(), keepttl=True
            )

    def bury(self, batch: BatchRecord, reason: str) -> None:
        """Drop the batch's keys and leave a tombstone (its jobs are erased one by one by the caller)."""
        stone = json.dumps({"owner": batch.owner, "reason": reason, "at": time.time()})
        with self.r.pipeline() as pipe:
            pipe.set(self._gone(batch.id), stone, ex=self.retention_s)
            pipe.delete(self._key(batch.id), self._done(batch.id), self._end(batch.id))
            pipe.zrem(self._open, batch.id)
            pipe.zrem(self._due, batch.id)
            pipe.execute()

    def tombstone(self, batch_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self._gone(batch_id))
        return dict(json.loads(raw)) if raw else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


COUNTED = ("queued", "running", "succeeded", "failed", "canceled", "deleted")


def summarize(batch: BatchRecord, records: list[Any], ended_at: float | None, retention_s: int) -> dict[str, Any]:
    """What a batch's view and its webhook tell: counts by status (an erased or expired job counts as
    `deleted`), progress over its jobs (a running job by its sampler steps), times in the jobs' own terms."""
    counts = dict.fromkeys(COUNTED, 0)
    done = 0.0
    for record in records:
        status = "deleted" if record is None else record.status
        counts[status] += 1
        if record is None or record.terminal:
            done += 1.0
        elif record.status == "running" and record.progress.steps:
            done += min(1.0, record.progress.step / record.progress.steps)
    total = len(batch.job_ids)
    expires_at = None if ended_at is None else math.ceil(ended_at + (batch.expires_after or retention_s))
    return {
        "id": batch.id,
        "status": "ended" if ended_at is not None else "running",
        "total": total,
        "counts": counts,
        "progress": round(done / total, 4) if total else 1.0,
        "created_at": batch.created_at,
        "ended_at": ended_at,
        "variant": batch.variant or None,
        "expires_after": batch.expires_after or retention_s,
        "expires_at": rfc3339(expires_at),
        "job_ids": list(batch.job_ids),
    }
