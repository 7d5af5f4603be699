"""A job with caption=auto end to end: the worker loads the tiny LLaVA, the job shows its caption and timing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from tests.paths import DATA
from tests.servers import free_port, running, wait_for_status


def test_caption_auto_job(tmp_path: Path, fixture_a: Path, tiny_llava: Path) -> None:
    metrics_port = free_port()
    settings = {"llava_model": tiny_llava, "llava_max_new_tokens": 8, "worker_metrics_port": metrics_port}
    with running(tmp_path, fixture_a, {"alice": {}}, **settings) as svc, svc.client("alice") as client:
        params = {"min_size": 64, "steps": 2, "caption": "auto", "caption_question": "What is in the photo?"}
        job = client.post(
            "/v1/jobs",
            files={"image": ("cat.jpg", (DATA / "chelsea_degraded.jpg").read_bytes(), "image/jpeg")},
            data={"params": json.dumps(params)},
        ).json()
        done = wait_for_status(client, job["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", done["error"]
        assert done["caption"] and done["positive_prompt"].startswith(done["caption"].split()[0])
        assert done["seconds"]["caption"] > 0
        off = client.post(
            "/v1/jobs",
            files={"image": ("cat.jpg", (DATA / "chelsea_degraded.jpg").read_bytes(), "image/jpeg")},
            data={"params": json.dumps({**params, "caption": "none"})},
        ).json()
        assert wait_for_status(client, off["id"], {"succeeded"})["caption"] == ""
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert re.search(r'^supir_stage_duration_seconds_count\{stage="caption"\} 1\.0$', text, re.MULTILINE)
