"""Batches through the real service (uvicorn, Celery workers on the tiny model, Redis, local storage): a batch of
200 photos shares one worker fairly with another key's single photo, survives a killed worker, ends once with one
webhook, and downloads as a zip; refusals name the item and leave nothing behind; cancel, DELETE, idempotency."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
from PIL import Image

from jobs.webhooks import verify
from tests.servers import WEBHOOK_SECRET, free_port, running, wait_for_status, wait_until

TINY = {"min_size": 64, "steps": 1}


def photos(count: int, seed: int = 0) -> list[bytes]:
    """Distinct small JPEGs (each its own pixels: no two inputs alike)."""
    made = []
    for i in range(count):
        image = Image.new("RGB", (72, 56), ((seed * 7 + i * 37) % 256, (i * 11) % 256, (i * 5 + 90) % 256))
        image.putpixel((i % 72, (i // 72) % 56), (255, 255, 255))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        made.append(buffer.getvalue())
    return made


def multipart(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"photo-{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]


def code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


class BatchReceiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        BatchReceiver.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_batch_of_200_shares_one_worker_fairly_survives_a_killed_worker_and_ends_once(
    tmp_path: Path, fixture_a: Path
) -> None:
    server = HTTPServer(("127.0.0.1", free_port()), BatchReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = {
        "rate_limit_per_minute": 100_000,
        "webhook_secret": WEBHOOK_SECRET,
        "allow_private_webhooks": "true",
        "batch_sweep_s": 2,
        "worker_lost_after_s": 6,  # the reaper finds the killed worker's job soon
    }
    try:
        with (
            running(tmp_path, fixture_a, {"a": {}, "b": {}}, **settings) as svc,
            svc.client("a") as a,
            svc.client("b") as b,
        ):
            hook = f"http://127.0.0.1:{server.server_port}/batch"
            # item 30 samples for seconds: the worker is killed while it runs, so a job is surely cut mid-run (the
            # others take a fraction of a second, and a kill between two of them would cut none)
            items = [{}] * 30 + [{"params": {"min_size": 128, "steps": 40}}]
            fields = {"params": json.dumps(TINY), "webhook_url": hook, "items": json.dumps(items)}
            created = a.post("/v1/batches", data=fields, files=multipart(photos(200)), timeout=120)
            assert created.status_code == 201, created.text
            batch = created.json()
            assert batch["total"] == 200 and batch["status"] == "running" and len(batch["job_ids"]) == 200
            first = batch["job_ids"][0]
            wait_for_status(a, first, {"running", "succeeded"}, timeout=120)
            single = b.post("/v1/jobs", data={"params": json.dumps(TINY)}, files={"image": ("b.jpg", photos(1, 9)[0])})
            assert single.status_code == 202, single.text
            b_job = single.json()
            assert b_job["queue_position"] <= 1  # next (or behind the one job of a's already picked)

            def cut_job_samples() -> bool:
                job = a.get(f"/v1/jobs/{batch['job_ids'][30]}").json()
                return job["status"] == "running" and (job.get("progress") or {}).get("step", 0) >= 2

            wait_until(cut_job_samples, 300, 0.05, "the batch's item 30 to sample")
            svc.kill_worker(svc.workers[0])  # mid-batch, mid-job: no ack, no cleanup
            svc.start_worker()

            view = wait_until(
                lambda: (v := a.get(f"/v1/batches/{batch['id']}").json())["status"] == "ended" and v,
                900,
                1.0,
                "the batch to end",
            )
            assert view["counts"]["succeeded"] == 200 and view["progress"] == 1.0, view["counts"]
            b_done = wait_for_status(b, b_job["id"], {"succeeded"}, timeout=120)

            # fair share: b's job started within two of a's jobs after it was queued
            records = [a.get(f"/v1/jobs/{job_id}").json() for job_id in batch["job_ids"]]
            ahead = [r for r in records if b_done["created_at"] < r["started_at"] < b_done["started_at"]]
            assert len(ahead) <= 2, [r["id"] for r in ahead]
            # nothing lost or doubled: every job ran to one success; the killed run counts as an attempt
            assert all(r["status"] == "succeeded" for r in records)
            assert records[30]["attempts"] == 2 and sum(r["attempts"] for r in records) <= 201

            # one webhook for the batch, signed, with the final counts (a second would have come by now)
            wait_until(lambda: BatchReceiver.received, 60, 0.2, "the batch webhook")
            time.sleep(6)  # three beats of the batches sweep
            assert len(BatchReceiver.received) == 1
            headers, body = BatchReceiver.received[0]
            assert verify(WEBHOOK_SECRET, headers, body)
            event = json.loads(body)
            assert event["event"] == "batch.completed" and event["batch"]["id"] == batch["id"]
            assert event["batch"]["counts"]["succeeded"] == 200
            assert a.get(f"/v1/batches/{batch['id']}").json()["webhook"]["state"] == "delivered"

            # the zip: every result, in the batch's order, and a manifest
            with a.stream("GET", f"/v1/batches/{batch['id']}/results.zip", timeout=120) as response:
                assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
                assert "content-length" not in response.headers  # streamed as it is made
                archive = zipfile.ZipFile(io.BytesIO(response.read()))
            names = archive.namelist()
            results = [n for n in names if n != "manifest.json"]
            assert results == [f"{i:04d}-{job_id}.png" for i, job_id in enumerate(batch["job_ids"])]
            assert Image.open(io.BytesIO(archive.read(results[7]))).size == (
                records[7]["results"][0]["width"],
                records[7]["results"][0]["height"],
            )
            manifest = json.loads(archive.read("manifest.json"))
            assert [j["status"] for j in manifest["jobs"]] == ["succeeded"] * 200
    finally:
        server.shutdown()
        server.server_close()


def test_a_batch_is_checked_whole_before_anything_is_queued(tmp_path: Path, fixture_a: Path) -> None:
    with (
        running(tmp_path, fixture_a, {"a": {}}, with_workers=False, max_batch_items=4) as svc,
        svc.client("a") as a,
    ):
        good = photos(3)
        bad = a.post("/v1/batches", files=multipart([*good[:2], b"not an image at all", good[2]]))
        assert bad.status_code == 415 and code(bad) == "unsupported_media_type", bad.text
        assert bad.json()["error"]["field"].startswith("items[2]")
        too_many = a.post("/v1/batches", files=multipart(photos(5)))
        assert too_many.status_code == 422 and code(too_many) == "too_many_items"
        item_params = a.post(
            "/v1/batches", data={"items": json.dumps([{}, {"params": {"steps": 0}}])}, files=multipart(good[:2])
        )
        assert item_params.status_code == 422 and item_params.json()["error"]["field"] == "items[1].params.steps"
        both = a.post("/v1/batches", json={"items": [{"upload_id": "upl_" + "0" * 32, "image_url": "http://x.org/a"}]})
        assert both.status_code == 400 and both.json()["error"]["field"] == "items[0]"
        unknown = a.post("/v1/batches", json={"items": [{"image_url": "http://x.org/a"}], "colour": "red"})
        assert unknown.status_code == 400 and code(unknown) == "invalid_request"
        empty = a.post("/v1/batches", json={"items": []})
        assert empty.status_code == 400 and code(empty) == "missing_image"
        # nothing was kept of the refused batches: no job, no stored photo
        assert a.get("/v1/jobs").json()["jobs"] == []
        assert not list((tmp_path / "objects").rglob("inputs/*"))


def test_uploads_batch_replay_list_cancel_and_delete(tmp_path: Path, fixture_a: Path) -> None:
    with (
        running(tmp_path, fixture_a, {"a": {"max_active_jobs": 1}, "b": {}}, with_workers=False) as svc,
        svc.client("a") as a,
        svc.client("b") as b,
    ):
        upload_ids = []
        for data in photos(3):
            target = a.post("/v1/uploads", json={"content_type": "image/jpeg", "size": len(data)}).json()
            assert httpx.put(target["url"], content=data, headers=target["headers"]).status_code in (200, 201, 204)
            upload_ids.append(target["id"])
        body = {
            "items": [
                {"upload_id": upload_ids[0]},
                {"upload_id": upload_ids[1]},
                {"upload_id": upload_ids[2], "params": {"steps": 2}},
            ],
            "params": {"steps": 4, "seed": 5},
            "expires_after": 600,
        }
        created = a.post("/v1/batches", json=body, headers={"Idempotency-Key": "box-1"})
        assert created.status_code == 201, created.text
        batch = created.json()
        replay = a.post("/v1/batches", json=body, headers={"Idempotency-Key": "box-1"})
        assert replay.status_code == 200 and replay.json()["id"] == batch["id"]
        assert replay.headers["idempotent-replayed"] == "true"
        assert batch["counts"]["queued"] == 3 and batch["expires_after"] == 600 and batch["eta"] is None
        # the batch's jobs hold none of the key's active-job slots (1 here): a job of its own still goes in
        single = a.post("/v1/jobs", files={"image": ("one.jpg", photos(1, 5)[0], "image/jpeg")})
        assert single.status_code == 202, single.text

        jobs = a.get(f"/v1/batches/{batch['id']}/jobs", params={"limit": 2}).json()
        assert [j["id"] for j in jobs["jobs"]] == batch["job_ids"][:2] and jobs["next_cursor"] == 2
        rest = a.get(f"/v1/batches/{batch['id']}/jobs", params={"cursor": 2}).json()
        assert [j["params"]["steps"] for j in rest["jobs"]] == [2] and rest["next_cursor"] is None
        assert [j["params"]["seed"] for j in jobs["jobs"]] == [5, 5]
        assert {j["batch_id"] for j in jobs["jobs"]} == {batch["id"]}
        assert b.get(f"/v1/batches/{batch['id']}").status_code == 404  # another key's batch does not exist

        canceled = a.post(f"/v1/batches/{batch['id']}/cancel").json()
        assert canceled["status"] == "ended" and canceled["counts"]["canceled"] == 3
        assert canceled["expires_at"] is not None

        assert a.delete(f"/v1/batches/{batch['id']}").status_code == 204
        gone = a.get(f"/v1/batches/{batch['id']}")
        assert gone.status_code == 410 and code(gone) == "batch_deleted"
        assert code(a.get(f"/v1/jobs/{batch['job_ids'][0]}")) == "job_deleted"
        assert a.delete(f"/v1/batches/{batch['id']}").status_code == 204  # idempotent
        kept = {p.name for p in (tmp_path / "objects").rglob("inputs/*")}
        assert kept == {single.json()["id"]}  # the batch's photos are gone; the key's own job keeps its
