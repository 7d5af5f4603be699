"""Idempotency-Key is one atomic claim per (owner, key): concurrent or retried creates with one key make one job.

One service of its own (real uvicorn + worker, ~20 s to start): a high quota, and a LocalStore directory the
storage test can break.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.servers import FAST, SLOW, Service, photo, running, wait_for_status, wait_until

KEYS = {"idem": {"max_active_jobs": 100}}


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, fixture_a: Path) -> Iterator[Service]:
    with running(tmp_path_factory.mktemp("idem"), fixture_a, KEYS, rate_limit_per_minute=100_000) as service:
        yield service


def create(client: httpx.Client, key: str, params: object = FAST) -> httpx.Response:
    params_field = params if isinstance(params, str) else json.dumps(params)
    return client.post(
        "/v1/jobs", files={"image": photo()}, data={"params": params_field}, headers={"Idempotency-Key": key}
    )


def job_ids(client: httpx.Client) -> set[str]:
    return {j["id"] for j in client.get("/v1/jobs", params={"limit": 100}).json()["jobs"]}


def test_a_storage_error_releases_the_key_and_the_retry_makes_one_job(svc: Service) -> None:
    """Injects: the object store failing to write the input (a file where its inputs/ folder goes). The create
    answers 503; the same key retried once storage is back makes one job, then replays it."""
    inputs = Path(svc.env["SUPIR_LOCAL_DIR"]) / "inputs"
    aside = inputs.with_name("inputs-aside")
    if inputs.exists():
        inputs.rename(aside)
    inputs.parent.mkdir(parents=True, exist_ok=True)
    inputs.write_bytes(b"not a folder")
    with svc.client("idem") as client:
        before = job_ids(client)
        try:
            failed = create(client, "storage-retry")
            assert failed.status_code == 503, failed.text
            assert failed.json()["error"]["code"] == "storage_error"
        finally:
            inputs.unlink()
            if aside.exists():
                aside.rename(inputs)
        assert job_ids(client) == before
        retried = create(client, "storage-retry")
        assert retried.status_code == 202, retried.text
        again = create(client, "storage-retry")
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == retried.json()["id"]
        assert job_ids(client) - before == {retried.json()["id"]}
        wait_for_status(client, retried.json()["id"], {"succeeded"}, timeout=120)


def test_twenty_concurrent_creates_with_one_key_make_one_job(svc: Service) -> None:
    """Injects: 20 multipart uploads of one photo at once with one key (before: 15 jobs from 20)."""
    with svc.client("idem") as client:
        before = job_ids(client)

    def post(_: int) -> httpx.Response:
        with svc.client("idem") as client:
            return create(client, "twenty-at-once")

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(post, range(20)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 19 + [202], [r.text for r in responses if r.status_code not in (200, 202)]
    assert len({r.json()["id"] for r in responses}) == 1
    assert all(r.headers.get("idempotent-replayed") == "true" for r in responses if r.status_code == 200)
    with svc.client("idem") as client:
        assert job_ids(client) - before == {responses[0].json()["id"]}
        wait_for_status(client, responses[0].json()["id"], {"succeeded"}, timeout=120)


def test_another_body_with_the_key_is_409_and_equal_params_match(svc: Service) -> None:
    with svc.client("idem") as client:
        before = job_ids(client)
        first = create(client, "normalised", '{"min_size": 64, "steps": 3, "seed": 1, "upscale": 1}')
        assert first.status_code == 202, first.text
        # the same values written as floats: the hash is over the validated params, so the same job
        same = create(client, "normalised", '{"min_size": 64.0, "steps": 3.0, "seed": 1, "upscale": 1.0}')
        assert same.status_code == 200, same.text
        assert same.json()["id"] == first.json()["id"] and same.headers["idempotent-replayed"] == "true"
        other = create(client, "normalised", {**FAST, "steps": 4})
        assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
        assert other.json()["error"]["field"] == "Idempotency-Key"
        assert job_ids(client) - before == {first.json()["id"]}
        wait_for_status(client, first.json()["id"], {"succeeded"}, timeout=120)


@pytest.mark.parametrize("key", ["k" * 300, "has space", "", "tab\there", "caf\u00e9"])
def test_a_malformed_key_is_400(svc: Service, key: str) -> None:
    with svc.client("idem") as client:
        before = job_ids(client)
        headers = {"Idempotency-Key": key.encode()}  # bytes: httpx sends non-ASCII as is
        refused = client.post("/v1/jobs", files={"image": photo()}, data={"params": json.dumps(FAST)}, headers=headers)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "invalid_request" and error["field"] == "Idempotency-Key"
        assert job_ids(client) == before


def test_the_longest_allowed_key_is_accepted(svc: Service) -> None:
    with svc.client("idem") as client:
        longest = create(client, "~" * 255)
        assert longest.status_code == 202, longest.text
        client.post(f"/v1/jobs/{longest.json()['id']}/cancel")


def test_cancel_answers_cancel_requested(svc: Service) -> None:
    with svc.client("idem") as client:
        job = create(client, f"cancel-{time.time_ns()}", SLOW).json()
        assert job["cancel_requested"] is False
        wait_until(
            lambda: client.get(f"/v1/jobs/{job['id']}").json()["progress"]["stage"] == "sampling",
            120,
            0.1,
            "sampling to start",
        )
        canceled = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert canceled.status_code == 200, canceled.text
        body = canceled.json()
        assert body["cancel_requested"] is True and body["status"] in ("running", "canceled")
        final = wait_for_status(client, job["id"], {"canceled", "succeeded", "failed"}, timeout=60)
        assert final["status"] == "canceled" and final["cancel_requested"] is True
