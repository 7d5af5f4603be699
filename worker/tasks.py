"""Celery tasks: thin wrappers mapping a job id to `execute` and back. Start a worker with

    celery -A worker.tasks worker --pool prefork --concurrency 1

(one such process per GPU). It consumes the queue of each SUPIR variant it serves (`SUPIR_WORKER_VARIANTS`, all of
`SUPIR_VARIANTS` by default; `jobs.queue.variant_queue`), derived from the settings so that no command line can
disagree with the weights it loads. The weights load in the pool process, after the fork (CUDA cannot cross a fork),
and Celery waits `SUPIR_WORKER_LOAD_TIMEOUT_S` for it, so a replacement process is not killed while it loads.
The main process stays light: it serves /livez and /readyz (`SUPIR_WORKER_HEALTH_PORT`) and runs the reaper.
Webhooks and the retention sweep run on the light worker (worker.webhooks), on a queue of their own.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.sharedctypes
import os
import time

import redis
from celery import Task
from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown
from kombu import Queue

from jobs.queue import RESTORE_TASK, WEBHOOK_EVENT_TASK, WEBHOOK_TASK, make_celery, variant_queue, webhook_queue
from jobs.reaper import Reaper
from jobs.record import JobRecord
from jobs.redis_conn import store_client
from jobs.redis_memory import exit_if_evicting
from jobs.settings import get_settings
from jobs.store import JobStore, pid_alive

from . import execute, health
from .runtime import Runtime

log = logging.getLogger("supir.worker")
settings = get_settings()
app = make_celery(settings)
app.conf.task_queues = [Queue(variant_queue(settings, name)) for name in settings.worker_variant_names]
_runtime: Runtime | None = None
_reaper: Reaper | None = None
# created before the fork, so shared with the pool process (and gone with the container, unlike a file):
READY_PID = multiprocessing.sharedctypes.RawValue("i", 0)  # the pool process whose weights are loaded (0: none)
LAST_BEAT = multiprocessing.sharedctypes.RawValue("d", 0.0)  # when a pool process's heartbeat thread last beat


def runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        _runtime = Runtime(settings)
        _runtime.announce = _send_webhook_event
        _runtime.on_beat = _note_beat
        _runtime.load()
    return _runtime


def _note_beat() -> None:
    LAST_BEAT.value = time.time()


@worker_init.connect
def _forget_an_earlier_life(**_: object) -> None:
    """In the main process, before any pool process starts: a ready file left by an earlier container (an
    emptyDir outlives a container restart) must not vouch for this one."""
    if settings.ready_file is not None:
        settings.ready_file.unlink(missing_ok=True)


@worker_init.connect
def _refuse_an_evicting_redis(**_: object) -> None:
    """In the main process, before any pool process starts: exits non-zero in production when Redis may evict."""
    exit_if_evicting(settings, "the GPU worker")


@worker_process_init.connect
def _load_after_fork(**_: object) -> None:
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port)
    if runtime().state == "ready":
        READY_PID.value = os.getpid()


@worker_process_shutdown.connect
def _stop(**_: object) -> None:
    if READY_PID.value == os.getpid():
        READY_PID.value = 0
    if _runtime is not None:
        _runtime.stop()


@worker_ready.connect
def _start_main_process_services(**_: object) -> None:
    """In the main process: the health server and the reaper (neither touches torch or the weights)."""
    global _reaper
    if settings.worker_health_port:
        health.serve(
            settings.worker_health_port,
            ready=lambda: pid_alive(READY_PID.value),
            live=lambda: health.beating(LAST_BEAT.value, settings.worker_lost_after_s),
        )
    store = JobStore(
        store_client(settings),
        settings.key_prefix,
        retention_s=settings.retention_hours * 3600,
    )
    _reaper = Reaper(
        store,
        enqueue=lambda job_id: _requeue(store, job_id),
        max_attempts=settings.max_attempts,
        lost_after_s=settings.worker_lost_after_s,
        every_s=min(5.0, settings.worker_lost_after_s / 4),
        on_change=_after_reap,
    ).start()


@worker_shutdown.connect
def _stop_reaper(**_: object) -> None:
    if _reaper is not None:
        _reaper.stop()


def _requeue(store: JobStore, job_id: str) -> None:
    """A lost job back on its own variant's queue (the reaper of any worker may find any variant's job)."""
    record = store.get(job_id)
    variant = record.variant if record is not None and record.variant else settings.default_variant
    restore.apply_async(args=[job_id], queue=variant_queue(settings, variant))


def _after_reap(record: JobRecord) -> None:
    if record.terminal and record.webhook is not None and record.webhook.state == "pending":
        _send_webhook(record.id)


def _send_webhook_event(job_id: str, event: str) -> None:
    app.send_task(WEBHOOK_EVENT_TASK, args=[job_id, event], queue=webhook_queue(settings))


def _send_webhook(job_id: str) -> None:
    # by name, to the light worker's queue (worker.webhooks): never behind the restorations queued here
    app.send_task(WEBHOOK_TASK, args=[job_id], queue=webhook_queue(settings))


@app.task(name=RESTORE_TASK, bind=True, max_retries=None)  # its retries are waits, never failures
def restore(self: Task, job_id: str) -> str:
    rt = runtime()
    if rt.state != "ready":
        # weights failed to load here: leave the job to a healthy worker (or to this one after a fix)
        raise self.retry(countdown=30, max_retries=None)
    try:
        return execute.run_job(rt, job_id)
    except execute.Busy as exc:  # a duplicate delivery while another process runs the job: look again later
        raise self.retry(countdown=settings.worker_lost_after_s, max_retries=None) from exc
    except redis.RedisError:
        # Redis stayed away longer than execute.REDIS_WAIT_S: the reaper queues a running job again, and an
        # unacknowledged message comes back after the visibility timeout; nothing here can reach the broker
        log.error("job %s: Redis unavailable; left to the reaper and the broker's redelivery", job_id)
        return "redis_unavailable"
    finally:
        with contextlib.suppress(redis.RedisError):
            _enqueue_webhook(rt, job_id)


def _enqueue_webhook(rt: Runtime, job_id: str) -> None:
    record = rt.store.get(job_id)
    hook = record.webhook if record is not None and record.terminal else None
    # attempts == 0: no delivery has started (one that has retries on its own; a second would post twice). A job
    # canceled while queued was sent by the API already; this covers a send the broker lost.
    if hook is not None and hook.state == "pending" and hook.attempts == 0:
        _send_webhook(job_id)
