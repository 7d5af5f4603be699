"""A 150 MB photo through a direct upload, the real API process measured: its resident memory (psutil, sampled
while the photo is sent and while its job is made) and the request body bytes it read (its
supir_http_request_body_bytes_total). Local storage: the signed PUT streams through the API to disk. S3 (moto's
server): the presigned POST goes to S3, and no request to the API carries the photo. Either way the job is made
from the stored object without the API holding it: a copy in the store, its header read in ranges, its sha256
(asked for: the result cache is on and the seed given) streamed. The API runs without workers: the job stays
queued, then is deleted with every object it had."""

from __future__ import annotations

import hashlib
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis

from jobs.store import JobStore
from supir_core.imageio import load_image
from tests.paths import DATA, REDIS_URL
from tests.servers import Service, moto_s3, running

SIDE = 4330  # 16-bit RGBA, stored without compression: 4330 rows of 1 + 4330 × 8 bytes, about 150 MB
LIMITS = {
    "max_upload_bytes": 160_000_000,
    "max_input_pixels": 20_000_000,  # 18.7 M pixels
    "result_cache": "owner",  # a seeded job is keyed by its photo's sha256: the API hashes the upload
}
RSS_GROWTH_BOUND = 20 * 2**20
SMALL = (DATA / "chelsea_degraded.jpg").read_bytes()
PIECE = 1 << 20


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write_big_png(path: Path) -> int:
    """A valid SIDE × SIDE 16-bit RGBA PNG whose pixel data is deflate's stored blocks (no compression), written
    in pieces; its size in bytes."""
    row = b"\x00" + bytes((x * 7 + x // 256) % 256 for x in range(SIDE * 8))  # filter type 0, a ramp
    deflate = zlib.compressobj(level=0)
    with path.open("wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", SIDE, SIDE, 16, 6, 0, 0, 0)))
        for first in range(0, SIDE, 30):
            rows = row * min(30, SIDE - first)
            file.write(png_chunk(b"IDAT", deflate.compress(rows)))
        file.write(png_chunk(b"IDAT", deflate.flush()) + png_chunk(b"IEND", b""))
    return path.stat().st_size


def pieces(path: Path) -> Iterator[bytes]:
    with path.open("rb") as file:
        while piece := file.read(PIECE):
            yield piece


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    for piece in pieces(path):
        digest.update(piece)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def big_png(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    path = tmp_path_factory.mktemp("big") / "big.png"
    size = write_big_png(path)
    assert 149_000_000 < size < 151_000_000
    return path, size, sha256_of(path)


class PeakRss:
    """The API process's resident memory, sampled every 10 ms on a thread while the block runs."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.before = self.peak = self.process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.before


def body_bytes(svc: Service) -> float:
    """Request body bytes the API process has read, every method together (its /metrics on the admin port)."""
    text = httpx.get(f"{svc.admin_url}/metrics", timeout=30).text
    lines = [line for line in text.splitlines() if line.startswith("supir_http_request_body_bytes_total{")]
    assert lines, "no supir_http_request_body_bytes_total in /metrics"
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def new_upload(client: httpx.Client, size: int, content_type: str) -> dict[str, Any]:
    answer = client.post("/v1/uploads", json={"content_type": content_type, "size": size})
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def send_local(target: dict[str, Any], body: bytes | Iterator[bytes], size: int) -> None:
    headers = {**target["headers"], "Content-Length": str(size)}  # a length: not chunked
    answer = httpx.put(target["url"], content=body, headers=headers, timeout=600)
    assert answer.status_code == 200, answer.text


def send_s3(target: dict[str, Any], file: Any) -> None:
    answer = httpx.post(target["url"], data=target["fields"], files={"file": ("photo", file)}, timeout=600)
    assert answer.status_code == 204, answer.text


def make_job(client: httpx.Client, upload_id: str) -> dict[str, Any]:
    created = client.post("/v1/jobs", json={"upload_id": upload_id, "params": {"seed": 1}}, timeout=600)
    assert created.status_code == 202, created.text
    return dict(created.json())


def report(case: str, rss: PeakRss, sent: float, size: int, seconds: float) -> None:
    print(
        f"{case}: {size:,} bytes; API RSS {rss.before / 2**20:.1f} MiB before, peak +{rss.growth / 2**20:.1f} MiB; "
        f"request body bytes the API read: {sent:,.0f}; upload and job in {seconds:.1f} s"
    )


def test_a_150_mb_photo_through_the_local_signed_put_in_bounded_api_memory(
    tmp_path: Path, fixture_a: Path, big_png: tuple[Path, int, str]
) -> None:
    path, size, sha256 = big_png
    objects = tmp_path / "objects"
    with (
        running(tmp_path, fixture_a, {"alice": {}}, with_workers=False, **LIMITS) as svc,
        svc.client("alice") as alice,
    ):
        warm = new_upload(alice, len(SMALL), "image/jpeg")  # every code path of the API loaded before measuring
        send_local(warm, SMALL, len(SMALL))
        make_job(alice, warm["id"])
        assert svc.api is not None
        sent_before, started = body_bytes(svc), time.monotonic()
        with PeakRss(svc.api.pid) as rss:
            target = new_upload(alice, size, "image/png")
            send_local(target, pieces(path), size)
            job = make_job(alice, target["id"])
        seconds, sent = time.monotonic() - started, body_bytes(svc) - sent_before
        report("local signed PUT", rss, sent, size, seconds)

        assert rss.growth < RSS_GROWTH_BOUND, f"API RSS grew {rss.growth / 2**20:.1f} MiB"
        # the PUT went through this process (the counter sees the photo), and nothing else of that size did
        assert size <= sent < size + 100_000, sent
        assert job["status"] == "queued" and (job["input"]["width"], job["input"]["height"]) == (SIDE, SIDE)
        record = JobStore(redis.Redis.from_url(REDIS_URL), svc.prefix).get(job["id"])
        assert record is not None and record.input_sha256 == sha256
        assert (objects / "inputs" / job["id"]).stat().st_size == size
        assert not list(objects.rglob("uploads/*")), "the upload's object was left behind"

        assert alice.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert not list(objects.rglob(f"*{job['id']}*"))

    # what the worker does with the job's input: the photo decodes whole (the API never decoded it)
    loaded = load_image(path.read_bytes())
    assert loaded.size == (SIDE, SIDE) and loaded.alpha is not None


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[tuple[str, Any]]:
    with moto_s3("supir-large") as endpoint_and_client:
        yield endpoint_and_client


def test_a_150_mb_photo_through_the_s3_presigned_post_never_reaches_the_api(
    tmp_path: Path, fixture_a: Path, big_png: tuple[Path, int, str], s3_endpoint: tuple[str, Any]
) -> None:
    path, size, sha256 = big_png
    endpoint, s3 = s3_endpoint
    settings = {
        "storage": "s3",
        "s3_bucket": "supir-large",
        "s3_endpoint_url": endpoint,
        "s3_path_style": "true",
        "s3_access_key_id": "test",
        "s3_secret_access_key": "test",
    }

    def keys() -> dict[str, int]:
        return {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket="supir-large").get("Contents", [])}

    with (
        running(tmp_path, fixture_a, {"alice": {}}, with_workers=False, **LIMITS, **settings) as svc,
        svc.client("alice") as alice,
    ):
        warm = new_upload(alice, len(SMALL), "image/jpeg")
        send_s3(warm, SMALL)
        make_job(alice, warm["id"])
        assert svc.api is not None
        sent_before, started = body_bytes(svc), time.monotonic()
        with PeakRss(svc.api.pid) as rss:
            target = new_upload(alice, size, "image/png")
            assert target["method"] == "POST" and target["url"].startswith(endpoint)
            with path.open("rb") as file:
                send_s3(target, file)
            job = make_job(alice, target["id"])
        seconds, sent = time.monotonic() - started, body_bytes(svc) - sent_before
        report("S3 presigned POST", rss, sent, size, seconds)

        assert rss.growth < RSS_GROWTH_BOUND, f"API RSS grew {rss.growth / 2**20:.1f} MiB"
        assert sent < 10_000, f"the API read {sent:,.0f} request body bytes"  # two small JSON bodies
        assert job["status"] == "queued" and (job["input"]["width"], job["input"]["height"]) == (SIDE, SIDE)
        record = JobStore(redis.Redis.from_url(REDIS_URL), svc.prefix).get(job["id"])
        assert record is not None and record.input_sha256 == sha256
        stored = keys()
        assert stored.get(f"inputs/{job['id']}") == size
        assert f"uploads/{target['id']}" not in stored, "the upload's object was left behind"

        assert alice.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert not [key for key in keys() if job["id"] in key]
