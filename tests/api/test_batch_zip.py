"""A batch's results.zip is made while it is sent: memory holds one result at a time, not the archive
(real Redis, real files on disk; tracemalloc counts every allocation Python makes)."""

from __future__ import annotations

import os
import time
import tracemalloc
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from api.batches import zip_stream
from jobs.batches import BatchRecord
from jobs.record import JobRecord, JobResult, output_key
from jobs.storage import LocalStore
from jobs.store import JobStore
from tests.paths import REDIS_URL

RESULT_BYTES = 6_000_000
RESULTS = 16  # 96 MB of results in all


@pytest.fixture
def store() -> Iterator[JobStore]:
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"test-zip-{uuid.uuid4().hex[:8]}"
    yield JobStore(client, prefix)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)


def test_the_zip_streams_every_result_in_bounded_memory(store: JobStore, tmp_path: Path) -> None:
    objects = LocalStore(tmp_path / "objects", "http://127.0.0.1", "secret")
    job_ids = []
    for i in range(RESULTS + 1):
        record = JobRecord(owner="a", variant="v0Q")
        if i != 3:  # one job failed: no result, but a line in the manifest
            key = output_key(record.id)
            objects.put(key, os.urandom(RESULT_BYTES), "image/png")  # incompressible, as PNGs are
            result = JobResult(key=key, width=8, height=8, bytes=RESULT_BYTES)
            record = record.model_copy(update={"status": "succeeded", "result": result, "results": [result]})
        else:
            record = record.model_copy(update={"status": "failed"})
        store.create_finished(record.model_copy(update={"finished_at": time.time()}))
        job_ids.append(record.id)
    batch = BatchRecord(owner="a", job_ids=job_ids)
    services = SimpleNamespace(store=store, objects=objects)

    target = tmp_path / "results.zip"
    largest_chunk = 0
    tracemalloc.start()
    try:
        with target.open("wb") as out:
            for chunk in zip_stream(services, batch):  # type: ignore[arg-type]
                largest_chunk = max(largest_chunk, len(chunk))
                out.write(chunk)
                del chunk
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert target.stat().st_size > RESULTS * RESULT_BYTES
    # one result read whole plus a chunk or two in flight: far below the 96 MB archive
    assert peak < 2.5 * RESULT_BYTES, f"peak {peak / 1e6:.1f} MB"
    assert largest_chunk <= (1 << 20) + 64_000
    with zipfile.ZipFile(target) as archive:
        assert archive.testzip() is None  # every CRC right
        names = archive.namelist()
        assert len(names) == RESULTS + 1 and names[-1] == "manifest.json"
        assert names[0] == f"0000-{job_ids[0]}.png" and f"0003-{job_ids[3]}.png" not in names
        assert archive.getinfo(names[5]).file_size == RESULT_BYTES
