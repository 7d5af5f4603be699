"""The job service with real parts: uvicorn over HTTP, Celery worker processes, Redis, local storage."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import httpx
from PIL import Image

from jobs.webhooks import verify
from tests.servers import (
    FAST,
    SLOW,
    WEBHOOK_SECRET,
    Service,
    free_port,
    photo,
    submit,
    wait_for_status,
    wait_until,
)


def sse_events(client: httpx.Client, job_id: str) -> list[dict]:
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def test_upload_progress_result(service: Service) -> None:
    with service.client("alice") as client:
        created = submit(client, FAST, "coffee_rgba.png")
        assert created.status_code == 202, created.text
        job = created.json()
        assert job["status"] == "queued" and job["params"]["seed"] == 1
        assert created.headers["location"] == f"/v1/jobs/{job['id']}"
        events = sse_events(client, job["id"])
        statuses = [e["status"] for e in events]
        assert statuses[-1] == "succeeded" and "running" in statuses
        steps = [e["progress"]["step"] for e in events if e["progress"]["stage"] == "sampling"]
        assert steps and max(steps) == 3
        final = client.get(f"/v1/jobs/{job['id']}").json()
        assert final["result"]["width"] == 120 and final["result"]["height"] == 80
        assert set(final["seconds"]) >= {"stage1", "sampling", "decoding", "upload", "total"}
        assert final["positive_prompt"].startswith("Cinematic")
        downloaded = httpx.get(final["result"]["url"])  # the signed URL works without the API key
        assert downloaded.status_code == 200
        with Image.open(io.BytesIO(downloaded.content)) as img:
            assert img.size == (120, 80) and img.mode == "RGBA"
        assert client.get(f"/v1/jobs/{job['id']}/result").content == downloaded.content
        listed = client.get("/v1/jobs", params={"status": "succeeded"}).json()
        assert job["id"] in [j["id"] for j in listed["jobs"]]


def test_other_keys_jobs_do_not_exist(service: Service) -> None:
    with service.client("alice") as alice, service.client("bob") as bob:
        job = submit(alice, FAST).json()
        for path in ("", "/events", "/result"):
            response = bob.get(f"/v1/jobs/{job['id']}{path}")
            assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
        assert bob.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
        assert job["id"] not in [j["id"] for j in bob.get("/v1/jobs").json()["jobs"]]
        wait_for_status(alice, job["id"], {"succeeded"})


def test_idempotency(service: Service) -> None:
    with service.client("carol") as client:
        headers = {"Idempotency-Key": "upload-42"}
        files = {"image": photo()}
        one = client.post("/v1/jobs", files=files, data={"params": json.dumps(FAST)}, headers=headers)
        two = client.post("/v1/jobs", files={"image": photo()}, data={"params": json.dumps(FAST)}, headers=headers)
        assert one.status_code == 202 and two.status_code == 200
        assert two.json()["id"] == one.json()["id"] and two.headers["idempotent-replayed"] == "true"
        other = client.post(
            "/v1/jobs", files={"image": photo()}, data={"params": json.dumps({**FAST, "steps": 4})}, headers=headers
        )
        assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
        wait_for_status(client, one.json()["id"], {"succeeded"})


def test_rate_limit(service: Service) -> None:
    with service.client("limited") as client:
        codes = [client.get("/v1/jobs").status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        refused = client.get("/v1/jobs")
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 61
        # writes are counted apart from reads: the polls above leave the key's creates and cancels untouched
        assert client.post("/v1/jobs/job_none/cancel").json()["error"]["code"] == "not_found"


def test_quota_and_cancel_within_one_step(service: Service) -> None:
    with service.client("onejob") as client:
        job = submit(client, SLOW).json()
        second = submit(client, FAST)
        assert second.status_code == 429 and second.json()["error"]["code"] == "quota_exceeded"

        def sampling_step() -> int:
            progress = client.get(f"/v1/jobs/{job['id']}").json()["progress"]
            return progress["step"] if progress["stage"] == "sampling" and progress["step"] >= 2 else 0

        wait_until(sampling_step, 60, 0.05, "sampling to start")
        canceled = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert canceled.status_code == 200
        step_at_cancel = canceled.json()["progress"]["step"]
        final = wait_for_status(client, job["id"], {"canceled", "succeeded", "failed"}, timeout=30)
        assert final["status"] == "canceled"
        assert final["progress"]["step"] <= step_at_cancel + 1  # at most the step in flight finishes
        again = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert again.status_code == 409 and again.json()["error"]["code"] == "job_not_cancelable"
        assert client.get(f"/v1/jobs/{job['id']}/result").json()["error"]["code"] == "result_not_ready"
        assert submit(client, FAST).status_code == 202  # the quota is free again


class Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_webhook_is_signed_and_delivered(service: Service) -> None:
    server = HTTPServer(("127.0.0.1", free_port()), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with service.client("alice") as client:
            url = f"http://127.0.0.1:{server.server_port}/hook"
            job = submit(client, FAST, webhook_url=url).json()
            assert job["webhook"]["state"] == "pending"
            headers, body = wait_until(lambda: Receiver.received and Receiver.received[0], 60, 0.1, "the webhook")
            assert verify(WEBHOOK_SECRET, headers, body)
            assert not verify("another-secret", headers, body)
            assert not verify(WEBHOOK_SECRET, headers, body + b" ")
            event = json.loads(body)
            assert event["event"] == "job.succeeded" and event["job"]["id"] == job["id"]
            delivered = wait_until(
                lambda: client.get(f"/v1/jobs/{job['id']}").json()["webhook"]["state"] == "delivered", 30
            )
            assert delivered
    finally:
        server.shutdown()
        server.server_close()


def test_operations_endpoints(service: Service) -> None:
    assert httpx.get(f"{service.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{service.url}/readyz").json()
    assert ready == {"ready": True, "checks": {"redis": "ok", "server": "ok"}}
    status = httpx.get(f"{service.admin_url}/status").json()
    assert status["redis"] == "ok" and status["storage"] == "ok" and status["workers"]["ready"] == 1
    assert status["jobs"]["waiting"] >= 0
    text = httpx.get(f"{service.admin_url}/metrics").text
    for name in (
        "supir_http_requests_total",
        "supir_http_request_duration_seconds",
        "supir_jobs_waiting",
        "supir_jobs_running",
    ):
        assert name in text
    assert httpx.get(f"{service.url}/openapi.json").json()["info"]["title"] == "supir-serve"


def test_api_keys_are_required(service: Service) -> None:
    with service.client(None) as anonymous:
        response = anonymous.get("/v1/jobs")
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
        forged = anonymous.get("/v1/jobs", headers={"Authorization": "Bearer sk_not_a_key"})
        assert forged.status_code == 401


class FlakyReceiver(BaseHTTPRequestHandler):
    calls: ClassVar[list[int]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        FlakyReceiver.calls.append(1)
        self.send_response(503 if len(FlakyReceiver.calls) == 1 else 200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_failed_webhook_is_retried_with_backoff(service: Service) -> None:
    server = HTTPServer(("127.0.0.1", free_port()), FlakyReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with service.client("bob") as client:
            job = submit(client, FAST, webhook_url=f"http://127.0.0.1:{server.server_port}/hook").json()

            def delivered() -> dict | None:
                hook = client.get(f"/v1/jobs/{job['id']}").json()["webhook"]
                return hook if hook["state"] == "delivered" else None

            hook = wait_until(delivered, 60, 0.2, "the retried webhook")
            assert hook["attempts"] == 2 and hook["last_status"] == 200
            assert len(FlakyReceiver.calls) == 2
    finally:
        server.shutdown()
        server.server_close()


def test_a_wrong_method_is_405_with_allow(service: Service) -> None:
    """What schemathesis checks (RFC 9110): a 405 names the methods the route has."""
    response = httpx.request("TRACE", f"{service.url}/healthz", timeout=30)
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    assert "GET" in response.headers["allow"]
    # /v1/jobs has two routes (list and create): the header names both, not only the first that matched
    jobs = httpx.request("DELETE", f"{service.url}/v1/jobs", timeout=30)
    assert jobs.status_code == 405
    assert {m.strip() for m in jobs.headers["allow"].split(",")} == {"GET", "POST"}


class EventReceiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        EventReceiver.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_webhook_events_filter(service: Service) -> None:
    """started, progress and completed as asked for; only started when only that is asked for."""
    server = HTTPServer(("127.0.0.1", free_port()), EventReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/hook"
    try:
        with service.client("carol") as client:
            every = json.dumps(["started", "progress", "completed"])
            job = submit(client, {**FAST, "steps": 30}, webhook_url=url, webhook_events=every).json()
            assert job["webhook"]["events"] == ["started", "progress", "completed"]

            def of_job(job_id: str) -> list[str]:
                names = []
                for headers, body in list(EventReceiver.received):
                    assert verify(WEBHOOK_SECRET, headers, body)
                    event = json.loads(body)
                    if event["job"]["id"] == job_id:
                        names.append(event["event"])
                return names

            wait_until(lambda: "job.succeeded" in of_job(job["id"]), 120, 0.1, "the completed webhook")
            names = of_job(job["id"])
            assert names.count("job.started") == 1 and names.count("job.succeeded") == 1, names
            assert "job.progress" in names, names
            progress = [json.loads(b)["job"]["progress"] for _, b in EventReceiver.received if b"job.progress" in b]
            assert all(p["stage"] and p["step"] <= p["steps"] for p in progress)

            # only `started`: the ending is not posted, and the job says so
            started_only = submit(client, FAST, webhook_url=url, webhook_events="started").json()
            assert started_only["webhook"]["state"] == "not_requested"
            wait_for_status(client, started_only["id"], {"succeeded"})
            wait_until(lambda: of_job(started_only["id"]), 30, 0.1, "the started webhook")
            time.sleep(2)  # a completed event, wrongly sent, would arrive within this on an idle light worker
            assert of_job(started_only["id"]) == ["job.started"]

            for fields, field in (
                ({"webhook_events": "started"}, "webhook_events"),  # no webhook_url
                ({"webhook_url": url, "webhook_events": "finished"}, "webhook_events"),
                ({"webhook_url": url, "webhook_events": "[]"}, "webhook_events"),
            ):
                refused = submit(client, FAST, **fields)
                assert refused.status_code == 400 and refused.json()["error"]["field"] == field, refused.text
    finally:
        server.shutdown()
        server.server_close()


def test_prefer_wait_answers_with_the_ended_job(service: Service) -> None:
    with service.client("carol") as client:
        created = client.post(
            "/v1/jobs",
            files={"image": photo()},
            data={"params": json.dumps(FAST)},
            headers={"Prefer": "respond-async, wait=120"},
        )
        assert created.status_code == 200, created.text
        assert created.json()["status"] == "succeeded" and created.json()["result"]["url"]
        assert created.headers["preference-applied"] == "wait=60"  # capped at SUPIR_MAX_PREFER_WAIT_S

        start = time.monotonic()
        slow = client.post(
            "/v1/jobs", files={"image": photo()}, data={"params": json.dumps(SLOW)}, headers={"Prefer": "wait=1"}
        )
        assert slow.status_code == 202 and slow.json()["status"] in ("queued", "running")
        assert "preference-applied" not in slow.headers
        assert time.monotonic() - start >= 1.0
        client.post(f"/v1/jobs/{slow.json()['id']}/cancel")
        wait_for_status(client, slow.json()["id"], {"canceled"})

        ignored = client.post(
            "/v1/jobs", files={"image": photo()}, data={"params": json.dumps(FAST)}, headers={"Prefer": "wait=soon"}
        )
        assert ignored.status_code == 202  # a preference the server cannot read is ignored, not an error
        wait_for_status(client, ignored.json()["id"], {"succeeded"})


def test_thumbnails_are_small_jpegs_made_once(service: Service) -> None:
    with service.client("carol") as client:
        job = submit(client, FAST, "coffee_rgba.png").json()
        wait_for_status(client, job["id"], {"succeeded"})
        first = client.get(f"/v1/jobs/{job['id']}/thumbnail", params={"size": 64})
        assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(first.content)) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) == 64 and thumb.size == (64, 43)  # 120×80 → 64 wide
        kept = list(service.tmp.glob(f"objects/thumbs/{job['id']}-64.jpg"))
        assert len(kept) == 1 and kept[0].read_bytes() == first.content  # made once, then served from storage
        assert client.get(f"/v1/jobs/{job['id']}/thumbnail", params={"size": 64}).content == first.content
        assert client.get(f"/v1/jobs/{job['id']}/thumbnail", params={"size": 5}).status_code == 400
        queued = submit(client, SLOW).json()
        not_yet = client.get(f"/v1/jobs/{queued['id']}/thumbnail")
        assert not_yet.status_code == 409 and not_yet.json()["error"]["code"] == "result_not_ready"
        client.post(f"/v1/jobs/{queued['id']}/cancel")
        wait_for_status(client, queued["id"], {"canceled"})
