"""Graceful shutdown as clients see it: every request gets a real answer, and a 503 never hides a created job.

When SIGTERM arrives, api.server's protocol calls `DRAIN.begin(grace)`. From then on:
  * a request that begins now (a kept-alive connection's next request) is answered 503 `shutting_down` with
    `Retry-After` and `Connection: close` at once: another replica serves the retry;
  * a request already running keeps going; if at the deadline (the grace after SIGTERM) it has neither started
    its answer nor passed its point of no return (`commit()`: from there it changes state that a retry must not
    repeat, e.g. storing a job), it is cancelled and answered the same 503, so the client knows nothing was made;
  * a committed request finishes and gets its normal answer (a 202 with its job): api.server's hard bound is
    FINISH_S longer than the grace to leave it time, so uvicorn never cancels it into its plain-text 500.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import anyio
import anyio.lowlevel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .errors import error_response

# Set when shutdown begins (or the app's lifespan ends): event streams and `Prefer: wait` end within a second.
SHUTTING_DOWN = threading.Event()
RETRY_AFTER_S = 2  # long enough for the load balancer to have dropped this pod, short for the client
# after the grace: committed requests finish (a few Redis and storage calls), and refused bodies are drained,
# within this. One stalled longer by a hung S3 or Redis is cut by uvicorn at this bound (its plain 500).
FINISH_S = 10.0
# answered by every replica, shutting down or not (readiness says 503 itself while shutting down)
UNGUARDED_PATHS = ("/healthz", "/readyz", "/metrics", "/status")


class Drain:
    """This process's shutdown: the deadline for requests in flight (None while serving)."""

    def __init__(self) -> None:
        self.deadline: float | None = None
        self._waiters: set[asyncio.Future[None]] = set()

    def begin(self, grace_s: float) -> None:
        """Shutdown begins (called on the event loop; again for every open connection: only the first counts)."""
        SHUTTING_DOWN.set()
        if self.deadline is not None:
            return
        self.deadline = time.monotonic() + grace_s
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def reset(self) -> None:
        SHUTTING_DOWN.clear()
        self.deadline = None

    async def wait_for_deadline(self) -> None:
        if self.deadline is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            try:
                await waiter
            finally:
                self._waiters.discard(waiter)
        assert self.deadline is not None
        await anyio.sleep(max(0.0, self.deadline - time.monotonic()))


DRAIN = Drain()


class _RequestLife:
    """What the guard must know of one request: has it answered, has it committed, was it ended by the guard."""

    def __init__(self, send: Send) -> None:
        self.raw_send = send
        self.answered = self.committed = self.expired = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.answered = True
        await self.raw_send(message)


_LIFE: contextvars.ContextVar[_RequestLife | None] = contextvars.ContextVar("supir_request_life", default=None)


async def commit() -> None:
    """The running request passes its point of no return: from here a shutdown lets it finish and answer
    (its own bounds apply), rather than refusing it with a 503 its client would retry."""
    # a refusal already decided (the deadline passed during a thread call) is delivered here, before any change
    await anyio.lowlevel.checkpoint()
    life = _LIFE.get()
    if life is not None:
        life.committed = True


async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
    metrics.REJECTED.labels("shutting_down").inc()
    message = "this server is shutting down and did not act on the request; send it again"
    headers = {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"}
    await error_response("shutting_down", message, headers=headers)(scope, receive, send)


class ShutdownGuard:
    """Pure ASGI middleware applying the rules above to every request but the probes and admin routes."""

    def __init__(self, app: ASGIApp, drain: Drain = DRAIN) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNGUARDED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.deadline is not None:
            await refuse(scope, receive, send)
            return
        life = _RequestLife(send)
        token = _LIFE.set(life)
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._expire, life, tasks.cancel_scope)
                await self.app(scope, receive, life.send)
                tasks.cancel_scope.cancel()  # answered: the watch ends
        finally:
            _LIFE.reset(token)
        if life.expired:
            await refuse(scope, receive, send)

    async def _expire(self, life: _RequestLife, request: anyio.CancelScope) -> None:
        await self.drain.wait_for_deadline()
        if not life.answered and not life.committed:
            life.expired = True
            request.cancel()  # its own cleanup runs (api.creation gives back quota slots and keys)
