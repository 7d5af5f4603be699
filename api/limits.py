"""Request-body limits as a pure ASGI middleware: bodies are counted as they stream, never held whole.

An over-limit body is refused with a JSON 413 as soon as its count (or its declared Content-Length) passes the
limit. The answer is written at once, then the rest of the body is read and dropped up to `drain_bytes` and a
time bound before the connection closes (nginx's "lingering close"): a client that sends its whole body before
reading still finds the 413 instead of a connection reset. A body that goes silent for `body_timeout_s` is
refused with 408.
"""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.settings import Settings

from . import metrics
from .errors import STATUS

FORM_OVERHEAD_BYTES = 1_000_000  # multipart boundaries and the small fields around the image
LINGER_S = 30.0  # longest time spent dropping an over-limit body
LINGER_SILENCE_S = 5.0  # a client that stops sending while we drop its body is done with it


class BodyRefused(Exception):
    """Raised into the app when its request was refused here; the client already has its answer."""


class BodyLimits:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    def limit_for(self, scope: Scope, content_type: str) -> int:
        upload = scope["method"] == "POST" and scope["path"] == "/v1/jobs"
        if upload and content_type.startswith("multipart/form-data"):
            return self.settings.max_upload_bytes + FORM_OVERHEAD_BYTES
        if scope["method"] == "POST" and scope["path"] == "/v1/batches" and content_type.startswith("multipart/"):
            return self.settings.max_batch_upload_bytes + FORM_OVERHEAD_BYTES
        if scope["method"] == "PUT" and scope["path"].startswith("/v1/uploads/"):  # a direct upload's bytes
            return self.settings.max_upload_bytes
        return self.settings.max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await _Guarded(self, scope, receive, send).run()


class _Guarded:
    """One request: its byte count, whether the body has ended, whether we have answered in the app's place."""

    def __init__(self, limits: BodyLimits, scope: Scope, receive: Receive, send: Send) -> None:
        self.app, self.settings = limits.app, limits.settings
        self.scope, self.raw_receive, self.raw_send = scope, receive, send
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.content_type = headers.get("content-type", "").lower()
        length = headers.get("content-length", "")
        self.declared = int(length) if length.isdigit() else None
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        # a client that waits for "100 Continue" sends nothing after a refusal, so there is nothing to drain
        self.expects_continue = headers.get("expect", "").lower() == "100-continue"
        self.limit = limits.limit_for(scope, self.content_type)
        self.received = 0
        self.body_done = not chunked and not self.declared
        self.refused = False

    async def run(self) -> None:
        if self.declared is not None and self.declared > self.limit:  # refuse before reading a byte
            await self.refuse_too_large(drain=self.declared <= self.settings.drain_bytes)
            return
        try:
            await self.app(self.scope, self.receive, self.send)
        except Exception:
            if self.refused:  # the app was stopped by our refusal; it has nothing more to say
                return
            raise

    async def receive(self) -> Message:
        if self.refused:
            raise BodyRefused
        if self.body_done:  # after the body: disconnect notices, no limit or timeout applies
            return await self.raw_receive()
        try:
            with anyio.fail_after(self.settings.body_timeout_s):
                message = await self.raw_receive()
        except TimeoutError:
            silence = f"no request body data for {self.settings.body_timeout_s:g} s (SUPIR_BODY_TIMEOUT_S)"
            await self.answer("request_timeout", silence)
            raise BodyRefused from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.body_done = not message.get("more_body", False)
            if self.received > self.limit:
                await self.refuse_too_large(drain=True)
                raise BodyRefused
        else:  # http.disconnect
            self.body_done = True
        return message

    async def send(self, message: Message) -> None:
        if self.refused:
            return
        if message["type"] == "http.response.start" and not self.body_done:
            # answered before the body ended: what we drop below is bounded, then the connection closes rather
            # than letting the server read whatever else the client sends
            message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        final = message["type"] == "http.response.body" and not message.get("more_body", False)
        if final and not self.body_done and not self.expects_continue:
            # the app answered without reading the whole body (a 401, a 429): deliver its answer, then drop the
            # rest of the body before ending the response, so a client that writes everything first still reads it
            await self.raw_send({**message, "more_body": True})
            await self.drain()
            await self.raw_send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await self.raw_send(message)

    async def refuse_too_large(self, drain: bool) -> None:
        size = f"{self.declared:,} bytes" if self.declared is not None else f"over {self.limit:,} bytes"
        upload = self.limit > self.settings.max_json_bytes and self.content_type.startswith("multipart/")
        if upload and self.scope["path"] == "/v1/batches":
            message = (
                f"the request is {size}; a multipart batch holds at most {self.settings.max_batch_upload_bytes:,} "
                "bytes (SUPIR_MAX_BATCH_UPLOAD_BYTES): send larger batches as direct uploads (upload_id items)"
            )
        elif upload:
            message = (
                f"the request is {size}; images of at most {self.settings.max_upload_bytes:,} bytes are accepted "
                "(SUPIR_MAX_UPLOAD_BYTES)"
            )
        else:
            setting = "SUPIR_MAX_UPLOAD_BYTES" if self.limit > self.settings.max_json_bytes else "SUPIR_MAX_JSON_BYTES"
            message = f"the request body is {size}; at most {self.limit:,} bytes are accepted ({setting})"
        await self.answer("file_too_large", message, field="image" if upload else None, drain=drain)

    async def answer(self, code: str, message: str, field: str | None = None, drain: bool = False) -> None:
        """Answer in the app's place: the whole JSON error first, then (maybe) drop the body, then close."""
        self.refused = True
        metrics.REJECTED.labels(code).inc()
        body = json.dumps({"error": {"code": code, "message": message, "field": field}}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await self.raw_send({"type": "http.response.start", "status": STATUS[code], "headers": headers})
        await self.raw_send({"type": "http.response.body", "body": body, "more_body": True})
        if drain and not self.expects_continue:
            await self.drain()
        await self.raw_send({"type": "http.response.body", "body": b"", "more_body": False})

    async def drain(self) -> None:
        """Read and drop the rest of the body, up to drain_bytes in all and LINGER_S."""
        deadline = time.monotonic() + LINGER_S
        while not self.body_done and self.received <= self.settings.drain_bytes:
            wait = min(LINGER_SILENCE_S, deadline - time.monotonic())
            if wait <= 0:
                return
            message: dict[str, Any] | None = None
            with anyio.move_on_after(wait):
                message = dict(await self.raw_receive())
            if message is None or message["type"] != "http.request":
                return
            self.received += len(message.get("body", b""))
            self.body_done = not message.get("more_body", False)
