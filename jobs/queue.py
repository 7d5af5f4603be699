"""The Celery app both sides share: the API only sends tasks by name, the worker runs them."""

from __future__ import annotations

from celery import Celery

from .redis_conn import broker_transport_options, broker_url
from .settings import Settings

RESTORE_TASK = "supir.restore"
WEBHOOK_TASK = "supir.webhook"  # the `completed` event, retried until delivered
WEBHOOK_EVENT_TASK = "supir.webhook_event"  # `started` / `progress`: best effort
SWEEP_TASK = "supir.sweep"
EXPIRE_TASK = "supir.expire"  # the objects of jobs past their expires_at (jobs.retention)
BATCH_WEBHOOK_TASK = "supir.batch_webhook"  # a batch's one `batch.completed` event, retried until delivered
BATCHES_TASK = "supir.batches"  # ends batches a crash left open; sends their due webhooks (jobs.batches)


def webhook_queue(settings: Settings) -> str:
    """The light worker's queue (worker.webhooks): webhooks and the sweep never wait behind restorations."""
    return f"{settings.queue}-webhooks"


def variant_queue(settings: Settings, variant: str) -> str:
    """The GPU queue of one SUPIR variant: its workers consume only it, and it scales on its own."""
    return f"{settings.queue}-{variant}"


def make_celery(settings: Settings) -> Celery:
    light = webhook_queue(settings)
    app = Celery("supir", broker=broker_url(settings), backend=None)
    app.conf.update(
        task_default_queue=settings.queue,
        task_acks_late=True,  # a job is acknowledged when it ends, so a dead worker's job is redelivered
        task_reject_on_worker_lost=True,  # a pool process that dies hands its job straight back to the queue
        # a replacement pool process loads the weights before it reports up; Celery's default (4 s) kills it first
        worker_proc_alive_timeout=settings.worker_load_timeout_s,
        worker_prefetch_multiplier=1,  # a GPU worker holds one job, not a backlog
        task_soft_time_limit=settings.job_time_limit_s,
        task_time_limit=settings.job_time_limit_s + 60,
        broker_transport_options={
            **broker_transport_options(settings),  # timeouts; the Sentinel master's name
            "visibility_timeout": settings.visibility_timeout_s,  # longer than any job: no double delivery
            # look for a dead worker's unacknowledged job every few seconds (a ZRANGEBYSCORE on one key)
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 4)),
            "unacked_restore_throttle": 1,
            "global_keyprefix": f"{settings.key_prefix}:celery:",
        },
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # whoever sends these (the API, a GPU worker, beat, a retry), they go to the light worker
        task_routes={
            name: {"queue": light}
            for name in (WEBHOOK_TASK, WEBHOOK_EVENT_TASK, SWEEP_TASK, EXPIRE_TASK, BATCH_WEBHOOK_TASK, BATCHES_TASK)
        },
        beat_schedule={
            "sweep": {"task": SWEEP_TASK, "schedule": 3600.0},
            # a job's files go within this of its expires_at (one ZRANGEBYSCORE when none is due)
            "expire": {"task": EXPIRE_TASK, "schedule": settings.expiry_sweep_s},
            "batches": {"task": BATCHES_TASK, "schedule": settings.batch_sweep_s},
        },
    )
    return app
