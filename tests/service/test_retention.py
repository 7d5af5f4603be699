"""Retention: once a job is older than SUPIR_RETENTION_HOURS, its record expires (a Redis TTL) and the sweep, run
by the light worker (`--beat` in the manifests; sent by hand here), deletes its input and result and drops it from
its owner's list, without the light worker ever loading torch or the weights."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import redis

from jobs.queue import SWEEP_TASK, make_celery
from jobs.settings import Settings
from tests.paths import DATA
from tests.servers import FAST, SLOW, Service, photo, running, serving, submit, wait_for_status, wait_until

RETENTION_H = 0.001  # 3.6 s


def test_the_sweep_deletes_expired_inputs_results_and_records(tmp_path: Path, fixture_a: Path) -> None:
    with running(tmp_path, fixture_a, {"alice": {}}, retention_hours=RETENTION_H) as svc, svc.client("alice") as client:
        photo = ("photo.jpg", (DATA / "chelsea_degraded.jpg").read_bytes(), "image/jpeg")
        params = {"min_size": 64, "steps": 3, "seed": 1}
        job = client.post("/v1/jobs", files={"image": photo}, data={"params": json.dumps(params)}).json()
        assert wait_for_status(client, job["id"], {"succeeded", "failed"}, timeout=120)["status"] == "succeeded"
        objects = tmp_path / "objects"
        stored = sorted(p.relative_to(objects) for p in objects.rglob("*") if p.is_file())
        assert [p.parts[0] for p in stored] == ["inputs", "results"], stored

        time.sleep(RETENTION_H * 3600 + 1)
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 404  # the record's TTL
        settings = Settings(redis_url=svc.env["SUPIR_REDIS_URL"], key_prefix=svc.prefix, queue=svc.prefix)
        make_celery(settings).send_task(SWEEP_TASK)  # routed to the light worker's queue, as beat sends it
        wait_until(lambda: not any(p.is_file() for p in objects.rglob("*")), 60, 0.2, "the sweep to delete files")
        index = redis.Redis.from_url(settings.redis_url)
        # the owner's list no longer names the expired job (the same task, just after the files)
        wait_until(lambda: index.zcard(f"{svc.prefix}:owner:alice") == 0, 30, 0.1, "the index sweep")

        assert svc.webhooks is not None and svc.webhooks.poll() is None
        maps = Path(f"/proc/{svc.webhooks.pid}/maps").read_text()
        assert "libtorch" not in maps and "torch/lib" not in maps


# --- retention per request, DELETE, zero retention after delivery, rate-limit headers --------------------------
# One service for the tests below: the expiry sweep every second (SUPIR_EXPIRY_SWEEP_S), so a job's short expiry is
# seen within seconds; zero retention after delivery on (only /result downloads count: the tests above and below
# that must keep a job read its view and thumbnail only).


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, fixture_a: Path) -> Iterator[Service]:
    keys = {"alice": {}, "bob": {}, "limited": {"rate_limit_per_minute": 2, "read_rate_limit_per_minute": 2}}
    settings = {"expiry_sweep_s": 1, "delete_after_delivery": "true", "allow_private_urls": "true"}
    with running(tmp_path_factory.mktemp("retention"), fixture_a, keys, **settings) as service:
        yield service


def files_of(svc: Service, job_id: str) -> list[str]:
    """The job's objects in the service's local store, as keys."""
    objects = svc.tmp / "objects"
    return sorted(str(p.relative_to(objects)) for p in objects.rglob(f"*{job_id}*") if p.is_file())


def finished(client: httpx.Client, response: httpx.Response) -> dict:
    assert response.status_code in (200, 202), response.text
    job = wait_for_status(client, response.json()["id"], {"succeeded", "failed", "canceled"}, timeout=120)
    assert job["status"] == "succeeded", job["error"]
    return job


def unix(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def test_expires_after_sets_expires_at_on_every_way_to_create_and_is_bounded(svc: Service) -> None:
    image = (DATA / "chelsea_degraded.jpg").read_bytes()
    with svc.client("alice") as client, serving(image, "image/jpeg") as photos:
        longest = 24 * 3600  # SUPIR_RETENTION_HOURS' default: the maximum
        too_long = client.post("/v1/jobs", json={"image_url": f"{photos}/a.jpg", "expires_after": longest + 1})
        assert too_long.status_code == 422, too_long.text
        assert too_long.json()["error"]["code"] == "invalid_parameter"
        assert (
            too_long.json()["error"]["field"] == "expires_after" and str(longest) in too_long.json()["error"]["message"]
        )
        zero = submit(client, FAST, expires_after="0")
        assert zero.status_code == 422 and zero.json()["error"]["field"] == "expires_after", zero.text
        spec = client.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
        for body in spec["application/json"]["schema"]["oneOf"]:  # image_url or upload_id
            assert body["properties"]["expires_after"]["maximum"] == longest

        uploaded = submit(client, FAST, expires_after="3600")  # multipart
        assert uploaded.json()["expires_after"] == 3600 and uploaded.json()["expires_at"] is None  # not ended yet
        job = finished(client, uploaded)
        assert abs(unix(job["expires_at"]) - (job["finished_at"] + 3600)) <= 1
        assert abs(unix(job["expires_at"]) - (time.time() + 3600)) <= 120
        listed = {j["id"]: j for j in client.get("/v1/jobs").json()["jobs"]}
        assert listed[job["id"]]["expires_at"] == job["expires_at"]

        fetched = finished(client, client.post("/v1/jobs", json={"image_url": f"{photos}/a.jpg", "params": FAST,
                                                                  "expires_after": 7200}))  # fmt: skip
        assert abs(unix(fetched["expires_at"]) - (fetched["finished_at"] + 7200)) <= 1
        default = finished(client, submit(client, FAST))
        assert default["expires_after"] == longest
        assert abs(unix(default["expires_at"]) - (default["finished_at"] + longest)) <= 1

        preview = finished(client, submit(client, FAST, preview="true", expires_after="600"))
        inherited = finished(client, client.post(f"/v1/jobs/{preview['id']}/restore"))
        assert inherited["expires_after"] == 600  # a restore inherits the preview's, as its other settings
        own = finished(client, client.post(f"/v1/jobs/{preview['id']}/restore", json={"expires_after": 30}))
        assert own["expires_after"] == 30 and abs(unix(own["expires_at"]) - (own["finished_at"] + 30)) <= 1
        over = client.post(f"/v1/jobs/{preview['id']}/restore", json={"expires_after": longest + 1})
        assert over.status_code == 422 and over.json()["error"]["field"] == "expires_after"


STAGE1_TOO = ["inputs", "results", "stage1", "thumbs"]


def test_after_its_expiry_every_object_and_the_record_of_a_job_are_gone(svc: Service) -> None:
    with svc.client("alice") as client:
        kept = finished(client, submit(client, FAST, expires_after="3600"))
        made = []
        for fields, kinds in (({}, ["inputs", "results", "thumbs"]), ({"preview": "true"}, STAGE1_TOO)):
            job = finished(client, submit(client, FAST, expires_after="10", **fields))
            assert client.get(f"/v1/jobs/{job['id']}/thumbnail", params={"size": 32}).status_code == 200
            assert [f.split("/")[0] for f in files_of(svc, job["id"])] == kinds  # every kind of object it may own
            made.append(job)
        short, preview = made

        # the record's TTL ends at expires_at; the beat's expiry sweep (every second here) erases the objects
        for job in (short, preview):
            wait_until(lambda j=job: not files_of(svc, j["id"]), 60, 0.2, f"the objects of {job['id']} to go")
            gone = client.get(f"/v1/jobs/{job['id']}")
            # 404, not 410: an expiry is a Redis TTL (nothing runs at that moment to leave a tombstone); only an
            # erasure asked for (DELETE, delivery) leaves one
            assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
            assert time.time() >= unix(job["expires_at"])
        assert [f.split("/")[0] for f in files_of(svc, kept["id"])] == ["inputs", "results"]
        assert client.get(f"/v1/jobs/{kept['id']}").status_code == 200


def test_delete_erases_a_job_at_once_and_its_reads_answer_410(svc: Service) -> None:
    with svc.client("alice") as alice, svc.client("bob") as bob:
        job = finished(alice, submit(alice, FAST))
        link = job["result"]["url"]  # the local store's signed link
        assert alice.get(f"/v1/jobs/{job['id']}/thumbnail", params={"size": 32}).status_code == 200
        assert len(files_of(svc, job["id"])) == 3

        refused = bob.delete(f"/v1/jobs/{job['id']}")  # another key's job does not exist for bob
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
        assert len(files_of(svc, job["id"])) == 3

        for _ in range(2):  # idempotent: the second answers the same
            erased = alice.delete(f"/v1/jobs/{job['id']}")
            assert erased.status_code == 204 and erased.content == b""
            assert files_of(svc, job["id"]) == []
        for path in ("", "/result", "/thumbnail", "/events"):
            gone = alice.get(f"/v1/jobs/{job['id']}{path}")
            assert gone.status_code == 410, (path, gone.text)
            assert (
                gone.json()["error"]["code"] == "job_deleted"
                and "deleted by its owner" in gone.json()["error"]["message"]
            )
        assert alice.post(f"/v1/jobs/{job['id']}/cancel").status_code == 410
        assert httpx.get(link).status_code == 410
        assert bob.get(f"/v1/jobs/{job['id']}").status_code == 404  # the tombstone is its owner's only
        assert job["id"] not in {j["id"] for j in alice.get("/v1/jobs").json()["jobs"]}

        # a create repeated with the Idempotency-Key of an erased job is told so, at once (no job is made again)
        def keyed() -> httpx.Response:
            body = {"params": json.dumps(FAST)}
            return alice.post("/v1/jobs", files={"image": photo()}, data=body, headers={"Idempotency-Key": key})

        key = f"erased-{time.time()}"
        first = finished(alice, keyed())
        assert alice.delete(f"/v1/jobs/{first['id']}").status_code == 204
        again = keyed()
        assert again.status_code == 410 and again.json()["error"]["code"] == "job_deleted", again.text


def test_deleting_a_running_job_stops_it_and_its_worker_writes_nothing_after(svc: Service) -> None:
    with svc.client("alice") as client:
        job = submit(client, SLOW).json()

        def sampling() -> bool:
            progress = client.get(f"/v1/jobs/{job['id']}").json()["progress"]
            return progress["stage"] == "sampling" and progress["step"] >= 1

        wait_until(sampling, 120, 0.1, "the job to sample")
        assert [f.split("/")[0] for f in files_of(svc, job["id"])] == ["inputs"]
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert files_of(svc, job["id"]) == []
        # the worker stops before its next step and is free again; it has written nothing of the job meanwhile
        wait_until(lambda: svc_busy(svc) == 0, 60, 0.2, "the worker to drop the job")
        assert files_of(svc, job["id"]) == []
        assert client.get(f"/v1/jobs/{job['id']}").json()["error"]["code"] == "job_deleted"
        after = finished(client, submit(client, FAST))  # and takes the next job
        assert after["status"] == "succeeded"
        client.delete(f"/v1/jobs/{after['id']}")


def svc_busy(svc: Service) -> int:
    return int(httpx.get(f"{svc.admin_url}/status", timeout=30).json()["workers"]["busy"])


def test_zero_retention_erases_a_restoration_once_its_result_is_downloaded(svc: Service) -> None:
    with svc.client("alice") as client:
        job = finished(client, submit(client, FAST))
        preview = finished(client, submit(client, FAST, preview="true"))
        downloaded = client.get(f"/v1/jobs/{job['id']}/result")
        assert downloaded.status_code == 200 and downloaded.content.startswith(b"\x89PNG")
        gone = wait_until(lambda: (r := client.get(f"/v1/jobs/{job['id']}")).status_code == 410 and r, 30, 0.1)
        assert (
            gone.json()["error"]["code"] == "job_deleted" and "DELETE_AFTER_DELIVERY" in gone.json()["error"]["message"]
        )
        assert files_of(svc, job["id"]) == []
        # a preview is kept: its restore needs its photo and stage 1
        assert client.get(f"/v1/jobs/{preview['id']}/result").status_code == 200
        time.sleep(1)
        assert client.get(f"/v1/jobs/{preview['id']}").status_code == 200 and files_of(svc, preview["id"])


def test_rate_limit_headers_on_counted_answers_and_retry_after_on_429(svc: Service) -> None:
    policy = re.compile(r'^"(read|write)";q=(\d+);w=60$')
    left = re.compile(r'^"(read|write)";r=(\d+);t=(\d+)$')
    with svc.client("alice") as client:
        read = client.get("/v1/jobs")
        assert read.status_code == 200 and read.headers["ratelimit-policy"] == '"read";q=1000000;w=60'
        name, remaining, reset = left.fullmatch(read.headers["ratelimit"]).groups()  # type: ignore[union-attr]
        assert name == "read" and int(remaining) < 1_000_000 and 1 <= int(reset) <= 61
        created = submit(client, FAST)
        assert created.status_code == 202
        assert policy.fullmatch(created.headers["ratelimit-policy"]).groups() == ("write", "120")  # type: ignore[union-attr]
        assert left.fullmatch(created.headers["ratelimit"]).group(1) == "write"  # type: ignore[union-attr]
        finished(client, created)
    with svc.client("limited") as client:
        answers = [client.get("/v1/jobs") for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert [left.fullmatch(a.headers["ratelimit"]).group(2) for a in answers] == ["1", "0", "0"]  # type: ignore[union-attr]
        refused = answers[2]
        assert refused.json()["error"]["code"] == "rate_limited" and 1 <= int(refused.headers["retry-after"]) <= 61
        assert refused.headers["ratelimit-policy"] == '"read";q=2;w=60'
    with svc.client(None) as anonymous:  # never counted per key: no key to count it against
        unknown = anonymous.get("/v1/jobs")
        assert unknown.status_code == 401 and "ratelimit" not in unknown.headers
