"""Event streams (api.events): resume with Last-Event-ID, many open streams, queue positions, the per-key cap."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from api.events import MAX_STREAMS_PER_KEY
from tests.servers import Service, submit, wait_for_status

SLOW = {"min_size": 256, "steps": 200, "seed": 1}  # minutes on CPU: canceled at the end of each test


def read_events(response: httpx.Response) -> list[tuple[int | None, dict]]:
    """(id, job) per event until the stream ends; id None for an event without an `id:` line."""
    events: list[tuple[int | None, dict]] = []
    event_id: int | None = None
    for line in response.iter_lines():
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("data: "):
            events.append((event_id, json.loads(line[6:])))
            event_id = None
    return events


def cancel_all(client: httpx.Client, ids: list[str]) -> None:
    for job_id in ids:
        client.post(f"/v1/jobs/{job_id}/cancel")
    for job_id in ids:
        wait_for_status(client, job_id, {"canceled", "succeeded", "failed"}, timeout=120)


def test_a_dropped_stream_resumes_without_missing_a_change(service: Service) -> None:
    with service.client("alice") as client:
        job = submit(client, {"min_size": 64, "steps": 8, "seed": 1}).json()
        first: list[tuple[int | None, dict]] = []
        event_id: int | None = None
        # drop the connection at the first sampler step, mid-job
        with client.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("id: "):
                    event_id = int(line[4:])
                elif line.startswith("data: "):
                    first.append((event_id, json.loads(line[6:])))
                    event_id = None
                    seen = first[-1][1]
                    if seen["progress"]["stage"] == "sampling" or seen["status"] in ("succeeded", "failed"):
                        break
        last = max(i for i, _ in first if i is not None)
        headers = {"Last-Event-ID": str(last)}
        with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=headers, timeout=120) as response:
            second = read_events(response)
    numbered = [i for i, _ in first + second if i is not None]
    assert numbered == sorted(set(numbered)), f"ids must strictly increase across both connections: {numbered}"
    assert all(i > last for i, _ in second if i is not None)
    statuses = [e["status"] for _, e in first + second]
    assert statuses[-1] == "succeeded", statuses
    assert sum(s in ("succeeded", "failed", "canceled") for s in statuses) == 1, statuses
    steps = [e["progress"]["step"] for _, e in first + second if e["progress"]["stage"] == "sampling"]
    assert steps and max(steps) == 8


@contextlib.asynccontextmanager
async def open_streams(service: Service, key: str, job_id: str, count: int) -> AsyncIterator[list[httpx.Response]]:
    """`count` event streams of one job, each open and past its first event."""
    headers = {"Authorization": f"Bearer {service.keys[key]}"}
    limits = httpx.Limits(max_connections=count + 5, max_keepalive_connections=0)
    async with (
        httpx.AsyncClient(base_url=service.url, headers=headers, timeout=60, limits=limits) as client,
        contextlib.AsyncExitStack() as stack,
    ):
        readers: list[AsyncIterator[str]] = []  # kept: a line reader dropped mid-stream closes its connection

        async def one() -> httpx.Response:
            response = await stack.enter_async_context(client.stream("GET", f"/v1/jobs/{job_id}/events"))
            assert response.status_code == 200, await response.aread()
            readers.append(response.aiter_lines())
            async for line in readers[-1]:
                if line.startswith("data: "):
                    break
            return response

        responses = []
        for _ in range(count):  # one at a time: AsyncExitStack is not for concurrent entries
            responses.append(await one())
        yield responses


def test_sixty_open_streams_leave_the_api_answering(service: Service) -> None:
    keys = ["alice", "bob", "carol"]
    jobs: dict[str, str] = {}
    for key in keys:
        with service.client(key) as client:
            jobs[key] = submit(client, SLOW).json()["id"]
    per_key = 60 // len(keys)
    assert per_key <= MAX_STREAMS_PER_KEY

    async def main() -> tuple[int, int]:
        async with contextlib.AsyncExitStack() as stack:
            for key in keys:
                await stack.enter_async_context(open_streams(service, key, jobs[key], per_key))
            async with httpx.AsyncClient(base_url=service.url, timeout=10) as probe:
                health = await probe.get("/healthz")
                headers = {"Authorization": f"Bearer {service.keys['alice']}"}
                job = await probe.get(f"/v1/jobs/{jobs['alice']}", headers=headers)
            return health.status_code, job.status_code

    try:
        assert asyncio.run(main()) == (200, 200)
    finally:
        for key in keys:
            with service.client(key) as client:
                cancel_all(client, [jobs[key]])


def test_queue_position_updates_while_a_job_waits(service: Service) -> None:
    with service.client("bob") as client:
        ids = [submit(client, SLOW).json()["id"] for _ in range(3)]
        try:
            wait_for_status(client, ids[0], {"running"}, timeout=120)
            positions: list[Any] = []
            with client.stream("GET", f"/v1/jobs/{ids[2]}/events", timeout=60) as response:
                canceled = False
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    job = json.loads(line[6:])
                    positions.append(job["queue_position"])
                    if not canceled:
                        # the job ahead leaves the queue: only the position poll can notice (no change to ids[2])
                        client.post(f"/v1/jobs/{ids[1]}/cancel")
                        canceled = True
                    elif job["queue_position"] is not None and job["queue_position"] < positions[0]:
                        break
            assert positions[0] is not None and positions[-1] == positions[0] - 1, positions
        finally:
            cancel_all(client, ids)


def test_open_streams_per_key_are_capped(service: Service) -> None:
    with service.client("mallory") as client:
        job_id = submit(client, SLOW).json()["id"]

    async def main() -> tuple[int, str, int]:
        async with open_streams(service, "mallory", job_id, MAX_STREAMS_PER_KEY) as streams:
            headers = {"Authorization": f"Bearer {service.keys['mallory']}"}
            async with httpx.AsyncClient(base_url=service.url, headers=headers, timeout=30) as extra:
                over = await extra.get(f"/v1/jobs/{job_id}/events")
                await streams[0].aclose()  # a closed stream gives its slot back
                await asyncio.sleep(1.0)
                async with extra.stream("GET", f"/v1/jobs/{job_id}/events") as again:
                    reopened = again.status_code
        return over.status_code, over.json()["error"]["code"], reopened

    try:
        assert asyncio.run(main()) == (429, "rate_limited", 200)
    finally:
        with service.client("mallory") as client:
            cancel_all(client, [job_id])
