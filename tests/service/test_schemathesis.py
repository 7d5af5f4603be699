"""Schemathesis against the live API: generated requests for every documented operation (examples, coverage,
fuzzing and stateful phases), with all of its checks: no 5xx, and every status code, content type, header and
body as the OpenAPI document declares them.

The API runs without workers: created jobs stay queued, which every operation but the event stream handles the
same as a running job. Run through the CLI (the tool's own report on failure), deterministic generation.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.servers import BIN, REPO, Service, running, serving

KEY = "fuzz"
MIN_CASES = 1000
MAX_EXAMPLES = 100  # per operation and phase
# Generated bodies create jobs with no worker to run them: the key's quota and rate limits must not be what
# answers; auth failures (the ignored_auth check sends requests without a key) likewise.
LIMITS = {"max_active_jobs": 1_000_000, "rate_limit_per_minute": 1_000_000, "read_rate_limit_per_minute": 1_000_000}

# Checks are chosen here, not with --checks on the command line: that would override the per-operation lines.
CONFIG = f"""
hooks = "tests.schemathesis_hooks"

[checks]
enabled = true  # all of them
# schemathesis' own list, and 410: a job its stateful phase deleted (DELETE /v1/jobs/{{id}}) answers 410 job_deleted
positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "410", "429", "5xx"]
# schemathesis' own list, and 410: a deleted job's routes answer 410 whatever else is wrong with the request, as a
# missing one's answer 404
negative_data_rejection.expected-statuses = [
    "400", "401", "403", "404", "405", "406", "409", "410", "415", "422", "428", "429", "5xx",
]

[generation]
deterministic = true
max-examples = {MAX_EXAMPLES}
database = "none"

[[operations]]
include-operation-id = "createJob"
# the coverage phase's boundary values skip filter_body (tests/schemathesis_hooks.py), so it sends params with
# tile_stride > tile_size, which RestoreParams refuses by a rule JSON Schema cannot state; fuzzing still checks it
phases.coverage.checks.positive_data_acceptance.enabled = false

[[operations]]
include-operation-id = "restoreFromPreview"
# the same params, the same unstated rule
phases.coverage.checks.positive_data_acceptance.enabled = false

[[operations]]
include-operation-id = "estimateJob"
# the photo's pixels (width × height) and its output's (× upscale²) are bounded (422 image_too_large,
# output_too_large): rules between fields that JSON Schema cannot state; so is tile_stride ≤ tile_size
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "422", "429", "503"]

[[operations]]
include-operation-id = "createUpload"
# a size over the schema's maximum (SUPIR_MAX_UPLOAD_BYTES) is 413 file_too_large, as a file over it is
checks.negative_data_rejection.expected-statuses = [
    "400", "401", "403", "404", "405", "406", "409", "410", "413", "415", "422", "428", "429", "5xx",
]

[[operations]]
include-operation-id = "createBatch"
# multipart: at most one `items` entry per file in `images` (422 invalid_parameter), a rule between two fields that
# JSON Schema cannot state
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "3xx", "401", "403", "404", "409", "410", "422", "429", "5xx",
]

[[operations]]
include-operation-id = "getUsage"
# `from` after `to`, or over 366 days apart, is refused (422 invalid_parameter): a rule between two parameters that
# JSON Schema cannot state. A malformed date is 400, so the check still catches a date format the API will not read.
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "422", "429", "503"]
"""


@pytest.fixture(scope="module")
def photo_url() -> Iterator[str]:
    """A PNG over HTTP on localhost, for image_url (the API is allowed private URLs for it)."""
    out = io.BytesIO()
    Image.new("RGB", (48, 32), (90, 140, 200)).save(out, format="PNG")
    with serving(out.getvalue(), "image/png") as base:
        yield f"{base}/photo.png"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("schemathesis-api")
    # `Prefer: wait` holds a create while its job is queued (here: for ever); kept under schemathesis' 10-s
    # request timeout
    settings = {"auth_failures_per_minute": 1_000_000, "allow_private_urls": "true", "max_prefer_wait_s": 2}
    with running(tmp, tmp, {KEY: LIMITS}, with_workers=False, **settings) as service:
        yield service


def test_schemathesis_finds_nothing(api: Service, photo_url: str, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    report = tmp_path / "report.json"
    command = [
        str(BIN / "schemathesis"), "--config-file", str(config), "run", f"{api.url}/openapi.json",
        "--header", f"Authorization: Bearer {api.keys[KEY]}",
        # an SSE stream stays open while its job is queued, and with no worker every job stays queued
        "--exclude-path", "/v1/jobs/{job_id}/events",
        "--workers", "1",
        "--report", "json", "--report-json-path", str(report),
        "--no-color",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PHOTO_URL": photo_url}
    # cwd: the tool's own folder (.schemathesis/) goes to the tmp dir, not the repo
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    print(output)
    assert run.returncode == 0, output + "\n" + api.logs()
    summary = json.loads(report.read_text())
    assert summary["test_cases"]["generated"] >= MIN_CASES, output
    assert not summary["failures"] and not summary["errors"], output
