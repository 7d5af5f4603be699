"""What the routes work with, built once per API process: the settings, the Redis job store, the object store,
and the two ways out to the workers (the GPU queue and the light webhooks queue). Tests build the app against
real servers through these seams, never by patching library internals."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from jobs.estimates import RateBook, expected_start_s, job_seconds, ready_workers
from jobs.queue import BATCH_WEBHOOK_TASK, RESTORE_TASK, WEBHOOK_TASK, make_celery, variant_queue, webhook_queue
from jobs.record import TERMINAL, JobRecord, JobResult
from jobs.redis_conn import store_client
from jobs.settings import Settings
from jobs.storage import ObjectStore, make_store
from jobs.store import JobStore

from .keyring import KeyRing
from .models import Job, JobResultInfo

RESULT_URL_TTL_S = 3600


class Services:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        objects: ObjectStore,
        enqueue: Callable[[str, str], None],
        notify: Callable[[str], None] = lambda job_id: None,
        notify_batch: Callable[[str], None] = lambda batch_id: None,
    ):
        self.settings, self.store, self.objects, self.enqueue = settings, store, objects, enqueue
        self.api_keys = KeyRing(settings)  # SUPIR_API_KEYS, or SUPIR_API_KEYS_FILE re-read when it changes
        # readiness pings on a client of their own with short timeouts: a probe must answer within its own
        # timeout (1 s by default) even when Redis hangs
        self.probe = store_client(settings, socket_timeout=0.5, connect_timeout=0.5)
        self.notify = notify  # sends a job's webhook (to the light worker), for jobs the API itself ends
        self.notify_batch = notify_batch  # the same for a batch the API ends (a cancel)
        self.rates = RateBook(store)  # what workers measured, for estimates and queued jobs' ETA
        # image_url downloads and full decodes run in the threadpool; these bound how many threads they take,
        # so slow URLs or big images cannot starve the other routes of threads
        self.fetches = asyncio.Semaphore(settings.max_concurrent_fetches)
        self.decodes = asyncio.Semaphore(settings.max_concurrent_decodes)

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        store = JobStore(store_client(settings), settings.key_prefix, retention_s=settings.retention_hours * 3600)
        celery = make_celery(settings)

        def enqueue(job_id: str, variant: str) -> None:
            # each variant's queue is read only by workers that loaded its file
            celery.send_task(RESTORE_TASK, args=[job_id], queue=variant_queue(settings, variant))

        def notify(job_id: str) -> None:
            celery.send_task(WEBHOOK_TASK, args=[job_id], queue=webhook_queue(settings))

        def notify_batch(batch_id: str) -> None:
            celery.send_task(BATCH_WEBHOOK_TASK, args=[batch_id], queue=webhook_queue(settings))

        return cls(settings, store, make_store(settings), enqueue, notify, notify_batch)

    def view(self, record: JobRecord) -> dict[str, Any]:
        """What a client sees of a job, as JSON (api.models.Job); blocking (Redis, signing)."""
        active = record.status not in TERMINAL
        queued = record.status == "queued"
        position = self.store.queue_position(record.id, record.variant or None, record.owner) if queued else None
        job = Job.from_record(
            record,
            queue_position=position,
            expected_start_s=self.expected_start(record.variant, position) if position is not None else None,
            # the cancel was taken: a running job stops at its next step (one EXISTS, for active jobs only)
            cancel_requested=record.status == "canceled" or (active and self.store.cancel_requested(record.id)),
            results=[self._result(r) for r in results_of(record)] if record.status == "succeeded" else [],
            retention_s=self.settings.retention_s,
        )
        # params as stored: an older record's partial params are not filled in with today's defaults here
        return {**job.model_dump(mode="json"), "params": record.params}

    def expected_start(self, variant: str, ahead: int) -> float | None:
        """A queued job's expected start (jobs.estimates.expected_start_s); a record without a variant is the
        default variant's."""
        variant = variant or self.settings.default_variant
        seconds, _ = job_seconds(self.rates.rates(variant))
        running, workers = self.store.running_count(variant), ready_workers(self.store, variant)
        return expected_start_s(ahead, running, workers, seconds)

    def _result(self, result: JobResult) -> JobResultInfo:
        shown = result.model_dump(exclude={"key"})
        return JobResultInfo(**shown, url=self.objects.url(result.key, RESULT_URL_TTL_S))


def results_of(record: JobRecord) -> list[JobResult]:
    """Every sample's result; a record from before several samples has only `result`."""
    return record.results or ([record.result] if record.result is not None else [])
