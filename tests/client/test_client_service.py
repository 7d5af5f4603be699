"""supir_client against the live service (uvicorn, Celery workers, Redis, the tiny model): a restoration round trip
through a direct upload, parameters sent only when set, waiting (Prefer: wait, the event stream, polling), the
lower-level calls, typed errors, a retried create that makes one job, webhook verification and the CLI."""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from supir_client import (
    ApiError,
    Client,
    InvalidParameter,
    InvalidSignature,
    JobCanceled,
    JobDeleted,
    NotFound,
    StaleWebhook,
    SupirError,
    Unauthorized,
    WaitTimeout,
)
from supir_client.models import InputImage, Size
from supir_client.webhooks import verify

from jobs.webhooks import signed_headers
from supir_core.params import PRESETS, RestoreParams
from tests.client.conftest import Hooks, Recording
from tests.paths import DATA, REPO
from tests.servers import BIN, FAST, SLOW, WEBHOOK_SECRET, Service, wait_until

PHOTO = DATA / "chelsea_degraded.jpg"
PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


def client_for(service: Service, key: str, transport: Recording | None = None) -> Client:
    return Client(service.url, service.keys[key], timeout=60, transport=transport)


def test_restore_uploads_directly_waits_and_downloads_every_sample(client_service: Service, tmp_path: Path) -> None:
    sent = Recording()
    with client_for(client_service, "alice", sent) as client:
        restoration = client.restore(PHOTO, min_size=64, steps=3, seed=5, num_samples=2)
    job = restoration.job
    assert job.status == "succeeded" and job.input == InputImage(150, 113, "image/jpeg")
    assert [r.seed for r in job.results] == [5, 6]
    assert len(restoration.samples) == 2
    for data, result in zip(restoration.samples, job.results, strict=True):
        assert data.startswith(PNG_MAGIC) and len(data) == result.bytes
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (result.width, result.height)
    assert restoration.samples[0] != restoration.samples[1]  # two seeds, two images

    # the photo went straight to storage: an upload, its bytes PUT to the signed URL (without the key), then a
    # JSON job naming it, held with Prefer: wait; then each sample
    upload_id = sent.bodies("POST", "/v1/jobs")[0]["upload_id"]
    calls = [(r.method, r.url.path) for r in sent.sent]
    assert calls[:3] == [("POST", "/v1/uploads"), ("PUT", f"/v1/uploads/{upload_id}"), ("POST", "/v1/jobs")]
    put, create = sent.sent[1], sent.sent[2]
    assert put.content == PHOTO.read_bytes() and "authorization" not in put.headers
    assert put.headers["content-type"] == "image/jpeg"
    assert create.headers["prefer"] == "wait=60" and create.headers["content-type"] == "application/json"
    results = [r.url.params["index"] for r in sent.sent if r.url.path == f"/v1/jobs/{job.id}/result"]
    assert results == ["0", "1"]

    paths = restoration.save(tmp_path / "out")
    assert [p.name for p in paths] == ["chelsea_degraded.png", "chelsea_degraded-1.png"]
    assert [p.read_bytes() for p in paths] == restoration.samples


def test_preset_quality_sends_only_what_was_set(client_service: Service, tmp_path: Path) -> None:
    sent = Recording()
    with client_for(client_service, "alice", sent) as client:
        restoration = client.restore(PHOTO.read_bytes(), preset="quality", min_size=64, steps=3, seed=1)
    (body,) = sent.bodies("POST", "/v1/jobs")
    chosen = {"min_size": 64, "steps": 3, "seed": 1}
    assert body == {"upload_id": body["upload_id"], "preset": "quality", "params": chosen}
    job = restoration.job
    assert job.status == "succeeded" and job.preset == "quality"
    # the preset's values ran: had the client sent the schema's defaults, they would have won over the preset
    defaults = RestoreParams()
    for name, value in PRESETS["quality"].items():
        assert job.params[name] == value != getattr(defaults, name), name
    assert job.params["steps"] == 3 and job.params["min_size"] == 64
    assert [p.name for p in restoration.save(tmp_path)] == [f"{job.id}.png"]  # bytes have no file name


def test_wait_follows_the_event_stream_and_falls_back_to_polling(client_service: Service) -> None:
    sent = Recording()
    with client_for(client_service, "dave", sent) as client:
        queued = client.restore(PHOTO, wait=False, **FAST)
        assert queued.samples == [] and "prefer" not in sent.sent[-1].headers
        ended = client.wait(queued.job.id, timeout=120)
        assert ended.status == "succeeded" and ended.id == queued.job.id
        paths = [r.url.path for r in sent.sent]
        assert f"/v1/jobs/{ended.id}/events" in paths
        assert f"/v1/jobs/{ended.id}" not in paths  # the stream sufficed: no polling

        slow = client.create_job(upload_id=client.upload(PHOTO).id, params=SLOW)
        with pytest.raises(WaitTimeout) as timed_out:
            client.wait(slow.id, timeout=1)
        assert timed_out.value.job is not None and timed_out.value.job.status in ("queued", "running")
        assert client.cancel(slow.id).cancel_requested
        canceled = client.wait(slow.id, timeout=120)
        assert canceled.status == "canceled"
        with pytest.raises(JobCanceled) as ended_without_results:
            client.samples(canceled)
        assert ended_without_results.value.job == canceled

    # event streams cut off every time: the client polls
    cut = Recording(drop=lambda request: request.url.path.endswith("/events"))
    with client_for(client_service, "dave", cut) as client:
        job = client.create_job(upload_id=client.upload(PHOTO).id, params=FAST)
        assert client.wait(job.id, timeout=120).status == "succeeded"
        paths = [r.url.path for r in cut.sent]
        assert paths.count(f"/v1/jobs/{job.id}/events") == 3 and f"/v1/jobs/{job.id}" in paths


def test_the_lower_level_calls(client_service: Service) -> None:
    with client_for(client_service, "carol") as client:
        done = client.restore(PHOTO, min_size=64, steps=3, seed=3).job
        again = client.get_job(done.id)
        assert (again.id, again.status, again.params, again.results[0].width) == (
            done.id, "succeeded", done.params, done.results[0].width,
        )  # fmt: skip
        page = client.list_jobs(limit=1)
        assert [j.id for j in page.jobs] == [done.id] and page.next_cursor is not None
        assert client.list_jobs(cursor=page.next_cursor).jobs == ()
        assert [j.id for j in client.iter_jobs(status="succeeded")] == [done.id]

        thumbnail = client.thumbnail(done.id, size=32)
        with Image.open(io.BytesIO(thumbnail)) as image:
            assert image.format == "JPEG" and max(image.size) == 32

        estimate = client.estimate(150, 113, min_size=64, steps=3)
        assert estimate.input == Size(150, 113) and estimate.steps == 3 and estimate.num_samples == 1
        assert estimate.gpu_seconds > 0 and estimate.kind == "restore"
        quality = client.estimate(150, 113, preset="quality", steps=3)
        assert quality.processing.width >= 64

        short = client.create_upload("image/jpeg", 10, expires_after=30)
        assert short.kept_until is not None and short.kept_until <= short.expires_at  # kept no longer than asked

        today = dt.datetime.now(dt.UTC).date()
        # the worker counts a job just after its ending is recorded: a read in that instant may not see it yet
        usage = wait_until(lambda: (u := client.usage()).total.jobs >= 1 and u, 30, 0.1, "the job in usage")
        assert usage.key == "carol" and usage.last == today and usage.total.jobs == 1
        assert client.usage(today - dt.timedelta(days=2)).days[-1].date == today

        client.delete(done.id)
        client.delete(done.id)  # idempotent
        with pytest.raises(JobDeleted) as deleted:
            client.get_job(done.id)
        assert deleted.value.status == 410 and deleted.value.code == "job_deleted"
        with pytest.raises(NotFound):
            client.get_job("job_" + "0" * 32)


def test_bad_requests_raise_typed_errors(client_service: Service) -> None:
    with client_for(client_service, "erin") as client:
        with pytest.raises(InvalidParameter) as refused:
            client.restore(PHOTO, min_size=64, steps=5000)
        error = refused.value
        assert isinstance(error, ApiError) and isinstance(error, SupirError)
        assert (error.status, error.code, error.field) == (422, "invalid_parameter", "params.steps")
        assert "5000" in error.message or "200" in error.message
        with pytest.raises(InvalidParameter) as unknown:
            client.restore(PHOTO, stepz=3)
        assert unknown.value.code == "unknown_parameter"
        with pytest.raises(InvalidParameter) as preset:
            client.restore(PHOTO, preset="nonesuch")
        assert preset.value.field == "preset"
        assert client.retries == 0  # refusals are final: nothing was sent again
        with pytest.raises(ValueError, match="PNG, JPEG"):
            client.restore(b"plain text, no image")
        assert client.list_jobs().jobs == ()  # none of these made a job
    with Client(client_service.url, "sk_not_a_key") as stranger, pytest.raises(Unauthorized) as unauthorized:
        stranger.list_jobs()
    assert unauthorized.value.code == "unauthorized"


def test_a_retried_create_makes_exactly_one_job(client_service: Service) -> None:
    creates: list[str] = []

    def first_create(request) -> bool:  # type: ignore[no-untyped-def]
        if request.method == "POST" and request.url.path == "/v1/jobs":
            creates.append(request.headers["idempotency-key"])
            return len(creates) == 1
        return False

    sent = Recording(drop=first_create)
    with client_for(client_service, "bob", sent) as client:
        restoration = client.restore(PHOTO, min_size=64, steps=3, seed=2)
        assert client.retries == 1
    assert len(creates) == 2 and creates[0] == creates[1]  # the retry carried the first try's key
    assert restoration.job.status == "succeeded" and len(restoration.samples) == 1
    with client_for(client_service, "bob") as client:
        assert [j.id for j in client.iter_jobs()] == [restoration.job.id]  # one job for the two creates
        client.restore(PHOTO, min_size=64, steps=3, seed=2)  # another call: another key, another job
        assert len(list(client.iter_jobs())) == 2


def test_webhooks_are_verified_and_tampered_or_stale_ones_refused(client_service: Service, hooks: Hooks) -> None:
    with client_for(client_service, "alice") as client:
        job = client.restore(PHOTO, webhook_url=hooks.url, min_size=64, steps=3).job
    headers, body = wait_until(lambda: hooks.received and hooks.received[0], 60, 0.1, "the webhook")
    event = verify(body, headers, WEBHOOK_SECRET)
    assert event.name == "job.succeeded" and event.job is not None and event.job.id == job.id
    assert event.job.status == "succeeded" and event.job.result is not None and event.job.result.width == 150
    assert verify(body, headers, ["an-older-secret", WEBHOOK_SECRET]).job == event.job  # during a rotation

    with pytest.raises(InvalidSignature):
        verify(body.replace(b'"succeeded"', b'"failed"', 1), headers, WEBHOOK_SECRET)
    with pytest.raises(InvalidSignature):
        verify(body, headers, "another-secret")
    with pytest.raises(InvalidSignature):
        verify(body, {k: v for k, v in headers.items() if k.lower() != "x-supir-signature"}, WEBHOOK_SECRET)
    sent_at = int(headers["X-Supir-Timestamp"])
    moved = {**headers, "X-Supir-Timestamp": str(sent_at - 1000)}  # an old time put on a fresh body
    with pytest.raises(InvalidSignature):
        verify(body, moved, WEBHOOK_SECRET)
    assert verify(body, headers, WEBHOOK_SECRET, now=sent_at + 299).name == "job.succeeded"
    with pytest.raises(StaleWebhook):
        verify(body, headers, WEBHOOK_SECRET, now=sent_at + 301)  # a replay, five minutes on
    with pytest.raises(StaleWebhook):
        verify(body, headers, WEBHOOK_SECRET, tolerance_s=10, now=sent_at - 11)  # from the future

    # the service's own signer, for a batch's event too
    batch = b'{"event": "batch.completed", "batch": {"id": "bat_' + b"1" * 32 + b'", "status": "ended", "total": 2}}'
    signed = verify(batch, signed_headers(WEBHOOK_SECRET, batch), WEBHOOK_SECRET)
    assert signed.name == "batch.completed" and signed.batch is not None and signed.batch.ended


def test_the_cli_restores_a_photo(client_service: Service, tmp_path: Path) -> None:
    env = {**os.environ, "SUPIR_URL": client_service.url, "SUPIR_API_KEY": client_service.keys["alice"]}
    command = [str(BIN / "supir-client"), "restore", str(PHOTO), "-o", str(tmp_path)]
    params = ["--param", "min_size=64", "--param", "steps=3", "--param", "output_format=jpeg"]
    done = subprocess.run([*command, *params], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    written = Path(done.stdout.strip())
    assert written == tmp_path / "chelsea_degraded.jpg" and written.read_bytes().startswith(JPEG_MAGIC)

    refused = subprocess.run([*command, "--param", "steps=5000"], capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 1 and "invalid_parameter" in refused.stderr and "params.steps" in refused.stderr


def test_the_readmes_first_example_runs_as_written(client_service: Service, tmp_path: Path) -> None:
    readme = (REPO / "clients" / "python" / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.DOTALL)
    assert example and "restore(" in example.group(1)
    shutil.copy(PHOTO, tmp_path / "old_photo.jpg")
    env = {**os.environ, "SUPIR_URL": client_service.url, "SUPIR_API_KEY": client_service.keys["dave"]}
    done = subprocess.run(
        [sys.executable, "-c", example.group(1)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "restored" / "old_photo.png") as image:
        assert image.size == (300, 226)  # upscale=2 of 150×113
