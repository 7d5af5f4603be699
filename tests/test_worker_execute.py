"""worker.execute.run_job against a real Redis and a local store, with stand-in pipelines for what cannot
happen here (a GPU running out of memory) and the real tiny one for the rest."""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
import torch

from jobs.record import JobRecord
from jobs.settings import Settings
from jobs.storage import LocalStore
from jobs.store import JobStore
from supir_core.errors import StorageError
from supir_core.pipeline import RestorationPipeline
from worker import execute
from worker.runtime import Runtime

DATA = Path(__file__).parent / "data"
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
    assert execute.run_job(runtime, job.id) == "skipped"
    assert runtime.store.get(job.id) == done


def test_gpu_out_of_memory_fails_the_job_and_the_worker_goes_on(runtime: Runtime) -> None:
    real = runtime.pipeline

    def exhausted(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    runtime.pipeline = exhausted
    job = queued_job(runtime)
    assert execute.run_job(runtime, job.id) == "failed"
    failed = runtime.store.get(job.id)
    assert failed is not None and failed.error is not None and failed.error.code == "gpu_out_of_memory"
    runtime.pipeline = real
    assert execute.run_job(runtime, queued_job(runtime).id) == "succeeded"


def test_storage_errors_retry_then_fail(runtime: Runtime) -> None:
    class Flaky(LocalStore):
        def get(self, key: str) -> bytes:
            raise StorageError("connection reset by peer")

    runtime.objects = Flaky(Path(runtime.settings.local_dir), "http://test", "secret")
    job = JobRecord(owner="t", params=FAST, input_key="inputs/x")
    runtime.store.create(job)
    with pytest.raises(execute.RetryLater):
        execute.run_job(runtime, job.id, final_attempt=False)
    assert execute.run_job(runtime, job.id, final_attempt=True) == "failed"
    record = runtime.store.get(job.id)
    assert record is not None and record.error is not None and record.error.code == "storage_error"
    assert record.attempts == 2


def test_a_job_canceled_before_it_starts_never_runs(runtime: Runtime) -> None:
    calls = []
    runtime.pipeline = lambda *a, **k: calls.append(1)
    job = queued_job(runtime)
    runtime.store.request_cancel(job.id)
    assert execute.run_job(runtime, job.id) == "canceled" and not calls


def test_progress_is_throttled(runtime: Runtime) -> None:
    runtime.settings = runtime.settings.model_copy(update={"progress_interval_s": 3600})
    job = queued_job(runtime)
    runtime.store.start(job.id)
    write = execute._progress_writer(runtime, job.id)
    seen = []
    runtime.store.set_progress = lambda job_id, p: seen.append(p.step)  # type: ignore[method-assign]
    for step in range(1, 11):
        write(SimpleNamespace(stage="sampling", step=step, steps=10))
    assert seen == [1, 10]  # the first of a stage and the last step; the rest fall inside the interval
