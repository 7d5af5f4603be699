"""api.shutdown's guard on a small ASGI app, with the shutdown begun by hand at a chosen moment: at the deadline
a request past its point of no return (`commit()`) finishes with its own answer, one before it is cancelled (its
cleanup runs) and answered 503 `shutting_down`; a request that begins after shutdown began is refused at once.
(tests/faults/test_api_shutdown.py drives the real server with SIGTERM.) About 2 s."""

from __future__ import annotations

import asyncio
import time

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api.shutdown import Drain, ShutdownGuard, commit


def test_at_the_deadline_committed_requests_finish_and_the_others_get_a_retryable_503() -> None:
    cleaned: list[str] = []

    async def committed(request: Request) -> JSONResponse:
        await commit()
        await anyio.sleep(1.0)  # past the deadline: storing its job, say
        return JSONResponse({"made": True}, status_code=202)

    async def uncommitted(request: Request) -> JSONResponse:
        try:
            await anyio.sleep(30)  # a body still arriving, say
        finally:
            cleaned.append("uncommitted")
        return JSONResponse({"made": True}, status_code=202)

    drain = Drain()
    routes = [Route("/committed", committed, methods=["POST"]), Route("/uncommitted", uncommitted, methods=["POST"])]
    app = ShutdownGuard(Starlette(routes=routes), drain)

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            running = [asyncio.create_task(client.post(path)) for path in ("/committed", "/uncommitted")]
            await asyncio.sleep(0.3)
            drain.begin(0.5)
            late = await client.post("/committed")  # begins after shutdown began
            return [*(await asyncio.gather(*running)), late]

    started = time.monotonic()
    done, refused, late = asyncio.run(main())
    assert done.status_code == 202 and done.json() == {"made": True}
    for response in (refused, late):
        assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down", response.text
        assert int(response.headers["retry-after"]) > 0 and response.headers["connection"] == "close"
    assert cleaned == ["uncommitted"]
    assert time.monotonic() - started < 10  # the uncommitted one did not sleep its 30 s
