"""Fair share across API keys: which queued job of a variant a free worker runs next.

Each variant keeps one queue per owner (key) and a virtual clock. An owner's *pass* is the virtual time at which
its next job is due; a worker takes the oldest job of the owner with the lowest pass, and that owner's pass moves
on by 1 / weight. An owner that had nothing queued joins at the current virtual time, so idling earns no credit:
a key with one photo waits behind at most one job per other key, however many the others queued (stride
scheduling). Weights come from the key's `share_weight` (SUPIR_API_KEYS), recorded when it queues a job.

Celery still carries one message per job (the token): autoscaling, at-least-once delivery and the reaper work
as before; a message only decides *when* a worker looks, and `pick` decides *what* it runs. A message whose
own job was taken by an earlier pick finds another job or nothing (its own job is then running or done).

Keys (prefix `p`, per variant `v`):
    p:fair:<v>            sorted set owner → pass (owners that may have queued jobs)
    p:fairq:<v>:<owner>   sorted set of the owner's queued job ids by creation time
    p:fairclock:<v>       the virtual time: the pass of the owner picked last
    p:fairweight          hash owner → weight, as its last job was queued
"""

from __future__ import annotations

import math
from typing import Any

# Queue a job: into its owner's queue; the owner joins the variant's rotation at the current virtual time, or
# keeps its own pass when that is later (it already had its turn ahead of the clock).
_ENQUEUE = """
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
local clock = tonumber(redis.call('GET', KEYS[2]) or '0')
local pass = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '-1')
if pass < clock then redis.call('ZADD', KEYS[1], clock, ARGV[1]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[4], ARGV[1], ARGV[4]) end
return 0
"""

# The next job: the oldest of the owner with the lowest pass (owners with empty queues leave the rotation); the
# clock moves to that pass and the owner's pass on by 1 / weight. The job stays queued until a worker starts it.
_PICK = """
local owners = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #owners, 2 do
  local owner, pass = owners[i], tonumber(owners[i + 1])
  local head = redis.call('ZRANGE', ARGV[1] .. owner, 0, 0)
  if #head == 0 then
    redis.call('ZREM', KEYS[1], owner)
  else
    local weight = tonumber(redis.call('HGET', KEYS[3], owner) or '1') or 1
    if weight <= 0 then weight = 1 end
    redis.call('SET', KEYS[2], tostring(pass))
    redis.call('ZADD', KEYS[1], pass + 1 / weight, owner)
    return head[1]
  end
end
return false
"""


class FairQueue:
    """The per-owner queues of each variant and the pick over them (keys in the module docstring)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.r = client
        self.p = prefix

    def _rotation(self, variant: str) -> str:
        return f"{self.p}:fair:{variant}"

    def _owner_queues(self, variant: str) -> str:
        return f"{self.p}:fairq:{variant}:"

    def _clock(self, variant: str) -> str:
        return f"{self.p}:fairclock:{variant}"

    @property
    def _weights(self) -> str:
        return f"{self.p}:fairweight"

    def enqueue(self, pipe: Any, variant: str, owner: str, job_id: str, at: float, weight: float | None) -> None:
        """Queue job_id (in `pipe`, so with the record's own change). A requeued job keeps its place: `at` is
        its creation time. `weight` None keeps the owner's last one."""
        keys = (self._rotation(variant), self._clock(variant), self._owner_queues(variant) + owner, self._weights)
        pipe.eval(_ENQUEUE, len(keys), *keys, owner, job_id, at, "" if weight is None else repr(float(weight)))

    def dequeue(self, pipe: Any, variant: str, owner: str, job_id: str) -> None:
        """The job left the queue (started, ended or erased); its owner leaves the rotation at the next pick."""
        pipe.zrem(self._owner_queues(variant) + owner, job_id)

    def pick(self, variant: str) -> str | None:
        """The job a free worker of `variant` should start next, or None when no owner has one queued."""
        keys = (self._rotation(variant), self._clock(variant), self._weights)
        found = self.r.eval(_PICK, len(keys), *keys, self._owner_queues(variant))
        return found.decode() if isinstance(found, bytes) else found

    def position(self, variant: str, owner: str, job_id: str) -> int | None:
        """Jobs that will start before job_id, in the order `pick` takes them (None: not in a fair queue).

        The owner's k-th queued job is due at pass + k / weight; another owner's i-th job goes first when it is
        due earlier (at the same time, when that owner sorts first, as the sorted set does)."""
        with self.r.pipeline(transaction=False) as pipe:
            pipe.zrank(self._owner_queues(variant) + owner, job_id)
            pipe.zrange(self._rotation(variant), 0, -1, withscores=True)
            pipe.hgetall(self._weights)
            pipe.get(self._clock(variant))
            rank, rotation, raw_weights, raw_clock = pipe.execute()
        if rank is None:
            return None
        weights = {_text(k): _weight(v) for k, v in raw_weights.items()}
        passes = {_text(o): float(s) for o, s in rotation}
        clock = float(raw_clock or 0)
        due = max(passes.get(owner, clock), clock) + rank / weights.get(owner, 1.0)
        others = [o for o in passes if o != owner]
        with self.r.pipeline(transaction=False) as pipe:
            for other in others:
                pipe.zcard(self._owner_queues(variant) + other)
            sizes = pipe.execute()
        ahead = int(rank)
        for other, size in zip(others, sizes, strict=True):
            # how many of `other`'s jobs are due before `due`: i with passes[other] + i / w < due
            slots = (due - passes[other]) * weights.get(other, 1.0)
            if abs(slots - round(slots)) < 1e-9:
                slots = round(slots)
                ahead += min(int(size), max(0, int(slots) + (1 if other < owner else 0)))
            else:
                ahead += min(int(size), max(0, math.ceil(slots)))
        return ahead


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _weight(value: bytes | str) -> float:
    try:
        weight = float(_text(value))
    except ValueError:
        return 1.0
    return weight if weight > 0 else 1.0
