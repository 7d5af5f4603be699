"""Load test of the job API: create and status calls from N concurrent clients (async httpx).

    python bench/load_api.py --spawn                    # start API + 1 worker on the tiny fixture model here
    python bench/load_api.py --url http://host:8000 --key sk_...   # against a running service

Phase 1 (jobs): each client creates a small job and polls it to the end, again and again, for --seconds.
Phase 2 (polls): each client polls one finished job as fast as it can, for --seconds.
Reports p50/p99 latency of create and status calls, polls per second, and per-job overhead beyond
compute (client-seen time from create to terminal status, minus the worker's own total seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PHOTO = (REPO / "tests" / "data" / "astronaut_gray.png").read_bytes()
PARAMS = json.dumps({"min_size": 64, "steps": 2, "seed": 0})


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def job_client(client: httpx.AsyncClient, until: float, out: dict[str, list[float]]) -> None:
    while time.perf_counter() < until:
        start = time.perf_counter()
        response = await client.post(
            "/v1/jobs", files={"image": ("a.png", PHOTO, "image/png")}, data={"params": PARAMS}
        )
        out["create"].append(time.perf_counter() - start)
        if response.status_code != 202:
            out["errors"].append(response.status_code)
            await asyncio.sleep(0.2)
            continue
        job_id = response.json()["id"]
        while True:
            t = time.perf_counter()
            job = (await client.get(f"/v1/jobs/{job_id}")).json()
            out["status"].append(time.perf_counter() - t)
            if job["status"] in ("succeeded", "failed", "canceled"):
                break
            await asyncio.sleep(0.02)
        if job["status"] == "succeeded":
            out["overhead"].append(time.perf_counter() - start - job["seconds"]["total"])
            out["jobs"].append(1.0)


async def poll_client(client: httpx.AsyncClient, job_id: str, until: float, out: list[float]) -> None:
    while time.perf_counter() < until:
        t = time.perf_counter()
        await client.get(f"/v1/jobs/{job_id}")
        out.append(time.perf_counter() - t)


async def run(url: str, key: str | None, clients: int, seconds: float) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=clients * 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as client:
        out: dict[str, list[float]] = {"create": [], "status": [], "overhead": [], "jobs": [], "errors": []}
        until = time.perf_counter() + seconds
        await asyncio.gather(*(job_client(client, until, out) for _ in range(clients)))
        finished = (await client.get("/v1/jobs", params={"status": "succeeded", "limit": 1})).json()["jobs"][0]["id"]
        polls: list[float] = []
        start = time.perf_counter()
        await asyncio.gather(*(poll_client(client, finished, start + seconds, polls) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ms = 1000.0
    return {
        "clients": clients,
        "seconds_per_phase": seconds,
        "jobs_completed": len(out["jobs"]),
        "create_ms": {
            "p50": pct(out["create"], 0.5) * ms,
            "p99": pct(out["create"], 0.99) * ms,
            "n": len(out["create"]),
        },
        "status_ms_during_jobs": {"p50": pct(out["status"], 0.5) * ms, "p99": pct(out["status"], 0.99) * ms},
        "polls_per_second": len(polls) / elapsed,
        "status_ms_polling": {"p50": pct(polls, 0.5) * ms, "p99": pct(polls, 0.99) * ms, "n": len(polls)},
        "overhead_per_job_ms": {
            "p50": pct(out["overhead"], 0.5) * ms,
            "p99": pct(out["overhead"], 0.99) * ms,
            "mean": statistics.fmean(out["overhead"]) * ms if out["overhead"] else None,
        },
        "errors": len(out["errors"]),
    }


@contextlib.contextmanager
def spawned(workers: int) -> Iterator[tuple[str, str]]:
    sys.path.insert(0, str(REPO))
    from tests.servers import running

    fixture = REPO / "tests" / "data" / "conformance" / "A"
    # the per-key limits are raised (and docs/service.md says so): the bench measures the service, not the limiter
    settings = {
        "rate_limit_per_minute": 10**7,
        "read_rate_limit_per_minute": 10**7,
        "max_active_jobs": 10**4,
        "progress_interval_s": 0.25,
    }
    with running(Path(tempfile.mkdtemp()), fixture, {"bench": {}}, api_workers=workers, **settings) as svc:
        yield svc.url, svc.keys["bench"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", default=os.environ.get("SUPIR_API_KEY"))
    parser.add_argument("--spawn", action="store_true", help="start API + one worker (tiny model) for the run")
    parser.add_argument("--api-workers", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()

    with spawned(args.api_workers) if args.spawn else contextlib.nullcontext((args.url, args.key)) as (url, key):
        results = [asyncio.run(run(url, key, n, args.seconds)) for n in args.clients]
    for r in results:
        create, status, overhead = r["create_ms"], r["status_ms_polling"], r["overhead_per_job_ms"]
        print(
            f"{r['clients']:>3} clients: create p50 {create['p50']:.1f} ms p99 {create['p99']:.1f} ms | "
            f"status p50 {status['p50']:.1f} ms p99 {status['p99']:.1f} ms, {r['polls_per_second']:.0f} polls/s | "
            f"{r['jobs_completed']} jobs, overhead p50 {overhead['p50']:.0f} ms p99 {overhead['p99']:.0f} ms | "
            f"errors {r['errors']}"
        )
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "load_api.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
