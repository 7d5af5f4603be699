"""Worker failures with real processes: pool processes and whole workers killed mid-job, a photo that kills its
worker every time, a warm shutdown, and a burst of jobs. Two Celery workers share one queue; each test names the
failure it injects. Exactly-once is checked on the job's own event channel: one terminal event, never two."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from tests.paths import REDIS_URL
from tests.servers import FAST, REPO, Service, free_port, submit, wait_for_status, wait_until

SLOW = {"min_size": 128, "steps": 40, "seed": 1}  # a few seconds of sampling: time to act while it runs
LOST_AFTER_S = 6


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, fixture_a: Path) -> Iterator[Service]:
    ports = [free_port(), free_port()]
    tmp = tmp_path_factory.mktemp("worker-faults")
    service = Service(
        tmp,
        fixture_a,
        {"alice": {"max_active_jobs": 1000}},
        rate_limit_per_minute=100_000,
        worker_health_port=ports[0],
        worker_lost_after_s=LOST_AFTER_S,
        ready_file=tmp / "ready-0",
        # loading takes seconds here, as real weights take minutes: longer than Celery's default 4-s start-up timer
        warmup_size=512,
    )
    service.health_ports = {}  # type: ignore[attr-defined]
    try:
        service.start()
        service.health_ports[service.workers[0].pid] = ports[0]  # type: ignore[attr-defined]
        second = service.start_worker(
            {"SUPIR_WORKER_HEALTH_PORT": str(ports[1]), "SUPIR_READY_FILE": str(tmp / "ready-1")}
        )
        service.health_ports[second.pid] = ports[1]  # type: ignore[attr-defined]
        wait_until(lambda: worker_ready(service, second.pid), 120, 0.25, "the second worker")
        yield service
    finally:
        service.stop()


def worker_env(service: Service, health_port: int) -> dict[str, str]:
    """A further worker's own health port and ready file (ready-<its index>)."""
    index = len(service.workers)
    return {"SUPIR_WORKER_HEALTH_PORT": str(health_port), "SUPIR_READY_FILE": str(service.tmp / f"ready-{index}")}


def worker_ready(service: Service, worker_pid: int) -> bool:
    port = service.health_ports[worker_pid]  # type: ignore[attr-defined]
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def probe_passes(service: Service, worker_pid: int, *args: str, via_file: bool = False) -> bool:
    """Compose's health check, `python -m worker.health [--live]`: it asks the worker's health port, or, with no
    port, reads the worker's ready file."""
    index = [w.pid for w in service.workers].index(worker_pid)
    port = "0" if via_file else str(service.health_ports[worker_pid])  # type: ignore[attr-defined]
    env = {**service.env, "SUPIR_READY_FILE": str(service.tmp / f"ready-{index}"), "SUPIR_WORKER_HEALTH_PORT": port}
    command = [sys.executable, "-m", "worker.health", *args]
    return subprocess.run(command, env=env, cwd=REPO, timeout=60).returncode == 0


def redis_client() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL, decode_responses=True)


def holder_pid(service: Service, job_id: str, killed: frozenset[int] = frozenset()) -> int:
    """The pool process whose beat names job_id (its name is host:pid), other than those already killed: a killed
    process's beat outlives it by up to LOST_AFTER_S, and its pid (a zombie until reaped) still takes signals."""
    r = redis_client()

    def find() -> int | None:
        for key in r.scan_iter(f"{service.prefix}:worker:*"):
            beat = r.get(key)
            pid = int(key.rpartition(":")[2])
            if beat and json.loads(beat).get("job") == job_id and pid not in killed:
                return pid
        return None

    return int(wait_until(find, 120, 0.1, f"a worker process running {job_id}"))


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rpartition(")")[2].split()[1])


class Terminals:
    """Every record published on a job's event channel, collected from a subscription opened before it runs."""

    def __init__(self, service: Service, job_id: str) -> None:
        self.statuses: list[str] = []
        self._pubsub = redis_client().pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(f"{service.prefix}:events:{job_id}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.5)
            if message is not None:
                self.statuses.append(json.loads(message["data"])["status"])

    def terminal(self) -> list[str]:
        time.sleep(1.0)  # let late duplicates, if any, arrive
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()
        return [s for s in self.statuses if s in ("succeeded", "failed", "canceled")]


def submit_running(client: httpx.Client, service: Service, params: dict) -> tuple[str, Terminals]:
    job = submit(client, params).json()
    events = Terminals(service, job["id"])
    wait_until(
        lambda: client.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"] >= 1, 120, 0.1, "sampling to start"
    )
    return job["id"], events


def test_sigkill_of_the_pool_process_mid_job_runs_the_job_once_on_a_fresh_process(svc: Service) -> None:
    """Injects: SIGKILL of the pool process while it samples (as an OOM kill, SIGBUS or CUDA crash would).
    Celery's default 4 s start-up timer used to kill every replacement while it loaded the weights."""
    with svc.client("alice") as client:
        # 200 steps: the readiness probes below run first, and on a busy machine 40 steps could end before the kill
        job_id, events = submit_running(client, svc, {**SLOW, "steps": 200})
        child = holder_pid(svc, job_id)
        worker = parent_of(child)
        assert worker_ready(svc, worker) and probe_passes(svc, worker) and probe_passes(svc, worker, via_file=True)
        assert probe_passes(svc, worker, "--live")
        os.kill(child, signal.SIGKILL)
        # not ready from the moment the process dies until a replacement has loaded (seconds at least)
        wait_until(lambda: not worker_ready(svc, worker), 30, 0.05, "the worker to report not ready")
        assert not probe_passes(svc, worker) or worker_ready(svc, worker)
        assert not probe_passes(svc, worker, via_file=True) or worker_ready(svc, worker)  # it names the dead pid
        assert probe_passes(svc, worker, "--live")  # reloading is progress: not a reason to restart the pod
        job = wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=90)
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        assert events.terminal() == ["succeeded"]
        assert client.get(f"/v1/jobs/{job_id}/result").status_code == 200
        wait_until(lambda: worker_ready(svc, worker), 120, 0.25, "the replacement pool process")
        assert probe_passes(svc, worker) and probe_passes(svc, worker, via_file=True)


def test_a_photo_that_kills_its_worker_every_time_fails_worker_lost_and_the_next_job_runs(svc: Service) -> None:
    """Injects: SIGKILL of whichever pool process runs the job, every time it runs (a poison photo)."""
    with svc.client("alice") as client:
        job_id, events = submit_running(client, svc, SLOW)
        killed: set[int] = set()
        while True:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "canceled"):
                break
            kills = len(killed)
            if job["status"] == "running" and job["attempts"] > kills and job["progress"]["step"] >= 1:
                with contextlib.suppress(TimeoutError, ProcessLookupError):
                    pid = holder_pid(svc, job_id, frozenset(killed))
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
            assert len(killed) <= 3, "the job ran a fourth time"
            time.sleep(0.1)
        kills = len(killed)
        assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
        assert kills == 3 and job["attempts"] == 3
        assert "/" not in job["error"]["message"]
        assert events.terminal() == ["failed"]
        after = submit(client, FAST).json()
        assert wait_for_status(client, after["id"], {"succeeded", "failed"}, timeout=120)["status"] == "succeeded"


def test_a_whole_worker_killed_mid_job_is_requeued_by_the_reaper_within_a_minute(svc: Service) -> None:
    """Injects: SIGKILL of a worker's main and pool processes together (a node lost): the broker would hold the
    unacknowledged job until the visibility timeout (40 min); the reaper on the other worker requeues it."""
    with svc.client("alice") as client:
        job_id, events = submit_running(client, svc, SLOW)
        child = holder_pid(svc, job_id)
        worker = next(w for w in svc.workers if w.pid == parent_of(child))
        killed_at = time.monotonic()
        svc.kill_worker(worker)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"  # nothing ends it but the reaper
        job = wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=120)
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        assert time.monotonic() - killed_at < 120
        assert events.terminal() == ["succeeded"]
        results = [p.name for p in (svc.tmp / "objects" / "results").iterdir() if p.name.startswith(job_id)]
        assert results == [f"{job_id}.png"]  # the second run wrote the result the first would have: one file
        time.sleep(1)
        assert client.get(f"/v1/jobs/{job_id}").json()["finished_at"] == job["finished_at"]  # ended once
    port = svc.health_ports.pop(worker.pid)  # type: ignore[attr-defined]
    replacement = svc.start_worker(worker_env(svc, port))
    svc.health_ports[replacement.pid] = port  # type: ignore[attr-defined]


BURST = 48  # 6 creates per client: enough to race the creates and keep both workers' prefetch full


def test_a_burst_of_jobs_all_end_once_and_every_success_has_one_result(svc: Service) -> None:
    """Injects: 48 creates at once from 8 clients onto two workers; nothing may be lost, stuck or doubled."""
    quick = {"min_size": 64, "steps": 1, "seed": 3}
    with svc.client("alice") as client:
        with ThreadPoolExecutor(8) as pool:
            created = list(pool.map(lambda _: submit(client, quick), range(BURST)))
        assert [r.status_code for r in created] == [202] * BURST
        ids = [r.json()["id"] for r in created]
        assert len(set(ids)) == BURST
        jobs = [wait_for_status(client, i, {"succeeded", "failed", "canceled"}, timeout=600) for i in ids]
    assert {j["status"] for j in jobs} == {"succeeded"}
    assert {j["attempts"] for j in jobs} == {1}, "a job ran twice"
    results = list((svc.tmp / "objects" / "results").glob("*.png"))
    ours = [p for p in results if p.stem in set(ids)]
    assert len(ours) == BURST


def test_sigterm_mid_job_finishes_the_job_then_exits(svc: Service) -> None:
    """Injects: SIGTERM to a worker's main process while its job samples (a rollout or scale-in). Documented
    behaviour: warm shutdown; the worker takes no new job, finishes the one it runs, then exits."""
    with svc.client("alice") as client:
        job_id, events = submit_running(client, svc, SLOW)
        worker = next(w for w in svc.workers if w.pid == parent_of(holder_pid(svc, job_id)))
        os.kill(worker.pid, signal.SIGTERM)
        job = wait_for_status(client, job_id, {"succeeded", "failed", "canceled"}, timeout=120)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        assert events.terminal() == ["succeeded"]
        worker.wait(120)
