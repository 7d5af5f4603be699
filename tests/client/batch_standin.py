"""STAND-IN for the batch routes (`/v1/batches…`), until they land on main: a small HTTP server that implements the
batch contract (issue 27) on top of the live service's job API, and passes every other request through to the
live service unchanged. So a batch's uploads, jobs, restorations and results are all real; only the batch
bookkeeping is this file's. Once the service serves batches, point the tests at `service.url` and delete this.

Not implemented here: the `batch.completed` webhook, `expires_at`, `eta` (always null)."""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

TERMINAL = {"succeeded", "failed", "canceled"}
HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "content-encoding", "keep-alive"}


@dataclass
class StoredBatch:
    id: str
    owner: str  # the Authorization header that made it
    job_ids: list[str]
    created_at: float = field(default_factory=time.time)


class BatchStandIn:
    def __init__(self, live_url: str) -> None:
        self.live = httpx.Client(base_url=live_url, timeout=60)
        self.batches: dict[str, StoredBatch] = {}
        self.replays: dict[tuple[str, str], str] = {}  # (owner, Idempotency-Key) → batch id
        self.lock = threading.Lock()
        self.created_bodies: list[dict[str, Any]] = []  # what clients sent to POST /v1/batches

    # --- the contract -----------------------------------------------------------------------------------------

    def create(self, owner: str, body: dict[str, Any], key: str | None) -> tuple[int, Any]:
        self.created_bodies.append(body)
        with self.lock:
            if key and (owner, key) in self.replays:
                return 200, self.view(self.batches[self.replays[(owner, key)]])
            items = body.get("items")
            if not isinstance(items, list) or not items:
                return 400, error("invalid_request", "items must be a non-empty list", "items")
            job_ids = []
            for item in items:
                job = {k: item[k] for k in ("upload_id", "image_url") if k in item}
                params = {**(body.get("params") or {}), **(item.get("params") or {})}
                options = {
                    "params": params or None,
                    "preset": item.get("preset") or body.get("preset"),
                    "variant": body.get("variant"),
                    "expires_after": body.get("expires_after"),
                }
                job.update({k: v for k, v in options.items() if v is not None})
                answer = self.live.post("/v1/jobs", json=job, headers={"Authorization": owner})
                if answer.status_code >= 400:
                    return answer.status_code, answer.json()
                job_ids.append(answer.json()["id"])
            batch = StoredBatch("bat_" + uuid.uuid4().hex, owner, job_ids)
            self.batches[batch.id] = batch
            if key:
                self.replays[(owner, key)] = batch.id
        return 201, self.view(batch)

    def jobs(self, batch: StoredBatch) -> list[dict[str, Any]]:
        return [self.live.get(f"/v1/jobs/{j}", headers={"Authorization": batch.owner}).json() for j in batch.job_ids]

    def view(self, batch: StoredBatch) -> dict[str, Any]:
        jobs = self.jobs(batch)
        counts = {s: 0 for s in ("queued", "running", "succeeded", "failed", "canceled")}
        for job in jobs:
            counts[job["status"]] += 1
        ended = all(job["status"] in TERMINAL for job in jobs)
        return {
            "id": batch.id,
            "status": "ended" if ended else "running",
            "total": len(jobs),
            "counts": counts,
            "progress": sum(counts[s] for s in TERMINAL) / len(jobs),
            "eta": None,
            "created_at": batch.created_at,
            "ended_at": max(job["finished_at"] for job in jobs) if ended else None,
            "expires_at": None,
            "job_ids": list(batch.job_ids),
        }

    def job_page(self, batch: StoredBatch, query: dict[str, str]) -> dict[str, Any]:
        offset, limit = int(query.get("offset", 0)), int(query.get("limit", 20))
        jobs = [j for j in self.jobs(batch) if query.get("status") in (None, j["status"])]
        more = offset + limit < len(jobs)
        return {"jobs": jobs[offset : offset + limit], "next_cursor": offset + limit if more else None}

    def cancel(self, batch: StoredBatch) -> dict[str, Any]:
        for job_id in batch.job_ids:
            self.live.post(f"/v1/jobs/{job_id}/cancel", headers={"Authorization": batch.owner})  # 409 once ended
        return self.view(batch)

    def delete(self, batch: StoredBatch) -> None:
        for job_id in batch.job_ids:
            self.live.delete(f"/v1/jobs/{job_id}", headers={"Authorization": batch.owner})
        with self.lock:
            self.batches.pop(batch.id, None)

    def results_zip(self, batch: StoredBatch) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            for job in self.jobs(batch):
                if job["status"] != "succeeded":
                    continue
                for index, result in enumerate(job["results"]):
                    extension = result["content_type"].split("/")[1].replace("jpeg", "jpg")
                    name = f"{job['id']}.{extension}" if index == 0 else f"{job['id']}-{index}.{extension}"
                    answer = self.live.get(
                        f"/v1/jobs/{job['id']}/result", params={"index": index}, headers={"Authorization": batch.owner}
                    )
                    archive.writestr(name, answer.content)
        return out.getvalue()

    # --- HTTP -----------------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes) -> Any:
        """(status, JSON or bytes, content type) for a batch route; None for any other path (passed through)."""
        parts = path.strip("/").split("/")
        if parts[:2] != ["v1", "batches"]:
            return None
        owner = headers.get("authorization", "")
        if len(parts) == 2 and method == "POST":
            status, answer = self.create(owner, json.loads(body or b"{}"), headers.get("idempotency-key"))
            return status, answer, "application/json"
        batch = self.batches.get(parts[2]) if len(parts) > 2 else None
        if batch is None or batch.owner != owner:
            return 404, error("not_found", "no such batch"), "application/json"
        route = (method, "/".join(parts[3:]))
        if route == ("GET", ""):
            return 200, self.view(batch), "application/json"
        if route == ("GET", "jobs"):
            return 200, self.job_page(batch, query), "application/json"
        if route == ("POST", "cancel"):
            return 200, self.cancel(batch), "application/json"
        if route == ("DELETE", ""):
            self.delete(batch)
            return 204, b"", "application/json"
        if route == ("GET", "results.zip"):
            return 200, self.results_zip(batch), "application/zip"
        return 404, error("not_found", "no such route"), "application/json"


def error(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


@contextmanager
def batch_standin(live_url: str) -> Iterator[tuple[str, BatchStandIn]]:
    """(the stand-in's base URL, its state) while it runs on loopback."""
    standin = BatchStandIn(live_url)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            headers = {k.lower(): v for k, v in self.headers.items()}
            body = self.rfile.read(int(headers.get("content-length", 0) or 0))
            answer = standin.handle(self.command, url.path, query, headers, body)
            if answer is None:  # not a batch route: the live service answers
                sent = {k: v for k, v in headers.items() if k not in HOP_HEADERS}
                passed = standin.live.request(self.command, self.path, headers=sent, content=body)
                status, data = passed.status_code, passed.content
                kept = [(k, v) for k, v in passed.headers.multi_items() if k.lower() not in HOP_HEADERS]
            else:
                status, payload, content_type = answer
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                kept = [("Content-Type", content_type)]
            self.send_response(status)
            for name, value in kept:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _any

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", standin
    finally:
        server.shutdown()
        server.server_close()
        standin.live.close()
