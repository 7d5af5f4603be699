"""The processes started the way the Kubernetes manifests start them: the command, environment (the ConfigMap as
kustomize generates it, Secret, env) and volumes read from deploy/k8s, not retyped here. What cannot be the same on
this machine is substituted, and only that: each emptyDir is a fresh empty folder, a Secret volume a folder of its
keys' files, the cluster's Redis is the local one, the Secret's placeholders get real values (as an operator's
would), the port is a free one."""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from jobs.store import JobStore
from tests.deploy.kustomize import rendered
from tests.paths import redis_url
from tests.servers import REPO, free_port, manifest_command, process_tree, wait_until
from worker.health import ready_file_text

K8S = REPO / "deploy" / "k8s"
REDIS_URL = redis_url(15)  # a database of its own: the manifests use the default key prefix


def container(manifest: str, name: str) -> dict:
    """The container's spec (tests.servers.manifest_command takes its command)."""
    for doc in yaml.safe_load_all((K8S / manifest).read_text()):
        if doc and doc["kind"] == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                if c["name"] == name:
                    return c
    raise LookupError(f"no container {name} in {manifest}")


def secret_volumes(manifest: str) -> dict[str, str]:
    """The Deployment's Secret volumes: volume name → Secret name."""
    for doc in yaml.safe_load_all((K8S / manifest).read_text()):
        if doc and doc["kind"] == "Deployment":
            volumes = doc["spec"]["template"]["spec"].get("volumes", [])
            return {v["name"]: v["secret"]["secretName"] for v in volumes if "secret" in v}
    raise LookupError(f"no Deployment in {manifest}")


@cache
def config_map(name: str) -> dict[str, str]:
    """A ConfigMap's data as `kubectl kustomize` generates it (named `<name>-<hash of its data>`)."""
    for doc in rendered():
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].rsplit("-", 1)[0] == name:
            return dict(doc["data"])
    raise LookupError(f"no ConfigMap {name} in the rendered manifests")


def manifest_env(c: dict, mounts: dict[str, Path]) -> dict[str, str]:
    """The container's environment: envFrom the ConfigMap and the example Secret, then env; paths on mounted
    volumes moved to their stand-in folders."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_map(source["configMapRef"]["name"]))
        if "secretRef" in source:
            env.update(operator_secret(source["secretRef"]["name"]))
    env.update({e["name"]: str(e["value"]) for e in c.get("env", []) if "value" in e})
    for key, value in env.items():
        for mount, folder in mounts.items():
            if value == mount or value.startswith(mount.rstrip("/") + "/"):
                env[key] = str(folder) + value[len(mount.rstrip("/")) :]
    env["SUPIR_REDIS_URL"] = REDIS_URL
    return env


API_KEY = "sk_" + secrets.token_urlsafe(32)


def operator_secret(name: str) -> dict[str, str]:
    """A Secret of secret.example.yaml with its placeholders filled in, as its comment tells an operator to (no
    S3 keys: the pod's identity would serve; no Redis password: the local Redis has none)."""
    examples = {
        doc["metadata"]["name"]: doc["stringData"]
        for doc in yaml.safe_load_all((K8S / "secret.example.yaml").read_text())
    }
    filled = {key: secrets.token_urlsafe(48) for key in examples[name]}
    filled.pop("SUPIR_REDIS_PASSWORD", None)
    for keys in ("SUPIR_API_KEYS", "keys.json") & filled.keys():  # as an env var or a mounted file
        filled[keys] = f'[{{"id": "app", "sha256": "{hashlib.sha256(API_KEY.encode()).hexdigest()}"}}]'
    return filled


@pytest.fixture
def clean_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


class Api:
    def __init__(self, tmp: Path) -> None:
        self.c = container("api.yaml", "api")
        self.mounts = {m["mountPath"]: tmp / m["name"] for m in self.c.get("volumeMounts", [])}
        self.secrets = secret_volumes("api.yaml")
        for folder in self.mounts.values():
            folder.mkdir(exist_ok=True)  # an emptyDir: empty, nothing made in it beforehand
        for volume, secret in self.secrets.items():
            for key, value in operator_secret(secret).items():
                (tmp / volume / key).write_text(value)  # a Secret volume: a file per key
        self.env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", **manifest_env(self.c, self.mounts)}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env["SUPIR_API_ADMIN_PORT"] = str(free_port())  # the manifest's, made a free one
        self.admin_url = f"http://127.0.0.1:{self.env['SUPIR_API_ADMIN_PORT']}"
        self.log = tmp / "api.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            argv = manifest_command("api.yaml", "api", {"--port": str(self.port)})
            self.proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log, stderr=log)
        try:
            wait_until(self.answers, 90, 0.2, "the API to answer /healthz")
        except BaseException:
            self.stop()  # a server that never came up must not outlive the test
            raise AssertionError(f"the API did not come up; log:\n{self.logs()}") from None

    def answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"the API exited:\n{self.logs()}"
        try:
            return httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def test_the_api_runs_with_the_manifests_environment_on_an_empty_tmp(tmp_path: Path, clean_redis: redis.Redis) -> None:
    api = Api(tmp_path)
    assert "PROMETHEUS_MULTIPROC_DIR" in api.env and api.env["SUPIR_ENVIRONMENT"] == "production"
    assert all(not list(f.iterdir()) for f in api.mounts.values() if f.name not in api.secrets)  # emptyDirs
    assert "SUPIR_API_KEYS_FILE" in api.env and "SUPIR_API_KEYS" not in api.env  # the keys: a mounted file
    api.start()
    try:
        # no GPU worker anywhere: ready all the same (clients can create and poll jobs)
        ready = httpx.get(f"{api.url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        status = httpx.get(f"{api.admin_url}/status", timeout=30).json()
        assert status["redis"] == "ok" and status["workers"]["ready"] == 0
        for _ in range(20):  # spread over both uvicorn worker processes
            assert httpx.get(f"{api.admin_url}/metrics", timeout=10).status_code == 200
        metrics = httpx.get(f"{api.admin_url}/metrics", timeout=10).text
        assert "supir_http_requests_total" in metrics and "supir_redis_up 1.0" in metrics
        assert 'supir_workers{state="ready"} 0.0' in metrics
        authorized = httpx.get(f"{api.url}/v1/jobs", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
        assert authorized.status_code == 200, authorized.text

        # a worker process beats as ready: readiness is unchanged, /status and the metrics see it
        JobStore(clean_redis, "supir").heartbeat("gpu-node:4242", "ready", ttl_s=30)
        assert httpx.get(f"{api.url}/readyz", timeout=10).status_code == 200
        assert httpx.get(f"{api.admin_url}/status", timeout=30).json()["workers"]["ready"] == 1
        assert 'supir_workers{state="ready"} 1.0' in httpx.get(f"{api.admin_url}/metrics", timeout=10).text
    finally:
        api.stop()

    # the container restarts in the same pod: the emptyDir keeps the dead processes' metric files
    metrics_dir = Path(api.env["PROMETHEUS_MULTIPROC_DIR"])
    assert list(metrics_dir.glob("*.db"))
    api.start()
    try:
        text = httpx.get(f"{api.admin_url}/metrics", timeout=10).text
        served = [line for line in text.splitlines() if line.startswith('supir_http_requests_total{method="GET"')]
        counts = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1]) for line in served}
        # the earlier life's 20+ scrapes are not counted again: only this life's requests
        assert all(value <= 2 for value in counts.values()), counts
    finally:
        api.stop()


def test_the_worker_runs_as_the_manifest_starts_it(tmp_path: Path, clean_redis: redis.Redis, fixture_a: Path) -> None:
    """worker.yaml's command and environment on the tiny weights: not ready until the weights are loaded, even with
    a ready file left by an earlier container life in /tmp (the emptyDir outlives a restart) naming a live
    process; a SIGKILLed pool process makes it not ready (yet live) until a replacement has loaded."""
    c = container("worker.yaml", "worker")
    mounts = {m["mountPath"]: tmp_path / m["name"] for m in c["volumeMounts"]}
    for folder in mounts.values():
        folder.mkdir()
    env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", **manifest_env(c, mounts)}
    # the weights volume holds the files the ConfigMap names: here the tiny fixture's, with its architecture
    Path(env["SUPIR_SDXL_CHECKPOINT"]).symlink_to(fixture_a / "sdxl.safetensors")
    Path(env["SUPIR_CHECKPOINT"]).symlink_to(fixture_a / "supir.ckpt")
    health, metrics = free_port(), free_port()
    env |= {
        "SUPIR_MODEL_CONFIG": str(fixture_a / "config.json"),
        "SUPIR_WORKER_HEALTH_PORT": str(health),
        "SUPIR_WORKER_METRICS_PORT": str(metrics),
        "SUPIR_WARMUP_SIZE": "512",  # loading takes seconds here, as real weights take minutes
    }
    stale = mounts["/tmp"] / "supir-worker-ready"
    stale.write_text(ready_file_text(os.getpid()))  # an earlier life's ready file, naming a live process (this one)
    env["SUPIR_READY_FILE"] = str(stale)
    log = tmp_path / "worker.log"

    def probe(*args: str, port: int = health) -> bool:
        """Compose's health check; with port 0 it reads the ready file instead."""
        command = [sys.executable, "-m", "worker.health", *args]
        probe_env = {**env, "SUPIR_WORKER_HEALTH_PORT": str(port)}
        return subprocess.run(command, env=probe_env, cwd=REPO, timeout=60).returncode == 0

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{health}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    with open(log, "wb") as out:
        worker = subprocess.Popen(
            manifest_command("worker.yaml", "worker"), cwd=REPO, env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        wait_until(lambda: _answers(health), 120, 0.1, "the health port")
        # loading: not ready, whatever the old file said (the main process removed it before forking)
        assert not ready() and not probe() and not probe(port=0), log.read_text()
        assert probe("--live")
        wait_until(ready, 180, 0.2, f"the weights to load; log:\n{log.read_text()[-3000:]}")
        assert probe() and probe("--live") and probe(port=0)
        pool = process_tree(worker.pid)[1:]
        assert len(pool) == 1
        os.kill(pool[0], signal.SIGKILL)
        wait_until(lambda: not ready(), 30, 0.05, "not ready once the pool process is gone")
        assert probe("--live")  # reloading is progress, not a reason to restart the container
        wait_until(ready, 180, 0.2, "a replacement pool process to load")
        assert process_tree(worker.pid)[1:] != pool
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(30)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/livez", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
