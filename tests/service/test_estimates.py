"""Estimates through the real service: `POST /v1/estimates` before and after the tiny model's jobs of three sizes
(the rates its worker measures), the ETA of a queued job, and estimates of a direct upload (the API alone: nothing
runs the jobs)."""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from jobs.estimates import DEFAULT_JOB_SECONDS, DEFAULTS, predict
from jobs.store import JobStore
from supir_core.params import validate_params
from tests.paths import DATA, REDIS_URL
from tests.servers import Service, running, submit, wait_for_status

PHOTO = "chelsea_degraded.jpg"
SIZES = (128, 256, 384)  # min_size: processing sizes of 192×128 … 512×384 (1 : 4 : 8 pixels)
ROUNDS = 4  # jobs per size, the sizes interleaved so that a busy spell of the machine touches each alike
STEPS = 4
BETWEEN = 320  # 448×320: between the second and third sizes
TOLERANCE = 0.25


def body(min_size: int) -> dict[str, object]:
    """The estimate's body for a job of the photo at this min_size."""
    with Image.open(DATA / PHOTO) as image:
        width, height = image.size
    return {"width": width, "height": height, "params": {"min_size": min_size, "steps": STEPS}}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, fixture_a: Path) -> Iterator[Service]:
    with running(tmp_path_factory.mktemp("estimates"), fixture_a, {"alice": {}}, rate_limit_per_minute=100_000) as svc:
        yield svc


def test_estimates_come_within_25_percent_of_the_measured_gpu_seconds(service: Service) -> None:
    with service.client("alice") as client:
        cold = client.post("/v1/estimates", json=body(SIZES[-1]))
        assert cold.status_code == 200, cold.text
        assert cold.json()["basis"] == "default" and cold.json()["measured_jobs"] == 0

        measured: dict[int, list[float]] = {size: [] for size in SIZES}
        for _ in range(ROUNDS):
            for size in SIZES:
                job = submit(client, {"min_size": size, "steps": STEPS, "seed": 1}).json()
                done = wait_for_status(client, job["id"], {"succeeded", "failed"}, timeout=180)
                assert done["status"] == "succeeded", done["error"]
                assert done["gpu_seconds"] == pytest.approx(
                    sum(v for k, v in done["seconds"].items() if k not in ("upload", "total")), abs=1e-3
                )
                measured[size].append(done["gpu_seconds"])

        estimates = {}
        for size in SIZES:
            answer = client.post("/v1/estimates", json=body(size))
            assert answer.status_code == 200, answer.text
            estimate = answer.json()
            assert estimate["basis"] == "measured" and estimate["measured_jobs"] == ROUNDS * len(SIZES), estimate
            assert estimate["processing"]["height"] == size and estimate["steps"] == STEPS
            # the worker published its memory plan: tiling is decided, as the worker would (CPU: it all fits)
            assert estimate["tiling"]["sampling"] == "untiled" and estimate["tiling"]["vae"] == "untiled"
            assert estimate["queue"]["ready_workers"] == 1 and estimate["queue"]["expected_wait_s"] == 0
            assert estimate["queue"]["job_seconds_basis"] == "measured"
            estimates[size] = estimate["gpu_seconds"]

        # a size between the measured ones, before any job of it ran: between its neighbours' estimates (its own
        # timing is not compared: two runs on a busy machine say little, and the curve is tested in tests/jobs)
        between = client.post("/v1/estimates", json=body(BETWEEN)).json()

    report = {size: (estimates[size], statistics.median(measured[size]), measured[size]) for size in measured}
    print("estimate, median measured, measured:", report, "between:", between["gpu_seconds"])
    for size in measured:
        assert abs(estimates[size] / statistics.median(measured[size]) - 1) <= TOLERANCE, report
    below, above = max(s for s in SIZES if s < BETWEEN), min(s for s in SIZES if s > BETWEEN)
    assert estimates[below] < between["gpu_seconds"] < estimates[above], (between, report)
    # not a constant that happens to fit: the largest size is predicted to take far longer than the smallest
    assert estimates[SIZES[-1]] > 2 * estimates[SIZES[0]], report


def new_upload(client: httpx.Client, size: int, content_type: str = "image/jpeg") -> dict:
    answer = client.post("/v1/uploads", json={"content_type": content_type, "size": size})
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def put(target: dict, body: bytes) -> httpx.Response:
    return httpx.put(target["url"], content=body, headers=target["headers"], timeout=30)


@pytest.fixture(scope="module")
def api_alone(tmp_path_factory: pytest.TempPathFactory, fixture_a: Path) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("estimates-api")
    keys: dict[str, dict] = {"alice": {}, "bob": {}}
    with running(tmp, fixture_a, keys, with_workers=False, rate_limit_per_minute=100_000) as svc:
        yield svc


def test_a_cold_start_says_so_and_queued_jobs_carry_an_eta(api_alone: Service) -> None:
    with api_alone.client("alice") as client:
        answer = client.post("/v1/estimates", json={**body(256), "params": {"min_size": 256, "steps": 10}})
        assert answer.status_code == 200, answer.text
        cold = answer.json()
        params = validate_params({"min_size": 256, "steps": 10})
        expected = predict(None, params, (cold["processing"]["width"], cold["processing"]["height"]))
        assert cold["basis"] == "default" and cold["measured_jobs"] == 0
        assert cold["default_stages"] == list(cold["gpu_seconds_by_stage"])
        assert cold["gpu_seconds"] == pytest.approx(expected.gpu_seconds)
        a, b = DEFAULTS["sampling"]
        pixels = cold["processing"]["width"] * cold["processing"]["height"]
        assert cold["gpu_seconds_by_stage"]["sampling"] == pytest.approx(10 * (a * pixels / 1e6 + b), rel=1e-3)
        # no worker has published a memory plan, but a photo that fits in one tile needs none to say so
        assert cold["tiling"]["sampling"] == "untiled" and cold["tiling"]["reason"] == "the image fits in one tile"
        big = client.post("/v1/estimates", json={"width": 1500, "height": 1130, "params": {"tiling": "auto"}}).json()
        assert big["tiling"]["sampling"] == "unknown" and "unknown until a worker" in big["tiling"]["reason"]
        assert cold["queue"] == {
            "queued": 0,
            "running": 0,
            "ready_workers": 0,
            "job_seconds": DEFAULT_JOB_SECONDS,
            "job_seconds_basis": "default",
            "expected_wait_s": None,
        }

        first = submit(client, {"min_size": 64, "steps": 2}).json()
        second = submit(client, {"min_size": 64, "steps": 2}).json()
        assert second["status"] == "queued" and second["expected_start_s"] is None and second["eta"] is None

        # a ready worker of the variant (its heartbeat, as a worker on another host writes it): now an ETA
        store = JobStore(redis.Redis.from_url(REDIS_URL), api_alone.prefix)
        store.heartbeat("elsewhere:1", "ready", variants=[second["variant"]], ttl_s=60)
        before = time.time()
        view = client.get(f"/v1/jobs/{second['id']}").json()
        assert view["queue_position"] == 1
        # one job ahead, none running, one worker: it starts once that one has run (a default job's time)
        assert view["expected_start_s"] == pytest.approx(DEFAULT_JOB_SECONDS)
        eta = datetime.fromisoformat(view["eta"]).timestamp()
        assert before + DEFAULT_JOB_SECONDS - 1 <= eta <= time.time() + DEFAULT_JOB_SECONDS + 1
        assert client.get(f"/v1/jobs/{first['id']}").json()["expected_start_s"] == 0  # the worker is free for it
        estimate = client.post("/v1/estimates", json=body(64)).json()
        assert estimate["queue"]["queued"] == 2 and estimate["queue"]["ready_workers"] == 1
        assert estimate["queue"]["expected_wait_s"] == pytest.approx(2 * DEFAULT_JOB_SECONDS)

        refused = client.post("/v1/estimates", json={"width": 100})
        assert refused.status_code == 400 and refused.json()["error"]["field"] == "height"
        too_big = client.post("/v1/estimates", json={"width": 60_000, "height": 60_000})
        assert too_big.status_code == 422 and too_big.json()["error"]["code"] == "image_too_large"
        bad_steps = client.post("/v1/estimates", json={"width": 100, "height": 100, "params": {"steps": 0}})
        assert bad_steps.status_code == 422 and bad_steps.json()["error"]["field"] == "params.steps"
        unserved = client.post("/v1/estimates", json={"width": 100, "height": 100, "variant": "v9"})
        assert unserved.status_code == 422 and unserved.json()["error"]["code"] == "variant_unavailable"


def test_an_estimate_of_a_direct_upload_reads_its_size_and_leaves_it_for_the_job(api_alone: Service) -> None:
    params = {"min_size": 256, "steps": 10}
    with api_alone.client("alice") as alice, api_alone.client("bob") as bob:
        photo = (DATA / PHOTO).read_bytes()
        target = new_upload(alice, len(photo))
        # not received yet: as a job would be refused
        unreceived = alice.post("/v1/estimates", json={"upload_id": target["id"], "params": params})
        assert unreceived.status_code == 409 and unreceived.json()["error"]["code"] == "upload_incomplete"
        assert put(target, photo).status_code == 200

        by_upload = alice.post("/v1/estimates", json={"upload_id": target["id"], "params": params})
        assert by_upload.status_code == 200, by_upload.text
        by_size = alice.post("/v1/estimates", json={**body(256), "params": params})
        assert by_upload.json() == by_size.json()
        assert by_upload.json()["input"] == {"width": 150, "height": 113}

        # another key's upload is as absent as a missing one; both ways of naming the photo at once are refused
        for client, upload_id in ((bob, target["id"]), (alice, "upl_" + "0" * 32)):
            missing = client.post("/v1/estimates", json={"upload_id": upload_id})
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        both = alice.post("/v1/estimates", json={"upload_id": target["id"], "width": 150, "height": 113})
        assert both.status_code == 400 and both.json()["error"]["code"] == "conflicting_image_sources"
        malformed = alice.post("/v1/estimates", json={"upload_id": "upl_nope"})
        assert malformed.status_code == 400 and malformed.json()["error"]["field"] == "upload_id"

        # the estimate left the upload unused: the job takes it, and then it is gone
        created = alice.post("/v1/jobs", json={"upload_id": target["id"], "params": params})
        assert created.status_code == 202, created.text
        assert (created.json()["input"]["width"], created.json()["input"]["height"]) == (150, 113)
        gone = alice.post("/v1/estimates", json={"upload_id": target["id"]})
        assert gone.status_code == 404

        # the size is the upright one the worker restores (EXIF orientation 6: a quarter turn)
        exif = Image.Exif()
        exif[0x0112] = 6
        turned = io.BytesIO()
        Image.new("RGB", (120, 80), "gray").save(turned, format="JPEG", exif=exif.tobytes())
        target = new_upload(alice, len(turned.getvalue()))
        assert put(target, turned.getvalue()).status_code == 200
        upright = alice.post("/v1/estimates", json={"upload_id": target["id"]})
        assert upright.status_code == 200 and upright.json()["input"] == {"width": 80, "height": 120}
        # the stored photo's header is checked as a job's would be: its type the signed one, its pixels in limits
        png = io.BytesIO()
        Image.new("RGB", (64, 64)).save(png, format="PNG")
        target = new_upload(alice, len(png.getvalue()))  # signed as a JPEG
        assert put(target, png.getvalue()).status_code == 200
        other = alice.post("/v1/estimates", json={"upload_id": target["id"]})
        assert other.status_code == 415 and other.json()["error"]["code"] == "unsupported_media_type"
        bomb = io.BytesIO()
        Image.new("L", (5000, 4000)).save(bomb, format="PNG")  # 20 M pixels in 20 kB
        target = new_upload(alice, len(bomb.getvalue()), "image/png")
        assert put(target, bomb.getvalue()).status_code == 200
        refused = alice.post("/v1/estimates", json={"upload_id": target["id"]})
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "decompression_bomb"
