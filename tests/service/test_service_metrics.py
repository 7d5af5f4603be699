"""Prometheus metrics: the worker's job and stage metrics, and API counters that add up across uvicorn workers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from tests.paths import DATA
from tests.servers import Service, running, wait_for_status


def sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in metrics"
    return float(match.group(1))


def test_worker_metrics(service: Service) -> None:
    with service.client("alice") as client:
        job = client.post(
            "/v1/jobs",
            files={"image": ("a.png", (DATA / "astronaut_gray.png").read_bytes(), "image/png")},
            data={"params": json.dumps({"min_size": 64, "steps": 2})},
        ).json()
        wait_for_status(client, job["id"], {"succeeded"})
    text = httpx.get(f"http://127.0.0.1:{service.env['SUPIR_WORKER_METRICS_PORT']}/metrics").text
    assert sample(text, "supir_jobs_finished_total", '{code="",status="succeeded"}') >= 1
    for stage in ("queue_wait", "stage1", "sampling", "decode", "upload", "total"):
        assert sample(text, "supir_stage_duration_seconds_count", f'{{stage="{stage}"}}') >= 1
    assert sample(text, "supir_sampler_steps_per_second") > 0
    assert sample(text, "supir_model_load_seconds") > sample(text, "supir_worker_warmup_seconds") > 0
    assert sample(text, "supir_worker_ready") == 1


def test_api_counters_add_up_across_uvicorn_workers(tmp_path: Path, fixture_a: Path) -> None:
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    with running(tmp_path, fixture_a, {"alice": {}}, api_workers=2, extra_env=env) as svc:
        for _ in range(30):
            httpx.get(f"{svc.url}/healthz")
        scrapes = [httpx.get(f"{svc.admin_url}/metrics").text for _ in range(6)]
    counts = [sample(t, "supir_http_requests_total", '{method="GET",route="/healthz",status="200"}') for t in scrapes]
    assert min(counts) >= 30  # whichever worker answers the scrape sees the requests both served
