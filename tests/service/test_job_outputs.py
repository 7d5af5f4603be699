"""What a job gives back, through the real service: several samples, the SUPIR variant it asked for (two workers
with different checkpoint files), output formats with the photo's metadata, the result cache and usage.

One service for the module: the API, a worker serving v0Q (the fixture's SUPIR file) and one serving v0F (a
second checkpoint in the same layout with other weights); a third variant, v0X, is configured with no worker
running, as a pool scaled to zero is."""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image, ImageCms

from jobs.store import JobStore
from tests.paths import DATA, REDIS_URL
from tests.servers import Service, wait_for_status, wait_until
from tests.variant_files import make_variant_checkpoint

FAST = {"min_size": 64, "steps": 2, "caption": "none"}
DATE_TAKEN = "2019:07:14 10:31:07"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory, fixture_a: Path) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("outputs")
    v0f = make_variant_checkpoint(fixture_a / "supir.ckpt", tmp / "SUPIR-v0F.ckpt", seed=7)
    variants = {"v0Q": str(fixture_a / "supir.ckpt"), "v0F": str(v0f), "v0X": str(fixture_a / "supir.ckpt")}
    keys = {"alice": {}, "bob": {}, "usage": {}}
    service = Service(tmp, fixture_a, keys, variants=json.dumps(variants), worker_variants="v0Q", result_cache="owner")
    try:
        service.start()
        service.start_worker({"SUPIR_WORKER_VARIANTS": "v0F"})
        wait_until(lambda: service.ready_workers("v0F") >= 1, 120, 0.25, "a ready v0F worker")
        yield service
    finally:
        service.stop()


def small_photo() -> bytes:
    """A 64×48 JPEG: processed at 64×64, so each job here takes a fraction of a second on the CPU."""
    with Image.open(DATA / "chelsea_degraded.jpg") as source:
        out = io.BytesIO()
        source.convert("RGB").resize((64, 48)).save(out, format="JPEG", quality=90)
    return out.getvalue()


SMALL = small_photo()


def submit(client: httpx.Client, params: dict, image: bytes | None = None, **fields: str) -> httpx.Response:
    upload = ("photo.jpg", image or SMALL, "image/jpeg")
    return client.post("/v1/jobs", files={"image": upload}, data={"params": json.dumps(params), **fields})


def finished(client: httpx.Client, params: dict, image: bytes | None = None, **fields: str) -> dict:
    created = submit(client, params, image, **fields)
    assert created.status_code in (200, 202), created.text
    return wait_for_status(client, created.json()["id"], {"succeeded", "failed", "canceled"}, timeout=120)


def record(service: Service, job_id: str):  # type: ignore[no-untyped-def]
    return JobStore(redis.Redis.from_url(REDIS_URL), service.prefix).get(job_id)


def image_of(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))  # kept open: `format` and `info` stay readable
    img.load()
    return img


def test_three_samples_from_one_job(outputs: Service) -> None:
    with outputs.client("alice") as client:
        job = finished(client, {**FAST, "seed": 40, "num_samples": 3})
        assert job["status"] == "succeeded", job
        assert [r["seed"] for r in job["results"]] == [40, 41, 42]
        assert job["result"] == job["results"][0]
        pictures = [client.get(f"/v1/jobs/{job['id']}/result", params={"index": i}) for i in range(3)]
        assert all(p.status_code == 200 and p.headers["content-type"] == "image/png" for p in pictures)
        assert len({hashlib.sha256(p.content).digest() for p in pictures}) == 3  # three different restorations
        assert {image_of(p.content).size for p in pictures} == {
            (job["results"][0]["width"], job["results"][0]["height"])
        }
        assert httpx.get(job["results"][2]["url"]).content == pictures[2].content  # each signed link works alone
        beyond = client.get(f"/v1/jobs/{job['id']}/result", params={"index": 3})
        assert beyond.status_code == 422 and beyond.json()["error"]["field"] == "index"
        thumb = client.get(f"/v1/jobs/{job['id']}/thumbnail", params={"index": 2, "size": 32})
        assert thumb.status_code == 200 and image_of(thumb.content).format == "JPEG"
        # the batch is the single runs it stands for: sample 1 is the job with seed 41
        single = finished(client, {**FAST, "seed": 41})
        alone = image_of(client.get(f"/v1/jobs/{single['id']}/result").content)
        assert _max_difference(alone, image_of(pictures[1].content)) <= 2  # batched float sums: a level or two


def _max_difference(a: Image.Image, b: Image.Image) -> int:
    return max(abs(x - y) for x, y in zip(a.convert("RGB").tobytes(), b.convert("RGB").tobytes(), strict=True))


def test_each_variant_runs_on_its_own_worker(outputs: Service, fixture_a: Path) -> None:
    files = {"v0Q": fixture_a / "supir.ckpt", "v0F": outputs.tmp / "SUPIR-v0F.ckpt"}
    with outputs.client("alice") as client:
        jobs = {name: finished(client, {**FAST, "seed": 5}, variant=name) for name in files}
        default = finished(client, {**FAST, "seed": 6})
    assert default["variant"] == "v0Q"
    workers = {}
    for name, job in jobs.items():
        assert job["status"] == "succeeded" and job["variant"] == name, job
        assert job["model_sha256"] == hashlib.sha256(files[name].read_bytes()).hexdigest()
        stored = record(outputs, job["id"])
        assert stored.model_sha256 == job["model_sha256"]
        workers[name] = _main_process(int(stored.worker.rpartition(":")[2]))
    # the pool process that ran each job belongs to the worker started for that variant
    assert workers == {"v0Q": outputs.workers[0].pid, "v0F": outputs.workers[1].pid}
    with outputs.client("alice") as client:
        q, f = (client.get(f"/v1/jobs/{jobs[n]['id']}/result").content for n in ("v0Q", "v0F"))
    assert q != f  # other weights, other restoration


def _main_process(pid: int) -> int:
    """The Celery main process of a pool process (its parent)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def test_an_unserved_variant_is_refused_before_queueing(outputs: Service) -> None:
    with outputs.client("bob") as client:
        refused = submit(client, {**FAST, "seed": 1}, variant="v9Z")
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "variant_unavailable" and error["field"] == "variant" and "v0F" in error["message"]
        assert client.get("/v1/jobs").json()["jobs"] == []  # nothing was made
        # a configured variant whose pool is scaled to zero queues, and its depth is reported on its own
        waiting = submit(client, {**FAST, "seed": 1}, variant="v0X").json()
        assert waiting["status"] == "queued" and waiting["variant"] == "v0X" and waiting["queue_position"] == 0
        status = httpx.get(f"{outputs.admin_url}/status").json()
        depth = {v["name"]: v for v in status["variants"]}
        assert depth["v0X"]["queued"] == 1 and depth["v0X"]["workers"] == 0 and depth["v0Q"]["default"]
        assert depth["v0Q"]["workers"] == 1 and depth["v0F"]["workers"] == 1
        metrics = httpx.get(f"{outputs.admin_url}/metrics").text
        assert 'supir_jobs_waiting{variant="v0X"} 1.0' in metrics
        assert 'supir_variant_workers{variant="v0F"} 1.0' in metrics
        assert client.post(f"/v1/jobs/{waiting['id']}/cancel").json()["status"] == "canceled"


def _jpeg_with_metadata() -> tuple[bytes, bytes]:
    """A JPEG photo with a date taken, a camera and an sRGB profile: (file, its ICC profile)."""
    with Image.open(DATA / "chelsea_degraded.jpg") as source:
        rgb = source.convert("RGB").resize((64, 48))
    exif = Image.Exif()
    exif[0x010F] = "Test Camera Co."  # Make
    exif.get_ifd(0x8769)[0x9003] = DATE_TAKEN  # Exif IFD: DateTimeOriginal
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=92, exif=exif.tobytes(), icc_profile=icc)
    return out.getvalue(), icc


def test_jpeg_and_webp_results_keep_the_photos_metadata(outputs: Service) -> None:
    photo, icc = _jpeg_with_metadata()
    with outputs.client("alice") as client:
        jpeg = finished(client, {**FAST, "seed": 3, "output_format": "jpeg", "output_quality": 80}, photo)
        webp = finished(client, {**FAST, "seed": 3, "output_format": "webp"}, photo)
        bare = finished(client, {**FAST, "seed": 3, "output_format": "jpeg", "keep_metadata": False}, photo)
        files = {name: client.get(f"/v1/jobs/{job['id']}/result") for name, job in
                 (("jpeg", jpeg), ("webp", webp), ("bare", bare))}  # fmt: skip
    assert files["jpeg"].headers["content-type"] == "image/jpeg" == jpeg["result"]["content_type"]
    assert files["webp"].headers["content-type"] == "image/webp"
    opened = {name: image_of(response.content) for name, response in files.items()}
    assert opened["jpeg"].format == "JPEG" and opened["webp"].format == "WEBP"
    for name in ("jpeg", "webp"):
        assert opened[name].getexif().get_ifd(0x8769).get(0x9003) == DATE_TAKEN, name
        assert opened[name].getexif().get(0x010F) == "Test Camera Co."
        assert opened[name].info.get("icc_profile") == icc, name
    assert not opened["bare"].getexif() and not opened["bare"].info.get("icc_profile")


def test_a_repeated_request_with_a_seed_is_answered_from_the_cache(outputs: Service) -> None:
    params = {**FAST, "seed": 11, "num_samples": 2}
    with outputs.client("alice") as client:
        first = finished(client, params)
        assert first["status"] == "succeeded" and not first["cached"]
        again = submit(client, params)
        assert again.status_code == 200, again.text  # ended at birth
        cached = again.json()
        assert cached["status"] == "succeeded" and cached["cached"] and cached["cached_from"] == first["id"]
        assert cached["id"] != first["id"] and [r["seed"] for r in cached["results"]] == [11, 12]
        for i in range(2):
            ours = client.get(f"/v1/jobs/{cached['id']}/result", params={"index": i}).content
            assert ours == client.get(f"/v1/jobs/{first['id']}/result", params={"index": i}).content
        stored = record(outputs, cached["id"])
        assert stored.attempts == 0 and stored.worker is None and stored.started_at == stored.finished_at
        assert 'supir_result_cache_total{outcome="hit"}' in httpx.get(f"{outputs.admin_url}/metrics").text
        # another parameter, no seed, another variant: each runs on a worker
        for changed, fields in (
            ({**params, "steps": 3}, {}),
            ({**FAST, "num_samples": 2}, {}),
            (params, {"variant": "v0F"}),
        ):
            job = finished(client, changed, **fields)
            assert job["status"] == "succeeded" and not job["cached"] and job["attempts"] == 1, (changed, fields)
    with outputs.client("bob") as other:  # another key's identical request: its own run (cache per key)
        assert not finished(other, params)["cached"]


def test_usage_matches_the_jobs(outputs: Service) -> None:
    params = {**FAST, "seed": 21}
    with outputs.client("usage") as client:
        jobs = [
            finished(client, params),
            finished(client, {**params, "num_samples": 2}),
            submit(client, params).json(),  # from the cache: images, no GPU seconds
        ]
        assert [j["cached"] for j in jobs] == [False, False, True]
        used = client.get("/v1/usage").json()
    gpu = sum(v for job in jobs for k, v in job["seconds"].items() if k not in ("upload", "total"))
    assert used["total"]["jobs"] == 3 and used["total"]["images"] == 4 and used["total"]["cached_jobs"] == 1
    assert math.isclose(used["total"]["gpu_seconds"], gpu, abs_tol=0.01), (used, gpu)
    assert math.isclose(sum(j["gpu_seconds"] for j in jobs), gpu, abs_tol=0.01)
