"""What Redis says of its memory, and the one start-up check every process (API, GPU worker, light worker) makes.

Job records, queues and broker messages live only in Redis. A `maxmemory-policy` other than `noeviction` lets
Redis delete keys when it is full: accepted jobs vanish (a client holding a 202 gets 404) and nothing fails. Records
of ended jobs carry TTLs, so `volatile-*` policies pick them too. Everything is read from `INFO` (managed Redis
often refuses `CONFIG GET`). With `noeviction` a full Redis refuses writes instead; the API keeps a reserve below
`maxmemory` (SUPIR_REDIS_MEMORY_RESERVE) by refusing new jobs first, so accepted jobs can still run, end and be read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from supir_core.errors import SupirError

from .redis_conn import store_client
from .settings import Settings

log = logging.getLogger("supir.redis")
SAFE_POLICY = "noeviction"
HOW_TO_FIX = (
    "set maxmemory-policy noeviction (`CONFIG SET maxmemory-policy noeviction` and the same line in redis.conf; "
    "on managed Redis the instance's parameter: ElastiCache parameter group, Memorystore and Azure Cache for Redis "
    "`maxmemory-policy`); see docs/operations.md#redis-memory"
)


_CHECKED: set[tuple[str, str]] = set()  # the Redis servers this process has checked (URL, Sentinels)


class EvictingRedis(SupirError):
    """Redis may delete job records when full: a production process refuses to start."""


@dataclass(frozen=True)
class RedisMemory:
    policy: str | None  # maxmemory_policy; None when INFO does not say (a proxy, an old server)
    used_bytes: int  # what Redis compares with maxmemory (used_memory less replication and AOF buffers)
    max_bytes: int  # maxmemory; 0: no limit (the host's memory is the limit)
    evicted_keys: int

    @property
    def evicting(self) -> bool:
        return self.policy is not None and self.policy != SAFE_POLICY

    @property
    def used_fraction(self) -> float | None:
        return self.used_bytes / self.max_bytes if self.max_bytes else None

    @property
    def refuses_writes(self) -> bool:
        """Redis answers writes with OOM ("command not allowed when used memory > 'maxmemory'")."""
        return not self.evicting and self.max_bytes > 0 and self.used_bytes >= self.max_bytes

    def takes_jobs(self, reserve: float) -> bool:
        """Room for one more job: below maxmemory less the reserve kept for jobs already accepted."""
        return self.max_bytes == 0 or self.used_bytes < self.max_bytes * (1.0 - reserve)


def read_memory(client: redis.Redis) -> RedisMemory:
    """INFO memory and INFO stats (two small commands any Redis user may run)."""
    memory, stats = client.info("memory"), client.info("stats")
    policy = memory.get("maxmemory_policy")
    used = int(memory.get("used_memory", 0)) - int(memory.get("mem_not_counted_for_evict", 0))
    return RedisMemory(
        policy=str(policy) if policy is not None else None,
        used_bytes=max(used, 0),
        max_bytes=int(memory.get("maxmemory", 0)),
        evicted_keys=int(stats.get("evicted_keys", 0)),
    )


def policy_problem(memory: RedisMemory) -> str | None:
    """The sentence an operator needs when the policy is unsafe (or unknown), else None."""
    if memory.policy is None:
        return "Redis does not report maxmemory_policy in INFO memory, so it cannot be checked; " + HOW_TO_FIX
    if memory.evicting:
        return (
            f"Redis maxmemory-policy is {memory.policy}: when Redis is full it deletes keys, accepted jobs among "
            f"them (clients get 404 for jobs they were given); {HOW_TO_FIX}"
        )
    return None


def check_redis_at_start(settings: Settings, process: str) -> RedisMemory | None:
    """Read the policy once at start: in production an evicting (or unknown) policy raises EvictingRedis; in dev
    it is logged as an error. An unreachable Redis is only logged (the process waits for it like for any outage;
    /status, the metrics and their alerts keep reporting the policy). Returns what was read, or None.

    Once per process and Redis (`python -m api.server` checks before uvicorn starts, the app's lifespan again)."""
    where = (settings.redis_url, settings.redis_sentinels)
    if where in _CHECKED:
        return None
    _CHECKED.add(where)
    client = store_client(settings, socket_timeout=2.0, connect_timeout=2.0)
    try:
        memory = read_memory(client)
    except redis.RedisError as exc:
        log.warning("%s: could not read Redis's maxmemory-policy at start (%s)", process, type(exc).__name__)
        return None
    finally:
        client.close()
    problem = policy_problem(memory)
    if problem is not None and settings.environment == "production":
        raise EvictingRedis(f"{process} refuses to start (SUPIR_ENVIRONMENT=production): {problem}")
    if problem is not None:
        log.error("%s: %s. Allowed only because SUPIR_ENVIRONMENT=%s", process, problem, settings.environment)
    elif memory.max_bytes == 0 and settings.environment == "production":
        log.warning("%s: Redis has no maxmemory: when the host runs out, Redis is killed, not refused", process)
    return memory


def exit_if_evicting(settings: Settings, process: str) -> None:
    """check_redis_at_start for a process's entry point: the refusal goes to stderr and the process exits 1
    (SystemExit passes through Celery's signal dispatch, which catches only Exception)."""
    try:
        check_redis_at_start(settings, process)
    except EvictingRedis as exc:
        raise SystemExit(str(exc)) from None
