"""worker.execute.run_job against a real Redis and a local store, with stand-in pipelines for what cannot
happen here (a GPU running out of memory) and the real tiny one for the rest."""

from __future__ import annotations

import copy
import io
import socket
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
import torch
from PIL import Image

from jobs.reaper import reap
from jobs.record import JobProgress, JobRecord, WebhookState
from jobs.settings import Settings
from jobs.storage import LocalStore, StorageError
from jobs.store import JobStore
from supir_core.pipeline import RestorationPipeline
from tests.paths import DATA
from worker import execute
from worker.runtime import Runtime

FAST = {"min_size": 64, "steps": 2, "seed": 9}


@pytest.fixture
def runtime(tmp_path: Path, tiny_model) -> Runtime:
    settings = Settings(key_prefix=f"test-{uuid.uuid4().hex[:8]}", local_dir=tmp_path, progress_interval_s=0)
    store = JobStore(redis.Redis.from_url(settings.redis_url), settings.key_prefix)
    rt = Runtime(settings, store=store, objects=LocalStore(tmp_path, "http://test", "secret"))
    rt.pipeline = RestorationPipeline(tiny_model)
    rt.state = "ready"
    return rt


def queued_job(rt: Runtime, params: dict | None = None) -> JobRecord:
    record = JobRecord(owner="t", params=params or FAST, input_key="inputs/x")
    rt.objects.put(record.input_key, (DATA / "astronaut_gray.png").read_bytes(), "image/png")
    rt.store.create(record)
    return record


def test_a_job_runs_once_and_a_redelivery_does_nothing(runtime: Runtime) -> None:
    job = queued_job(runtime)
    assert execute.run_job(runtime, job.id) == "succeeded"
    done = runtime.store.get(job.id)
    assert done is not None and done.status == "succeeded" and done.result is not None
    assert (done.result.width, done.result.height) == (96, 96) and done.attempts == 1
    assert done.tiling is not None and done.tiling.policy == "auto" and done.tiling.reason  # how it ran, and why
    assert done.faces is None  # params.faces is off by default
    assert execute.run_job(runtime, job.id) == "skipped"
    assert runtime.store.get(job.id) == done


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        # cuBLAS failing to allocate its workspace: a plain RuntimeError, the same out of memory
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    ],
)
def test_gpu_out_of_memory_fails_the_job_and_the_worker_goes_on(runtime: Runtime, error: Exception) -> None:
    real = runtime.pipeline

    def exhausted(*args: object, **kwargs: object) -> None:
        raise error

    runtime.pipeline = exhausted
    job = queued_job(runtime)
    assert execute.run_job(runtime, job.id) == "failed"
    failed = runtime.store.get(job.id)
    assert failed is not None and failed.error is not None and failed.error.code == "gpu_out_of_memory"
    runtime.pipeline = real
    assert execute.run_job(runtime, queued_job(runtime).id) == "succeeded"


def test_gpu_memory_metrics_read_the_pipelines_device_and_each_jobs_own_peak(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU here: torch.cuda's counters are faked, the pipeline (on the CPU) says it runs on cuda:1."""
    from worker import metrics

    calls: list[tuple[str, torch.device]] = []
    peaks = iter([700, 300])  # the second job's own peak is lower than the first's

    def counter(name: str, value: object) -> object:
        def read(device: torch.device) -> object:
            calls.append((name, device))
            return next(peaks) if name == "peak" else value

        return read

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", counter("allocated", 100))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", counter("peak", None))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", counter("reset", None))
    real = runtime.pipeline

    class OnSecondGpu:
        device = torch.device("cuda", 1)

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def __call__(self, *args: object, **kwargs: object) -> object:
            return real(*args, **kwargs)

    runtime.pipeline = OnSecondGpu()
    gauge = metrics.GPU_MEMORY_BYTES.labels("peak")
    assert execute.run_job(runtime, queued_job(runtime).id) == "succeeded"
    assert gauge._value.get() == 700
    assert execute.run_job(runtime, queued_job(runtime).id) == "succeeded"
    assert gauge._value.get() == 300
    assert metrics.GPU_MEMORY_BYTES.labels("allocated")._value.get() == 100
    job = ["reset", "allocated", "peak", "reset"]  # reset at the start, read at the end, reset after reading
    assert [name for name, _ in calls] == job + job
    assert {device for _, device in calls} == {torch.device("cuda", 1)}


def test_a_job_past_the_time_limit_fails_naming_the_setting_and_the_worker_goes_on(runtime: Runtime) -> None:
    """Celery's soft limit raises inside the run: the job fails `time_limit`, saying which setting bounds it."""
    from celery.exceptions import SoftTimeLimitExceeded

    real = runtime.pipeline

    def too_slow(*args: object, **kwargs: object) -> None:
        raise SoftTimeLimitExceeded()

    runtime.pipeline = too_slow
    job = queued_job(runtime)
    assert execute.run_job(runtime, job.id) == "failed"
    failed = runtime.store.get(job.id)
    assert failed is not None and failed.error is not None and failed.error.code == "time_limit"
    assert "SUPIR_JOB_TIME_LIMIT_S" in failed.error.message and "1800 s" in failed.error.message
    runtime.pipeline = real
    assert execute.run_job(runtime, queued_job(runtime).id) == "succeeded"


def test_storage_errors_retry_then_fail(runtime: Runtime) -> None:
    tries = []

    class Down(LocalStore):
        def get(self, key: str) -> bytes:
            tries.append(key)
            raise StorageError("S3 get failed: connection reset")

    runtime.objects = Down(Path(runtime.settings.local_dir), "http://test", "secret")
    runtime.settings = runtime.settings.model_copy(update={"storage_backoff_s": 0.0, "storage_retries": 3})
    job = JobRecord(owner="t", params=FAST, input_key="inputs/x")
    runtime.store.create(job)
    assert execute.run_job(runtime, job.id) == "failed"
    record = runtime.store.get(job.id)
    assert record is not None and record.error is not None and record.error.code == "storage_error"
    assert record.attempts == 1 and len(tries) == 4  # retried inside the run, then failed once


def test_storage_that_comes_back_within_the_retries_loses_nothing(runtime: Runtime) -> None:
    real_get = runtime.objects.get
    failures = [StorageError("S3 get failed: timeout")] * 2

    def flaky(key: str) -> bytes:
        if failures:
            raise failures.pop()
        return real_get(key)

    runtime.objects.get = flaky  # type: ignore[method-assign]
    runtime.settings = runtime.settings.model_copy(update={"storage_backoff_s": 0.0, "storage_retries": 3})
    job = queued_job(runtime)
    assert execute.run_job(runtime, job.id) == "succeeded" and not failures


def test_a_run_taken_over_cannot_end_the_job(runtime: Runtime) -> None:
    """Fencing: the reaper requeued the job and another process runs it; the first run's ending is dropped."""
    store = runtime.store
    job = queued_job(runtime)
    assert store.start(job.id, "elsewhere:1", 3)[0] == "started"
    requeued = store.requeue_lost(job.id, "elsewhere:1", 1, 3)
    assert requeued is not None and requeued.status == "queued" and requeued.lost == 1
    assert store.queue_position(job.id) == 0  # back in the queue, at its creation time
    assert store.finish(job.id, "failed", worker="elsewhere:1") is None
    assert store.set_progress(job.id, JobProgress(stage="sampling"), worker="elsewhere:1") is None
    assert execute.run_job(runtime, job.id) == "succeeded"
    done = store.get(job.id)
    assert done is not None and done.attempts == 2 and done.lost == 1 and done.worker == runtime.name


def test_a_job_held_by_a_live_process_is_busy_and_a_dead_ones_is_taken_over(runtime: Runtime) -> None:
    store = runtime.store
    job = queued_job(runtime)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        name = f"{socket.gethostname()}:{holder.pid}"
        assert store.start(job.id, name, 3)[0] == "started"
        store.heartbeat(name, "ready", job.id)
        with pytest.raises(execute.Busy):
            execute.run_job(runtime, job.id)  # a duplicate delivery while the holder runs it
    finally:
        holder.kill()
        holder.wait()
    assert execute.run_job(runtime, job.id) == "succeeded"  # its pid is gone: the run counts as lost
    done = store.get(job.id)
    assert done is not None and done.lost == 1 and done.attempts == 2


def test_the_last_allowed_loss_fails_the_job_worker_lost(runtime: Runtime) -> None:
    store = runtime.store
    job = queued_job(runtime)
    for attempt in (1, 2):
        assert store.start(job.id, f"gone-host:{attempt}", 3)[0] == "started"
        assert store.requeue_lost(job.id, f"gone-host:{attempt}", attempt, 3) is not None
    assert store.start(job.id, "gone-host:3", 3)[0] == "started"
    calls = []
    runtime.pipeline = lambda *a, **k: calls.append(1)
    assert execute.run_job(runtime, job.id) == "failed" and not calls  # its holder has no beat: lost, 3rd time
    failed = store.get(job.id)
    assert failed is not None and failed.error is not None and failed.error.code == "worker_lost"
    assert failed.lost == 3 and runtime.store.active_count("t") == 0


def test_the_reaper_requeues_a_job_whose_worker_dropped_it(runtime: Runtime) -> None:
    """The worker is alive but its beat names no job (its end was never recorded): queued again, once."""
    store = runtime.store
    job = queued_job(runtime)
    store.start(job.id, "w-host:7", 3)
    store.heartbeat("w-host:7", "ready", None)
    sent: list[str] = []
    assert reap(store, sent.append, max_attempts=3, lost_after_s=3600) == []  # too recent to judge
    changed = reap(store, sent.append, max_attempts=3, lost_after_s=0)
    assert [r.id for r in changed] == [job.id] and sent == [job.id] and changed[0].status == "queued"
    assert reap(store, sent.append, max_attempts=3, lost_after_s=0) == [] and sent == [job.id]


def test_the_quota_claim_is_atomic(runtime: Runtime) -> None:
    store = runtime.store
    with ThreadPoolExecutor(16) as pool:
        claims = list(pool.map(lambda i: store.claim_slot("q", f"job_{i}", 8), range(40)))
    assert sum(claims) == 8 and store.active_count("q") == 8
    held = next(f"job_{i}" for i, won in enumerate(claims) if won)  # threads race: any 8 of the 40 win
    assert store.claim_slot("q", held, 8)  # a claim already held is held
    store.release_slot("q", held)
    assert store.active_count("q") == 7
    assert store.free_orphan_slots("q", older_than_s=0) == 7  # no records behind them


def test_a_job_canceled_before_it_starts_never_runs(runtime: Runtime) -> None:
    calls = []
    runtime.pipeline = lambda *a, **k: calls.append(1)
    job = queued_job(runtime)
    runtime.store.request_cancel(job.id)
    assert execute.run_job(runtime, job.id) == "canceled" and not calls


def test_progress_is_throttled(runtime: Runtime) -> None:
    runtime.settings = runtime.settings.model_copy(update={"progress_interval_s": 3600})
    job = queued_job(runtime)
    runtime.store.start(job.id, runtime.name, 3)
    write = execute._progress_writer(runtime, job)
    seen = []
    runtime.store.set_progress = lambda job_id, p, worker: seen.append(p.step)  # type: ignore[method-assign]
    for step in range(1, 11):
        write(SimpleNamespace(stage="sampling", step=step, steps=10))
    assert seen == [1, 10]  # the first of a stage and the last step; the rest fall inside the interval


def test_progress_webhooks_follow_the_filter_and_their_own_interval(runtime: Runtime) -> None:
    sent: list[tuple[str, str]] = []
    runtime.announce = lambda job_id, event: sent.append((job_id, event))
    runtime.store.set_progress = lambda job_id, p, worker: None  # type: ignore[method-assign]
    job = queued_job(runtime)
    hooked = job.model_copy(update={"webhook": WebhookState(url="http://hooks.example/", events=["progress"])})
    for interval, record, expected in ((1e-9, hooked, 10), (3600, hooked, 0), (1e-9, job, 0)):
        runtime.settings = runtime.settings.model_copy(
            update={"progress_interval_s": 0, "webhook_progress_interval_s": interval}
        )
        sent.clear()
        write = execute._progress_writer(runtime, record)
        for step in range(1, 11):
            write(SimpleNamespace(stage="sampling", step=step, steps=10))
        assert sent == [(job.id, "progress")] * expected


def _photo_with_date(tmp_path: Path) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = "2001:02:03 04:05:06"  # DateTimeOriginal
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 90, 60)).save(out, format="JPEG", exif=exif.tobytes())
    return out.getvalue()


def test_the_service_can_strip_every_results_metadata(runtime: Runtime, tmp_path: Path) -> None:
    """keep_metadata asks for the photo's EXIF; SUPIR_STRIP_METADATA overrides it for the whole service."""
    photo = _photo_with_date(tmp_path)
    dates = {}
    for strip in (False, True):
        runtime.settings = runtime.settings.model_copy(update={"strip_metadata": strip})
        record = JobRecord(owner="t", params={**FAST, "output_format": "jpeg"}, input_key=f"inputs/{strip}")
        runtime.objects.put(record.input_key, photo, "image/jpeg")
        runtime.store.create(record)
        assert execute.run_job(runtime, record.id) == "succeeded"
        done = runtime.store.get(record.id)
        assert done is not None and done.result is not None and done.result.content_type == "image/jpeg"
        with Image.open(io.BytesIO(runtime.objects.get(done.result.key))) as result:
            dates[strip] = result.getexif().get_ifd(0x8769).get(0x9003)
    assert dates == {False: "2001:02:03 04:05:06", True: None}


def test_compiles_are_counted_per_job_and_three_sizes_fall_back_to_eager_never(
    runtime: Runtime, tiny_model, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's defaults with compile on (regional, dynamic shapes): three processing sizes in one process;
    the graphs each job built reach the metric and the log, the third size builds none, nothing runs eager."""
    from supir_core.speed import SpeedSettings, optimize
    from worker import metrics

    from_settings = SpeedSettings.from_attributes(runtime.settings.model_copy(update={"compile": "regional"}))
    assert from_settings.compile_dynamic  # the worker's default
    runtime.settings = runtime.settings.model_copy(update={"compile": "regional"})
    model = copy.deepcopy(tiny_model)
    torch._dynamo.reset()  # graphs of equal blocks compiled by earlier tests in this process would serve these
    runtime.pipeline = RestorationPipeline(optimize(model, replace(from_settings, compile_backend="eager")))
    runtime.count_compiles("earlier tests")  # this process's graphs so far are not these jobs'
    fallbacks = metrics.COMPILE_FALLBACKS._value.get()
    built = []
    for min_size in (64, 128, 192):
        before = metrics.COMPILED_GRAPHS._value.get()
        job = queued_job(runtime, {**FAST, "min_size": min_size})
        with caplog.at_level("INFO", logger="supir.worker"):
            assert execute.run_job(runtime, job.id) == "succeeded"
        built.append(metrics.COMPILED_GRAPHS._value.get() - before)
    assert built[0] > 0 and built[1:] == [0, 0], built
    assert f"job {job.id}" not in caplog.text and "compiled" in caplog.text
    assert metrics.COMPILE_FALLBACKS._value.get() == fallbacks
