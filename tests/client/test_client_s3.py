"""supir_client with the service on S3 storage (moto's server): the photo goes up as the presigned POST the service
answers, the results come down through the presigned URLs `/result` redirects to, and the API key goes to
neither."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image
from supir_client import Client

from tests.client.conftest import Recording
from tests.paths import DATA
from tests.servers import FAST, moto_s3, running

PHOTO = DATA / "chelsea_degraded.jpg"


def test_restore_through_a_presigned_post_and_presigned_results(tmp_path: Path, fixture_a: Path) -> None:
    with moto_s3("supir-client") as (endpoint, s3):
        settings = {
            "storage": "s3",
            "s3_bucket": "supir-client",
            "s3_endpoint_url": endpoint,
            "s3_path_style": "true",
            "s3_access_key_id": "test",
            "s3_secret_access_key": "test",
        }
        sent = Recording()
        with (
            running(tmp_path, fixture_a, {"alice": {}}, **settings) as svc,
            Client(svc.url, svc.keys["alice"], transport=sent) as client,
        ):
            restoration = client.restore(PHOTO, num_samples=2, **FAST)
            job = restoration.job
            assert job.status == "succeeded" and job.input is not None and job.input.width == 150
            for data, result in zip(restoration.samples, job.results, strict=True):
                with Image.open(io.BytesIO(data)) as image:
                    assert image.size == (result.width, result.height)
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket="supir-client")["Contents"]]
            assert f"inputs/{job.id}" in keys and not [k for k in keys if k.startswith("uploads/")]

        to_s3 = [r for r in sent.sent if str(r.url).startswith(endpoint)]
        upload, *downloads = to_s3
        assert upload.method == "POST" and upload.headers["content-type"].startswith("multipart/form-data")
        assert PHOTO.read_bytes() in upload.content and b'name="policy"' in upload.content
        assert [r.method for r in downloads] == ["GET", "GET"]  # the two samples, after the API's 307s
        assert not [r for r in to_s3 if "authorization" in r.headers]
        redirects = [r for r in sent.sent if r.url.path == f"/v1/jobs/{job.id}/result"]
        assert len(redirects) == 2 and all(r.headers["authorization"].startswith("Bearer ") for r in redirects)
