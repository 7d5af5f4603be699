"""Many open event streams on one API process: does the API still answer? (async httpx; prints JSON)

    python bench/sse_streams.py --spawn --streams 500          # API (1 process) + 1 worker on the tiny model here
    python bench/sse_streams.py --url http://host:8000 --key sk_a sk_b ...   # against a running service

Each key may hold api.events.MAX_STREAMS_PER_KEY open streams, so the streams are spread over the keys (--spawn
makes enough keys). Each key gets one slow job; its streams all follow that job (one runs, the rest wait in the
queue, so their streams also poll queue positions). With the streams open, /healthz and GET /v1/jobs/{id} are
timed one after the other for --seconds; the jobs are canceled at the end. Raise `ulimit -n` first: each stream
is a socket here, and a socket plus a Redis connection in the API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from api.events import MAX_STREAMS_PER_KEY  # noqa: E402

PHOTO = (REPO / "tests" / "data" / "astronaut_gray.png").read_bytes()
SLOW = json.dumps({"min_size": 256, "steps": 200, "seed": 0})  # outlasts the run on CPU; canceled after


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": round(pct(values, 0.5), 1), "p99": round(pct(values, 0.99), 1), "max": round(max(values), 1)}


async def follow(client: httpx.AsyncClient, job_id: str, opened: asyncio.Event, counts: dict[str, int]) -> None:
    """Hold one stream open, reading it, until cancelled."""
    try:
        async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            if response.status_code != 200:
                counts["refused"] += 1
                return
            counts["open"] += 1
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    counts["events"] += 1
                    opened.set()
    except httpx.HTTPError as exc:
        counts["failed"] += 1
        print(f"stream failed: {exc!r}", file=sys.stderr)
    finally:
        opened.set()


async def run(url: str, keys: list[str], streams: int, seconds: float) -> dict:
    per_key = math.ceil(streams / len(keys))
    if per_key > MAX_STREAMS_PER_KEY:
        raise SystemExit(f"{streams} streams need {math.ceil(streams / MAX_STREAMS_PER_KEY)} keys")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    clients = [
        httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {k}"}, timeout=60, limits=limits)
        for k in keys
    ]
    counts = {"open": 0, "refused": 0, "failed": 0, "events": 0}
    tasks: list[asyncio.Task[None]] = []
    jobs: list[tuple[httpx.AsyncClient, str]] = []
    try:
        for client in clients:
            files = {"image": ("a.png", PHOTO, "image/png")}
            created = await client.post("/v1/jobs", files=files, data={"params": SLOW})
            created.raise_for_status()
            jobs.append((client, created.json()["id"]))
        started = time.perf_counter()
        for i in range(streams):
            client, job_id = jobs[i // per_key]
            opened = asyncio.Event()
            tasks.append(asyncio.create_task(follow(client, job_id, opened, counts)))
            await asyncio.wait_for(opened.wait(), 60)  # one at a time: the time to open them all is measured too
        open_s = time.perf_counter() - started

        health: list[float] = []
        status: list[float] = []
        probe_client, probe_job = jobs[0]
        async with httpx.AsyncClient(base_url=url, timeout=30) as probe:
            until = time.perf_counter() + seconds
            while time.perf_counter() < until:
                t0 = time.perf_counter()
                (await probe.get("/healthz")).raise_for_status()
                t1 = time.perf_counter()
                (await probe_client.get(f"/v1/jobs/{probe_job}")).raise_for_status()
                t2 = time.perf_counter()
                health.append((t1 - t0) * 1000)
                status.append((t2 - t1) * 1000)
                await asyncio.sleep(0.05)
        still_open = sum(not t.done() for t in tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client, job_id in jobs:
            with contextlib.suppress(httpx.HTTPError):
                await client.post(f"/v1/jobs/{job_id}/cancel")
        for client in clients:
            await client.aclose()
    return {
        "streams": streams,
        "keys": len(keys),
        "opened": counts["open"],
        "refused": counts["refused"],
        "failed": counts["failed"],
        "still_open_at_end": still_open,
        "seconds_to_open_all": round(open_s, 1),
        "events_received": counts["events"],
        "probes": len(health),
        "healthz_ms": summary(health),
        "get_job_ms": summary(status),
    }


@contextlib.contextmanager
def spawned(keys: int) -> Iterator[tuple[str, list[str]]]:
    from tests.servers import running

    fixture = REPO / "tests" / "data" / "conformance" / "A"
    settings: dict[str, Any] = {"rate_limit_per_minute": 10**7, "read_rate_limit_per_minute": 10**7}
    names: dict[str, dict] = {f"bench{i}": {} for i in range(keys)}
    with running(Path(tempfile.mkdtemp()), fixture, names, api_workers=1, **settings) as svc:
        yield svc.url, [svc.keys[n] for n in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", nargs="+", default=[os.environ.get("SUPIR_API_KEY", "")])
    parser.add_argument("--spawn", action="store_true", help="start API (one process) + one worker for the run")
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()

    keys_needed = math.ceil(args.streams / MAX_STREAMS_PER_KEY)
    source = spawned(keys_needed) if args.spawn else contextlib.nullcontext((args.url, args.key))
    with source as (url, keys):
        result = asyncio.run(run(url, keys, args.streams, args.seconds))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
