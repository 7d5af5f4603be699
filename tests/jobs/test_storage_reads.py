"""The object stores' partial reads and copies (what a direct upload's job is made with, api.creation), on both
stores: S3 through moto's server over real HTTP, local on a directory."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.storage import LocalStore, ObjectMissing, ObjectStore, S3Store
from tests.servers import moto_s3

DATA = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and 4 bytes: a last piece shorter than the others


@pytest.fixture(scope="module")
def s3_client() -> Iterator[Any]:
    with moto_s3("reads") as (_, client):
        yield client


@pytest.fixture(params=["local", "s3"])
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path, "http://127.0.0.1", "secret")
    client = request.getfixturevalue("s3_client")
    bucket = f"reads-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    return S3Store(client, bucket)


def test_read_range_gives_those_bytes_and_fewer_at_the_end(objects: ObjectStore) -> None:
    objects.put("uploads/a", DATA, "image/png")
    assert objects.read_range("uploads/a", 0, 16) == DATA[:16]
    assert objects.read_range("uploads/a", 1000, 70_000) == DATA[1000:71_000]
    assert objects.read_range("uploads/a", len(DATA) - 3, 100) == DATA[-3:]
    with pytest.raises(ObjectMissing):
        objects.read_range("uploads/none", 0, 16)


def test_chunks_stream_the_whole_object_in_bounded_pieces(objects: ObjectStore) -> None:
    objects.put("uploads/a", DATA, "image/png")
    pieces = list(objects.chunks("uploads/a", 65_536))
    assert b"".join(pieces) == DATA
    assert max(len(p) for p in pieces) <= 65_536 and len(pieces) >= len(DATA) // 65_536
    with pytest.raises(ObjectMissing):
        list(objects.chunks("uploads/none", 65_536))


def test_copy_is_a_separate_object_under_its_own_key(objects: ObjectStore) -> None:
    objects.put("uploads/a", DATA, "image/png")
    objects.copy("uploads/a", "inputs/job_a")
    assert objects.get("inputs/job_a") == DATA
    objects.put("uploads/a", b"replaced", "image/png")  # the source's later bytes are not the copy's
    objects.delete("uploads/a")
    assert objects.get("inputs/job_a") == DATA
    objects.put("inputs/job_a", b"older", "image/png")
    objects.put("uploads/b", DATA[:10], "image/png")
    objects.copy("uploads/b", "inputs/job_a")  # over an object: replaced
    assert objects.get("inputs/job_a") == DATA[:10]
    with pytest.raises(ObjectMissing):
        objects.copy("uploads/none", "inputs/job_b")
    with pytest.raises(ObjectMissing):
        objects.size("inputs/job_b")
    if isinstance(objects, S3Store):
        head = objects.client.head_object(Bucket=objects.bucket, Key="inputs/job_a")
        assert head["ContentType"] == "image/png"


def test_a_local_copy_is_as_new_as_its_making_for_the_age_sweep(tmp_path: Path) -> None:
    objects = LocalStore(tmp_path, "http://127.0.0.1", "secret")
    objects.put("uploads/a", DATA, "image/png")
    old = time.time() - 7200
    os.utime(tmp_path / "uploads/a", (old, old))
    objects.copy("uploads/a", "inputs/job_a")
    objects.delete("uploads/a")
    assert objects.delete_older_than(time.time() - 3600) == 0  # the copy is minutes old, not its source's hours
    assert objects.get("inputs/job_a") == DATA
    assert not list(tmp_path.rglob("*.part"))
