"""jobs.retention on both object stores (S3: moto's server over real HTTP; local: a directory) and a real Redis:
an erase or an expiry removes every object of the job (input, each sample's result, thumbnails, stage 1) and
nothing of the job beside it; a tombstone stays for the erased one."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import redis
from moto.server import ThreadedMotoServer

from jobs.record import JobRecord, input_key, output_key, stage1_key, thumbnail_key
from jobs.retention import erase, expire_due
from jobs.storage import LocalStore, ObjectStore, S3Store
from jobs.store import JobStore
from tests.paths import REDIS_URL
from tests.servers import free_port


@pytest.fixture(scope="module")
def s3_client() -> Iterator[object]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server._server.server_address[:2]  # type: ignore[union-attr]
    client = boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    yield client
    server.stop()


@pytest.fixture(params=["local", "s3"])
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path, "http://127.0.0.1", "secret")
    client = request.getfixturevalue("s3_client")
    bucket = f"retention-{uuid.uuid4().hex[:8]}"  # a test's own: it lists what is left
    client.create_bucket(Bucket=bucket)
    return S3Store(client, bucket)


@pytest.fixture
def store() -> Iterator[JobStore]:
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    yield JobStore(client, prefix, retention_s=3600)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)


def keys_of(job_id: str) -> list[str]:
    return [
        input_key(job_id),
        output_key(job_id, 0, "png"),
        output_key(job_id, 1, "webp"),
        thumbnail_key(job_id, 256),
        thumbnail_key(job_id, 64, 1),
        stage1_key(job_id),
    ]


def listed(objects: ObjectStore) -> set[str]:
    if isinstance(objects, LocalStore):
        return {str(p.relative_to(objects.root)) for p in objects.root.rglob("*") if p.is_file()}
    assert isinstance(objects, S3Store)
    return {o["Key"] for o in objects.client.list_objects_v2(Bucket=objects.bucket).get("Contents", [])}


def stored_job(store: JobStore, objects: ObjectStore, **fields: object) -> JobRecord:
    record = JobRecord(owner="alice", **fields)  # type: ignore[arg-type]
    store.create(record)
    for key in keys_of(record.id):
        objects.put(key, b"x", "application/octet-stream")
    return record


def test_erase_removes_every_object_of_the_job_and_leaves_a_tombstone(store: JobStore, objects: ObjectStore) -> None:
    job, other = stored_job(store, objects), stored_job(store, objects)
    assert erase(store, objects, job, "deleted") == len(keys_of(job.id))
    assert listed(objects) == set(keys_of(other.id))
    assert store.get(job.id) is None and store.get(other.id) is not None
    assert store.tombstone(job.id) == {"owner": "alice", "reason": "deleted", "at": pytest.approx(time.time(), abs=5)}
    assert store.cancel_requested(job.id) and store.active_count("alice") == 1  # its quota slot is free


def test_the_expiry_sweep_erases_only_jobs_past_their_expires_at(store: JobStore, objects: ObjectStore) -> None:
    short, long = stored_job(store, objects, expires_after=1), stored_job(store, objects)
    for job in (short, long):
        ended = store.finish(job.id, "succeeded")
        assert ended is not None and ended.expires_at is not None
    assert expire_due(store, objects, now=time.time()) == 0  # none due yet
    assert expire_due(store, objects, now=time.time() + 2) == 1  # the short one only (the long: the retention)
    assert listed(objects) == set(keys_of(long.id))
    time.sleep(2.1)
    assert store.get(short.id) is None and store.get(long.id) is not None  # the record's own TTL
    assert store.tombstone(short.id) is None  # an expiry leaves no tombstone: its reads are 404
