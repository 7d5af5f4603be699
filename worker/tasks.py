"""Celery tasks: thin wrappers mapping a job id to `execute` and back. Start a worker with

    celery -A worker.tasks worker --pool prefork --concurrency 1

(one such process per GPU). It consumes the queue of each SUPIR variant it serves (`SUPIR_WORKER_VARIANTS`, all of
`SUPIR_VARIANTS` by default; `jobs.queue.variant_queue`), derived from the settings so that no command line can
disagree with the weights it loads. The weights load in the pool process, after the fork (CUDA cannot cross a fork),
and Celery waits `SUPIR_WORKER_LOAD_TIMEOUT_S` for it, so a replacement process is not killed while it loads.
The main process stays light: it serves /livez and /readyz (`SUPIR_WORKER_HEALTH_PORT`) and runs the reaper.
Webhooks and the retention sweep run on the light worker (worker.webhooks), on a queue of their own.

A pool process that cannot load the weights in `SUPIR_WORKER_LOAD_TRIES` tries (worker.runtime) stops its worker
from taking jobs, and the worker then exits with status 1: the kubelet (CrashLoopBackOff) or Docker's restart
policy starts it again with a back-off of its own. Exiting, rather than only answering /livez 503, needs no probe
to notice it (the startup probe would hide a failed liveness for its whole 15 minutes), works the same under
compose, and holds no job meanwhile: the one it had reserved goes back to the queue untouched.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.sharedctypes
import os
import threading
import time

import redis
from celery import Task
from celery.exceptions import Reject
from celery.platforms import EX_FAILURE
from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown
from kombu import Queue

from jobs.queue import (
    BATCH_WEBHOOK_TASK,
    RESTORE_TASK,
    WEBHOOK_EVENT_TASK,
    WEBHOOK_TASK,
    make_celery,
    variant_queue,
    webhook_queue,
)
from jobs.reaper import Reaper
from jobs.record import JobRecord
from jobs.redis_conn import store_client
from jobs.redis_memory import exit_if_evicting
from jobs.settings import get_settings
from jobs.store import JobStore, pid_alive

from . import execute, health, podmarks
from .runtime import Runtime

log = logging.getLogger("supir.worker")
settings = get_settings()
app = make_celery(settings)
app.conf.task_queues = [Queue(variant_queue(settings, name)) for name in settings.worker_variant_names]
_runtime: Runtime | None = None
_reaper: Reaper | None = None
_marks: podmarks.PodMarks | None = None  # this pod's busy/idle annotations, kept by the pool process
# created before the fork, so shared with the pool process (and gone with the container, unlike a file):
READY_PID = multiprocessing.sharedctypes.RawValue("i", 0)  # the pool process whose weights are loaded (0: none)
LAST_BEAT = multiprocessing.sharedctypes.RawValue("d", 0.0)  # when a pool process's heartbeat thread last beat
LOAD_FAILED = multiprocessing.sharedctypes.RawValue("i", 0)  # > 0: a pool process's failed tries; the worker exits
FAIR_PICKS = 20  # picks passed over (taken by another worker, or ended) before the message's own job runs
_node = ""  # this worker's Celery node name (celery@host, or -n), set in the main process before the fork


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
def _forget_an_earlier_life(sender: object = None, **_: object) -> None:
    """In the main process, before any pool process starts: a ready file left by an earlier container (an
    emptyDir outlives a container restart) must not vouch for this one."""
    global _node
    _node = str(getattr(sender, "hostname", "") or "")
    if settings.ready_file is not None:
        settings.ready_file.unlink(missing_ok=True)


@worker_init.connect
def _refuse_an_evicting_redis(**_: object) -> None:
    """In the main process, before any pool process starts: exits non-zero in production when Redis may evict."""
    exit_if_evicting(settings, "the GPU worker")


@worker_process_init.connect
def _load_after_fork(**_: object) -> None:
    global _marks
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port)
    _marks = podmarks.from_settings(settings)
    if runtime().state == "ready":
        READY_PID.value = os.getpid()
    if _marks is not None:
        _marks.idle()  # loaded (or failed): nothing runs here yet, whatever an earlier process left on the pod
    if runtime().state != "ready":
        _stop_taking_jobs()


def _stop_taking_jobs() -> None:
    """In a pool process whose load failed, before Celery hears it is up (and may hand it a job): the main process
    stops consuming the variant queues (as `worker.drain` does), then is told to exit. A message it had reserved
    already comes here and is rejected back to the queue (see `restore`); anything else unacknowledged is restored
    to the queue when the main process closes its broker connection."""
    try:
        for name in settings.worker_variant_names:
            app.control.cancel_consumer(variant_queue(settings, name), destination=[_node], reply=True, timeout=5)
    except Exception as exc:  # the broker away: the exit below still stops the consuming
        log.warning("could not stop consuming before exiting: %s", exc)
    LOAD_FAILED.value = max(1, runtime().failed_tries)


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
            live=lambda: not LOAD_FAILED.value and health.beating(LAST_BEAT.value, settings.worker_lost_after_s),
        )
    threading.Thread(target=_exit_once_loading_failed, name="supir-load-watch", daemon=True).start()
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


def _exit_once_loading_failed() -> None:
    """In the main process: a warm shutdown with status 1 once a pool process has spent its load tries (set from
    this thread, Celery's event loop checks the flag at every turn, as after SIGTERM)."""
    while not LOAD_FAILED.value:
        time.sleep(0.5)
    log.error(
        "the weights failed to load %d times (SUPIR_WORKER_LOAD_TRIES %d): exiting with status 1, to be restarted "
        "with back-off",
        LOAD_FAILED.value,
        settings.worker_load_tries,
    )
    from celery.worker import state

    state.should_stop = EX_FAILURE


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
        # weights failed to load here and this worker is exiting: the message goes back to the head of the queue
        # for a healthy worker, its job untouched (still queued, no attempt counted)
        raise Reject("the weights are not loaded in this worker", requeue=True)
    if _marks is not None:
        _marks.busy()  # before the run: scale-in and node drains now take an idle worker first
    ran = [job_id]  # the jobs this turn ran or tried (their webhooks are looked at after)
    try:
        return _run_fairly(rt, job_id, ran)
    except execute.Busy as exc:  # a duplicate delivery while another process runs the job: look again later
        raise self.retry(countdown=settings.worker_lost_after_s, max_retries=None) from exc
    except redis.RedisError:
        # Redis stayed away longer than execute.REDIS_WAIT_S: the reaper queues a running job again, and an
        # unacknowledged message comes back after the visibility timeout; nothing here can reach the broker
        log.error("job %s: Redis unavailable; left to the reaper and the broker's redelivery", job_id)
        return "redis_unavailable"
    finally:
        for tried in dict.fromkeys(ran):
            with contextlib.suppress(redis.RedisError):
                _enqueue_webhook(rt, tried)
        if _marks is not None:
            _marks.idle()


def _run_fairly(rt: Runtime, job_id: str, ran: list[str]) -> str:
    """Run the job the fair share picks (jobs.fairshare): the message for job_id is the turn, not the choice.
    A pick that another worker started meanwhile, or that ended, is passed over for the next. When no fair queue
    holds a job (one queued before fair share, say), the message's own job runs as before; that also takes over
    its job from a worker process that died while running it."""
    record = rt.store.get(job_id)
    # the message's own variant: its queue is one this worker consumes (a job gone or from before variants
    # picks nothing: its own run is skipped or runs as it always did)
    variant = record.variant if record is not None else ""
    for _ in range(FAIR_PICKS if variant else 0):
        picked = rt.store.next_fair(variant)
        if picked is None:
            break
        ran.append(picked)
        try:
            outcome = execute.run_job(rt, picked)
        except execute.Busy:  # started by another worker between its pick and this one
            continue
        if outcome != "skipped":
            if picked != job_id:
                log.debug("job %s: ran in the turn of job %s (fair share)", picked, job_id)
            return outcome
    return execute.run_job(rt, job_id)


def _enqueue_webhook(rt: Runtime, job_id: str) -> None:
    record = rt.store.get(job_id)
    hook = record.webhook if record is not None and record.terminal else None
    # attempts == 0: no delivery has started (one that has retries on its own; a second would post twice). A job
    # canceled while queued was sent by the API already; this covers a send the broker lost.
    if hook is not None and hook.state == "pending" and hook.attempts == 0:
        _send_webhook(job_id)
    if record is not None and record.batch_id and rt.store.batches.claim_due(record.batch_id):
        # this job ended its batch: the batch's one webhook goes now (else the light worker's beat sends it)
        try:
            app.send_task(BATCH_WEBHOOK_TASK, args=[record.batch_id], queue=webhook_queue(settings))
        except Exception:
            rt.store.batches.mark_due(record.batch_id)
            raise
