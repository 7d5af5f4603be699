"""Real servers for service tests: uvicorn serving the API, Celery worker processes, moto's S3 server.

Each Service gets its own Redis key prefix and Celery queue, so several can share the one Redis server.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from api.auth import hash_key
from tests.paths import DATA, REDIS_URL, REPO

WEBHOOK_SECRET = "whsec-test-secret"
BIN = Path(sys.executable).parent


def manifest_command(manifest: str, container: str, options: dict[str, str] | None = None) -> list[str]:
    """A container's command from deploy/k8s, so tests start processes exactly as the cluster does: the program
    from this venv, and only the given options' values replaced (each service's own queue, say)."""
    for doc in yaml.safe_load_all((REPO / "deploy" / "k8s" / manifest).read_text()):
        if doc and doc["kind"] == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                if c["name"] == container:
                    command = [*c["command"], *c.get("args", [])]
                    command[0] = str(BIN / command[0])
                    for option, value in (options or {}).items():
                        command = replace_option(command, option, value)
                    return command
    raise LookupError(f"no container {container} in {manifest}")


def replace_option(command: list[str], option: str, value: str) -> list[str]:
    at = command.index(option)  # ValueError: the manifest lost an option the tests rely on
    return [*command[: at + 1], value, *command[at + 2 :]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class Service:
    """API (uvicorn, real HTTP) + worker (celery prefork, 1 process) on the tiny fixture weights."""

    def __init__(
        self,
        tmp: Path,
        fixture: Path,
        keys: dict[str, dict],
        api_workers: int = 1,
        extra_env: dict[str, str] | None = None,
        **settings: object,
    ) -> None:
        self.tmp = tmp
        self.api_workers = api_workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_port = free_port()  # /metrics and /status (api.admin)
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.prefix = f"test-{uuid.uuid4().hex[:10]}"
        self.keys = {name: f"sk_test_{name}_{uuid.uuid4().hex}" for name in keys}
        api_keys = [{"id": name, "sha256": hash_key(self.keys[name]), **extra} for name, extra in keys.items()]
        self.env = {
            **os.environ,
            "SUPIR_REDIS_URL": REDIS_URL,
            "SUPIR_KEY_PREFIX": self.prefix,
            "SUPIR_QUEUE": self.prefix,
            "SUPIR_LOCAL_DIR": str(tmp / "objects"),
            "SUPIR_PUBLIC_URL": self.url,
            "SUPIR_API_ADMIN_PORT": str(self.admin_port),
            "SUPIR_API_KEYS": json.dumps(api_keys),
            "SUPIR_SDXL_CHECKPOINT": str(fixture / "sdxl.safetensors"),
            "SUPIR_CHECKPOINT": str(fixture / "supir.ckpt"),
            "SUPIR_MODEL_CONFIG": str(fixture / "config.json"),
            "SUPIR_DEVICE": "cpu",
            "SUPIR_DTYPE": "float32",
            "SUPIR_PROGRESS_INTERVAL_S": "0",
            "SUPIR_READ_RATE_LIMIT_PER_MINUTE": "1000000",  # tests poll; test_rate_limit uses a key of its own
            "SUPIR_WARMUP_SIZE": "64",  # the warm-up path runs in every service test (a fraction of a second)
            "SUPIR_RESULT_CACHE": "off",  # tests repeat requests and expect them to run; tests of the cache turn it on
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **{f"SUPIR_{k.upper()}": str(v) for k, v in settings.items()},
            **(extra_env or {}),
        }
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.webhooks: subprocess.Popen[bytes] | None = None  # the light worker: webhooks, on a queue of their own
        self._logs: list[object] = []

    def start(self, with_workers: bool = True) -> Service:
        """Returns once the API is ready and, with workers, a GPU worker has loaded (with_workers=False: the API
        alone; jobs stay queued)."""
        if with_workers:
            self.start_workers()
        log = open(self.tmp / f"api-{self.port}.log", "wb")  # noqa: SIM115 - lives as long as the server
        self._logs.append(log)
        self.api = subprocess.Popen(
            [sys.executable, "-m", "api.server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", str(self.api_workers)],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(lambda: self._answers("/readyz"), 90, 0.25, "/readyz to answer 200")
        if with_workers:
            wait_until(lambda: self.ready_workers() >= 1, 90, 0.25, "a ready GPU worker in /status")
        return self

    def start_workers(self) -> None:
        self.start_worker()
        log = open(self.tmp / "webhooks.log", "wb")  # noqa: SIM115
        self._logs.append(log)
        command = manifest_command("webhooks.yaml", "webhooks", {"--queues": f"{self.prefix}-webhooks"})
        command = replace_option(command, "--schedule", str(self.tmp / "beat-schedule"))
        self.webhooks = subprocess.Popen(
            [*command, "-n", f"{self.prefix}-webhooks@%h"],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def start_worker(self, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"worker-{len(self.workers)}.log", "wb")  # noqa: SIM115
        self._logs.append(log)
        # no queue on the command line: the worker consumes its variants' queues, named from SUPIR_QUEUE (the
        # prefix) by its settings, exactly as in the cluster
        command = manifest_command("worker.yaml", "worker")
        worker = subprocess.Popen(
            [*command, "-n", f"{self.prefix}-{len(self.workers)}@%h"],
            cwd=REPO, env={**self.env, **(extra_env or {})}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.workers.append(worker)
        return worker

    def kill_worker(self, worker: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and its pool process at once: no shutdown, no ack, no cleanup."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)

    def ready_workers(self, variant: str | None = None) -> int:
        """Ready GPU worker processes (serving `variant`, when named), as /status reports them."""
        try:
            status = httpx.get(f"{self.admin_url}/status", timeout=30).json()
        except (httpx.HTTPError, ValueError):
            return 0
        if variant is not None:
            return sum(int(v["workers"]) for v in status.get("variants") or [] if v["name"] == variant)
        return int(status["workers"]["ready"]) if status.get("workers") else 0

    def _answers(self, path: str) -> bool:
        try:
            return httpx.get(f"{self.url}{path}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        lights = [self.webhooks] if self.webhooks else []
        for worker in [*self.workers, *lights]:
            if worker.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.pid, signal.SIGTERM)
        if self.api is not None and self.api.poll() is None:
            self.api.terminate()
        for proc in [*self.workers, *lights, *([self.api] if self.api else [])]:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in self._logs:
            log.close()  # type: ignore[attr-defined]

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.tmp.glob("*.log")))


@contextlib.contextmanager
def running(
    tmp: Path,
    fixture: Path,
    keys: dict[str, dict],
    api_workers: int = 1,
    extra_env: dict[str, str] | None = None,
    with_workers: bool = True,
    **settings: object,
) -> Iterator[Service]:
    service = Service(tmp, fixture, keys, api_workers, extra_env, **settings)
    try:
        yield service.start(with_workers)
    finally:
        service.stop()


@contextlib.contextmanager
def serving(body: bytes, content_type: str) -> Iterator[str]:
    """A file over HTTP on loopback (a photo for image_url): its base URL; any path answers with it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def wait_for_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 60) -> dict:
    def check() -> dict | None:
        response = client.get(f"/v1/jobs/{job_id}")
        if response.status_code == 429:  # polling a slow job on a busy machine can outrun the key's rate limit
            return None
        job = response.json()
        return job if job["status"] in statuses else None

    return wait_until(check, timeout, 0.25, f"job {job_id} to reach {statuses}")


# a job of seconds on the tiny model, and one long enough to act on while it samples
FAST = {"min_size": 64, "steps": 3, "seed": 1}
SLOW = {"min_size": 256, "steps": 200, "seed": 1}  # long enough to act on while it samples


def photo(name: str = "chelsea_degraded.jpg") -> tuple[str, bytes, str]:
    data = (DATA / name).read_bytes()
    return name, data, "image/jpeg" if name.endswith(".jpg") else "image/png"


def submit(client: httpx.Client, params: dict, name: str = "chelsea_degraded.jpg", **fields: str) -> httpx.Response:
    return client.post("/v1/jobs", files={"image": photo(name)}, data={"params": json.dumps(params), **fields})


def process_tree(pid: int) -> list[int]:
    """The process and all its descendants (uvicorn's and Celery's pool processes), from /proc."""
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            queue += [int(child) for child in children]
    return pids


class RedisServer:
    """A redis-server of a test's own (AOF on, in its directory), for the faults that need one: restarts, policies."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.port = directory, free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(self._answers, 30, 0.1, "redis-server")

    def _answers(self) -> bool:
        ping = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, timeout=30)
        return ping.stdout.strip() == b"PONG"

    def stop(self, how: str) -> None:
        assert self.process is not None
        if how == "kill -9":
            self.process.send_signal(signal.SIGKILL)
        else:
            subprocess.run(["redis-cli", "-p", str(self.port), "shutdown"], check=False, timeout=30)
        self.process.wait(30)


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[tuple[str, Any]]:
    """A real S3 API (moto's server) on a free local port with `bucket` made: (endpoint, boto3 client)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    try:
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
        )
        client.create_bucket(Bucket=bucket)
        yield endpoint, client
    finally:
        server.stop()
