"""`GET /v1/jobs/{id}/events`: Server-Sent Events on redis.asyncio, so an open stream holds no thread.

Each event is the whole job view. Its `id:` is the record's version, a per-job counter that `JobStore.update`
bumps in the same transaction as it stores and publishes a change, so ids increase per job and mean the same
thing on every API process. A client reconnecting with `Last-Event-ID: n` gets the current record at once if
its version is above n (a record is complete, so the latest one is a full catch-up), then every later change.
While the job is queued, its view is re-sent without an `id:` when its queue position changes: the position
is derived, not a stored change, so it must not move the resume point.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from jobs.record import JobRecord
from jobs.redis_conn import async_store_client
from jobs.settings import Settings
from jobs.store import JobStore

from . import metrics
from .errors import ApiError

MAX_STREAMS_PER_KEY = 20  # open streams one API key may hold on one API process; more get 429 rate_limited
KEEPALIVE_S = 15.0  # a comment line this often, so proxies do not close a quiet stream
POSITION_POLL_S = 2.0  # how often a queued job's position is re-read (one ZRANK)
MAX_REDIS_CONNECTIONS = 5000  # per API process: about one per open stream, plus a few for reads
WAKE_S = 1.0  # the longest a stream waits between checks of the shutdown flag


def parse_last_event_id(value: str | None) -> int | None:
    """The version a client last saw; anything that is not a small non-negative integer is ignored."""
    if value is None or not value.strip().isdigit() or len(value.strip()) > 18:
        return None
    return int(value.strip())


def frame(view: dict[str, Any], version: int | None) -> str:
    head = f"id: {version}\n" if version is not None else ""
    return f"{head}event: job\ndata: {json.dumps(view)}\n\n"


class EventStreams:
    """The async Redis client (made on first use, closed at shutdown) and the per-key count of open streams."""

    def __init__(self, settings: Settings, store: JobStore, shutting_down: threading.Event) -> None:
        self.settings, self.store, self.shutting_down = settings, store, shutting_down
        self._client: aioredis.Redis | None = None
        self.open: Counter[str] = Counter()  # the event loop is single-threaded: no lock needed

    def client(self) -> aioredis.Redis:
        if self._client is None:
            # each open stream holds one connection (its subscription): redis-py's default pool of 100 would
            # refuse the 101st stream; Redis itself allows 10,000 clients by default
            self._client = async_store_client(self.settings, max_connections=MAX_REDIS_CONNECTIONS)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def response(
        self,
        job_id: str,
        owner: str,
        last_seen: int | None,
        view: Callable[[JobRecord], dict[str, Any]],
    ) -> StreamingResponse:
        """The stream's response, counted against the owner's cap from now until it ends (however it ends)."""
        if not self._take_slot(owner):
            metrics.REJECTED.labels("rate_limited").inc()
            message = f"over {MAX_STREAMS_PER_KEY} open event streams for this key"
            raise ApiError("rate_limited", message, headers={"Retry-After": "5"})
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        body = self.stream(job_id, last_seen, view)
        return _CountedStream(body, lambda: self._give_slot(owner), media_type="text/event-stream", headers=headers)

    def _take_slot(self, owner: str) -> bool:
        """One of the owner's MAX_STREAMS_PER_KEY subscriptions on this process (False: all are taken)."""
        if self.open[owner] >= MAX_STREAMS_PER_KEY:
            return False
        self.open[owner] += 1
        return True

    def _give_slot(self, owner: str) -> None:
        self.open[owner] -= 1
        if self.open[owner] <= 0:
            del self.open[owner]

    async def wait_for_end(self, job_id: str, owner: str, timeout_s: float) -> JobRecord | None:
        """The job once it has ended, if it ends within timeout_s (`Prefer: wait`); None otherwise, or at once
        when the owner already holds its cap of streams (a waiting request holds a subscription like one)."""
        if not self._take_slot(owner):
            return None
        deadline = time.monotonic() + timeout_s
        pubsub = self.client().pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.store.channel(job_id))  # before the read: no ending falls between
            record, _ = await self._read(job_id)
            while record is not None and not record.terminal and not self.shutting_down.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(left, WAKE_S))
                if message is not None:
                    data = json.loads(message["data"])
                    if "deleted" in data:  # erased (JobStore.bury): it will never end
                        return None
                    data.pop("version", None)
                    record = JobRecord.model_validate(data)
            return record if record is not None and record.terminal else None
        finally:
            await pubsub.aclose()
            self._give_slot(owner)

    async def _read(self, job_id: str) -> tuple[JobRecord | None, int]:
        """The record and its version, read together (one MULTI), so the pair is consistent."""
        async with self.client().pipeline(transaction=True) as pipe:
            pipe.get(f"{self.store.p}:job:{job_id}")
            pipe.get(self.store.version_key(job_id))
            raw, version = await pipe.execute()
        return (JobRecord.model_validate_json(raw) if raw else None), int(version or 0)

    async def stream(
        self, job_id: str, last_seen: int | None, view: Callable[[JobRecord], dict[str, Any]]
    ) -> AsyncIterator[str]:
        async def render(record: JobRecord) -> dict[str, Any]:
            # the view signs result URLs and reads the position with the sync client: a thread, but only
            # for the moment of one event, never for the life of the stream
            return await run_in_threadpool(view, record)

        client = self.client()
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            # subscribe first, then read: a change between the two arrives as a message, and its version
            # tells whether the read already covered it
            await pubsub.subscribe(self.store.channel(job_id))
            record, sent = await self._read(job_id)
            if record is None:
                return
            if last_seen is not None and last_seen > sent:
                last_seen = None  # an id this job never had (its counter was lost, or another job's): start over
            current: dict[str, Any] | None = None
            if last_seen is None or sent > last_seen or record.status == "queued":
                current = await render(record)
                fresh = last_seen is None or sent > last_seen
                yield frame(current, sent if fresh else None)
            if record.terminal:
                return
            sent = max(sent, last_seen or 0)
            position = current["queue_position"] if current else None
            written = polled = time.monotonic()
            while not self.shutting_down.is_set():  # on shutdown end now: the client reconnects elsewhere
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=WAKE_S)
                now = time.monotonic()
                if message is not None:
                    data = json.loads(message["data"])
                    if "deleted" in data:  # erased (JobStore.bury): no more events; a read now answers 410
                        return
                    version = data.pop("version", None)
                    if version is not None and version <= sent:
                        continue  # already covered by the first read, or seen before the client resumed
                    record = JobRecord.model_validate(data)
                    current = await render(record)
                    position = current["queue_position"]
                    if version is not None:
                        sent = version
                    yield frame(current, version)
                    written = now
                    if record.terminal:
                        return
                    continue
                if record.status == "queued" and current is not None and now - polled >= POSITION_POLL_S:
                    polled = now
                    rank = await run_in_threadpool(
                        self.store.queue_position, job_id, record.variant or None, record.owner
                    )
                    if isinstance(rank, int) and rank != position:
                        position = current["queue_position"] = rank
                        yield frame(current, None)
                        written = now
                        continue
                if now - written >= KEEPALIVE_S:
                    yield ": keep-alive\n\n"
                    written = now
        finally:
            await pubsub.aclose()


class _CountedStream(StreamingResponse):
    """Releases its slot in the per-key count however the response ends: finished, failed, or the client gone
    before the body started (when the body generator never runs, so its own `finally` would not)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._body = content
        self._release: Callable[[], None] | None = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            closing: Callable[[], Awaitable[None]] | None = getattr(self._body, "aclose", None)
            if closing is not None:
                await closing()  # unsubscribes now, not when the garbage collector gets to it
            release, self._release = self._release, None
            if release is not None:
                release()
