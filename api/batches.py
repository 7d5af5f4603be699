"""Creating and reading batches (`/v1/batches`): many photos in one request, one job each, followed together.

A create checks every item first (no I/O), then fetches, checks and stores each photo, and only then writes the
jobs and the batch and queues them: a bad photo anywhere refuses the whole batch (its error names the item) and
leaves nothing behind. Batch jobs hold no per-key active-job slots (the batch limit bounds them) and are never
answered from the result cache (each photo runs); they wait in the fair share beside other keys' work."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
from fastapi import Request
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from jobs.batches import BatchRecord, BatchWebhook, new_batch_id, summarize
from jobs.record import JobRecord, new_job_id
from jobs.retention import erase, erase_objects
from jobs.settings import Settings
from jobs.storage import ObjectMissing

from . import metrics, shutdown
from .creation import (
    FORM_FIELD_BYTES,
    JobRequest,
    _claimed_upload,
    _consume_upload,
    _enqueue,
    _job_request,
    _json_object,
    _parse_json,
    _photo,
    _record,
    _served,
    _uploads,
    _validated,
    check_public_url,
)
from .errors import ApiError
from .intake import check_image
from .models import HttpUrl, JobFromUpload, JobFromUrl, JobUpload
from .services import Services, results_of

SHARED = ("params", "preset", "variant", "webhook_url", "expires_after")
ITEM_FIELDS = ("upload_id", "image_url", "params", "preset")
ZIP_CHUNK = 1 << 20
WEBHOOK_URL: TypeAdapter[str] = TypeAdapter(HttpUrl)


@dataclass
class BatchRequest:
    """A batch create after the checks that need no I/O: one JobRequest per photo."""

    jobs: list[JobRequest]
    webhook_url: str | None
    expires_after: int | None
    variant: str
    files: list[UploadFile] = field(default_factory=list)  # multipart: the photos, in the jobs' order

    def digest(self, file_hashes: list[str]) -> str:
        parts = [job.digest() for job in self.jobs] + file_hashes + [self.webhook_url or ""]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


async def read_batch_request(request: Request, settings: Settings) -> tuple[BatchRequest, Any]:
    """The request's items and shared fields, each item checked as a job body would be (its errors name it).
    Returns the request and, for multipart, the open form (the caller closes it once the photos are stored)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        fields = _json_object(await request.body())
        return _batch_from_fields(fields, None, settings), None
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=settings.max_batch_items + 1, max_fields=8, max_part_size=FORM_FIELD_BYTES)
        try:
            files = [_as_file(f) for f in form.getlist("images")]
            if any(isinstance(v, UploadFile) and k != "images" for k, v in form.multi_items()):
                raise ApiError("invalid_request", "send the photos as repeated file parts named 'images'")
            fields = {k: v for k, v in form.items() if not isinstance(v, UploadFile) and k != "images"}
            if "params" in fields:
                fields["params"] = _parse_json(fields["params"], "the params field", field="params")
            if isinstance(fields.get("expires_after"), str) and fields["expires_after"].strip().isdigit():
                fields["expires_after"] = int(fields["expires_after"])
            overrides = _parse_json(fields.pop("items"), "the items field", field="items") if "items" in fields else []
            if not isinstance(overrides, list) or len(overrides) > len(files):
                message = "items must be a JSON array with at most one entry per file in images"
                raise ApiError("invalid_parameter", message, field="items")
            fields["items"] = [*overrides, *({} for _ in range(len(files) - len(overrides)))]
            batch = _batch_from_fields(fields, files, settings)
        except BaseException:
            await form.close()
            raise
        return batch, form
    raise ApiError("unsupported_media_type", "send JSON with items (upload_id or image_url), or multipart images")


def _as_file(part: UploadFile | str) -> UploadFile:
    """A file part sent without a filename reaches us as text (Starlette decodes it as UTF-8, else Latin-1; photos
    are never valid UTF-8): its bytes again, as a file."""
    if isinstance(part, UploadFile):
        return part
    try:
        data = part.encode("latin-1")
    except UnicodeEncodeError:
        data = part.encode("utf-8")
    return UploadFile(io.BytesIO(data))


def _batch_from_fields(fields: dict[str, Any], files: list[UploadFile] | None, settings: Settings) -> BatchRequest:
    unknown = sorted(set(fields) - {"items", *SHARED})
    if unknown:
        raise ApiError("invalid_request", f"unknown field {unknown[0]!r}", field=unknown[0])
    items = fields.get("items")
    if not isinstance(items, list) or not items:
        raise ApiError("missing_image", "a batch needs items: a non-empty list of photos", field="items")
    if len(items) > settings.max_batch_items:
        message = f"{len(items)} photos; a batch holds at most {settings.max_batch_items} (SUPIR_MAX_BATCH_ITEMS)"
        raise ApiError("too_many_items", message, field="items")
    shared = {k: fields[k] for k in SHARED if k in fields and k != "webhook_url"}
    jobs = [_item_request(i, item, shared, files, settings) for i, item in enumerate(items)]
    variant = jobs[0].variant or settings.default_variant
    return BatchRequest(
        jobs, _webhook_url(fields.get("webhook_url")), shared.get("expires_after"), variant, files or []
    )


def _webhook_url(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return str(WEBHOOK_URL.validate_python(value))
    except ValidationError:
        raise ApiError("invalid_webhook_url", "webhook_url must be an http or https URL", field="webhook_url") from None


def _item_request(
    index: int, item: Any, shared: dict[str, Any], files: list[UploadFile] | None, settings: Settings
) -> JobRequest:
    """Item `index` over the shared fields, checked as a job body (its params over the shared params)."""
    where = f"items[{index}]"
    if not isinstance(item, dict):
        raise ApiError("invalid_request", f"{where} must be a JSON object", field=where)
    from_file = files is not None
    unknown = sorted(set(item) - ({"params", "preset"} if from_file else set(ITEM_FIELDS)))
    if unknown:
        raise ApiError("invalid_request", f"unknown field {unknown[0]!r} in {where}", field=f"{where}.{unknown[0]}")
    if not from_file and ("upload_id" in item) == ("image_url" in item):
        message = f"{where} needs exactly one of upload_id and image_url"
        raise ApiError("missing_image", message, field=where)
    params = shared.get("params")
    if isinstance(params, dict) and isinstance(item.get("params"), dict):
        item = {**item, "params": {**params, **item["params"]}}
    body_fields = {**shared, **item}
    try:
        if from_file:
            body: JobUpload | JobFromUrl | JobFromUpload = _validated(
                JobUpload, {**body_fields, "image": b"-"}, settings
            )
        elif "upload_id" in item:
            body = _validated(JobFromUpload, body_fields, settings)
        else:
            body = _validated(JobFromUrl, body_fields, settings)
        job = _served(_job_request(body, None, settings, None), settings)
    except ApiError as exc:
        raise ApiError(
            exc.code, f"{where}: {exc.message}", field=f"{where}.{exc.field}" if exc.field else where
        ) from None
    if from_file:
        assert files is not None
        job = replace(job, image=None, declared_type=files[index].content_type)
    return job


@dataclass
class _Stored:
    """One item, its photo stored: the record to write, and its upload to consume once the batch exists."""

    record: JobRecord
    upload: Any = None


async def create_batch(
    services: Services, owner: str, share_weight: float, batch: BatchRequest, idempotency_key: str | None
) -> tuple[BatchRecord, bool]:
    """(the batch, whether it is an Idempotency-Key replay). Nothing is queued until every photo is stored."""
    settings, store = services.settings, services.store
    if batch.webhook_url is not None:
        await run_in_threadpool(
            check_public_url, batch.webhook_url, settings, "webhook_url", settings.allow_private_webhooks
        )
    file_hashes = [await run_in_threadpool(_file_sha256, f) for f in batch.files]
    request_hash = batch.digest(file_hashes)
    batch_id = new_batch_id()
    idem = f"batch:{idempotency_key}" if idempotency_key else None
    if idem is not None:
        replay = await _claim_or_replay(services, owner, idem, batch_id, request_hash)
        if replay is not None:
            return replay, True
    stored: list[_Stored] = []
    try:
        for index, job in enumerate(batch.jobs):
            try:
                stored.append(await _store_item(services, owner, job, batch, index, batch_id))
            except ApiError as exc:
                field_name = f"items[{index}]" + (f".{exc.field}" if exc.field else "")
                raise ApiError(exc.code, f"items[{index}]: {exc.message}", field=field_name) from None
        await shutdown.commit()
        record = BatchRecord(
            id=batch_id,
            owner=owner,
            job_ids=[s.record.id for s in stored],
            variant=batch.variant,
            webhook=BatchWebhook(url=batch.webhook_url) if batch.webhook_url else None,
            expires_after=batch.expires_after,
            request_hash=request_hash,
        )
        await run_in_threadpool(_write, services, record, stored, share_weight)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(_undo, services, owner, stored, idem, batch_id)
        raise
    for item in stored:  # queued last: a failure to queue ends that job failed (api.creation._enqueue)
        with contextlib.suppress(ApiError):
            await _enqueue(services, item.record, owner, None)
        if item.upload is not None:
            await run_in_threadpool(_consume_upload, services, item.upload)
    if idem is not None:
        with contextlib.suppress(Exception):
            await run_in_threadpool(store.confirm_idempotency_key, owner, idem, batch_id, request_hash)
    metrics.JOBS_CREATED.inc(len(stored))
    return record, False


async def _store_item(
    services: Services, owner: str, job: JobRequest, batch: BatchRequest, index: int, batch_id: str
) -> _Stored:
    job_id = new_job_id()
    upload = None
    if batch.files:
        image = await run_in_threadpool(_read_file, batch.files[index], services.settings.max_upload_bytes)
        declared = job.declared_type
    else:
        if job.upload_id is not None:
            upload = await run_in_threadpool(_claimed_upload, services, owner, job.upload_id, job_id)
        try:
            job, image, declared = await _photo(services, owner, job, upload)
        except BaseException:
            if upload is not None:
                await run_in_threadpool(_uploads(services).release, upload.id, job_id)
            raise
    try:
        async with services.decodes:
            info = await run_in_threadpool(check_image, image, services.settings, job.params.upscale, declared)
        image_sha256 = await run_in_threadpool(lambda: hashlib.sha256(image).hexdigest())
        record = _record(job, job_id, owner, info, "", image_sha256)
        record = record.model_copy(update={"batch_id": batch_id, "expires_after": batch.expires_after})
        await run_in_threadpool(services.objects.put, record.input_key, image, info.content_type)
    except BaseException:
        if upload is not None:
            await run_in_threadpool(_uploads(services).release, upload.id, job_id)
        raise
    return _Stored(record, upload)


def _write(services: Services, batch: BatchRecord, stored: list[_Stored], share_weight: float) -> None:
    """The jobs, then the batch: a reader that finds the batch finds every job."""
    for item in stored:
        services.store.create(item.record, share_weight)
    services.store.batches.create(batch)


def _undo(services: Services, owner: str, stored: list[_Stored], idem: str | None, batch_id: str) -> None:
    """After a failed create: the photos stored so far go, their uploads are free again, the key is released."""
    with contextlib.suppress(Exception):
        for item in stored:
            record = services.store.get(item.record.id)
            if record is not None:
                erase(services.store, services.objects, record, "deleted")
            else:
                erase_objects(services.objects, item.record.id)
            if item.upload is not None:
                _uploads(services).release(item.upload.id, item.record.id)
    with contextlib.suppress(Exception):
        if idem is not None:
            services.store.release_idempotency_key(owner, idem, batch_id)


def _file_sha256(upload: UploadFile) -> str:
    digest = hashlib.sha256()
    upload.file.seek(0)
    while chunk := upload.file.read(ZIP_CHUNK):
        digest.update(chunk)
    upload.file.seek(0)
    return digest.hexdigest()


def _read_file(upload: UploadFile, limit: int) -> bytes:
    upload.file.seek(0)
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise ApiError("file_too_large", f"{upload.filename or 'a photo'} is over {limit:,} bytes")
    return data


async def _claim_or_replay(
    services: Services, owner: str, key: str, batch_id: str, request_hash: str
) -> BatchRecord | None:
    """Claim the Idempotency-Key for this batch (None), or the batch of the request that holds it."""
    store = services.store
    deadline = time.monotonic() + 30.0
    while True:
        holder = await run_in_threadpool(store.claim_idempotency_key, owner, key, batch_id, request_hash)
        if holder is None:
            return None
        if holder.get("hash") != request_hash:
            message = "this Idempotency-Key was used with a different request"
            raise ApiError("idempotency_conflict", message, field="Idempotency-Key")
        found = await run_in_threadpool(store.batches.get, holder["job"])
        if found is not None:
            return found
        if time.time() - float(holder.get("at", 0)) > 300.0 or holder.get("state") == "created":
            await run_in_threadpool(store.release_idempotency_key, owner, key, holder["job"])
            continue
        if time.monotonic() > deadline:
            message = "a request with this Idempotency-Key is still being created; try again"
            raise ApiError("idempotency_in_progress", message, field="Idempotency-Key", headers={"Retry-After": "5"})
        await anyio.sleep(0.1)


def owned_batch(services: Services, owner: str, batch_id: str) -> BatchRecord:
    """The owner's batch, or the error that says why there is none (410 while an erased one's tombstone lasts)."""
    book = services.store.batches
    batch = book.get(batch_id) if batch_id.startswith("bat_") and len(batch_id) == 36 else None
    if batch is not None and batch.owner == owner:
        return batch
    stone = book.tombstone(batch_id[:40]) if batch is None else None
    if stone is not None and stone.get("owner") == owner:
        raise ApiError("batch_deleted", f"batch {batch_id} was deleted: its jobs and files are erased")
    raise ApiError("not_found", f"no batch {batch_id[:80]}")


def batch_records(services: Services, batch: BatchRecord) -> list[JobRecord | None]:
    return batch_records_of(services, batch.job_ids)


def batch_records_of(services: Services, job_ids: list[str]) -> list[JobRecord | None]:
    """The jobs' records in one round trip (None: erased or expired)."""
    return services.store.get_many(job_ids)


def batch_view(services: Services, batch: BatchRecord) -> dict[str, Any]:
    """What the owner sees of a batch (api.models.Batch)."""
    records = batch_records(services, batch)
    ended_at = services.store.batches.ended_at(batch.id)
    view = summarize(batch, records, ended_at, services.settings.retention_s)
    view["eta"] = None if ended_at is not None else _eta(services, batch, records)
    view["webhook"] = batch.webhook.model_dump(include={"url", "state", "attempts"}) if batch.webhook else None
    view["jobs_url"] = f"/v1/batches/{batch.id}/jobs"
    view["results_url"] = f"/v1/batches/{batch.id}/results.zip"
    return view


def _eta(services: Services, batch: BatchRecord, records: list[JobRecord | None]) -> str | None:
    """When the batch's last job should end: the last queued job's expected start plus a job's time (or, with
    none queued, the running ones' remaining time)."""
    from jobs.estimates import job_seconds

    seconds, _ = job_seconds(services.rates.rates(batch.variant or services.settings.default_variant))
    queued = [r for r in records if r is not None and r.status == "queued"]
    if queued:
        last = max(queued, key=lambda r: services.store.queue_position(r.id, r.variant or None, r.owner) or 0)
        ahead = services.store.queue_position(last.id, last.variant or None, last.owner) or 0
        start = services.expected_start(last.variant, ahead)
        if start is None:
            return None
        remaining = start + seconds
    elif any(r is not None and r.status == "running" for r in records):
        remaining = seconds
    else:
        remaining = 0.0
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + remaining))


def cancel_batch(services: Services, batch: BatchRecord) -> None:
    """Queued jobs end canceled now; running ones stop at their next step."""
    store = services.store
    for record in batch_records(services, batch):
        if record is None or record.terminal:
            continue
        store.request_cancel(record.id)
        if record.status == "queued":

            def end_if_queued(r: JobRecord) -> JobRecord | None:
                return (
                    r.model_copy(update={"status": "canceled", "finished_at": time.time()})
                    if r.status == "queued"
                    else None
                )

            store.update(record.id, end_if_queued)
    send_due_webhook(services, batch.id)


def send_due_webhook(services: Services, batch_id: str) -> None:
    """The batch ended here (a cancel): its webhook goes now; the light worker's beat sends it otherwise."""
    book = services.store.batches
    if book.claim_due(batch_id):
        try:
            services.notify_batch(batch_id)
        except Exception:
            book.mark_due(batch_id)


def delete_batch(services: Services, batch: BatchRecord) -> None:
    """Erase every job of the batch (as DELETE /v1/jobs/{id}), then the batch; it answers 410 after."""
    store = services.store
    for job_id, record in zip(batch.job_ids, batch_records(services, batch), strict=True):
        if record is not None:
            erase(store, services.objects, record, "deleted")
        else:
            erase_objects(services.objects, job_id)
    store.batches.bury(batch, "deleted")


def zip_entries(services: Services, batch: BatchRecord) -> Iterator[tuple[str, str]]:
    """(name in the zip, object key) of every result, in the batch's order: `0007-job_….png`, and
    `0007-job_…-1.png` for later samples."""
    for index, record in enumerate(batch_records(services, batch)):
        if record is None or record.status != "succeeded":
            continue
        for sample, result in enumerate(results_of(record)):
            extension = result.key.rsplit(".", 1)[-1]
            suffix = f"-{sample}" if sample else ""
            yield f"{index:04d}-{record.id}{suffix}.{extension}", result.key


class _Sink:
    """A write-only file for zipfile: what is written waits here until the response takes it."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.offset = 0

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        self.offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self.offset

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def zip_stream(services: Services, batch: BatchRecord) -> Iterator[bytes]:
    """The zip of the batch's results, made as it is sent: one result in memory at a time (stored, not
    compressed: PNG and JPEG are compressed already), and a manifest.json of every job last."""
    sink = _Sink()
    manifest = []
    with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, key in zip_entries(services, batch):
            try:
                data = services.objects.get(key)
            except ObjectMissing:
                continue  # erased meanwhile (expiry, DELETE): left out, as the manifest says
            with archive.open(zipfile.ZipInfo(name, date_time=time.gmtime()[:6]), mode="w", force_zip64=True) as entry:
                for start in range(0, len(data), ZIP_CHUNK):
                    entry.write(data[start : start + ZIP_CHUNK])
                    yield sink.take()
            del data
            manifest.append(name)
        summary = [
            {
                "index": i,
                "job": job_id,
                "status": r.status if r else "deleted",
                "error": r.error.model_dump() if r and r.error else None,
            }
            for i, (job_id, r) in enumerate(zip(batch.job_ids, batch_records(services, batch), strict=True))
        ]
        archive.writestr("manifest.json", json.dumps({"batch": batch.id, "files": manifest, "jobs": summary}, indent=1))
    yield sink.take()
