"""A Redis that may evict job records, and one that is full: a Redis server of the test's own (AOF on), its
`maxmemory-policy` and `maxmemory` set with CONFIG SET as an operator (or a managed Redis's parameter group) would.

An evicting policy deletes accepted jobs silently when Redis fills up, so production processes refuse to start on
one. With `noeviction` a full Redis refuses writes: the API refuses new jobs (503 queue_full) while a reserve below
maxmemory is left, so every accepted job still runs, ends and can be read."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.servers import FAST, RedisServer, Service, manifest_command, submit, wait_for_status, wait_until

PRODUCTION = {
    "SUPIR_ENVIRONMENT": "production",
    "SUPIR_SIGNING_SECRET": "s" * 48,
    "SUPIR_WEBHOOK_SECRET": "w" * 48,
}
RESERVE = 0.2  # SUPIR_REDIS_MEMORY_RESERVE of the flooded service
ROOM_BYTES = 300_000  # room above the warmed-up service: 10-30 creates (a job takes 4-10 KB, buffers ±100 KB)


def client_of(server: RedisServer) -> redis.Redis:
    return redis.Redis(port=server.port, socket_timeout=30)


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=Path(__file__).parents[2], env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru"])
def test_production_api_and_workers_refuse_to_start_on_an_evicting_redis(
    tmp_path: Path, fixture_a: Path, own_redis: RedisServer, policy: str
) -> None:
    """Injects: maxmemory-policy allkeys-lru or volatile-lru (the managed-Redis default; ended jobs' records carry
    TTLs). The API (`python -m api.server`), the GPU worker and the webhooks worker, started as the manifests start
    them, exit non-zero naming the setting and noeviction."""
    client_of(own_redis).config_set("maxmemory-policy", policy)
    service = Service(tmp_path, fixture_a, {"alice": {}}, redis_url=f"redis://127.0.0.1:{own_redis.port}/0")
    env = {**service.env, **PRODUCTION}
    commands = {
        "api": [sys.executable, "-m", "api.server", "--port", str(service.port)],
        "gpu-worker": manifest_command("worker.yaml", "worker"),
        "webhooks": manifest_command("webhooks.yaml", "webhooks", {"--schedule": str(tmp_path / "beat")}),
    }
    processes = {name: start(command, env, tmp_path / f"{name}.log") for name, command in commands.items()}
    try:
        codes = {name: process.wait(120) for name, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(30)
    logs = {name: (tmp_path / f"{name}.log").read_text(errors="replace") for name in commands}
    assert all(code != 0 for code in codes.values()), (codes, logs)
    for name, log in logs.items():
        assert f"maxmemory-policy is {policy}" in log and "noeviction" in log, (name, log[-2000:])
        assert "refuses to start (SUPIR_ENVIRONMENT=production)" in log, (name, log[-2000:])


def test_a_dev_api_on_an_evicting_redis_starts_and_says_so(
    tmp_path: Path, fixture_a: Path, own_redis: RedisServer
) -> None:
    """In dev the API starts (with an error in its log), and /status and the metrics report the policy."""
    client_of(own_redis).config_set("maxmemory-policy", "allkeys-lru")
    service = Service(tmp_path, fixture_a, {"alice": {}}, redis_url=f"redis://127.0.0.1:{own_redis.port}/0")
    try:
        service.start(with_workers=False)
        status = httpx.get(f"{service.admin_url}/status", timeout=30).json()
        metrics = httpx.get(f"{service.admin_url}/metrics", timeout=30).text
    finally:
        service.stop()
    assert status["redis"].startswith("evicting: maxmemory-policy allkeys-lru"), status["redis"]
    assert status["redis_memory"]["policy"] == "allkeys-lru"
    assert 'supir_redis_evicting_policy{policy="allkeys-lru"} 1.0' in metrics
    assert "supir_redis_evicted_keys_total" in metrics and "supir_redis_memory_used_bytes" in metrics
    assert "maxmemory-policy is allkeys-lru" in service.logs()


@pytest.fixture
def full_redis_service(tmp_path: Path, fixture_a: Path, own_redis: RedisServer) -> Iterator[Service]:
    """A service on a noeviction Redis whose maxmemory leaves ROOM_BYTES for new jobs above what it uses idle."""
    admin = client_of(own_redis)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 0)
    service = Service(
        tmp_path,
        fixture_a,
        {"alice": {"max_active_jobs": 1000}},
        redis_url=f"redis://127.0.0.1:{own_redis.port}/0",
        rate_limit_per_minute=100_000,
        redis_memory_reserve=RESERVE,
    )
    try:
        service.start()
        # a first burst opens the connections a flood uses (each holds buffers that count as used memory), so
        # that the room is then taken by jobs
        warm_up, _ = flood(service, limit=8)
        with service.client("alice") as client:
            for job_id in warm_up:
                wait_for_status(client, job_id, {"succeeded"}, timeout=300)
        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory", int((used + ROOM_BYTES) / (1 - RESERVE)))
        yield service
    finally:
        service.stop()
        admin.config_set("maxmemory", 0)


def flood(service: Service, clients: int = 4, limit: int = 400) -> tuple[list[str], list[httpx.Response]]:
    """Creates from several clients at once until each has been refused 3 times in a row, or `limit` requests:
    (ids of the jobs accepted, the refusals)."""
    accepted: list[str] = []
    refused: list[httpx.Response] = []
    lock = threading.Lock()

    def one_client() -> None:
        in_a_row = 0
        with service.client("alice") as client:
            while in_a_row < 3 and len(accepted) + len(refused) < limit:
                response = submit(client, FAST)
                with lock:
                    if response.status_code == 202:
                        accepted.append(response.json()["id"])
                        in_a_row = 0
                    else:
                        refused.append(response)
                        in_a_row += 1

    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return accepted, refused


def test_a_full_noeviction_redis_refuses_new_jobs_and_loses_none(
    full_redis_service: Service, own_redis: RedisServer
) -> None:
    """Injects: a noeviction Redis with little room, flooded with creates. 202s, then JSON 503 queue_full with
    Retry-After once Redis reaches maxmemory less the reserve; every accepted job ends succeeded. Then Redis is
    filled to maxmemory (it refuses writes): /status says `full`, creates get 503, every job still reads 200."""
    service, admin = full_redis_service, client_of(own_redis)
    started = time.monotonic()
    accepted, refused = flood(service)
    assert 5 <= len(accepted) < 300 and len(refused) >= 3, (len(accepted), len(refused))
    for response in refused:
        assert response.status_code == 503 and response.headers["retry-after"] == "30", response.text
        assert response.json()["error"]["code"] == "queue_full", response.text
    # jobs ending free memory, so the flood's last state may already have passed: hold Redis between the reserve's
    # line (80 %) and full, from outside the service, to read what /status says there
    nearly = f"{service.prefix}-nearly"
    while (lambda info: info["used_memory"] / info["maxmemory"])(admin.info("memory")) < 1 - RESERVE / 2:
        admin.append(nearly, b"x" * 20_000)
    status = httpx.get(f"{service.admin_url}/status", timeout=30).json()
    assert status["redis"] == "nearly full" and status["redis_memory"]["takes_jobs"] is False, status
    admin.delete(nearly)

    with service.client("alice") as client:

        def all_ended() -> list[dict] | None:
            jobs = [client.get(f"/v1/jobs/{job_id}").json() for job_id in accepted]
            return jobs if all(j["status"] in ("succeeded", "failed", "canceled") for j in jobs) else None

        jobs = wait_until(all_ended, 600, 1.0, "every accepted job to end")
        assert [j["status"] for j in jobs] == ["succeeded"] * len(accepted), [(j["status"], j["error"]) for j in jobs]
        ran_s = time.monotonic() - started

        # fill Redis to maxmemory from outside the service: Redis now refuses writes. The refused command's own
        # query buffer counted towards the limit and is freed after it, so Redis may rest a little below maxmemory
        # (seen: 98.2 %); hold it at the limit by lowering maxmemory to what it uses, less 64 KiB for keys that
        # expire meanwhile, as a full Redis stays
        filler = f"{service.prefix}-filler"
        while True:
            try:
                admin.append(filler, b"x" * 50_000)
            except redis.OutOfMemoryError:
                break
        maxmemory = int(admin.config_get("maxmemory")["maxmemory"])
        memory = admin.info("memory")
        admin.config_set(
            "maxmemory", min(maxmemory, memory["used_memory"] - memory.get("mem_not_counted_for_evict", 0) - 65536)
        )
        status = httpx.get(f"{service.admin_url}/status", timeout=30).json()
        assert status["redis"] == "full" and status["redis_memory"]["refuses_writes"] is True, status
        refusal = submit(client, FAST)
        assert refusal.status_code == 503 and refusal.json()["error"]["code"] == "queue_full", refusal.text
        assert refusal.headers["retry-after"] == "30"
        reads = [client.get(f"/v1/jobs/{job_id}") for job_id in accepted]
        assert [r.status_code for r in reads] == [200] * len(accepted), [r.text for r in reads if r.status_code != 200]

        # memory given back: the flood stopped at the reserve's line and its ended jobs' records stay until their
        # TTLs, so freeing the filler alone leaves Redis near that line (seen in CI: still refused); the operator
        # also grows the instance by half, and new jobs are taken again (the API reads INFO on each create)
        admin.delete(filler)
        admin.config_set("maxmemory", maxmemory * 3 // 2)
        assert submit(client, FAST).status_code == 202
    print(f"\n{len(accepted)} creates accepted, {len(refused)} refused; all accepted ended in {ran_s:.0f} s")
    print(json.dumps(status["redis_memory"]))
