"""The service on an S3 API (moto's server over real HTTP), and image_url intake from a real HTTP server."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.paths import DATA
from tests.servers import moto_s3, running, serving, wait_for_status

FAST = {"min_size": 64, "steps": 2, "seed": 4}


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3("supir-test") as endpoint_and_client:
        yield endpoint_and_client


def test_s3_storage_and_image_url(tmp_path: Path, fixture_a: Path, s3_endpoint) -> None:
    endpoint, s3 = s3_endpoint
    settings = {
        "storage": "s3",
        "s3_bucket": "supir-test",
        "s3_endpoint_url": endpoint,
        "s3_path_style": "true",
        "s3_access_key_id": "test",
        "s3_secret_access_key": "test",
        "allow_private_urls": "true",  # the photo server is on loopback
    }
    photo = (DATA / "chelsea_degraded.jpg").read_bytes()
    with (
        serving(photo, "image/jpeg") as photos,
        running(tmp_path, fixture_a, {"alice": {}}, **settings) as svc,
        svc.client("alice") as client,
    ):
        uploaded = client.post(
            "/v1/jobs",
            files={"image": ("cat.jpg", photo, "image/jpeg")},
            data={"params": json.dumps(FAST)},
        ).json()
        fetched = client.post(
            "/v1/jobs",
            json={"image_url": f"{photos}/cat.jpg", "params": {**FAST, "upscale": 2}},
        )
        assert fetched.status_code == 202, fetched.text
        for job, size in ((uploaded, (150, 113)), (fetched.json(), (300, 226))):
            final = wait_for_status(client, job["id"], {"succeeded", "failed"})
            assert final["status"] == "succeeded", final["error"]
            assert final["result"]["url"].startswith(f"{endpoint}/supir-test/results/{job['id']}.png?")
            download = httpx.get(final["result"]["url"])  # presigned: no credentials needed
            assert download.status_code == 200
            with Image.open(io.BytesIO(download.content)) as img:
                assert img.size == size
            redirect = client.get(f"/v1/jobs/{job['id']}/result", follow_redirects=False)
            assert redirect.status_code == 307 and redirect.headers["location"].startswith(endpoint)
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="supir-test")["Contents"])
        assert keys == sorted([f"inputs/{uploaded['id']}", f"inputs/{fetched.json()['id']}",
                               f"results/{uploaded['id']}.png", f"results/{fetched.json()['id']}.png"])  # fmt: skip


def test_result_urls_are_signed_for_the_public_endpoint(s3_endpoint) -> None:
    """Compose: the services reach MinIO as http://minio:9000, a browser as http://localhost:9000. Here the
    services' endpoint is 127.0.0.1 and the public one `localhost`: links name the public host, and work."""
    from jobs.settings import Settings
    from jobs.storage import S3Store

    endpoint, _ = s3_endpoint
    public = endpoint.replace("127.0.0.1", "localhost")
    settings = Settings(
        storage="s3",
        s3_bucket="supir-test",
        s3_endpoint_url=endpoint,
        s3_public_endpoint_url=public,
        s3_path_style=True,
        s3_access_key_id="test",
        s3_secret_access_key="test",
    )
    store = S3Store.from_settings(settings)
    store.put("results/public-link.png", b"\x89PNG-bytes", "image/png")
    url = store.url("results/public-link.png", 60)
    assert url.startswith(f"{public}/supir-test/results/public-link.png?")
    assert httpx.get(url).content == b"\x89PNG-bytes"
