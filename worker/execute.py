"""One job, start to end, as plain functions the Celery tasks call (and tests call directly). Webhook
deliveries live in worker.webhooks (a light worker of their own)."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from jobs.cache import cacheable, record_key
from jobs.record import JobError, JobProgress, JobRecord, JobResult, Status, output_key, stage1_key
from jobs.storage import ObjectMissing, StorageError
from supir_core.errors import Canceled, InvalidInput, WeightsError
from supir_core.params import RestoreParams

from . import metrics
from .runtime import Runtime

log = logging.getLogger("supir.worker")
_TENSORS = "application/octet-stream"
T = TypeVar("T")


class Busy(Exception):
    """Another live worker process runs this job (a duplicate delivery): look again later."""


REDIS_WAIT_S = 300.0  # how long a job waits out a Redis restart or failover (a worker can do nothing without it)
_SAFE = re.compile(r"<[^<>]* at 0x[0-9a-f]+>|(?:[A-Za-z]:)?/[\w.\-]+(?:/[\w.\-]+)+")


def _redis(call: Callable[[], T]) -> T:
    """Run a Redis call, waiting out a restart or failover (up to REDIS_WAIT_S) instead of dropping the job."""
    deadline = time.monotonic() + REDIS_WAIT_S
    while True:
        try:
            return call()
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            log.warning("Redis unavailable; retrying")
            time.sleep(1.0)


def _stored(runtime: Runtime, what: str, call: Callable[[], T]) -> T:
    """A storage call, retried with exponential backoff (2, 4, … 32 s by default); StorageError once the tries
    run out, at once when the object is missing."""
    first, retries = runtime.settings.storage_backoff_s, runtime.settings.storage_retries
    for wait in (*(first * 2**i for i in range(retries)), None):
        try:
            return call()
        except StorageError as exc:
            if wait is None or isinstance(exc, ObjectMissing):
                raise
            log.warning("storage: %s failed (%s); retrying in %.0f s", what, exc.message, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _announce(runtime: Runtime, record: JobRecord, event: str) -> None:
    """Queue a `started` / `progress` webhook if the job asked for it; best effort, never fails the job."""
    if record.webhook is None or event not in record.webhook.events:
        return
    try:
        runtime.announce(record.id, event)
    except Exception:  # the broker is away: these events are informative, the ending is what must arrive
        log.warning("job %s: its %s webhook could not be queued", record.id, event)


def _progress_writer(runtime: Runtime, record: JobRecord) -> Callable[[Any], None]:
    """Record progress at most every progress_interval_s (and at every stage change or last step); send a
    `progress` webhook at most every webhook_progress_interval_s."""
    job_id = record.id
    last: dict[str, Any] = {"at": 0.0, "stage": "", "hook_at": time.monotonic()}

    def write(p: Any) -> None:
        now = time.monotonic()
        final = p.stage == "sampling" and p.step == p.steps
        if p.stage == last["stage"] and not final and now - last["at"] < runtime.settings.progress_interval_s:
            return
        last.update(at=now, stage=p.stage)
        try:
            progress = JobProgress(stage=p.stage, step=p.step, steps=p.steps)
            runtime.store.set_progress(job_id, progress, worker=runtime.name)
        except redis.RedisError:
            log.warning("job %s: progress not recorded (Redis)", job_id)
            return
        if now - last["hook_at"] >= runtime.settings.webhook_progress_interval_s:
            last["hook_at"] = now
            _announce(runtime, record, "progress")

    return write


def _cancel_requested(runtime: Runtime, job_id: str) -> bool:
    try:
        return runtime.store.cancel_requested(job_id)
    except redis.RedisError:
        return False  # Redis is away: keep restoring; a cancel is seen at the next check


def _end(runtime: Runtime, job_id: str, status: Status, code: str = "", message: str = "", **fields: Any) -> str:
    if code:
        fields["error"] = JobError(code=code, message=message)
    done = _redis(lambda: runtime.store.finish(job_id, status, worker=runtime.name, **fields))
    if done is None:
        return "skipped"  # another run holds or has ended the job: its ending stands
    metrics.JOBS_FINISHED.labels(status, code).inc()
    return status


def safe_message(text: str) -> str:
    """A message for the job's owner: no object reprs or server paths."""
    return _SAFE.sub("…", text)[:300]


def run_job(runtime: Runtime, job_id: str) -> str:
    """Restore job_id; returns its terminal status or 'skipped' (ended, gone, or held by another run).

    Raises Busy when another live worker process holds the job. Redis outages are waited out (REDIS_WAIT_S)
    and storage errors retried with backoff (settings.storage_*) inside the run, so no failure here needs the
    broker to be up; a run that still cannot record its end is found lost by the reaper and runs again."""
    store = runtime.store
    record = _redis(lambda: store.get(job_id))
    if record is None or record.terminal:
        return "skipped"  # a redelivery of a job that has ended: nothing to do, exactly one ending stands
    if _redis(lambda: store.cancel_requested(job_id)):
        _redis(lambda: store.finish(job_id, "canceled"))
        metrics.JOBS_FINISHED.labels("canceled", "").inc()
        return "canceled"
    runtime.running(job_id)  # the beat names the job before the record does: the reaper never sees it unnamed
    try:
        return _run(runtime, job_id)
    finally:
        runtime.job = None
        with contextlib.suppress(redis.RedisError):
            runtime.beat()


def _run(runtime: Runtime, job_id: str) -> str:
    store = runtime.store
    max_lost = runtime.settings.max_attempts
    outcome, record = _redis(lambda: store.start(job_id, runtime.name, max_lost))
    if outcome == "busy":
        raise Busy(job_id)
    if outcome == "lost":
        metrics.JOBS_FINISHED.labels("failed", "worker_lost").inc()
        return "failed"
    if record is None or outcome != "started":
        return "skipped"
    if record.attempts == 1:
        metrics.STAGE_SECONDS.labels("queue_wait").observe(max(0.0, (record.started_at or 0) - record.created_at))
    _announce(runtime, record, "started")
    started = time.perf_counter()
    try:
        params = RestoreParams.model_validate(record.params)
        pipeline = runtime.pipeline_for(record.variant)
        if pipeline is None:  # a message on the wrong queue: this worker has not loaded that file
            message = f"this worker does not serve variant {record.variant}"
            return _end(runtime, job_id, "failed", "variant_unavailable", message)
        data = _stored(runtime, "reading the input", lambda: runtime.objects.get(record.input_key))
        loaded = _load_image(data)
        on_progress = _progress_writer(runtime, record)
        if record.kind == "preview":
            result: Any = pipeline.preview(loaded, params, on_progress=on_progress)
            images = [result.stage1_image]
            meta = {**result.metadata, "positive_prompt": None, "negative_prompt": None, "seeds": [None]}
            kept = result.stage1.to_bytes()
            _stored(runtime, "keeping stage 1", lambda: runtime.objects.put(stage1_key(job_id), kept, _TENSORS))
        else:
            stage1 = None
            if record.stage1_job is not None:
                from supir_core.pipeline import Stage1  # torch: only ever in the pool process

                source = stage1_key(record.stage1_job)
                stage1 = Stage1.from_bytes(_stored(runtime, "reading stage 1", lambda: runtime.objects.get(source)))
            result = pipeline(
                loaded,
                params,
                on_progress=on_progress,
                should_stop=lambda: _cancel_requested(runtime, job_id),
                stage1=stage1,
            )
            images, meta = list(getattr(result, "images", [result.image])), result.metadata
        upload_start = time.perf_counter()
        results = _write_results(runtime, record, params, images, meta.get("seeds") or [meta.get("seed")], loaded)
        seconds = {**meta["seconds"], "upload": time.perf_counter() - upload_start}
        seconds["total"] = time.perf_counter() - started
    except Canceled:
        return _end(runtime, job_id, "canceled")
    except InvalidInput as exc:
        code = exc.code if exc.code != "invalid_input" else "invalid_image"
        return _end(runtime, job_id, "failed", code, safe_message(exc.message))
    except WeightsError as exc:
        log.error("job %s: %s", job_id, exc.message)
        return _end(runtime, job_id, "failed", "weights_error", "the worker's model weights could not be used")
    except ObjectMissing:
        return _end(runtime, job_id, "failed", "input_missing", "the job's photo is no longer stored")
    except StorageError as exc:
        log.error("job %s: storage kept failing: %s", job_id, exc.message)
        return _end(runtime, job_id, "failed", "storage_error", "the object store kept failing; try again later")
    except redis.RedisError:
        raise  # Redis stayed away past REDIS_WAIT_S: the reaper queues the job again once it is back
    except Exception as exc:
        if _is_out_of_memory(exc):
            _free_gpu_cache()
            message = "the GPU ran out of memory; try a smaller image or upscale"
            return _end(runtime, job_id, "failed", "gpu_out_of_memory", message)
        if _is_time_limit(exc):
            limit = runtime.settings.job_time_limit_s
            message = f"the job ran past the service's time limit of {limit} s (SUPIR_JOB_TIME_LIMIT_S)"
            return _end(runtime, job_id, "failed", "time_limit", message + "; try a smaller image or fewer steps")
        log.exception("job %s failed", job_id)
        message = f"an internal error ({type(exc).__name__}) stopped the job; the worker's log has the details"
        return _end(runtime, job_id, "failed", "internal_error", message)

    for stage, value in seconds.items():
        if stage in ("stage1", "caption", "encode", "sampling", "decoding", "upload", "total"):
            metrics.STAGE_SECONDS.labels("decode" if stage == "decoding" else stage).observe(value)
    if meta["seconds"].get("sampling"):
        metrics.STEPS_PER_SECOND.set(params.steps / meta["seconds"]["sampling"])
    _record_gpu_memory()
    steps = 0 if record.kind == "preview" else params.steps
    gpu_seconds = round(sum(meta["seconds"].values()), 4)  # the pipeline's stages: upload and waits excluded
    model = runtime.models.get(record.variant, {})
    _remember_result(runtime, record, model.get("model_id"))  # before the ending: a repeat right after it hits
    status = _end(
        runtime,
        job_id,
        "succeeded",
        result=results[0],
        results=results,
        seconds={k: round(v, 4) for k, v in seconds.items()},
        caption=meta.get("caption"),
        positive_prompt=meta.get("positive_prompt"),
        negative_prompt=meta.get("negative_prompt"),
        progress=JobProgress(stage="done", step=steps, steps=steps),
        gpu_seconds=gpu_seconds,
        model_sha256=model.get("supir_sha256"),
        model_id=model.get("model_id"),
    )
    if status == "succeeded":  # this run's ending stands: count it once
        _after_success(runtime, record, len(results), gpu_seconds)
    return status


def _load_image(data: bytes) -> Any:
    from supir_core.imageio import load_image  # torch: only ever in the pool process

    return load_image(data)


def _write_results(
    runtime: Runtime, record: JobRecord, params: RestoreParams, images: list[Any], seeds: list[Any], loaded: Any
) -> list[JobResult]:
    """Encode every sample in the asked format (with the photo's metadata unless stripped) and store it under a
    key fixed by the job and the sample, so a redelivered job overwrites rather than adds."""
    from supir_core.imageio import CONTENT_TYPES, EXTENSIONS, encode_image

    keep = params.keep_metadata and not runtime.settings.strip_metadata
    metadata = loaded.result_metadata() if keep else None
    results = []
    for index, (image, seed) in enumerate(zip(images, seeds, strict=True)):
        data = encode_image(image, params.output_format, params.output_quality, metadata)
        key = output_key(record.id, index, EXTENSIONS[params.output_format])
        content_type = CONTENT_TYPES[params.output_format]
        _stored(runtime, "writing the result", lambda: runtime.objects.put(key, data, content_type))  # noqa: B023
        results.append(
            JobResult(
                key=key, width=image.width, height=image.height, bytes=len(data), content_type=content_type, seed=seed
            )
        )
    return results


def _remember_result(runtime: Runtime, record: JobRecord, model_id: str | None) -> None:
    """The result cache's entry for a reproducible job. Written before the job ends: the API answers from it only
    once the job it names has succeeded with its results, so an entry whose run did not end it is never used."""
    if model_id is None or not cacheable(runtime.settings, record):
        return
    try:
        runtime.store.remember_result(record_key(runtime.settings, record, model_id), record.id)
    except redis.RedisError:
        log.warning("job %s: no result cache entry (Redis)", record.id)


def _after_success(runtime: Runtime, record: JobRecord, images: int, gpu_seconds: float) -> None:
    """Usage and metrics, counted once (by the run whose ending stood); a Redis hiccup never fails the job."""
    variant = record.variant or runtime.variants[0]
    metrics.GPU_SECONDS.labels(variant).inc(gpu_seconds)
    metrics.IMAGES.labels(variant).inc(images)
    try:
        runtime.usage.record(record.owner, images=images, gpu_seconds=gpu_seconds, cached=False)
    except redis.RedisError:
        log.warning("job %s: usage not recorded (Redis)", record.id)


def _is_out_of_memory(exc: Exception) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def _is_time_limit(exc: Exception) -> bool:
    from celery.exceptions import SoftTimeLimitExceeded

    return isinstance(exc, SoftTimeLimitExceeded)


def _free_gpu_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _record_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        metrics.GPU_MEMORY_BYTES.labels("allocated").set(torch.cuda.memory_allocated())
        metrics.GPU_MEMORY_BYTES.labels("peak").set(torch.cuda.max_memory_allocated())
