"""The light worker: webhook deliveries and the retention sweep, on a queue of their own. Start it with

    celery -A worker.webhooks worker --pool threads --concurrency 8 --queues supir-webhooks --beat

(`<SUPIR_QUEUE>-webhooks`; run `--beat` on exactly one). Deliveries are I/O, so a thread pool; they never wait
behind restorations on the GPU queue. It needs only Redis, the object store (presigned result URLs) and the
settings: nothing here imports torch or the pipeline, so it runs from the API image and starts in a second.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import httpx
from celery import Task
from celery.signals import worker_init, worker_ready

from jobs.batches import BatchWebhook, summarize
from jobs.netguard import ForbiddenAddress, resolve_checked, send_pinned
from jobs.queue import (
    BATCH_WEBHOOK_TASK,
    BATCHES_TASK,
    EXPIRE_TASK,
    SWEEP_TASK,
    WEBHOOK_EVENT_TASK,
    WEBHOOK_TASK,
    make_celery,
)
from jobs.record import JobRecord, rfc3339
from jobs.redis_conn import store_client
from jobs.redis_memory import exit_if_evicting
from jobs.retention import expire_due
from jobs.settings import Settings, get_settings
from jobs.storage import ObjectStore, make_store
from jobs.store import JobStore
from jobs.webhooks import signed_headers

from . import metrics

log = logging.getLogger("supir.webhooks")
settings = get_settings()
app = make_celery(settings)
# the thread pool cannot enforce Celery's time limits (they are for restorations); httpx's timeout bounds a POST
app.conf.update(task_soft_time_limit=None, task_time_limit=None)
MAX_RETRIES = 5
EVENT_RETRIES = 2  # a `started` or `progress` event goes stale: a few quick tries, then dropped


class RetryLater(Exception):
    """A transient failure (a webhook receiver down): the task should run again later."""


class Deps(Protocol):
    """What a delivery needs (a worker Runtime has these too)."""

    settings: Settings
    store: JobStore
    objects: ObjectStore


@dataclass
class Stores:
    settings: Settings
    store: JobStore
    objects: ObjectStore


_stores: Stores | None = None
_lock = threading.Lock()


def stores() -> Stores:
    """Built once, on first use, and shared by the pool's threads (redis-py and boto3 clients are thread-safe)."""
    global _stores
    with _lock:
        if _stores is None:
            store = JobStore(
                store_client(settings, socket_timeout=30),
                settings.key_prefix,
                retention_s=settings.retention_hours * 3600,
            )
            _stores = Stores(settings, store, make_store(settings))
        return _stores


@worker_init.connect
def _refuse_an_evicting_redis(**_: object) -> None:
    exit_if_evicting(settings, "the webhooks worker")


@worker_ready.connect
def _serve_metrics(**_: object) -> None:
    # a port of its own (not SUPIR_WORKER_METRICS_PORT): it may share a host with a GPU worker
    if settings.webhooks_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.webhooks_metrics_port)


def _backoff(retries: int) -> float:
    return min(2.0 ** (retries + 1), 120.0)


@app.task(name=WEBHOOK_TASK, bind=True, max_retries=MAX_RETRIES)
def deliver(self: Task, job_id: str) -> str:
    try:
        return deliver_webhook(stores(), job_id, final_attempt=self.request.retries >= MAX_RETRIES)
    except RetryLater as exc:
        raise self.retry(countdown=_backoff(self.request.retries)) from exc


@app.task(name=WEBHOOK_EVENT_TASK, bind=True, max_retries=EVENT_RETRIES)
def deliver_event(self: Task, job_id: str, event: str) -> str:
    try:
        return deliver_webhook_event(stores(), job_id, event)
    except RetryLater as exc:
        raise self.retry(countdown=1.0 + self.request.retries) from exc


@app.task(name=EXPIRE_TASK)
def expire() -> int:
    """Erase the objects of jobs past their expires_at (jobs.retention); their records expire on their own."""
    s = stores()
    return expire_due(s.store, s.objects)


@app.task(name=SWEEP_TASK)
def sweep() -> dict[str, int]:
    """Drop objects older than the retention window (whatever no job's expiry names: a safety net), and expired
    jobs from the owners' lists."""
    s = stores()
    cutoff = time.time() - settings.retention_hours * 3600
    expired = expire_due(s.store, s.objects)
    objects = s.objects.delete_older_than(cutoff)
    return {"expired_jobs": expired, "objects": objects, "index_entries": s.store.sweep(s.store.owners())}


@app.task(name=BATCH_WEBHOOK_TASK, bind=True, max_retries=MAX_RETRIES)
def deliver_batch(self: Task, batch_id: str) -> str:
    try:
        return deliver_batch_webhook(stores(), batch_id, final_attempt=self.request.retries >= MAX_RETRIES)
    except RetryLater as exc:
        raise self.retry(countdown=_backoff(self.request.retries)) from exc


@app.task(name=BATCHES_TASK)
def batches() -> dict[str, int]:
    """End the batches a crash left open (their jobs all ended) and send every due batch webhook once."""
    s = stores()
    ended = s.store.end_finished_batches()
    sent = 0
    for batch_id in s.store.batches.due_ids():
        if s.store.batches.claim_due(batch_id):  # one sender per batch, whoever else looks
            deliver_batch.delay(batch_id)
            sent += 1
    return {"ended": ended, "webhooks": sent}


def batch_payload(deps: Deps, batch_id: str) -> tuple[str, bytes] | None:
    """(the webhook's URL, its signed body: `batch.completed` with the batch's view), or None."""
    book = deps.store.batches
    batch = book.get(batch_id)
    if batch is None or batch.webhook is None:
        return None
    records = [deps.store.get(job_id) for job_id in batch.job_ids]
    view = summarize(batch, records, book.ended_at(batch_id), deps.settings.retention_s)
    body = {"event": "batch.completed", "batch": view}
    return batch.webhook.url, json.dumps(body, separators=(",", ":")).encode()


def deliver_batch_webhook(deps: Deps, batch_id: str, final_attempt: bool) -> str:
    """POST the batch's signed `batch.completed` event; returns 'delivered', 'failed', 'skipped' or raises
    RetryLater."""
    book = deps.store.batches
    batch = book.get(batch_id)
    if batch is None or batch.webhook is None or batch.webhook.state != "pending" or book.ended_at(batch_id) is None:
        return "skipped"
    payload = batch_payload(deps, batch_id)
    if payload is None:
        return "skipped"
    status, error = _post(deps, *payload)
    delivered = status is not None and 200 <= status < 300
    state = "delivered" if delivered else ("failed" if final_attempt else "pending")
    hook = BatchWebhook(
        url=batch.webhook.url, state=state, attempts=batch.webhook.attempts + 1, last_status=status, last_error=error
    )
    book.set_webhook(batch_id, hook)
    metrics.WEBHOOKS.labels(
        "batch.completed", "delivered" if delivered else "failed" if final_attempt else "retry"
    ).inc()
    if not delivered and not final_attempt:
        raise RetryLater(error or f"HTTP {status}")
    return state


def webhook_payload(record: JobRecord, deps: Deps, event: str | None = None) -> bytes:
    """The signed body: `event` is job.started or job.progress, or for the ending job.<status>."""
    result = None
    if record.result is not None:
        result = record.result.model_dump(exclude={"key"}) | {"url": deps.objects.url(record.result.key, 3600)}
    body = {
        "event": f"job.{event or record.status}",
        "job": {
            "id": record.id,
            "status": record.status,
            "progress": record.progress.model_dump(),
            "error": record.error.model_dump() if record.error else None,
            "result": result,
            "seconds": record.seconds,
            "created_at": record.created_at,
            "finished_at": record.finished_at,
            # as in the job's view: when its record and files are erased (RFC 3339, UTC)
            "expires_after": record.expires_after or deps.settings.retention_s,
            "expires_at": rfc3339(record.expires_at),
        },
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _post(deps: Deps, url: str, body: bytes) -> tuple[int | None, str | None]:
    """(HTTP status, None) or (None, the error) of one signed POST."""
    settings = deps.settings
    try:
        # resolved once and checked (unless allowed); the POST goes to that checked address, not to a new lookup
        target = resolve_checked(url, settings.allow_private_webhooks)
        headers = signed_headers(settings.webhook_secret.get_secret_value(), body)
        with httpx.Client(timeout=10.0, follow_redirects=False) as client:
            response = send_pinned(client, client.build_request("POST", url, content=body, headers=headers), target)
        return response.status_code, None
    except (ForbiddenAddress, OSError, httpx.HTTPError) as exc:
        return None, f"{type(exc).__name__}: {exc}"[:200]


def deliver_webhook_event(deps: Deps, job_id: str, event: str) -> str:
    """POST a `started` or `progress` event with the job as it is now; skipped once the job has ended (its
    `completed` event tells the rest). Returns 'delivered' or 'skipped', or raises RetryLater."""
    record = deps.store.get(job_id)
    if record is None or record.webhook is None or event not in record.webhook.events or record.terminal:
        return "skipped"
    status, error = _post(deps, record.webhook.url, webhook_payload(record, deps, event))
    delivered = status is not None and 200 <= status < 300
    metrics.WEBHOOKS.labels(event, "delivered" if delivered else "retry").inc()
    if not delivered:
        raise RetryLater(error or f"HTTP {status}")
    return "delivered"


def deliver_webhook(deps: Deps, job_id: str, final_attempt: bool) -> str:
    """POST the signed terminal event once; returns 'delivered', 'failed' or raises RetryLater."""
    store = deps.store
    record = store.get(job_id)
    if record is None or record.webhook is None or not record.terminal or record.webhook.state != "pending":
        return "skipped"  # gone, not ended, delivered or failed already, or `completed` not asked for
    status, error = _post(deps, record.webhook.url, webhook_payload(record, deps))
    delivered = status is not None and 200 <= status < 300
    state = "delivered" if delivered else ("failed" if final_attempt else "pending")

    def change(r: JobRecord) -> JobRecord | None:
        if r.webhook is None:
            return None
        hook = r.webhook.model_copy(
            update={"state": state, "attempts": r.webhook.attempts + 1, "last_status": status, "last_error": error}
        )
        return r.model_copy(update={"webhook": hook})

    store.update(job_id, change)
    metrics.WEBHOOKS.labels("completed", "delivered" if delivered else "failed" if final_attempt else "retry").inc()
    if not delivered and not final_attempt:
        raise RetryLater(error or f"HTTP {status}")
    return state
