"""One job, start to end, as plain functions the Celery tasks call (and tests call directly)."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import redis

from jobs.netguard import ForbiddenAddress, check_addresses
from jobs.record import JobError, JobProgress, JobRecord, JobResult, output_key
from jobs.webhooks import signed_headers
from supir_core.errors import Canceled, InvalidInput, StorageError, SupirError, WeightsError
from supir_core.params import RestoreParams

from . import metrics
from .runtime import Runtime

log = logging.getLogger("supir.worker")


class RetryLater(Exception):
    """A transient failure (storage, Redis): the task should run again later."""


def _progress_writer(runtime: Runtime, job_id: str) -> Callable[[Any], None]:
    """Record progress at most every progress_interval_s (and at every stage change or last step)."""
    last: dict[str, Any] = {"at": 0.0, "stage": ""}

    def write(p: Any) -> None:
        now = time.monotonic()
        final = p.stage == "sampling" and p.step == p.steps
        if p.stage == last["stage"] and not final and now - last["at"] < runtime.settings.progress_interval_s:
            return
        last.update(at=now, stage=p.stage)
        try:
            runtime.store.set_progress(job_id, JobProgress(stage=p.stage, step=p.step, steps=p.steps))
        except redis.RedisError:
            log.warning("job %s: progress not recorded (Redis)", job_id)

    return write


def _fail(runtime: Runtime, job_id: str, code: str, message: str) -> JobRecord | None:
    metrics.JOBS_FINISHED.labels("failed", code).inc()
    return runtime.store.finish(job_id, "failed", error=JobError(code=code, message=message))


def run_job(runtime: Runtime, job_id: str, final_attempt: bool = True) -> str:
    """Restore job_id; returns its terminal status, 'skipped' (already ended / gone) or raises RetryLater."""
    store = runtime.store
    record = store.get(job_id)
    if record is None or record.terminal:
        return "skipped"  # a redelivery of a job that has ended: nothing to do, exactly one ending stands
    if store.cancel_requested(job_id):
        store.finish(job_id, "canceled")
        metrics.JOBS_FINISHED.labels("canceled", "").inc()
        return "canceled"
    record = store.start(job_id)
    if record is None:
        return "skipped"
    if record.attempts == 1:
        metrics.STAGE_SECONDS.labels("queue_wait").observe(max(0.0, (record.started_at or 0) - record.created_at))
    started = time.perf_counter()
    try:
        params = RestoreParams.model_validate(record.params)
        image = runtime.objects.get(record.input_key)
        result = runtime.pipeline(
            image,
            params,
            on_progress=_progress_writer(runtime, job_id),
            should_stop=lambda: store.cancel_requested(job_id),
        )
        upload_start = time.perf_counter()
        buffer = io.BytesIO()
        result.image.save(buffer, format="PNG")
        png = buffer.getvalue()
        key = output_key(job_id)  # fixed per job: a redelivered job overwrites, never duplicates
        runtime.objects.put(key, png, "image/png")
        seconds = {**result.metadata["seconds"], "upload": time.perf_counter() - upload_start}
        seconds["total"] = time.perf_counter() - started
    except Canceled:
        store.finish(job_id, "canceled")
        metrics.JOBS_FINISHED.labels("canceled", "").inc()
        return "canceled"
    except InvalidInput as exc:
        _fail(runtime, job_id, exc.code if exc.code != "invalid_input" else "invalid_image", exc.message)
        return "failed"
    except WeightsError as exc:
        _fail(runtime, job_id, "weights_error", exc.message)
        return "failed"
    except (StorageError, redis.RedisError) as exc:
        if not final_attempt:
            raise RetryLater(str(exc)) from exc
        _fail(runtime, job_id, "storage_error", f"storage kept failing: {exc}")
        return "failed"
    except Exception as exc:
        if _is_out_of_memory(exc):
            _free_gpu_cache()
            _fail(runtime, job_id, "gpu_out_of_memory", "the GPU ran out of memory; try a smaller image or upscale")
            return "failed"
        if _is_time_limit(exc):
            _fail(runtime, job_id, "time_limit", "the job ran past its time limit")
            return "failed"
        log.exception("job %s failed", job_id)
        message = exc.message if isinstance(exc, SupirError) else f"{type(exc).__name__}: {exc}"
        _fail(runtime, job_id, "internal_error", message)
        return "failed"

    meta = result.metadata
    for stage, value in seconds.items():
        if stage in ("stage1", "caption", "sampling", "decoding", "upload", "total"):
            metrics.STAGE_SECONDS.labels("decode" if stage == "decoding" else stage).observe(value)
    if meta["seconds"].get("sampling"):
        metrics.STEPS_PER_SECOND.set(params.steps / meta["seconds"]["sampling"])
    _record_gpu_memory()
    done = store.finish(
        job_id,
        "succeeded",
        result=JobResult(key=key, width=result.image.width, height=result.image.height, bytes=len(png)),
        seconds={k: round(v, 4) for k, v in seconds.items()},
        caption=meta.get("caption"),
        positive_prompt=meta.get("positive_prompt"),
        negative_prompt=meta.get("negative_prompt"),
        progress=JobProgress(stage="done", step=params.steps, steps=params.steps),
    )
    if done is not None:
        metrics.JOBS_FINISHED.labels("succeeded", "").inc()
    return "succeeded"


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


# ---------------------------------------------------------------------------------------------
# webhooks


def webhook_payload(record: JobRecord, runtime: Runtime) -> bytes:
    import json

    result = None
    if record.result is not None:
        result = record.result.model_dump(exclude={"key"}) | {"url": runtime.objects.url(record.result.key, 3600)}
    body = {
        "event": f"job.{record.status}",
        "job": {
            "id": record.id,
            "status": record.status,
            "error": record.error.model_dump() if record.error else None,
            "result": result,
            "seconds": record.seconds,
            "created_at": record.created_at,
            "finished_at": record.finished_at,
        },
    }
    return json.dumps(body, separators=(",", ":")).encode()


def deliver_webhook(runtime: Runtime, job_id: str, final_attempt: bool) -> str:
    """POST the signed terminal event once; returns 'delivered', 'failed' or raises RetryLater."""
    store, settings = runtime.store, runtime.settings
    record = store.get(job_id)
    if record is None or record.webhook is None or not record.terminal or record.webhook.state == "delivered":
        return "skipped"
    url = record.webhook.url
    status: int | None = None
    error: str | None = None
    try:
        if not settings.allow_private_webhooks:
            check_addresses(url)
        body = webhook_payload(record, runtime)
        headers = signed_headers(settings.webhook_secret.get_secret_value(), body)
        response = httpx.post(url, content=body, headers=headers, timeout=10.0, follow_redirects=False)
        status = response.status_code
        delivered = 200 <= status < 300
    except (ForbiddenAddress, OSError, httpx.HTTPError) as exc:
        delivered, error = False, f"{type(exc).__name__}: {exc}"[:200]
    state = "delivered" if delivered else ("failed" if final_attempt else "pending")

    def change(r: JobRecord) -> JobRecord | None:
        if r.webhook is None:
            return None
        hook = r.webhook.model_copy(
            update={"state": state, "attempts": r.webhook.attempts + 1, "last_status": status, "last_error": error}
        )
        return r.model_copy(update={"webhook": hook})

    store.update(job_id, change)
    metrics.WEBHOOKS.labels("delivered" if delivered else "failed" if final_attempt else "retry").inc()
    if not delivered and not final_attempt:
        raise RetryLater(error or f"HTTP {status}")
    return state
