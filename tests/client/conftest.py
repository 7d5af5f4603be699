"""The client package against the live service: one service per test process for the client's files (the session
fixture below), with webhooks allowed to a local receiver."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.servers import WEBHOOK_SECRET, Service, running


@pytest.fixture(scope="session")
def client_service(tmp_path_factory: pytest.TempPathFactory, fixture_a: Path) -> Iterator[Service]:
    # a key per test where a test counts its key's jobs: test_client_service's, then test_client_batches'
    keys = {name: {} for name in ("alice", "bob", "carol", "dave", "erin", "fay", "gus", "hal", "ida")}
    settings = {
        "rate_limit_per_minute": 100_000,
        "webhook_secret": WEBHOOK_SECRET,
        "allow_private_webhooks": "true",
        "max_active_jobs": 20,
        "default_params": '{"min_size": 64, "steps": 3}',  # the README's examples set neither: seconds, not minutes
    }
    with running(tmp_path_factory.mktemp("client-service"), fixture_a, keys, **settings) as svc:
        yield svc


class Recording(httpx.BaseTransport):
    """A real HTTP transport that keeps every request it sent, and can lose the answers of the requests `drop`
    picks: the request reaches the service, the client sees a dropped connection (as when a proxy or the network
    cuts it after the server has acted)."""

    def __init__(self, drop: Callable[[httpx.Request], bool] | None = None) -> None:
        self.inner = httpx.HTTPTransport()
        self.sent: list[httpx.Request] = []
        self.drop = drop

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.sent.append(request)
        response = self.inner.handle_request(request)
        if self.drop is not None and self.drop(request):
            response.close()  # unread: an event stream's body would not end
            raise httpx.ReadError("the connection was cut after the request was sent", request=request)
        return response

    def close(self) -> None:
        self.inner.close()

    def bodies(self, method: str, path: str) -> list[dict]:
        return [json.loads(r.content) for r in self.sent if r.method == method and r.url.path == path]


class Hooks:
    """A webhook receiver on loopback: every POST it got, as (headers, raw body)."""

    def __init__(self) -> None:
        received: list[tuple[dict[str, str], bytes]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.received = received
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    receiver = Hooks()
    try:
        yield receiver
    finally:
        receiver.close()
