"""Direct uploads (`POST /v1/uploads`) against the real service: local storage (a signed PUT on the API, streamed
to the store) and S3 (moto's server: a presigned POST), forged uploads refused, unused uploads swept."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from jobs.retention import expire_due
from jobs.storage import LocalStore
from jobs.store import JobStore
from tests.paths import DATA, REDIS_URL
from tests.servers import FAST, moto_s3, running, submit, wait_for_status

PHOTO = (DATA / "chelsea_degraded.jpg").read_bytes()


def new_upload(client: httpx.Client, size: int = len(PHOTO), content_type: str = "image/jpeg") -> dict:
    answer = client.post("/v1/uploads", json={"content_type": content_type, "size": size})
    assert answer.status_code == 201, answer.text
    return answer.json()


def put(target: dict, body: bytes | Iterator[bytes], **headers: str) -> httpx.Response:
    return httpx.put(target["url"], content=body, headers={**target["headers"], **headers}, timeout=30)


def code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


def with_query(url: str, **changes: str) -> str:
    base, _, query = url.partition("?")
    fields = dict(part.split("=", 1) for part in query.split("&"))
    return base + "?" + "&".join(f"{k}={v}" for k, v in {**fields, **changes}.items())


def test_local_upload_makes_a_job_and_forged_uploads_are_refused(tmp_path: Path, fixture_a: Path) -> None:
    with (
        running(tmp_path, fixture_a, {"alice": {}, "bob": {}}) as svc,
        svc.client("alice") as alice,
        svc.client("bob") as bob,
    ):
        target = new_upload(alice)
        assert target["method"] == "PUT" and target["url"].startswith(f"{svc.url}/v1/uploads/{target['id']}?")
        assert target["expires_at"].endswith("Z") and target["fields"] == {}

        # forged: a longer body than signed (declared, then chunked with no length), another type, a bad signature
        assert code(put(target, PHOTO + b"extra")) == "file_too_large"
        chunked = put(target, iter([PHOTO, b"more than was signed"]))
        assert chunked.status_code == 413 and code(chunked) == "file_too_large"
        assert code(put(target, PHOTO[:-10])) == "upload_incomplete"
        assert put(target, PHOTO, **{"Content-Type": "image/png"}).status_code == 415
        tampered = {**target, "url": with_query(target["url"], signature="0" * 64)}
        assert put(tampered, PHOTO).status_code == 403 and code(put(tampered, PHOTO)) == "invalid_signature"
        later = {**target, "url": with_query(target["url"], expires=str(int(time.time()) + 86_400))}
        assert code(put(later, PHOTO)) == "invalid_signature"  # the expiry is signed too
        assert not list((tmp_path / "objects").rglob("uploads/*")), "a refused body left bytes behind"
        # nothing received yet: a job naming it is refused before queueing
        assert code(alice.post("/v1/jobs", json={"upload_id": target["id"]})) == "upload_incomplete"

        received = put(target, PHOTO)
        assert received.status_code == 200, received.text
        assert received.json()["size"] == len(PHOTO)

        # another key's upload is as absent as a missing one
        assert bob.post("/v1/jobs", json={"upload_id": target["id"]}).status_code == 404
        assert bob.post("/v1/jobs", json={"upload_id": "upl_" + "0" * 32}).status_code == 404
        created = alice.post("/v1/jobs", json={"upload_id": target["id"], "params": FAST})
        assert created.status_code == 202, created.text
        job = wait_for_status(alice, created.json()["id"], {"succeeded", "failed"})
        assert job["status"] == "succeeded", job["error"]
        assert (job["input"]["width"], job["input"]["height"]) == (150, 113)
        # used once: the job has its own copy (its retention and DELETE cover it), the upload is gone
        assert not list((tmp_path / "objects").rglob("uploads/*"))
        assert alice.post("/v1/jobs", json={"upload_id": target["id"]}).status_code == 404
        assert alice.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert not list((tmp_path / "objects").rglob(f"*{job['id']}*"))

        # bytes that are no image: refused when the job is created, nothing queued, no copy left, the upload kept
        junk = b"not an image at all, just text " * 40
        target = new_upload(alice, len(junk), "image/png")
        assert put(target, junk).status_code == 200
        before = alice.get("/v1/jobs").json()["jobs"]
        refused = alice.post("/v1/jobs", json={"upload_id": target["id"]})
        assert refused.status_code == 415 and code(refused) == "unsupported_media_type"
        assert alice.get("/v1/jobs").json()["jobs"] == before
        assert not list((tmp_path / "objects").rglob("inputs/*"))
        assert (tmp_path / "objects" / "uploads" / target["id"]).exists()

        # the intake limits bound the upload itself
        assert code(alice.post("/v1/uploads", json={"content_type": "text/plain", "size": 10})) == (
            "unsupported_media_type"
        )
        assert code(alice.post("/v1/uploads", json={"content_type": "image/png", "size": 10**12})) == "file_too_large"
        assert alice.post("/v1/uploads", json={"content_type": "image/png", "size": 0}).status_code == 400
        assert httpx.post(f"{svc.url}/v1/uploads", json={"content_type": "image/png", "size": 10}).status_code == 401


def test_expired_upload_urls_are_refused_and_unused_uploads_are_swept(tmp_path: Path, fixture_a: Path) -> None:
    settings = {"upload_url_expires_s": 3, "upload_retention_s": 6}
    with (
        running(tmp_path, fixture_a, {"alice": {}}, with_workers=False, **settings) as svc,
        svc.client("alice") as alice,
    ):
        kept = new_upload(alice)
        assert put(kept, PHOTO).status_code == 200
        late = new_upload(alice)
        time.sleep(3.5)
        expired = put(late, PHOTO)
        assert expired.status_code == 403 and code(expired) == "upload_expired"
        objects = LocalStore(tmp_path / "objects", svc.url, "unused")
        assert objects.size(f"uploads/{kept['id']}") == len(PHOTO)

        store = JobStore(redis.Redis.from_url(REDIS_URL), svc.prefix)
        time.sleep(3)  # past the retention: the sweep (the beat's expire_due) erases the unused upload
        assert expire_due(store, objects) == 2
        assert not list((tmp_path / "objects").rglob("uploads/*"))
        assert alice.post("/v1/jobs", json={"upload_id": kept["id"]}).status_code == 404


def test_an_upload_is_erased_after_its_own_expires_after(tmp_path: Path, fixture_a: Path) -> None:
    with (
        running(tmp_path, fixture_a, {"alice": {}}, with_workers=False, upload_retention_s=600) as svc,
        svc.client("alice") as alice,
    ):
        too_long = alice.post("/v1/uploads", json={"content_type": "image/jpeg", "size": 10, "expires_after": 601})
        assert too_long.status_code == 422 and too_long.json()["error"]["field"] == "expires_after"
        short = alice.post("/v1/uploads", json={"content_type": "image/jpeg", "size": len(PHOTO), "expires_after": 2})
        assert short.status_code == 201, short.text
        target = short.json()
        # the URL takes bytes no longer than the upload is kept, and the view says when that is
        assert target["kept_until"] == target["expires_at"]
        assert put(target, PHOTO).status_code == 200
        kept = new_upload(alice)  # the service's retention (600 s)
        assert put(kept, PHOTO).status_code == 200
        objects = LocalStore(tmp_path / "objects", svc.url, "unused")
        store = JobStore(redis.Redis.from_url(REDIS_URL), svc.prefix)
        time.sleep(3)
        assert expire_due(store, objects) == 1  # only the short one is due
        assert not (tmp_path / "objects" / "uploads" / target["id"]).exists()
        assert objects.size(f"uploads/{kept['id']}") == len(PHOTO)
        gone = alice.post("/v1/jobs", json={"upload_id": target["id"]})
        assert gone.status_code == 404


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3("supir-uploads") as endpoint_and_client:
        yield endpoint_and_client


def post_to_s3(target: dict, body: bytes, **changed: str) -> httpx.Response:
    return httpx.post(target["url"], data={**target["fields"], **changed}, files={"file": ("photo", body)})


def test_s3_presigned_post_makes_a_job_and_the_job_refuses_what_s3_let_through(
    tmp_path: Path, fixture_a: Path, s3_endpoint
) -> None:
    endpoint, s3 = s3_endpoint
    settings = {
        "storage": "s3",
        "s3_bucket": "supir-uploads",
        "s3_endpoint_url": endpoint,
        "s3_path_style": "true",
        "s3_access_key_id": "test",
        "s3_secret_access_key": "test",
    }
    with running(tmp_path, fixture_a, {"alice": {}}, **settings) as svc, svc.client("alice") as alice:
        target = new_upload(alice)
        assert target["method"] == "POST" and target["url"].startswith(f"{endpoint}/supir-uploads")
        # the signed policy holds S3 to this exact size and type until expires_at
        policy = json.loads(base64.b64decode(target["fields"]["policy"]))
        assert ["content-length-range", len(PHOTO), len(PHOTO)] in policy["conditions"]
        assert {"Content-Type": "image/jpeg"} in policy["conditions"]
        assert policy["expiration"][:19] == target["expires_at"][:19]

        assert post_to_s3(target, PHOTO).status_code == 204
        created = alice.post("/v1/jobs", json={"upload_id": target["id"], "params": FAST})
        assert created.status_code == 202, created.text
        job = wait_for_status(alice, created.json()["id"], {"succeeded", "failed"})
        assert job["status"] == "succeeded", job["error"]
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="supir-uploads").get("Contents", [])]
        assert f"inputs/{job['id']}" in keys and f"uploads/{target['id']}" not in keys

        # moto's server does not enforce POST policies (size, type, expiry, signature: it stores whatever is
        # sent), so the job's own checks on the stored object are what refuse a forged one here
        bigger = new_upload(alice)
        assert post_to_s3(bigger, PHOTO + b"x" * 1000).status_code == 204
        too_big = alice.post("/v1/jobs", json={"upload_id": bigger["id"]})
        assert too_big.status_code == 413 and code(too_big) == "file_too_large"
        png = (DATA / "coffee_rgba.png").read_bytes()
        other_type = new_upload(alice, len(png))  # signed as a JPEG
        assert post_to_s3(other_type, png).status_code == 204
        assert code(alice.post("/v1/jobs", json={"upload_id": other_type["id"]})) == "unsupported_media_type"
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="supir-uploads").get("Contents", [])]
        assert not [k for k in keys if k.startswith("inputs/") and k != f"inputs/{job['id']}"]  # no copy left


def test_an_upload_is_cached_as_a_sent_photo_and_its_pixels_are_the_workers_to_refuse(
    tmp_path: Path, fixture_a: Path
) -> None:
    """The streamed sha256 of an upload keys the result cache as a sent photo's does (its job is answered from the
    first one's results, and keeps no copy of the photo); a PNG whose pixel data is cut short passes the header
    checks of a job from an upload and fails on the worker, where a sent one is refused at once."""
    params = {**FAST, "seed": 5}
    objects = tmp_path / "objects"
    with running(tmp_path, fixture_a, {"alice": {}}, result_cache="owner") as svc, svc.client("alice") as alice:
        first = wait_for_status(alice, submit(alice, params).json()["id"], {"succeeded", "failed"})
        assert first["status"] == "succeeded" and not first["cached"], first["error"]
        target = new_upload(alice)
        assert put(target, PHOTO).status_code == 200
        again = alice.post("/v1/jobs", json={"upload_id": target["id"], "params": params})
        assert again.status_code == 200, again.text  # ended at birth
        cached = again.json()
        assert cached["cached"] and cached["cached_from"] == first["id"]
        assert not (objects / "inputs" / cached["id"]).exists() and not list(objects.rglob("uploads/*"))

        cut = (DATA / "coffee_rgba.png").read_bytes()[:-2000]
        sent = alice.post("/v1/jobs", files={"image": ("cut.png", cut, "image/png")}, data={"params": '{"steps": 2}'})
        assert sent.status_code == 422 and code(sent) == "invalid_image"
        target = new_upload(alice, len(cut), "image/png")
        assert put(target, cut).status_code == 200
        created = alice.post("/v1/jobs", json={"upload_id": target["id"], "params": FAST})
        assert created.status_code == 202, created.text
        job = wait_for_status(alice, created.json()["id"], {"succeeded", "failed"})
        assert job["status"] == "failed" and job["error"]["code"] == "invalid_image", job
