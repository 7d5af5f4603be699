"""A worker whose weights cannot load: real Celery workers, real Redis, the API over HTTP, the tiny model of
fixture A. The bad worker is pointed at a truncated copy of the SUPIR file and given a job to hold while it loads;
after its tries it exits with status 1 (the kubelet or Docker restarts it with back-off), the job it held goes
back to the queue untouched, and a healthy worker then runs that same job once. The failed loads are counted
where the alert SupirWorkerWeightsFailed reads them (the API's /metrics)."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from jobs.settings import Settings
from jobs.store import JobStore
from tests.paths import REDIS_URL, REPO
from tests.servers import FAST, Service, free_port, submit, wait_for_status, wait_until
from worker.runtime import Runtime

TRIES = 3
BACKOFF_S = 1.0  # then 2 s: the whole back-off is 3 s


@pytest.fixture
def svc(tmp_path: Path, fixture_a: Path) -> Iterator[Service]:
    service = Service(tmp_path, fixture_a, {"alice": {}}, rate_limit_per_minute=100_000)
    try:
        yield service.start(with_workers=False)  # the API alone: jobs stay queued until a worker comes
    finally:
        service.stop()


def corrupt_copy(fixture: Path, tmp: Path) -> Path:
    """The SUPIR file cut to half its length, as an interrupted copy leaves it."""
    bad = tmp / "supir-truncated.ckpt"
    shutil.copyfile(fixture / "supir.ckpt", bad)
    with bad.open("r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    return bad


def broker_messages(service: Service) -> tuple[int, int]:
    """(messages waiting in the variant's queue, messages delivered and not acknowledged) in the broker."""
    r = redis.Redis.from_url(REDIS_URL)
    keys = f"{service.prefix}:celery:"
    return int(r.llen(f"{keys}{service.prefix}-v0Q")), int(r.hlen(f"{keys}unacked"))


def load_failures_exported(service: Service) -> float:
    """What the API's /metrics says of v0Q's failed loads (the series the alert reads)."""
    metrics = httpx.get(f"{service.admin_url}/metrics", timeout=30).text
    found = re.search(r'^supir_worker_load_failures_total\{variant="v0Q"\} (\S+)$', metrics, re.MULTILINE)
    assert found, "the API exports no supir_worker_load_failures_total for v0Q"
    return float(found.group(1))


def alert_fires_on(tmp: Path, before: float, after: float) -> subprocess.CompletedProcess[str]:
    """promtool evaluates SupirWorkerWeightsFailed's expression (it has no `for`: a result is a firing alert) on the
    exported values: `before` for 5 minutes, then `after`, as two API replicas report them."""
    rules = yaml.safe_load((REPO / "deploy/prometheus/rules.yml").read_text())
    expr = next(r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == "SupirWorkerWeightsFailed")
    series = [
        {"series": f'supir_worker_load_failures_total{{job="supir-api", instance="{api}", variant="v0Q"}}',
         "values": f"{before}x5 {after}x5"}
        for api in ("api-a", "api-b")
    ]  # fmt: skip
    case = {
        "interval": "1m",
        "input_series": series,
        "promql_expr_test": [
            {"expr": expr, "eval_time": "5m", "exp_samples": []},
            {"expr": expr, "eval_time": "6m", "exp_samples": [{"labels": '{variant="v0Q"}', "value": after - before}]},
        ],
    }
    (tmp / "rules.yml").write_text((REPO / "deploy/prometheus/rules.yml").read_text())
    (tmp / "case.yml").write_text(yaml.safe_dump({"rule_files": ["rules.yml"], "tests": [case]}))
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: `make test` installs it (scripts/ensure-tools.sh)"
    return subprocess.run([tool, "test", "rules", "case.yml"], cwd=tmp, capture_output=True, text=True, timeout=60)


def test_a_worker_that_cannot_load_its_weights_exits_and_leaves_its_job_to_a_healthy_worker(
    svc: Service, fixture_a: Path
) -> None:
    store = JobStore(redis.Redis.from_url(REDIS_URL), svc.prefix)
    with svc.client("alice") as client:
        job_id = submit(client, FAST).json()["id"]
        before = load_failures_exported(svc)
        bad_env = {
            "SUPIR_CHECKPOINT": str(corrupt_copy(fixture_a, svc.tmp)),
            "SUPIR_WORKER_LOAD_TRIES": str(TRIES),
            "SUPIR_WORKER_LOAD_BACKOFF_S": str(BACKOFF_S),
            "SUPIR_WORKER_HEALTH_PORT": str(free_port()),
        }
        bad = svc.start_worker(bad_env)
        assert bad.wait(180) == 1  # exited by itself, with a failure status: restarted with back-off
        log = (svc.tmp / "worker-0.log").read_text(errors="replace")
        assert [int(n) for n in re.findall(r"loading the weights failed \(try (\d) of 3\)", log)] == [1, 2, 3]
        assert "trying again in 1 s" in log and "trying again in 2 s" in log
        assert "the weights failed to load 3 times (SUPIR_WORKER_LOAD_TRIES 3): exiting with status 1" in log
        record = store.get(job_id)  # the job it had taken is untouched: never started, no attempt counted
        assert record is not None
        assert (record.status, record.attempts, record.started_at, record.worker) == ("queued", 0, None, None)
        assert broker_messages(svc) == (1, 0)  # its message waits in the queue, once, and none is held
        assert re.search(r"Task supir\.restore\[\S+\] received", log)  # it held the job while loading…
        assert "Canceling queue" in log  # …stopped consuming once its tries were spent…
        assert "reject requeue=True: the weights are not loaded in this worker" in log  # …and handed the job back
        assert store.load_failures() == {"v0Q": TRIES}
        after = load_failures_exported(svc)
        assert (before, after) == (0, TRIES)
        proc = alert_fires_on(svc.tmp, before, after)  # the alert fires on what this scenario exported
        assert proc.returncode == 0, proc.stdout + proc.stderr

        svc.start_worker()  # the fixture's good file
        done = wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=180)
    assert done["status"] == "succeeded", done.get("error")
    record = store.get(job_id)
    assert record is not None and record.attempts == 1
    wait_until(lambda: broker_messages(svc) == (0, 0), 30, 0.25, "the message to be acknowledged")


@pytest.mark.parametrize(
    ("tries", "backoff_s", "timeout_s", "failed_tries", "waited_s"),
    [
        (3, 0.5, 1800, 3, 0.5 + 1.0),  # every try, the back-off doubling between them
        (5, 4.0, 10, 2, 4.0),  # a third try could not end within the load timeout (Celery would kill it): stop
    ],
)
def test_the_load_is_tried_with_back_off_then_given_up(
    tmp_path: Path, tries: int, backoff_s: float, timeout_s: int, failed_tries: int, waited_s: float
) -> None:
    """Runtime.load alone (the pool process's part), with no SDXL file set: each try fails at once."""
    settings = Settings(
        redis_url=REDIS_URL,
        key_prefix=f"test-{uuid.uuid4().hex[:10]}",
        local_dir=tmp_path,
        sdxl_checkpoint=None,
        worker_load_tries=tries,
        worker_load_backoff_s=backoff_s,
        worker_load_timeout_s=timeout_s,
    )
    for module in ("supir_core.checkpoints", "supir_core.speed", "supir_core.variants"):
        importlib.import_module(module)  # the load's own imports first: the time measured is the tries'

    rt = Runtime(settings)
    start = time.monotonic()
    try:
        rt.load()
    finally:
        rt.stop()
    assert rt.state == "failed" and rt.pipelines == {} and rt.failed_tries == failed_tries
    assert rt.store.load_failures() == {"v0Q": failed_tries}
    assert waited_s <= time.monotonic() - start < waited_s + 10


def test_settings_that_cannot_work_are_refused_once_before_loading(
    tmp_path: Path, fixture_a: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """regional compile + CUDA graphs: refused at start with the reason, no retries, the weights never read."""
    settings = Settings(
        redis_url=REDIS_URL,
        key_prefix=f"test-{uuid.uuid4().hex[:10]}",
        local_dir=tmp_path,
        sdxl_checkpoint=fixture_a / "sdxl.safetensors",
        variants={"v0Q": fixture_a / "supir.ckpt"},
        compile="regional",
        cuda_graphs=True,
        worker_load_tries=3,
        worker_load_backoff_s=30.0,  # a retry would show in the time taken
    )
    rt = Runtime(settings)
    start = time.monotonic()
    try:
        with caplog.at_level("ERROR", logger="supir.worker"):
            rt.load()
    finally:
        rt.stop()
    assert rt.state == "failed" and rt.pipelines == {} and rt.failed_tries == 1
    assert time.monotonic() - start < 30
    assert "refused: cuda_graphs needs compile=full" in caplog.text
