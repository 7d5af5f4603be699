"""Fault: webhooks stuck behind restorations. With slow jobs queued on the single GPU worker, a job that ends
(the running one finishing, a queued one canceled by the API) has its webhook delivered within seconds, by the
light worker on its own queue, which never loads torch."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from tests.paths import DATA
from tests.servers import REPO, Service, free_port, running, wait_for_status, wait_until

SLOW = {"min_size": 128, "steps": 40, "seed": 1}
SECRET = "whsec-queue-test"
BOUND_S = 2.0  # from the job's finished_at to the POST's arrival


class Receiver(BaseHTTPRequestHandler):
    arrivals: ClassVar[dict[str, float]] = {}  # job id → when its webhook arrived

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.arrivals.setdefault(json.loads(body)["job"]["id"], time.time())
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, fixture_a: Path) -> Iterator[Service]:
    keys = {"alice": {"max_active_jobs": 100}}
    tmp = tmp_path_factory.mktemp("webhooks-queue")
    with running(
        tmp, fixture_a, keys, rate_limit_per_minute=100_000, allow_private_webhooks="true", webhook_secret=SECRET
    ) as service:
        yield service


@pytest.fixture(scope="module")
def hook_url() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", free_port()), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook"
    finally:
        server.shutdown()
        server.server_close()


def submit(client: httpx.Client, url: str) -> dict:
    image = ("chelsea_degraded.jpg", (DATA / "chelsea_degraded.jpg").read_bytes(), "image/jpeg")
    response = client.post("/v1/jobs", files={"image": image}, data={"params": json.dumps(SLOW), "webhook_url": url})
    assert response.status_code == 202, response.text
    return response.json()


def delay(svc: Service, client: httpx.Client, job_id: str) -> float:
    """Seconds from the job's end to its webhook's arrival."""
    arrived = wait_until(lambda: Receiver.arrivals.get(job_id), 30, 0.05, f"the webhook of {job_id}")
    finished = client.get(f"/v1/jobs/{job_id}").json()["finished_at"]
    return float(arrived - finished)


def test_webhooks_do_not_wait_behind_queued_restorations(svc: Service, hook_url: str) -> None:
    with svc.client("alice") as client:
        first, *queued = [submit(client, hook_url) for _ in range(4)]
        wait_for_status(client, first["id"], {"running"}, timeout=60)
        # a queued job canceled by the API: its webhook goes out now, not when the GPU worker reaches its task
        canceled = client.post(f"/v1/jobs/{queued[-1]['id']}/cancel").json()
        assert canceled["status"] == "canceled"
        canceled_delay = delay(svc, client, canceled["id"])
        # the running job ends with three jobs queued behind it (the canceled one's task still among them)
        assert wait_for_status(client, first["id"], {"succeeded"}, timeout=180)["status"] == "succeeded"
        first_delay = delay(svc, client, first["id"])
        job_s = client.get(f"/v1/jobs/{first['id']}").json()["seconds"]["total"]  # what a webhook would wait per job
        assert client.get(f"/v1/jobs/{queued[0]['id']}").json()["status"] in ("queued", "running")
        print(
            f"webhook delays: canceled {canceled_delay:.2f} s, finished {first_delay:.2f} s; a job takes {job_s:.1f} s"
        )
        assert canceled_delay < BOUND_S, svc.logs()
        assert first_delay < BOUND_S, svc.logs()
        for job in queued[:-1]:  # leave no slow work behind for the next test
            client.post(f"/v1/jobs/{job['id']}/cancel")
        hook = wait_until(
            lambda: (h := client.get(f"/v1/jobs/{first['id']}").json()["webhook"])["state"] == "delivered" and h,
            10,
            0.1,
            "the delivered state",
        )
        assert hook["attempts"] == 1


def test_the_light_worker_never_imports_torch(svc: Service) -> None:
    assert svc.webhooks is not None and svc.webhooks.poll() is None
    maps = Path(f"/proc/{svc.webhooks.pid}/maps").read_text()
    assert "libtorch" not in maps and "torch/lib" not in maps
    code = "import sys, worker.webhooks; assert 'torch' not in sys.modules and 'supir_core.pipeline' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=svc.env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
