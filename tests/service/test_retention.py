"""Retention: once a job is older than SUPIR_RETENTION_HOURS, its record expires (a Redis TTL) and the sweep, run
by the light worker (`--beat` in the manifests; sent by hand here), deletes its input and result and drops it from
its owner's list, without the light worker ever loading torch or the weights."""

from __future__ import annotations

import json
import time
from pathlib import Path

import redis

from jobs.queue import SWEEP_TASK, make_celery
from jobs.settings import Settings
from tests.paths import DATA
from tests.servers import running, wait_for_status, wait_until

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
