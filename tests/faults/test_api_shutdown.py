"""API rollouts as clients see them: a real `python -m api.server` process gets SIGTERM while uploads stream in
slowly. Each client gets its job (202, and the job exists) or a JSON 503 `shutting_down` with Retry-After (and
no job was made: its retry is safe), never a 500 or a reset; a kept-alive connection's next request is answered
503 with `Connection: close`; the process exits 0. And the operator routes live on the admin port only.

No GPU worker runs (jobs stay queued): the API alone is under test, with one uvicorn process and with two (as
the manifests run it). About 80 s on a busy 2-core machine."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import DATA, Service, wait_until

GRACE_S = 4.0  # SUPIR_GRACEFUL_SHUTDOWN_S here; api.shutdown.FINISH_S (10 s) more is the hard bound
PHOTO = (DATA / "astronaut_gray.png").read_bytes()


@pytest.fixture(params=[1], ids=lambda n: f"{n}-process")
def api(request: pytest.FixtureRequest, tmp_path: Path, fixture_a: Path) -> Iterator[Service]:
    """The API alone; `request.param` uvicorn processes (the manifests run 2, `make serve` 1)."""
    service = Service(tmp_path, fixture_a, {"alice": {}}, api_workers=request.param, graceful_shutdown_s=GRACE_S)
    try:
        yield service.start(with_workers=False)
    finally:
        service.stop()


def multipart(boundary: str) -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + PHOTO
        + f"\r\n--{boundary}--\r\n".encode()
    )


class SlowUpload(threading.Thread):
    """POST /v1/jobs whose body arrives in 20 pieces spread over `seconds` from now (httpx, Content-Length)."""

    def __init__(self, service: Service, seconds: float, idempotency_key: str | None = None) -> None:
        super().__init__(daemon=True)
        self.service, self.seconds, self.key = service, seconds, idempotency_key
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

    def pieces(self, body: bytes) -> Iterator[bytes]:
        size = -(-len(body) // 20)
        for at in range(0, len(body), size):
            yield body[at : at + size]
            time.sleep(self.seconds / 20)

    def run(self) -> None:
        boundary = uuid.uuid4().hex
        body = multipart(boundary)
        headers = {
            "Authorization": f"Bearer {self.service.keys['alice']}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(body)),
            **({"Idempotency-Key": self.key} if self.key else {}),
        }
        try:
            self.response = httpx.post(
                f"{self.service.url}/v1/jobs", content=self.pieces(body), headers=headers, timeout=120
            )
        except BaseException as exc:  # reported by the test
            self.error = exc


def refused_connect(port: int) -> bool:
    """True once the server has closed its listening socket: shutdown has begun."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except OSError:
        return True


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("api", [1, 2], indirect=True, ids=lambda n: f"{n}-process")
def test_sigterm_with_slow_uploads_in_flight_answers_each_with_its_job_or_a_retryable_503(api: Service) -> None:
    assert api.api is not None
    auth = {"Authorization": f"Bearer {api.keys['alice']}"}
    # a kept-alive connection, idle when SIGTERM comes
    kept = socket.create_connection(("127.0.0.1", api.port), timeout=30)
    kept.sendall(f"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: {auth['Authorization']}\r\n\r\n".encode())
    assert read_response(kept)[0] == 200

    finishing = [SlowUpload(api, 3.0) for _ in range(3)]  # done about 2 s after SIGTERM, within the grace
    unfinished = [SlowUpload(api, GRACE_S + 7.0, idempotency_key=f"late-{i}") for i in range(3)]
    for upload in [*finishing, *unfinished]:
        upload.start()
    time.sleep(1.0)  # every upload has sent its headers and its first pieces
    api.api.send_signal(signal.SIGTERM)
    sigterm_at = time.monotonic()
    wait_until(lambda: refused_connect(api.port), 10, 0.05, "the listening socket to close")

    # the idle kept-alive connection's next request: answered, not cut
    kept.sendall(f"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: {auth['Authorization']}\r\n\r\n".encode())
    status, headers, body = read_response(kept)
    assert status == 503 and json.loads(body)["error"]["code"] == "shutting_down", body
    assert headers["connection"] == "close" and int(headers["retry-after"]) > 0
    assert kept.recv(1) == b""  # then closed
    kept.close()

    for upload in [*finishing, *unfinished]:
        upload.join(60)
        assert upload.error is None, repr(upload.error)
    assert api.api.wait(30) == 0, api.logs()
    exited_s = time.monotonic() - sigterm_at
    print(f"exited {exited_s:.1f} s after SIGTERM")
    assert exited_s < GRACE_S + 10.0 + 5.0  # within the hard bound

    created = []
    for upload in finishing:
        assert upload.response is not None and upload.response.status_code == 202, upload.response
        created.append(upload.response.json()["id"])
    for upload in unfinished:
        response = upload.response
        assert response is not None and response.status_code == 503, response
        assert response.json()["error"]["code"] == "shutting_down" and int(response.headers["Retry-After"]) > 0

    # a new process on the same Redis: exactly the answered jobs exist, and the refused requests are safe to
    # send again with their Idempotency-Keys (each makes one job, once)
    api.stop()
    api.start(with_workers=False)
    with api.client("alice") as client:
        assert sorted(j["id"] for j in client.get("/v1/jobs").json()["jobs"]) == sorted(created)
        for upload in unfinished:
            again = client.post(
                "/v1/jobs", files={"image": ("p.png", PHOTO, "image/png")}, headers={"Idempotency-Key": upload.key}
            )
            assert again.status_code == 202, again.text
        assert len(client.get("/v1/jobs").json()["jobs"]) == len(finishing) + len(unfinished)


def test_metrics_and_status_are_served_on_the_admin_port_only(api: Service) -> None:
    for path in ("/metrics", "/status"):
        public = httpx.get(f"{api.url}{path}", timeout=30)
        assert public.status_code == 404 and public.json()["error"]["code"] == "not_found", public.text
    assert "supir_http_requests_total" in httpx.get(f"{api.admin_url}/metrics", timeout=30).text
    assert httpx.get(f"{api.admin_url}/status", timeout=30).json()["redis"] == "ok"
    # the admin port serves the operator routes and the probes, not the API
    assert httpx.get(f"{api.admin_url}/readyz", timeout=30).status_code == 200
    assert httpx.get(f"{api.admin_url}/v1/jobs", timeout=30).status_code == 404
    # what the web page needs of /status is public, without the internals
    service = httpx.get(f"{api.url}/v1/service", timeout=30).json()
    assert [v["name"] for v in service["variants"]] == ["v0Q"] and "redis" not in service
    paths = httpx.get(f"{api.url}/openapi.json", timeout=30).json()["paths"]
    assert "/v1/service" in paths and "/metrics" not in paths and "/status" not in paths
