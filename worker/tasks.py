"""Celery tasks: thin wrappers mapping a job id to `execute` and back. Start a worker with

    celery -A worker.tasks worker --pool prefork --concurrency 1 --queues supir

(one such process per GPU). The weights load in the pool process, after the fork, once.
"""

from __future__ import annotations

import contextlib
import logging
import time

import redis
from celery import Task
from celery.signals import worker_process_init, worker_process_shutdown

from jobs.queue import RESTORE_TASK, SWEEP_TASK, WEBHOOK_TASK, make_celery
from jobs.settings import get_settings

from . import execute
from .runtime import Runtime

log = logging.getLogger("supir.worker")
settings = get_settings()
app = make_celery(settings)
MAX_RETRIES = 5
_runtime: Runtime | None = None


def runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        _runtime = Runtime(settings)
        _runtime.load()
    return _runtime


@worker_process_init.connect
def _load_after_fork(**_: object) -> None:
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port)
    runtime()


@worker_process_shutdown.connect
def _stop(**_: object) -> None:
    if _runtime is not None:
        _runtime.stop()


def _backoff(retries: int) -> float:
    return min(2.0 ** (retries + 1), 120.0)


@app.task(name=RESTORE_TASK, bind=True, max_retries=MAX_RETRIES)
def restore(self: Task, job_id: str) -> str:
    rt = runtime()
    if rt.state != "ready":
        # weights failed to load here: leave the job to a healthy worker (or to this one after a fix)
        raise self.retry(countdown=30, max_retries=None)
    try:
        return execute.run_job(rt, job_id, final_attempt=self.request.retries >= MAX_RETRIES)
    except (execute.RetryLater, redis.RedisError) as exc:  # Redis down: the job is not lost, it waits
        raise self.retry(countdown=_backoff(self.request.retries), max_retries=None) from exc
    finally:
        with contextlib.suppress(redis.RedisError):
            _enqueue_webhook(rt, job_id)


def _enqueue_webhook(rt: Runtime, job_id: str) -> None:
    record = rt.store.get(job_id)
    if record is not None and record.terminal and record.webhook is not None and record.webhook.state == "pending":
        deliver_webhook.apply_async(args=[job_id], queue=settings.queue)


@app.task(name=WEBHOOK_TASK, bind=True, max_retries=MAX_RETRIES)
def deliver_webhook(self: Task, job_id: str) -> str:
    try:
        return execute.deliver_webhook(runtime(), job_id, final_attempt=self.request.retries >= MAX_RETRIES)
    except execute.RetryLater as exc:
        raise self.retry(countdown=_backoff(self.request.retries)) from exc


@app.task(name=SWEEP_TASK)
def sweep() -> dict[str, int]:
    """Drop inputs and results past the retention window, and expired jobs from the owners' lists."""
    rt = runtime()
    cutoff = time.time() - settings.retention_hours * 3600
    return {"objects": rt.objects.delete_older_than(cutoff), "index_entries": rt.store.sweep(rt.store.owners())}
