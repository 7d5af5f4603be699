"""Creating a job, `POST /v1/jobs`: read the multipart or JSON request, validate it without I/O, claim the
Idempotency-Key and a quota slot atomically, fetch and check the image (bounded), store it, write the record
and queue the task. Every claim is given back on any failure, so a retry makes exactly one job."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import anyio
import redis
from fastapi import Request
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from jobs.cache import cacheable, record_key
from jobs.record import JobRecord, JobResult, WebhookState, input_key, new_job_id, output_key
from jobs.redis_memory import read_memory
from jobs.settings import Settings
from jobs.storage import ObjectMissing
from jobs.store import JobStore
from jobs.uploads import Upload, UploadBook
from jobs.usage import UsageBook
from supir_core.errors import InvalidInput
from supir_core.params import MAX_SEED, PRESETS, RestoreParams, validate_params

from . import metrics, shutdown
from .deps import missing_job
from .errors import QUEUE_FULL_MESSAGE, QUEUE_FULL_RETRY_S, STATUS, ApiError
from .intake import check_image, check_public_url, fetch_image, sniff
from .models import (
    MAX_DECLARED_SIDE,
    WEBHOOK_EVENTS,
    EstimateRequest,
    JobFromUpload,
    JobFromUrl,
    JobUpload,
    RestoreFromPreview,
)
from .services import Services

MAX_JSON_DEPTH = 32  # nesting allowed in a JSON body or the params field
FORM_FIELD_BYTES = 64_000  # largest non-file multipart field (params is small)
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no spaces
JOB_ID = re.compile(r"job_[0-9a-f]{32}")
IDEMPOTENCY_WAIT_S = 30.0  # how long a repeat waits for the first create's job to exist
IDEMPOTENCY_POLL_S = 0.1
IDEMPOTENCY_STALE_S = 300.0  # a claim this old with no job: its API process died; the next request takes it
SIZE_PARAMS = ("min_size", "upscale")  # fix the processing size: a run from a kept stage 1 must share them
Body = TypeVar("Body", JobUpload, JobFromUrl, JobFromUpload, RestoreFromPreview, EstimateRequest)
# A body with several faults is answered with one: unknown fields first, then wrong JSON types, then wrong
# values, the fields in this order (the order the API has always checked them in)
FIELD_ORDER = (
    "image", "image_url", "upload_id", "width", "height", "webhook_url", "preset", "params", "variant", "preview",
    "webhook_events",
    "expires_after",
)  # fmt: skip
# each field's code, and the message for a value of the right JSON type that is still refused
REFUSALS = {
    "image_url": ("invalid_url", "image_url must be an http or https URL"),
    "upload_id": ("invalid_request", "upload_id must be the id POST /v1/uploads answered (upl_…)"),
    "webhook_url": ("invalid_webhook_url", "webhook_url must be an http or https URL"),
    "width": ("invalid_request", f"width must be a whole number of pixels from 1 to {MAX_DECLARED_SIDE}"),
    "height": ("invalid_request", f"height must be a whole number of pixels from 1 to {MAX_DECLARED_SIDE}"),
    "preset": ("invalid_parameter", "preset must be a string"),
    "params": ("invalid_request", "params must be a JSON object"),
    "variant": ("invalid_request", "variant must be a string"),
    "preview": ("invalid_request", "preview must be true or false"),
    "webhook_events": (
        "invalid_request",
        f"webhook_events must be a non-empty list of event names ({', '.join(WEBHOOK_EVENTS)})",
    ),
    "expires_after": ("invalid_parameter", "expires_after must be a whole number of seconds, at least 1"),
}
NO_UPLOAD = "send the photo as the multipart file field 'image' (or JSON image_url or upload_id)"


@dataclass(frozen=True)
class JobRequest:
    """A create request after the checks that need no I/O."""

    params: RestoreParams
    preset: str | None
    image: bytes | None  # the upload, or None for image_url
    declared_type: str | None  # the upload's declared content type
    image_url: str | None
    webhook_url: str | None
    webhook_events: tuple[str, ...]
    raw_params: dict[str, Any]
    preview: bool = False  # stop after stage 1 and its caption
    stage1_job: str | None = None  # sample from this preview job's stage 1 (its photo too)
    variant: str | None = None  # the SUPIR variant asked for (None: the service's default)
    expires_after: int | None = None  # seconds kept after the job ends (None: the service's retention)
    upload_id: str | None = None  # the photo is this upload's (POST /v1/uploads)

    def digest(self) -> str:
        """Over the validated request (params with their defaults, so `2` and `2.0` or an omitted default match)."""
        normalised = {
            "params": self.params.model_dump(mode="json"),
            "preset": self.preset,
            "image_url": self.image_url,
            "webhook_url": self.webhook_url,
            "webhook_events": sorted(self.webhook_events),
            "image": hashlib.sha256(self.image).hexdigest() if self.image else None,
            "preview": self.preview,
            "stage1_job": self.stage1_job,
            "variant": self.variant,
            "expires_after": self.expires_after,
            "upload_id": self.upload_id,
        }
        return hashlib.sha256(json.dumps(normalised, sort_keys=True).encode()).hexdigest()


def idempotency_key_of(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        message = "Idempotency-Key must be 1-255 printable ASCII characters without spaces"
        raise ApiError("invalid_request", message, field="Idempotency-Key")
    return key


async def read_job_request(request: Request, settings: Settings, stage1_job: str | None = None) -> JobRequest:
    """The request's fields from multipart or JSON, checked. Body size is bounded by the BodyLimits middleware
    before any of this reads it. With `stage1_job` (`POST /v1/jobs/{id}/restore`): a JSON body (or none) with
    what the run is told; the photo and stage 1 are the preview's."""
    content_type = request.headers.get("content-type", "")
    declared: str | None = None
    body: JobUpload | JobFromUrl | JobFromUpload | RestoreFromPreview
    if stage1_job is not None:
        body = await _from_preview_body(request, content_type, settings)
        if not JOB_ID.fullmatch(stage1_job):
            raise ApiError("not_found", f"no job {stage1_job[:80]}")
    elif content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        body, declared = await _form_body(request, settings)
    elif content_type.startswith("application/json"):
        fields = _json_object(await request.body())
        if "upload_id" in fields and "image_url" in fields:
            message = "send either image_url or upload_id, not both"
            raise ApiError("conflicting_image_sources", message, field="upload_id")
        if "upload_id" in fields:
            body = _validated(JobFromUpload, fields, settings)
        else:
            body = _validated(JobFromUrl, fields, settings)
    else:
        raise ApiError(
            "unsupported_media_type", "send multipart/form-data with an image, or JSON with image_url or upload_id"
        )
    return _served(_job_request(body, declared, settings, stage1_job), settings)


async def _form_body(request: Request, settings: Settings) -> tuple[JobUpload | JobFromUrl, str | None]:
    """A form's fields as the JSON body's values, validated, and the upload's declared content type. A form
    with image_url (and no file) is that JSON body sent as a form."""
    # as a context: the upload's spooled file is closed at the end, not left to the garbage collector
    async with request.form(max_files=1, max_fields=8, max_part_size=FORM_FIELD_BYTES) as form:
        fields: dict[str, Any] = {k: v for k, v in form.items() if not isinstance(v, UploadFile)}
        upload = form.get("image")
        data = await upload.read(settings.max_upload_bytes + 1) if isinstance(upload, UploadFile) else None
        declared = upload.content_type if isinstance(upload, UploadFile) else None
    if "params" in fields:
        fields["params"] = _parse_json(fields["params"], "the params field", field="params")
    if isinstance(fields.get("webhook_events"), str):
        fields["webhook_events"] = _event_list(fields["webhook_events"])
    if isinstance(fields.get("expires_after"), str) and fields["expires_after"].strip().isdigit():
        fields["expires_after"] = int(fields["expires_after"])
    if isinstance(fields.get("preview"), str):
        fields["preview"] = {"true": True, "false": False}.get(fields["preview"].strip().lower(), fields["preview"])
    if "image_url" in fields:
        if data is not None:
            message = "send either an image file or image_url, not both"
            raise ApiError("conflicting_image_sources", message, field="image_url")
        return _validated(JobFromUrl, fields, settings), None
    if data is None:
        raise ApiError("missing_image", NO_UPLOAD, field="image")
    return _validated(JobUpload, {**fields, "image": data}, settings), declared


async def _from_preview_body(request: Request, content_type: str, settings: Settings) -> RestoreFromPreview:
    body = await request.body()
    if body.strip() and not content_type.startswith("application/json"):
        message = "send JSON (params, preset, webhook_url, webhook_events, expires_after) or nothing"
        raise ApiError("unsupported_media_type", message)
    return _validated(RestoreFromPreview, _json_object(body) if body.strip() else {}, settings)


def read_estimate_request(body: bytes, settings: Settings) -> tuple[EstimateRequest, RestoreParams, str]:
    """`POST /v1/estimates`' JSON body, checked as a create body is: (the body, its params over this deployment's
    defaults and the preset, the variant that would run it)."""
    estimate = _validated(EstimateRequest, _json_object(body) if body.strip() else {}, settings)
    try:
        raw = with_defaults(estimate.params or {}, estimate.preset, settings.default_params)
        params = validate_params(raw, preset=estimate.preset)
    except InvalidInput as exc:
        raise _params_refusal(exc) from None
    variant = estimate.variant or settings.default_variant
    if variant not in settings.variant_files:
        raise _unserved(variant, settings)
    return estimate, params, variant


def _json_object(body: bytes) -> dict[str, Any]:
    fields = _parse_json(body, "the request body")
    if not isinstance(fields, dict):
        raise ApiError("invalid_json", "the request body must be a JSON object")
    return fields


def _validated(model: type[Body], fields: dict[str, Any], settings: Settings) -> Body:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise _refusal(exc, settings) from None


def _refusal(exc: ValidationError, settings: Settings) -> ApiError:
    """A body model's ValidationError as the API's error: its stable code, the field, a sentence."""
    error = min(exc.errors(), key=_precedence)
    name, kind, value = str(error["loc"][0]) if error["loc"] else "", error["type"], error["input"]
    if kind == "extra_forbidden":
        return ApiError("invalid_request", f"unknown field {name!r}", field=name)
    if kind in STATUS:  # a validator of the body models (api.models) that words it the API's way
        return ApiError(kind, error["msg"], field=name)
    if name == "image":
        return ApiError("missing_image", NO_UPLOAD, field="image")
    if name == "image_url" and (kind == "missing" or value is None or value == ""):
        return ApiError("missing_image", "send an image file or image_url", field="image")
    if name == "variant" and kind == "string_pattern_mismatch":  # no variant is named so: none serves it
        return _unserved(value, settings)
    if name == "webhook_events" and kind == "literal_error" and isinstance(value, str):
        message = f"unknown webhook event {value[:40]!r}; choose from {', '.join(WEBHOOK_EVENTS)}"
        return ApiError("invalid_request", message, field=name)
    code, message = REFUSALS[name]
    return ApiError(code, f"{name} must be a string" if kind == "string_type" else message, field=name)


def _precedence(error: ErrorDetails) -> tuple[int, int, str]:
    name = str(error["loc"][0]) if error["loc"] else ""
    stage = 0 if error["type"] == "extra_forbidden" else 1 if error["type"].endswith("_type") else 2
    return stage, FIELD_ORDER.index(name) if name in FIELD_ORDER else len(FIELD_ORDER), name


def _job_request(
    body: JobUpload | JobFromUrl | JobFromUpload | RestoreFromPreview,
    declared: str | None,
    settings: Settings,
    stage1_job: str | None,
) -> JobRequest:
    """The validated body with its params over this deployment's defaults and the preset, checked."""
    raw_params = body.params or {}
    try:
        params = validate_params(with_defaults(raw_params, body.preset, settings.default_params), preset=body.preset)
    except InvalidInput as exc:
        raise _params_refusal(exc) from None
    if body.expires_after is not None and body.expires_after > settings.retention_s:
        message = (
            f"expires_after={body.expires_after}: at most {settings.retention_s} seconds (the service's retention, "
            "SUPIR_RETENTION_HOURS)"
        )
        raise ApiError("invalid_parameter", message, field="expires_after")
    return JobRequest(
        params=params,
        preset=body.preset,
        image=body.image if isinstance(body, JobUpload) else None,
        declared_type=declared,
        image_url=body.image_url if isinstance(body, JobFromUrl) else None,
        webhook_url=body.webhook_url,
        webhook_events=tuple(body.webhook_events or ("completed",)),
        raw_params=raw_params,
        preview=not isinstance(body, RestoreFromPreview) and body.preview,
        stage1_job=stage1_job,
        variant=body.variant,
        expires_after=body.expires_after,
        upload_id=body.upload_id if isinstance(body, JobFromUpload) else None,
    )


def _params_refusal(exc: InvalidInput) -> ApiError:
    field = f"params.{exc.field}" if exc.field and exc.field != "preset" else exc.field
    return ApiError(exc.code, exc.message, field=field)


def _served(job: JobRequest, settings: Settings) -> JobRequest:
    """Refuse, before anything is queued, a variant no worker pool of this deployment serves (its queue would
    wait forever); a request naming none gets the default, so the digest and the record name the variant."""
    if job.variant is None:
        return job if job.stage1_job else replace(job, variant=settings.default_variant)
    if job.variant not in settings.variant_files:
        raise _unserved(job.variant, settings)
    return job


def _unserved(variant: str, settings: Settings) -> ApiError:
    served = ", ".join(settings.variant_files)
    message = (
        f"variant {variant[:40]!r} is not served here; choose one of {served} (the variants served are the "
        "service's SUPIR_VARIANTS setting, name → SUPIR file; without it, SUPIR_DEFAULT_VARIANT alone)"
    )
    return ApiError("variant_unavailable", message, field="variant")


def _event_list(raw: str) -> Any:
    """A multipart webhook_events field: a JSON array, or names separated by commas."""
    if raw.lstrip().startswith("["):
        return _parse_json(raw, "the webhook_events field", field="webhook_events")
    return [name.strip() for name in raw.split(",") if name.strip()]


def _parse_json(raw: str | bytes, what: str, field: str | None = None) -> Any:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser's stack
        raise ApiError("invalid_json", f"{what} is not valid JSON", field=field) from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise ApiError("invalid_json", f"{what} is nested deeper than {MAX_JSON_DEPTH} levels", field=field)
    return value


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def with_defaults(raw: dict[str, Any], preset: str | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """The request's params over this deployment's defaults (SUPIR_DEFAULT_PARAMS), less what its preset sets:
    official defaults < deployment defaults < preset < request. The job's params then show every value used."""
    preset_sets = PRESETS.get(preset, {}) if isinstance(preset, str) else {}
    return {**{k: v for k, v in defaults.items() if k not in preset_sets}, **raw}


async def create(
    services: Services,
    owner: str,
    quota: int,
    job: JobRequest,
    idempotency_key: str | None,
    share_weight: float = 1.0,
) -> tuple[JobRecord, bool]:
    """(the job, whether it is an Idempotency-Key replay of an earlier request's job).

    Blocking work (Redis, storage, DNS, downloads, decodes) runs in the threadpool; downloads and decodes under
    their semaphores."""
    settings, store = services.settings, services.store
    await run_in_threadpool(_room_for_a_job, services)
    if job.webhook_url is not None:
        await run_in_threadpool(
            check_public_url, job.webhook_url, settings, "webhook_url", settings.allow_private_webhooks
        )
    if job.stage1_job is not None:  # resolved first, so the Idempotency-Key's digest covers the params that run
        try:
            job = await run_in_threadpool(_over_preview, services, owner, job)
        except ApiError as exc:
            metrics.REJECTED.labels(exc.code).inc()
            raise
    request_hash = await run_in_threadpool(job.digest)

    # the same Idempotency-Key with the same request returns the first job: claimed before any work
    job_id = new_job_id()
    if idempotency_key:
        try:
            replay = await _claim_or_replay(services, owner, idempotency_key, job_id, request_hash)
        except BaseException:  # a shutdown's cancel too (api.shutdown): a claim made meanwhile is given back
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(_undo_claims, store, owner, job_id, None, idempotency_key)
            raise
        if replay is not None:
            return replay, True
    record, cached = await _stored_record(
        services, owner, quota, job, job_id, request_hash, idempotency_key, share_weight
    )
    if idempotency_key:
        with contextlib.suppress(redis.RedisError):  # only informative: waiters look for the record itself
            await run_in_threadpool(store.confirm_idempotency_key, owner, idempotency_key, job_id, request_hash)
    if cached:
        if record.webhook is not None and record.webhook.state == "pending":
            with contextlib.suppress(Exception):  # as for a job canceled while queued: the light worker posts it
                await run_in_threadpool(services.notify, job_id)
        return record, False
    await _enqueue(services, record, owner, idempotency_key)
    metrics.JOBS_CREATED.inc()
    return record, False


def _room_for_a_job(services: Services) -> None:
    """Refuse a new job while Redis is within SUPIR_REDIS_MEMORY_RESERVE of its maxmemory: with noeviction a full
    Redis refuses every write, and the jobs already accepted need some to start, end and be read."""
    memory = read_memory(services.store.r)
    if not memory.takes_jobs(services.settings.redis_memory_reserve):
        metrics.REJECTED.labels("queue_full").inc()
        raise ApiError("queue_full", QUEUE_FULL_MESSAGE, headers={"Retry-After": str(QUEUE_FULL_RETRY_S)})


async def _stored_record(
    services: Services,
    owner: str,
    quota: int,
    job: JobRequest,
    job_id: str,
    request_hash: str,
    idempotency_key: str | None,
    share_weight: float = 1.0,
) -> tuple[JobRecord, bool]:
    """Claim a quota slot, get the photo, and store the job: (its record, whether it was born succeeded from the
    result cache, holding no slot)."""
    store, claimed, upload = services.store, False, None
    try:
        # one atomic check-and-claim: concurrent creates cannot all pass a separate count
        claimed = await run_in_threadpool(store.claim_slot, owner, job_id, quota)
        if not claimed:
            message = (
                f"at most {quota} jobs may be queued or running at once for this key (the service's "
                "SUPIR_MAX_ACTIVE_JOBS, or the key's max_active_jobs in SUPIR_API_KEYS)"
            )
            raise ApiError("quota_exceeded", message, headers={"Retry-After": "10"})
        if job.upload_id is not None:
            upload = await run_in_threadpool(_claimed_upload, services, owner, job.upload_id, job_id)
        job, image, declared = await _photo(services, owner, job, upload)
        image_sha256 = await run_in_threadpool(lambda: hashlib.sha256(image).hexdigest())
        # the point of no return: from here a job gets stored (a cached one at once), so a shutdown lets this
        # request finish and answer it rather than refuse it with a 503 whose retry would make a second job
        await shutdown.commit()
        hit = await run_in_threadpool(_answer_from_cache, services, owner, job, job_id, image_sha256, request_hash)
        if hit is not None:
            await run_in_threadpool(store.release_slot, owner, job_id)  # it ended at birth: no slot held
            claimed = False
            if upload is not None:
                await run_in_threadpool(_consume_upload, services, upload)
            return hit, True
        async with services.decodes:
            info = await run_in_threadpool(check_image, image, services.settings, job.params.upscale, declared)
        record = _record(job, job_id, owner, info, request_hash, image_sha256)
        # input first, record second, task last: a failure leaves no record pointing at a missing input
        await run_in_threadpool(services.objects.put, record.input_key, image, info.content_type)
        await run_in_threadpool(store.create, record, share_weight)  # the record keeps the claimed slot
        if upload is not None:
            await run_in_threadpool(_consume_upload, services, upload)
        return record, False
    except BaseException as exc:  # any failure, a cancelled request too, gives back the slot and the key
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(_undo_claims, store, owner, job_id, job_id if claimed else None, idempotency_key)
            if upload is not None:
                with contextlib.suppress(redis.RedisError):
                    await run_in_threadpool(_uploads(services).release, upload.id, job_id)
        if isinstance(exc, ApiError):
            metrics.REJECTED.labels(exc.code).inc()
        raise


async def _photo(
    services: Services, owner: str, job: JobRequest, upload: Upload | None = None
) -> tuple[JobRequest, bytes, str | None]:
    """The job's photo and its declared type: the preview's, the upload, a direct upload's object, or the
    download of image_url."""
    if job.stage1_job is not None:
        return await _preview_photo(services, owner, job)
    if upload is not None:
        return job, await run_in_threadpool(_upload_bytes, services, upload), upload.content_type
    if job.image is not None:
        return job, job.image, job.declared_type
    assert job.image_url is not None  # read_job_request: one of the three
    async with services.fetches:
        image, declared = await run_in_threadpool(fetch_image, job.image_url, services.settings)
    return job, image, declared


async def _enqueue(services: Services, record: JobRecord, owner: str, idempotency_key: str | None) -> None:
    """Queue the stored job's task; when the queue is down, the job ends failed and its key is given back."""
    try:
        await run_in_threadpool(services.enqueue, record.id, record.variant)
    except Exception as exc:
        error = {"code": "queue_unavailable", "message": "the job queue is unavailable"}
        await run_in_threadpool(services.store.finish, record.id, "failed", error=error)  # ends it, frees its slot
        # the failed job stays visible, but its key is released: a retry with the key makes a new job
        await run_in_threadpool(_undo_claims, services.store, owner, record.id, None, idempotency_key)
        if isinstance(exc, redis.OutOfMemoryError):  # the broker's Redis is full (noeviction)
            raise ApiError("queue_full", QUEUE_FULL_MESSAGE, headers={"Retry-After": str(QUEUE_FULL_RETRY_S)}) from exc
        raise ApiError(
            "queue_unavailable", "the job queue is unavailable; try again", headers={"Retry-After": "5"}
        ) from exc


def _uploads(services: Services) -> UploadBook:
    return UploadBook(services.store.r, services.store.p)


def _claimed_upload(services: Services, owner: str, upload_id: str, job_id: str) -> Upload:
    """The owner's upload, marked used by this job (another key's upload is as absent as a missing one)."""
    book = _uploads(services)
    upload = book.get(upload_id)
    if upload is None or upload.owner != owner:
        raise ApiError("not_found", f"no upload {upload_id[:80]} for this key", field="upload_id")
    if not book.claim(upload_id, job_id):
        raise ApiError("upload_used", f"upload {upload_id} was already used by a job", field="upload_id")
    return upload


def _upload_bytes(services: Services, upload: Upload) -> bytes:
    """The upload's bytes, once its stored size is the signed one and its leading bytes are the signed type.
    The size is asked first, so an object S3 took against its policy is never read whole."""
    limit = services.settings.max_upload_bytes
    try:
        size = services.objects.size(upload.key)
    except ObjectMissing:
        raise ApiError("upload_incomplete", f"upload {upload.id} has not been received", field="upload_id") from None
    if size > min(upload.size, limit):
        message = f"upload {upload.id} holds {size:,} bytes; {upload.size:,} were signed for"
        raise ApiError("file_too_large", message, field="upload_id")
    if size < upload.size:
        message = f"upload {upload.id} holds {size:,} of the {upload.size:,} bytes signed for"
        raise ApiError("upload_incomplete", message, field="upload_id")
    try:
        data = services.objects.get(upload.key)
    except ObjectMissing:
        raise ApiError("upload_incomplete", f"upload {upload.id} has not been received", field="upload_id") from None
    found = sniff(data[:16])
    if found is not None and found[1] != upload.content_type:
        message = f"upload {upload.id} is {found[1]}, not the {upload.content_type} it was signed for"
        raise ApiError("unsupported_media_type", message, field="upload_id")
    return data


def _consume_upload(services: Services, upload: Upload) -> None:
    """The job holds its own copy now (its retention and DELETE cover it): the upload goes (best effort; the
    expiry sweep removes an object left behind)."""
    with contextlib.suppress(Exception):
        services.objects.delete(upload.key)
        _uploads(services).forget(upload.id)


def _over_preview(services: Services, owner: str, job: JobRequest) -> JobRequest:
    """The request over its preview: every parameter the preview ran with (its seed too) < the request's preset
    < the request's params. The processing size and the variant must stay the preview's (a kept stage 1 fits
    only those)."""
    assert job.stage1_job is not None
    source = _preview_of(services, owner, job.stage1_job)
    for name in SIZE_PARAMS:
        if name in job.raw_params and job.raw_params[name] != source.params.get(name):
            message = f"{name} must be the stage-1 job's ({source.params.get(name)}): it fixes the processing size"
            raise ApiError("invalid_parameter", message, field=f"params.{name}")
    if job.variant is not None and source.variant and job.variant != source.variant:
        message = f"variant must be the stage-1 job's ({source.variant}): stage 1 ran that variant's encoder"
        raise ApiError("invalid_parameter", message, field="variant")
    # a record from an older release may hold a parameter since retired: not the request's fault
    inherited = {k: v for k, v in source.params.items() if k in RestoreParams.model_fields}
    preset_sets = PRESETS.get(job.preset, {}) if job.preset is not None else {}
    try:
        params = validate_params({**inherited, **preset_sets, **job.raw_params})
    except InvalidInput as exc:
        raise _params_refusal(exc) from None
    variant = source.variant or services.settings.default_variant
    expires_after = job.expires_after or source.expires_after  # the preview's too, unless the request says
    return replace(job, params=params, preset=job.preset or source.preset, variant=variant, expires_after=expires_after)


def _preview_of(services: Services, owner: str, job_id: str) -> JobRecord:
    """The owner's finished preview job, or the error that says why there is none."""
    source = services.store.get(job_id)
    if source is None or source.owner != owner:
        raise missing_job(services.store, job_id, owner)
    if source.kind != "preview" or source.status != "succeeded":
        message = f"job {source.id} is no finished preview (a job created with preview: true that has succeeded)"
        raise ApiError("stage1_unavailable", message)
    return source


async def _preview_photo(services: Services, owner: str, job: JobRequest) -> tuple[JobRequest, bytes, str]:
    """The preview job's photo and its type."""
    assert job.stage1_job is not None
    source = await run_in_threadpool(_preview_of, services, owner, job.stage1_job)
    try:
        image = await run_in_threadpool(services.objects.get, source.input_key)
    except ObjectMissing:
        raise ApiError("stage1_unavailable", f"job {source.id}'s photo is past retention") from None
    return job, image, source.input_content_type


def _answer_from_cache(
    services: Services, owner: str, job: JobRequest, job_id: str, image_sha256: str, request_hash: str
) -> JobRecord | None:
    """A job born `succeeded` with copies of an earlier identical job's results (no GPU work), or None."""
    store = services.store
    probe = JobRecord(
        id=job_id,
        owner=owner,
        params=job.params.model_dump(),
        input_sha256=image_sha256,
        seed_given=job.params.seed is not None,
        variant=job.variant or "",
        kind="preview" if job.preview else "restore",
        stage1_job=job.stage1_job,
    )
    found = _cached_results(services, probe)
    if found is None:
        return None
    source, results = found
    now = time.time()
    webhook = _webhook_state(job)
    record = source.model_copy(
        update={
            "id": job_id,
            "owner": owner,
            "status": "succeeded",
            "params": probe.params,
            "preset": job.preset,
            "input_key": "",  # nothing to restore: the photo is not kept again
            "created_at": now,
            "started_at": now,
            "finished_at": now,
            "attempts": 0,
            "lost": 0,
            "worker": None,
            "seconds": {},
            "error": None,
            "result": results[0],
            "results": results,
            "webhook": webhook,
            "request_hash": request_hash,
            "cached": True,
            "cached_from": source.id,
            "gpu_seconds": 0.0,
            "expires_after": job.expires_after,
            "expires_at": None,  # its own, from its own end (now)
        }
    )
    record = store.create_finished(record)
    usage = UsageBook(store.r, store.p, services.settings.usage_retention_s)
    with contextlib.suppress(redis.RedisError):  # informative: the job itself is made
        usage.record(owner, images=len(results), gpu_seconds=0.0, cached=True)
    metrics.RESULT_CACHE.labels("hit").inc()
    return record


def _cached_results(services: Services, probe: JobRecord) -> tuple[JobRecord, list[JobResult]] | None:
    """The earlier job that answers the probe and the probe job's own copies of its results, or None (a miss;
    a cache entry whose job or files are gone is forgotten)."""
    settings, store = services.settings, services.store
    if not cacheable(settings, probe):
        return None
    model = store.variant_info(probe.variant)  # what this variant's workers load (None before any has)
    if model is None or "numerics" not in model:  # no numerics: published by a worker that keys no entries
        metrics.RESULT_CACHE.labels("miss").inc()
        return None
    key = record_key(settings, probe, model["model_id"], model["numerics"])
    source_id = store.cached_job(key)
    source = store.get(source_id) if source_id else None
    if source is None or source.status != "succeeded" or not source.results:
        if source_id:
            store.forget_result(key, source_id)
        metrics.RESULT_CACHE.labels("miss").inc()
        return None
    try:
        results = [_copied(services, r, probe.id, i) for i, r in enumerate(source.results)]
    except ObjectMissing:  # swept before its record expired: run it again
        store.forget_result(key, source.id)
        metrics.RESULT_CACHE.labels("miss").inc()
        return None
    return source, results


def _copied(services: Services, result: JobResult, job_id: str, index: int) -> JobResult:
    """The job's own copy of a result, so each job's files live and expire with it."""
    key = output_key(job_id, index, result.key.rsplit(".", 1)[-1])
    services.objects.put(key, services.objects.get(result.key), result.content_type)
    return result.model_copy(update={"key": key})


def _webhook_state(job: JobRequest) -> WebhookState | None:
    if not job.webhook_url:
        return None
    # the state follows the `completed` delivery; without it there is none to wait for
    state = "pending" if "completed" in job.webhook_events else "not_requested"
    return WebhookState(url=job.webhook_url, events=list(job.webhook_events), state=state)


def _record(
    job: JobRequest, job_id: str, owner: str, info: Any, request_hash: str, image_sha256: str = ""
) -> JobRecord:
    # no seed given: one derived from the job id, so every job records the seed that reproduces it
    seed = (
        job.params.seed
        if job.params.seed is not None
        else int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:4]) % (MAX_SEED + 1)
    )
    return JobRecord(
        id=job_id,
        owner=owner,
        params=job.params.model_copy(update={"seed": seed}).model_dump(),
        preset=job.preset,
        input_key=input_key(job_id),
        input_content_type=info.content_type,
        input_width=info.width,
        input_height=info.height,
        webhook=_webhook_state(job),
        request_hash=request_hash,
        kind="preview" if job.preview else "restore",
        stage1_job=job.stage1_job,
        variant=job.variant or "",
        input_sha256=image_sha256,
        seed_given=job.params.seed is not None,
        expires_after=job.expires_after,
    )


async def _claim_or_replay(
    services: Services, owner: str, key: str, job_id: str, request_hash: str
) -> JobRecord | None:
    """Claim the key for job_id (None: this request makes the job), or the job of the request that holds it:
    waits (async, bounded) while that request is still creating it, and takes the key over if that request
    fails and releases it, so one job results."""
    store = services.store
    deadline = time.monotonic() + IDEMPOTENCY_WAIT_S
    while True:
        holder = await run_in_threadpool(store.claim_idempotency_key, owner, key, job_id, request_hash)
        if holder is None:
            return None
        if holder.get("hash") != request_hash:
            message = "this Idempotency-Key was used with a different request"
            raise ApiError("idempotency_conflict", message, field="Idempotency-Key")
        record = await run_in_threadpool(store.get, holder["job"])
        queue_failed = record is not None and record.error is not None and record.error.code == "queue_unavailable"
        if record is not None and not queue_failed:  # a queue failure releases the key next: wait for that
            return record
        if record is None and holder.get("state") == "created":  # its job was made, and is gone since
            gone = await run_in_threadpool(missing_job, store, holder["job"], owner)
            if gone.code == "job_deleted":  # erased: the key's one job is no more, and says so
                raise gone
            # past its expires_after: the key is free for a new job
            await run_in_threadpool(store.release_idempotency_key, owner, key, holder["job"])
            continue
        if time.time() - float(holder.get("at", 0)) > IDEMPOTENCY_STALE_S:
            await run_in_threadpool(store.release_idempotency_key, owner, key, holder["job"])
            continue
        if time.monotonic() > deadline:
            message = "a request with this Idempotency-Key is still being created; try again"
            raise ApiError("idempotency_in_progress", message, field="Idempotency-Key", headers={"Retry-After": "5"})
        await asyncio.sleep(IDEMPOTENCY_POLL_S)


def _undo_claims(
    store: JobStore, owner: str, job_id: str, slot_job_id: str | None, idempotency_key: str | None
) -> None:
    """After a failed create: give back its quota slot and its Idempotency-Key (best effort: Redis may be down)."""
    with contextlib.suppress(redis.RedisError):
        if slot_job_id is not None:
            store.release_slot(owner, slot_job_id)
    with contextlib.suppress(redis.RedisError):
        if idempotency_key:
            store.release_idempotency_key(owner, idempotency_key, job_id)
