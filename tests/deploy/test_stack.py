"""The images and the local compose stack, for real: `make stack` (scripts/stack.sh) builds the images on this
machine (scripts/images.sh; layer cache makes a second run quick), starts docker-compose.yml + docker-compose.local.yml
on CPU with the tiny test model, and this module drives it over HTTP: every healthcheck passes, a job succeeds and
its signed result link downloads from the host, a worker container killed mid-job is restarted by its restart
policy and the job ends `succeeded` once, the API's /metrics works on a read-only root, a lock with a wrong hash
fails the build, a code-only change rebuilds only the code layers, and `make stack-down` leaves nothing behind.

It installs and starts Docker itself (scripts/ensure-docker.sh) and fails, never skips, when it cannot. Waits are
generous deadlines with polling, never short timeouts: a slow, busy CPU only makes it slower.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from PIL import Image

from tests.paths import REPO

PROJECT = "supir-serve-test"  # its own compose project: a developer's `make stack` (supir-serve-local) is left alone
# compose would take these from the environment over the stack's own values: the test runs without them
OWN = ("SUPIR_", "MINIO_", "GRAFANA_", "COMPOSE_", "DOCKER_BUILDKIT")
ENV = {k: v for k, v in os.environ.items() if not k.startswith(OWN)} | {"SUPIR_STACK_PROJECT": PROJECT}
API = "http://127.0.0.1:8000"
ADMIN = "http://127.0.0.1:8001"  # /metrics, /status
SERVICES = {"redis", "minio", "minio-init", "api", "webhooks", "worker-cpu"}
BUILD_S = 3600  # a cold build downloads torch's dependencies and copies a 1.3 GB venv: minutes on a slow machine
FAST = {"upscale": 1, "min_size": 64, "steps": 4, "seed": 1}
SLOW = {"upscale": 1, "min_size": 64, "steps": 20, "seed": 2}  # sampling long enough to kill the worker in it

T = TypeVar("T")


def run(args: list[str], timeout: float = 600, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert proc.returncode == 0, (
            f"{' '.join(args)} → {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def wait_until(probe: Callable[[], T | None], timeout: float, what: str, every: float = 1.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up waiting for {what} after {timeout:.0f} s\n{compose_logs()}"
        time.sleep(every)


def compose_logs() -> str:
    ids = containers()
    return "\n".join(
        f"--- {name}\n" + run(["docker", "logs", "--tail", "40", cid], check=False).stderr[-3000:]
        for name, cid in ids.items()
    )


def containers() -> dict[str, str]:
    """service → container id, for this project's containers (running or not)."""
    ids = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}"]).stdout.split()
    if not ids:
        return {}
    found = json.loads(run(["docker", "inspect", *ids]).stdout)
    return {c["Config"]["Labels"]["com.docker.compose.service"]: c["Id"] for c in found}


def inspect(service: str) -> dict:
    return json.loads(run(["docker", "inspect", containers()[service]]).stdout)[0]


def leftovers() -> dict[str, list[str]]:
    label = f"label=com.docker.compose.project={PROJECT}"
    return {
        kind: run(["docker", *cmd, "--filter", label]).stdout.split()
        for kind, cmd in (
            ("containers", ["ps", "-aq"]),
            ("networks", ["network", "ls", "-q"]),
            ("volumes", ["volume", "ls", "-q"]),
        )
    }


def stack_env() -> dict[str, str]:
    lines = (REPO / ".cache/stack" / f"{PROJECT}.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def png(size: int = 64) -> bytes:
    img = Image.new("RGB", (size, size))
    img.putdata([((x * 4) % 256, (y * 4) % 256, (x * y) % 256) for y in range(size) for x in range(size)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def submit(client: httpx.Client, params: dict) -> dict:
    created = client.post(
        "/v1/jobs", files={"image": ("photo.png", png(), "image/png")}, data={"params": json.dumps(params)}
    )
    assert created.status_code == 202, created.text
    return created.json()


def ending(job: dict) -> dict:
    """What a failed assertion should show of a job (pytest cuts a whole record short before its error)."""
    return {k: job.get(k) for k in ("status", "attempts", "lost", "error", "progress", "worker")}


def finished(client: httpx.Client, job_id: str, timeout: float = 900) -> dict:
    def done() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in {"succeeded", "failed", "canceled"} else None

    return wait_until(done, timeout, f"job {job_id} to finish")


@pytest.fixture(scope="module")
def stack() -> Iterator[httpx.Client]:
    run(["bash", "scripts/stack.sh", "down"], timeout=600)  # what an interrupted earlier run left
    started = time.monotonic()
    try:
        run(["make", "--no-print-directory", "stack"], timeout=BUILD_S)
        print(f"make stack: {time.monotonic() - started:.0f} s")
        key = stack_env()["SUPIR_STACK_API_KEY"]
        with httpx.Client(base_url=API, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            yield client
    finally:
        run(["make", "--no-print-directory", "stack-down"], timeout=600, check=False)


def test_every_container_is_healthy_non_root_and_read_only(stack: httpx.Client) -> None:
    found = containers()
    assert set(found) == SERVICES
    for service in SERVICES:
        state = inspect(service)["State"]
        if service == "minio-init":
            assert state["Status"] == "exited" and state["ExitCode"] == 0
            continue
        assert state["Status"] == "running", service
        assert state["Health"]["Status"] == "healthy", (service, state["Health"]["Log"][-1:])
    for service in ("api", "webhooks", "worker-cpu"):
        container = inspect(service)
        assert container["HostConfig"]["ReadonlyRootfs"] is True, service
        assert container["Config"]["User"] == "10001:10001", service
        assert container["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert stack.get("/readyz").status_code == 200


def test_images_carry_their_version_revision_and_source(stack: httpx.Client) -> None:
    for image in ("supir-serve-api:0.1.0", "supir-serve-worker:0.1.0-cpu"):
        labels = json.loads(run(["docker", "image", "inspect", image]).stdout)[0]["Config"]["Labels"]
        assert labels["org.opencontainers.image.version"] == "0.1.0"
        revision = labels["org.opencontainers.image.revision"]  # the commit checked out when it was built
        assert re.fullmatch(r"[0-9a-f]{40}", revision) and run(["git", "cat-file", "-e", f"{revision}^{{commit}}"])
        assert labels["org.opencontainers.image.source"]
    torch = run(
        ["docker", "run", "--rm", "--entrypoint", "python", "supir-serve-api:0.1.0", "-c", "import torch"], check=False
    )
    assert torch.returncode != 0  # the API image has no torch


def test_a_job_succeeds_and_its_signed_result_link_downloads_from_the_host(stack: httpx.Client) -> None:
    job = submit(stack, FAST)
    final = finished(stack, job["id"])
    assert final["status"] == "succeeded", ending(final)
    redirect = stack.get(f"/v1/jobs/{job['id']}/result", follow_redirects=False)
    assert redirect.status_code == 307
    link = redirect.headers["location"]
    assert link.startswith("http://localhost:9000/supir/") and "Signature=" in link, link
    assert final["result"]["url"].startswith("http://localhost:9000/")
    downloaded = httpx.get(link, timeout=60)  # no API key: the signature is the permission
    assert downloaded.status_code == 200, downloaded.text
    with Image.open(io.BytesIO(downloaded.content)) as img:
        assert img.format == "PNG" and img.size == (64, 64)


def test_the_stack_says_it_serves_the_tiny_model_with_cpu_sized_defaults(stack: httpx.Client) -> None:
    """What a person trying the stack sees first: the test-model notice, and defaults that finish in seconds."""
    status = httpx.get(f"{ADMIN}/status", timeout=60).json()
    assert status["test_model"] is True and "test model" in status["notice"], status
    assert status["default_params"] == {"min_size": 256, "steps": 8}
    job = stack.post(
        "/v1/jobs", files={"image": ("photo.png", png(), "image/png")}, data={"params": json.dumps({"seed": 3})}
    ).json()
    assert (job["params"]["min_size"], job["params"]["steps"]) == (256, 8), job
    assert finished(stack, job["id"])["status"] == "succeeded"


def test_the_api_metrics_work_on_a_read_only_root(stack: httpx.Client) -> None:
    metrics = httpx.get(f"{ADMIN}/metrics", timeout=60)
    assert metrics.status_code == 200
    assert httpx.get(f"{API}/metrics", timeout=60).status_code == 404  # not on the clients' port
    assert "supir_jobs_waiting" in metrics.text and "supir_http_requests_total" in metrics.text
    api = containers()["api"]
    assert run(["docker", "exec", api, "touch", "/app/x"], check=False).returncode != 0  # the root is read-only
    assert run(["docker", "exec", api, "ls", "/tmp/prometheus"]).stdout.strip()  # the metrics' files, on the tmpfs


def test_a_worker_killed_mid_job_is_restarted_and_the_job_succeeds_once(stack: httpx.Client) -> None:
    job = submit(stack, SLOW)

    def sampling() -> bool:
        now = stack.get(f"/v1/jobs/{job['id']}").json()
        assert now["status"] in {"queued", "running"}, now
        return now["status"] == "running" and (now.get("progress") or {}).get("step", 0) >= 2

    wait_until(sampling, 600, "the job to sample", every=0.25)
    worker = inspect("worker-cpu")
    restarts = worker["RestartCount"]
    # A crash (what an OOM kill looks like): SIGKILL to the container's main process, from the host. `docker kill`
    # itself counts as an operator's stop, after which Docker restarts nothing (restart: unless-stopped).
    pid = worker["State"]["Pid"]
    if os.geteuid() == 0:
        os.kill(pid, signal.SIGKILL)
    else:
        run(["sudo", "-n", "kill", "-9", str(pid)])
    assert stack.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    wait_until(lambda: inspect("worker-cpu")["RestartCount"] > restarts, 300, "the restart policy")
    final = finished(stack, job["id"])
    assert final["status"] == "succeeded", ending(final)
    assert final["attempts"] == 2  # the reaper requeued it once; it ran to the end once
    time.sleep(2)
    again = stack.get(f"/v1/jobs/{job['id']}").json()
    assert again["finished_at"] == final["finished_at"] and again["status"] == "succeeded"
    assert httpx.get(final["result"]["url"], timeout=60).status_code == 200
    wait_until(
        lambda: inspect("worker-cpu")["State"].get("Health", {}).get("Status") == "healthy",
        600,
        "the restarted worker's healthcheck",
    )


def test_docker_kill_of_the_worker_loses_nothing_and_the_job_succeeds_once_it_is_back(stack: httpx.Client) -> None:
    """`docker kill` is an operator's stop (Docker restarts nothing after it): the job waits, is never lost, and ends
    `succeeded` once when the operator brings the worker back with `make stack` (compose up)."""
    job = submit(stack, {**SLOW, "seed": 5})  # a seed of its own: SLOW's is answered from the result cache by now

    def sampling() -> bool:
        now = stack.get(f"/v1/jobs/{job['id']}").json()
        return now["status"] == "running" and (now.get("progress") or {}).get("step", 0) >= 2

    wait_until(sampling, 600, "the job to sample", every=0.25)
    run(["docker", "kill", containers()["worker-cpu"]])
    time.sleep(5)
    assert inspect("worker-cpu")["State"]["Status"] == "exited"  # stopped, as an operator's stop leaves it
    assert stack.get(f"/v1/jobs/{job['id']}").json()["status"] in {"running", "queued"}  # waiting, not failed
    run(["make", "--no-print-directory", "stack"], timeout=BUILD_S)  # the operator starts it again
    final = finished(stack, job["id"])
    assert final["status"] == "succeeded" and final["attempts"] == 2, ending(final)  # requeued once, ran once
    time.sleep(2)
    assert stack.get(f"/v1/jobs/{job['id']}").json()["finished_at"] == final["finished_at"]


def context_copy(tmp_path: Path) -> Path:
    """The build context the Dockerfiles read, in a scratch folder."""
    ctx = tmp_path / "ctx"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("supir_core", "jobs", "api", "worker", "docker", "constraints"):
        shutil.copytree(REPO / name, ctx / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", ".dockerignore"):
        shutil.copy2(REPO / name, ctx / name)
    shutil.copytree(REPO / ".docker-build/certs", ctx / ".docker-build/certs", dirs_exist_ok=True)
    return ctx


def base_image() -> str:
    return run(["bash", "scripts/base-image.sh"]).stdout.strip()


def rebuilt_steps(log: str) -> list[str]:
    """The build steps a classic-builder log shows as run, not taken from the cache (ARG and FROM set no layer)."""
    steps = re.findall(r"^Step \d+/\d+ : (.*)\n(?: ---> (.*))?", log, re.MULTILINE)
    return [step for step, note in steps if note != "Using cache" and not step.startswith(("FROM", "ARG"))]


def is_dependency_step(step: str) -> bool:
    return step.startswith(("COPY constraints/", "COPY --from=deps")) or "--require-hashes" in step


def test_a_rebuild_without_changes_rebuilds_no_dependency_layer(stack: httpx.Client) -> None:
    proc = run(["bash", "scripts/images.sh", "api", "worker-cpu"], timeout=BUILD_S)
    # (code layers may rebuild here when the working tree changed since the stack's build: see the next test)
    assert not [step for step in rebuilt_steps(proc.stdout + proc.stderr) if is_dependency_step(step)]


def test_a_code_change_rebuilds_only_the_code_layers(stack: httpx.Client, tmp_path: Path) -> None:
    ctx = context_copy(tmp_path)  # a snapshot: other edits to the working tree cannot reach these builds
    tag = "supir-serve-api:code-change-test"
    args = ["docker", "build", "--force-rm", "-f", "docker/api.Dockerfile", "-t", tag, "--build-arg",
            f"BASE_IMAGE={base_image()}", "--build-arg", "REVISION=test", "."]  # fmt: skip

    def build() -> tuple[list[str], float]:
        started = time.monotonic()
        proc = subprocess.run(
            args, cwd=ctx, env={**ENV, "DOCKER_BUILDKIT": "0"}, capture_output=True, text=True, timeout=BUILD_S
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        return rebuilt_steps(proc.stdout), time.monotonic() - started

    try:
        build()
        unchanged, seconds = build()
        assert unchanged == [], unchanged  # twice the same tree: every layer from the cache
        print(f"API image, no change: {seconds:.1f} s")
        init = ctx / "api" / "__init__.py"
        init.write_text(init.read_text() + "\n# a code-only change\n")
        rebuilt, seconds = build()
        print(f"API image, one code file changed: {seconds:.1f} s, rebuilt: {[s.split()[0] for s in rebuilt]}")
        assert rebuilt and rebuilt[0].startswith("COPY api"), rebuilt  # everything before the changed code: cached
        assert not [step for step in rebuilt if is_dependency_step(step)]
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=300)


def test_a_lock_with_a_wrong_hash_fails_the_build(stack: httpx.Client, tmp_path: Path) -> None:
    ctx = context_copy(tmp_path)
    lock = ctx / "constraints/api.lock"
    text = lock.read_text()
    first = re.search(r"^([a-z0-9-]+)==\S+ \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text, re.MULTILINE)
    assert first
    tampered = re.sub(r"[0-9a-f]{64}", "0" * 64, first.group(2))
    lock.write_text(text.replace(first.group(2), tampered, 1))
    proc = subprocess.run(
        [
            "docker",
            "build",
            "--force-rm",
            "-f",
            "docker/api.Dockerfile",
            "--build-arg",
            f"BASE_IMAGE={base_image()}",
            ".",
        ],
        cwd=ctx,
        env={**ENV, "DOCKER_BUILDKIT": "0"},
        capture_output=True,
        text=True,
        timeout=BUILD_S,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "DO NOT MATCH THE HASHES" in out and first.group(1) in out, out[-4000:]


def test_stack_down_removes_every_container_network_and_volume(stack: httpx.Client) -> None:
    assert any(leftovers().values())
    run(["make", "--no-print-directory", "stack-down"], timeout=600)
    assert leftovers() == {"containers": [], "networks": [], "volumes": []}
