"""One job, start to end, as plain functions the Celery tasks call (and tests call directly). Webhook
deliveries live in worker.webhooks (a light worker of their own)."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import redis

from jobs.cache import cacheable, record_key
from jobs.estimates import RateBook
from jobs.record import Faces, JobError, JobProgress, JobRecord, JobResult, Status, Tiling, output_key, stage1_key
from jobs.retention import erase_objects
from jobs.storage import ObjectMissing, StorageError
from supir_core.errors import Canceled, InvalidInput, WeightsError
from supir_core.params import RestoreParams

from . import metrics
from .runtime import Runtime

if TYPE_CHECKING:  # torch: only ever imported in the pool process
    from PIL.Image import Image

    from supir_core.imageio import LoadedImage
    from supir_core.pipeline import RestorationPipeline, Stage1

log = logging.getLogger("supir.worker")
_TENSORS = "application/octet-stream"
T = TypeVar("T")


class Busy(Exception):
    """Another live worker process runs this job (a duplicate delivery): look again later."""


class Erased(Exception):
    """The job was erased (DELETE) while it ran: what it wrote is removed again, and nothing more is written."""


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
        runtime.count_compiles(f"job {job_id}")
        with contextlib.suppress(redis.RedisError):
            runtime.beat()


def _run(runtime: Runtime, job_id: str) -> str:
    record = _start(runtime, job_id)
    if isinstance(record, str):
        return record  # nothing to run: busy elsewhere, lost too often, or ended
    started = time.perf_counter()
    try:
        params = RestoreParams.model_validate(record.params)
        pipeline = runtime.pipeline_for(record.variant)
        if pipeline is None:  # a message on the wrong queue: this worker has not loaded that file
            message = f"this worker does not serve variant {record.variant}"
            return _end(runtime, job_id, "failed", "variant_unavailable", message)
        data = _stored(runtime, "reading the input", lambda: runtime.objects.get(record.input_key))
        loaded = _load_image(data)
        _reset_gpu_peak(pipeline)  # the peak this job reports is its own (not a failed job's before it)
        made = _make(runtime, record, params, pipeline, loaded)
        upload_start = time.perf_counter()
        results = _write_results(runtime, record, params, made.images, made.seeds, loaded)
        seconds = {**made.seconds, "upload": time.perf_counter() - upload_start}
        seconds["total"] = time.perf_counter() - started
    except redis.RedisError:
        raise  # Redis stayed away past REDIS_WAIT_S: the reaper queues the job again once it is back
    except Erased:
        log.info("job %s: erased while it ran; its files are removed and it ends here", job_id)
        return "erased"
    except Exception as exc:
        return _end_failed(runtime, job_id, exc)
    return _succeed(runtime, record, params, made, results, seconds)


def _put(runtime: Runtime, job_id: str, what: str, key: str, data: bytes, content_type: str) -> None:
    """Store one of the job's objects, then make sure the job was not erased meanwhile: the API writes the
    tombstone before it erases, so a write that raced the erase is found here and removed."""
    _stored(runtime, what, lambda: runtime.objects.put(key, data, content_type))
    if _redis(lambda: runtime.store.tombstone(job_id)) is not None:
        _stored(runtime, "erasing the files of an erased job", lambda: erase_objects(runtime.objects, job_id))
        raise Erased(job_id)


def _start(runtime: Runtime, job_id: str) -> JobRecord | str:
    """Claim the job for this run: its record, or the status to return when there is nothing to run."""
    outcome, record = _redis(lambda: runtime.store.start(job_id, runtime.name, runtime.settings.max_attempts))
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
    return record


@dataclass
class _Made:
    """What a run made, a preview or a restoration, in the terms of the job's record."""

    images: list[Image]  # the stage-1 image of a preview, else every sample
    seeds: list[int | None]  # one per image (None: a preview has no sampling seed)
    seconds: dict[str, float]  # the pipeline's stages
    caption: str | None
    positive_prompt: str | None  # None: a preview encodes no prompts
    negative_prompt: str | None
    tiling: Tiling | None = None  # None: a preview samples nothing
    faces: Faces | None = None  # None: a preview, or params.faces off


def _make(
    runtime: Runtime, record: JobRecord, params: RestoreParams, pipeline: RestorationPipeline, loaded: LoadedImage
) -> _Made:
    on_progress = _progress_writer(runtime, record)
    if record.kind == "preview":
        preview = pipeline.preview(loaded, params, on_progress=on_progress)
        kept = preview.stage1.to_bytes()  # what a later job from this preview starts from
        _put(runtime, record.id, "keeping stage 1", stage1_key(record.id), kept, _TENSORS)
        return _Made([preview.stage1_image], [None], preview.seconds, preview.caption, None, None)
    stage1 = _read_stage1(runtime, record.stage1_job) if record.stage1_job is not None else None

    def should_stop() -> bool:
        return _cancel_requested(runtime, record.id)

    result = pipeline(loaded, params, on_progress=on_progress, should_stop=should_stop, stage1=stage1)
    prompts = result.prompts
    # validated here, inside the run: metadata of another shape fails the job loudly rather than its view
    faces = result.to_dict().get("faces")
    return _Made(
        list(result.images),
        list(result.seeds),
        result.seconds,
        prompts.caption,
        prompts.positive,
        prompts.negative,
        Tiling.model_validate(result.tiling.metadata()),
        Faces.model_validate(faces) if faces is not None else None,
    )


def _read_stage1(runtime: Runtime, preview_job: str) -> Stage1:
    from supir_core.pipeline import Stage1  # torch: only ever in the pool process

    source = stage1_key(preview_job)
    return Stage1.from_bytes(_stored(runtime, "reading stage 1", lambda: runtime.objects.get(source)))


def _end_failed(runtime: Runtime, job_id: str, exc: Exception) -> str:
    """End a job whose run raised `exc` (called inside the except block, so the log has its traceback)."""
    if isinstance(exc, Canceled):
        return _end(runtime, job_id, "canceled")
    if isinstance(exc, InvalidInput):
        code = exc.code if exc.code != "invalid_input" else "invalid_image"
        return _end(runtime, job_id, "failed", code, safe_message(exc.message))
    if isinstance(exc, WeightsError):
        log.error("job %s: %s", job_id, exc.message)
        return _end(runtime, job_id, "failed", "weights_error", "the worker's model weights could not be used")
    if isinstance(exc, ObjectMissing):
        return _end(runtime, job_id, "failed", "input_missing", "the job's photo is no longer stored")
    if isinstance(exc, StorageError):
        log.error("job %s: storage kept failing: %s", job_id, exc.message)
        return _end(runtime, job_id, "failed", "storage_error", "the object store kept failing; try again later")
    if _is_out_of_memory(exc):
        _free_gpu_cache(exc)
        message = "the GPU ran out of memory; try a smaller image or upscale"
        return _end(runtime, job_id, "failed", "gpu_out_of_memory", message)
    if _is_time_limit(exc):
        limit = runtime.settings.job_time_limit_s
        message = f"the job ran past the service's time limit of {limit} s (SUPIR_JOB_TIME_LIMIT_S)"
        return _end(runtime, job_id, "failed", "time_limit", message + "; try a smaller image or fewer steps")
    log.exception("job %s failed", job_id)
    message = f"an internal error ({type(exc).__name__}) stopped the job; the worker's log has the details"
    return _end(runtime, job_id, "failed", "internal_error", message)


def _succeed(
    runtime: Runtime,
    record: JobRecord,
    params: RestoreParams,
    made: _Made,
    results: list[JobResult],
    seconds: dict[str, float],
) -> str:
    """Metrics, the result cache's entry, then the job's ending with its results; usage once it stands."""
    for stage, value in seconds.items():
        if stage in ("stage1", "caption", "encode", "sampling", "decoding", "faces", "upload", "total"):
            metrics.STAGE_SECONDS.labels("decode" if stage == "decoding" else stage).observe(value)
    if made.seconds.get("sampling"):
        metrics.STEPS_PER_SECOND.set(params.steps / made.seconds["sampling"])
    _record_gpu_memory(runtime.pipeline_for(record.variant))
    steps = 0 if record.kind == "preview" else params.steps
    gpu_seconds = round(sum(made.seconds.values()), 4)  # the pipeline's stages: upload and waits excluded
    model = runtime.models.get(record.variant, {})
    _remember_result(runtime, record, model)  # before the ending: a repeat right after it hits
    status = _end(
        runtime,
        record.id,
        "succeeded",
        result=results[0],
        results=results,
        seconds={k: round(v, 4) for k, v in seconds.items()},
        caption=made.caption,
        positive_prompt=made.positive_prompt,
        negative_prompt=made.negative_prompt,
        tiling=made.tiling,
        faces=made.faces,
        progress=JobProgress(stage="done", step=steps, steps=steps),
        gpu_seconds=gpu_seconds,
        model_sha256=model.get("supir_sha256"),
        model_id=model.get("model_id"),
    )
    if status == "succeeded":  # this run's ending stands: count it once
        ran = record.model_copy(update={"seconds": seconds, "tiling": made.tiling, "status": "succeeded"})
        _after_success(runtime, ran, len(results), gpu_seconds)
    return status


def _load_image(data: bytes) -> LoadedImage:
    from supir_core.imageio import load_image  # torch: only ever in the pool process

    return load_image(data)


def _write_results(
    runtime: Runtime,
    record: JobRecord,
    params: RestoreParams,
    images: list[Image],
    seeds: list[int | None],
    loaded: LoadedImage,
) -> list[JobResult]:
    """Encode every sample in the asked format (with the photo's metadata unless stripped) and store it under a
    key fixed by the job and the sample, so a redelivered job overwrites rather than adds."""
    from supir_core.imageio import encode_results

    keep = params.keep_metadata and not runtime.settings.strip_metadata
    files = encode_results(
        images, params.output_format, params.output_quality, loaded.result_metadata() if keep else None
    )
    results = []
    for index, (file, seed) in enumerate(zip(files, seeds, strict=True)):
        key = output_key(record.id, index, file.extension)
        _put(runtime, record.id, "writing the result", key, file.data, file.media_type)
        results.append(
            JobResult(
                key=key,
                width=file.width,
                height=file.height,
                bytes=len(file.data),
                content_type=file.media_type,
                seed=seed,
            )
        )
    return results


def _remember_result(runtime: Runtime, record: JobRecord, model: dict[str, Any]) -> None:
    """The result cache's entry for a reproducible job. Written before the job ends: the API answers from it only
    once the job it names has succeeded with its results, so an entry whose run did not end it is never used."""
    model_id, numerics = model.get("model_id"), model.get("numerics")
    if model_id is None or numerics is None or not cacheable(runtime.settings, record):
        return
    try:
        runtime.store.remember_result(record_key(runtime.settings, record, model_id, numerics), record.id)
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
    try:  # the rates estimates rest on, and the memory plan as it stands now (CUDA-graph pools grow with jobs)
        RateBook(runtime.store).record(variant, record)
        runtime.publish_plan(variant)
    except redis.RedisError:
        log.warning("job %s: not counted in the rates of estimates (Redis)", record.id)


def _is_out_of_memory(exc: Exception) -> bool:
    from supir_core.memory import is_out_of_memory  # torch: only ever in the pool process

    return is_out_of_memory(exc)


def _is_time_limit(exc: Exception) -> bool:
    from celery.exceptions import SoftTimeLimitExceeded

    return isinstance(exc, SoftTimeLimitExceeded)


def _free_gpu_cache(exc: Exception) -> None:
    """The failed run's tensors freed (its traceback's frames hold them) and the allocator's cache given back."""
    from supir_core.memory import release_after_failure

    release_after_failure(exc)


def _cuda_device(pipeline: Any) -> Any:
    """The CUDA device the pipeline runs on (not the process's current device), or None off CUDA."""
    import torch

    device = getattr(pipeline, "device", None)  # stand-in pipelines in tests have none
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.device(device)


def _reset_gpu_peak(pipeline: Any) -> None:
    device = _cuda_device(pipeline)
    if device is not None:
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def _record_gpu_memory(pipeline: Any) -> None:
    """What stays allocated on the pipeline's device after the job, and the job's own peak (reset for the next)."""
    device = _cuda_device(pipeline)
    if device is None:
        return
    import torch

    metrics.GPU_MEMORY_BYTES.labels("allocated").set(torch.cuda.memory_allocated(device))
    metrics.GPU_MEMORY_BYTES.labels("peak").set(torch.cuda.max_memory_allocated(device))
    torch.cuda.reset_peak_memory_stats(device)
