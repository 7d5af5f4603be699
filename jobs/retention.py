"""Retention: how a job's files and record go, on time or at once. Torch-free: the API (DELETE, delivery) and the
light worker (the expiry sweep) both call it.

- On time: a job ends with `expires_at` = its end + its `expires_after` (the deployment's retention by default).
  Its record and version keys expire then (Redis TTLs, JobStore), and the expiry sweep (`expire_due`, run by the
  light worker every SUPIR_EXPIRY_SWEEP_S) erases its objects from the index `p:expiring`. Reads then answer 404.
- At once (`erase`): `DELETE /v1/jobs/{id}` and SUPIR_DELETE_AFTER_DELIVERY. A tombstone first (reads answer 410),
  the record gone and a running job told to stop in the same transaction, then every object under the job's key
  prefixes. A run still writing checks the tombstone after each write and removes what it wrote (worker.execute).

Anything made of jobs (batches, uploads) can reuse the same two paths: an expires_at in `p:expiring`, and a
tombstone plus its objects' prefixes.
"""

from __future__ import annotations

import logging
import time

from .record import JobRecord, object_prefixes
from .storage import ObjectStore, StorageError
from .store import JobStore
from .uploads import is_upload_id, upload_key

log = logging.getLogger("supir.retention")


def erase_objects(objects: ObjectStore, job_id: str) -> int:
    """Every object the job owns (input, results, thumbnails, stage 1): how many were removed."""
    return sum(objects.delete_prefix(prefix) for prefix in object_prefixes(job_id))


def erase(store: JobStore, objects: ObjectStore, record: JobRecord, reason: str) -> int:
    """Erase a job now: tombstone, record and indexes, then its objects. Raises StorageError when the objects
    could not all be removed; the job is then in `p:expiring` (due now) for the sweep to finish."""
    store.bury(record, reason)
    try:
        return erase_objects(objects, record.id)
    except StorageError:
        store.r.zadd(f"{store.p}:expiring", {record.id: time.time()})
        raise


def expire_due(store: JobStore, objects: ObjectStore, now: float | None = None) -> int:
    """The expiry sweep's pass: erase the objects of every job past its expires_at, and of every upload past its
    retention that no job used; how many were done. One whose objects could not be removed stays in the index for
    the next pass."""
    done = 0
    for job_id in store.expired_ids(time.time() if now is None else now):
        try:
            if is_upload_id(job_id):  # an upload never used (jobs.uploads)
                objects.delete_prefix(upload_key(job_id))
            else:
                erase_objects(objects, job_id)
        except StorageError as exc:
            log.warning("job %s: objects not erased yet (%s)", job_id, exc.message)
            continue
        store.forget_expired(job_id)
        done += 1
    return done
