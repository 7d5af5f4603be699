"""Redis behind Sentinel, with a password, and a failover while the service runs: real redis-server processes
(a master, a replica, one Sentinel), the API and a GPU worker on the tiny weights, configured only through the
settings an operator would set (SUPIR_REDIS_SENTINELS, SUPIR_REDIS_PASSWORD)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.paths import DATA
from tests.servers import free_port, running, wait_for_status, wait_until

PASSWORD = "s3ntinel-test-password"
FAST = {"min_size": 64, "steps": 3, "seed": 1}


class RedisGroup:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports = {"a": free_port(), "b": free_port()}
        self.sentinel_port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> RedisGroup:
        auth = ["--requirepass", PASSWORD, "--masterauth", PASSWORD, "--save", "", "--appendonly", "no"]
        a, b = self.ports["a"], self.ports["b"]
        self._spawn("a", ["redis-server", "--port", str(a), *auth])
        self._spawn("b", ["redis-server", "--port", str(b), "--replicaof", "127.0.0.1", str(a), *auth])
        config = self.tmp / "sentinel.conf"
        config.write_text(
            f"port {self.sentinel_port}\n"
            f"sentinel monitor mymaster 127.0.0.1 {a} 1\n"
            f"sentinel auth-pass mymaster {PASSWORD}\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
            "sentinel failover-timeout mymaster 5000\n"
        )
        self._spawn("sentinel", ["redis-server", str(config), "--sentinel"])
        wait_until(lambda: self._replicated(), 30, 0.1, "the replica to sync")
        wait_until(lambda: self.master_port() == a, 30, 0.1, "the Sentinel to see the master")
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.tmp / f"redis-{name}.log", "wb") as log:  # the process keeps its own descriptor
            self.procs.append(subprocess.Popen(argv, cwd=self.tmp, stdout=log, stderr=log))

    def _replicated(self) -> bool:
        try:
            info = redis.Redis(port=self.ports["b"], password=PASSWORD).info("replication")
        except redis.RedisError:
            return False
        return info.get("master_link_status") == "up"

    def sentinel(self) -> redis.Redis:
        return redis.Redis(port=self.sentinel_port, decode_responses=True)

    def master_port(self) -> int | None:
        try:
            found = self.sentinel().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
        except redis.RedisError:
            return None
        return int(found[1]) if found else None

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[RedisGroup]:
    redis_group = RedisGroup(tmp_path).start()
    try:
        yield redis_group
    finally:
        redis_group.stop()


def test_a_sentinel_failover_loses_no_job(tmp_path: Path, fixture_a: Path, group: RedisGroup) -> None:
    env = {
        "SUPIR_REDIS_URL": "redis://not-used:1/0",  # with Sentinels only its database number counts
        "SUPIR_REDIS_SENTINELS": f"127.0.0.1:{group.sentinel_port}",
        "SUPIR_REDIS_SENTINEL_MASTER": "mymaster",
        "SUPIR_REDIS_PASSWORD": PASSWORD,
    }
    photo = (DATA / "chelsea_degraded.jpg").read_bytes()

    def submit(client):  # type: ignore[no-untyped-def]
        files = {"image": ("photo.jpg", photo, "image/jpeg")}
        response = client.post("/v1/jobs", files=files, data={"params": json.dumps(FAST)})
        assert response.status_code == 202, response.text
        return response.json()["id"]

    (tmp_path / "svc").mkdir()
    with running(tmp_path / "svc", fixture_a, {"alice": {}}, extra_env=env) as svc, svc.client("alice") as client:
        first = submit(client)
        assert wait_for_status(client, first, {"succeeded", "failed"}, timeout=120)["status"] == "succeeded"

        group.sentinel().execute_command("SENTINEL", "FAILOVER", "mymaster")
        wait_until(lambda: group.master_port() == group.ports["b"], 60, 0.2, "the failover")
        failed_over = time.monotonic()

        # the API finds the new master (a create may meet the switch: a 503 is a retryable answer, not a loss)
        def created() -> str | None:
            response = client.post(
                "/v1/jobs",
                files={"image": ("photo.jpg", photo, "image/jpeg")},
                data={"params": json.dumps(FAST)},
            )
            return response.json()["id"] if response.status_code == 202 else None

        second = wait_until(created, 60, 0.5, "a create after the failover")
        # and so does the worker's broker connection: the job queued on the new master runs
        done = wait_for_status(client, second, {"succeeded", "failed"}, timeout=180)
        assert done["status"] == "succeeded", svc.logs()
        print(f"second job done {time.monotonic() - failed_over:.1f} s after the failover")
        assert client.get(f"/v1/jobs/{first}").json()["status"] == "succeeded"  # replicated before the switch
        assert httpx_ready(svc.url)


def httpx_ready(url: str) -> bool:
    import httpx

    return httpx.get(f"{url}/readyz", timeout=10).status_code == 200
