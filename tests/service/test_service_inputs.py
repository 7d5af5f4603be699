"""Bad input gets a clear JSON error with its own stable code, and loses nothing: no bad job kills a worker."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from jobs.queue import RESTORE_TASK, make_celery, variant_queue
from jobs.record import JobRecord
from jobs.settings import Settings
from tests.paths import DATA, REDIS_URL
from tests.servers import Service, wait_for_status

FAST = {"min_size": 64, "steps": 2, "seed": 3}


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), "gray" if mode != "1" else 1).save(buf, format="PNG")
    return buf.getvalue()


def jpeg() -> bytes:
    return (DATA / "chelsea_degraded.jpg").read_bytes()


def multipart(image: bytes | None, params: object = FAST, **fields: str) -> dict:
    request: dict = {"data": {"params": params if isinstance(params, str) else json.dumps(params), **fields}}
    if image is not None:
        request["files"] = {"image": ("photo", image, "application/octet-stream")}
    return request


# (kind of bad input, request, expected status, expected code, field)
CASES = [
    ("text file", multipart(b"just some text, not a picture"), 415, "unsupported_media_type", "image"),
    ("upload over the byte limit", multipart(b"\x89PNG\r\n\x1a\n" + b"\0" * 2_100_000), 413, "file_too_large", "image"),
    ("too many input pixels", multipart(png(2500, 2000)), 422, "image_too_large", "image"),
    ("decompression bomb", multipart(png(12000, 12000, "1")), 422, "decompression_bomb", "image"),
    ("image too small", multipart(png(4, 4)), 422, "image_too_small", "image"),
    (
        "output too large after upscale",
        multipart(png(1000, 1000), {"upscale": 8}),
        422,
        "output_too_large",
        "params.upscale",
    ),
    ("truncated image", multipart(png(300, 200)[:60] + b"\0" * 40), 422, "invalid_image", "image"),
    ("parameter out of range", multipart(jpeg(), {"steps": 0}), 422, "invalid_parameter", "params.steps"),
    ("unknown parameter", multipart(jpeg(), {"strength": 2}), 422, "unknown_parameter", "params.strength"),
    ("params not JSON", multipart(jpeg(), "{steps: 3"), 400, "invalid_json", "params"),
    ("no image", multipart(None), 400, "missing_image", "image"),
    (
        "file and URL",
        multipart(jpeg(), FAST, image_url="https://example.com/a.jpg"),
        400,
        "conflicting_image_sources",
        "image_url",
    ),
    ("URL not http", {"json": {"image_url": "ftp://example.com/a.jpg"}}, 400, "invalid_url", "image_url"),
    ("URL to loopback", {"json": {"image_url": "http://127.0.0.1:1/a.jpg"}}, 403, "url_forbidden", "image_url"),
    (
        "URL that does not resolve",
        {"json": {"image_url": "http://no-such-host.invalid/a.jpg"}},
        422,
        "url_fetch_failed",
        "image_url",
    ),
    (
        "bad webhook URL",
        multipart(jpeg(), FAST, webhook_url="mailto:ops@example.com"),
        400,
        "invalid_webhook_url",
        "webhook_url",
    ),
    ("unknown preset", multipart(jpeg(), FAST, preset="turbo"), 422, "invalid_parameter", "preset"),
    (
        "unknown field",
        {"json": {"image_url": "https://example.com/a.jpg", "colour": "red"}},
        400,
        "invalid_request",
        "colour",
    ),
    ("body not JSON", {"content": b"{", "headers": {"Content-Type": "application/json"}}, 400, "invalid_json", None),
    (
        "body of another type",
        {"content": b"x", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_media_type",
        None,
    ),
]


@pytest.mark.parametrize(("kind", "request_args", "status", "code", "field"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_its_own_code(
    service: Service, kind: str, request_args: dict, status: int, code: str, field: str | None
) -> None:
    with service.client("mallory") as client:
        response = client.post("/v1/jobs", **request_args)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["field"] == field
    assert error["message"] and "Traceback" not in error["message"]


def test_at_least_fifteen_distinct_codes() -> None:
    assert len({c[3] for c in CASES}) >= 15


def test_refused_requests_store_and_queue_nothing(service: Service) -> None:
    with service.client("mallory") as client:
        before = client.get("/v1/jobs").json()["jobs"]
        client.post("/v1/jobs", **multipart(png(4, 4)))
        assert client.get("/v1/jobs").json()["jobs"] == before


def test_bad_jobs_do_not_kill_the_worker(service: Service) -> None:
    """Jobs that pass the API but fail in the worker (a corrupt stored input, impossible params) each fail
    with a code, and the same worker restores the next photo."""
    settings = Settings(redis_url=REDIS_URL, key_prefix=service.prefix, queue=service.prefix)
    import redis

    from jobs.store import JobStore

    store = JobStore(redis.Redis.from_url(settings.redis_url), settings.key_prefix)
    celery = make_celery(settings)
    objects = Path(service.env["SUPIR_LOCAL_DIR"])
    poisoned = []
    for name, params, data in [
        ("garbage input", FAST, b"\x89PNG\r\n\x1a\n this is no longer a png"),
        ("impossible params", {**FAST, "steps": "many"}, jpeg()),
        ("missing input", FAST, None),
    ]:
        key = f"inputs/poison-{name.replace(' ', '-')}"
        record = JobRecord(owner="mallory", params=params, input_key=key, variant=settings.default_variant)
        if data is not None:
            (objects / "inputs").mkdir(parents=True, exist_ok=True)
            (objects / record.input_key).write_bytes(data)
        store.create(record)
        celery.send_task(RESTORE_TASK, args=[record.id], queue=variant_queue(settings, record.variant))
        poisoned.append(record.id)
    with service.client("mallory") as client:
        codes = [
            wait_for_status(client, job_id, {"failed", "succeeded"}, timeout=120)["error"]["code"]
            for job_id in poisoned
        ]
        assert codes == ["invalid_image", "internal_error", "input_missing"]  # a missing photo is not retried
        good = client.post("/v1/jobs", **multipart(jpeg()))
        assert good.status_code == 202
        assert wait_for_status(client, good.json()["id"], {"succeeded", "failed"})["status"] == "succeeded"
    assert all(w.poll() is None for w in service.workers)  # still the same, living worker
