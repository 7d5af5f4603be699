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
from typing import Any, get_args
from urllib.parse import urlsplit

import anyio
import redis
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from jobs.cache import cacheable, record_key
from jobs.record import JobRecord, JobResult, WebhookEvent, WebhookState, input_key, new_job_id, output_key
from jobs.settings import Settings
from jobs.storage import ObjectMissing
from jobs.store import JobStore
from jobs.usage import UsageBook
from supir_core.errors import InvalidInput
from supir_core.params import MAX_SEED, PRESETS, RestoreParams, validate_params

from . import metrics
from .errors import ApiError
from .intake import check_image, check_public_url, fetch_image
from .services import Services

MAX_JSON_DEPTH = 32  # nesting allowed in a JSON body or the params field
FORM_FIELD_BYTES = 64_000  # largest non-file multipart field (params is small)
MAX_URL_CHARS = 8192
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no spaces
JOB_ID = re.compile(r"job_[0-9a-f]{32}")
IDEMPOTENCY_WAIT_S = 30.0  # how long a repeat waits for the first create's job to exist
IDEMPOTENCY_POLL_S = 0.1
IDEMPOTENCY_STALE_S = 300.0  # a claim this old with no job: its API process died; the next request takes it
ALLOWED_FIELDS = {
    "params", "preset", "webhook_url", "webhook_events", "image_url", "preview", "stage1_job", "variant"
}  # fmt: skip
# stage1_job is set from the path of POST /v1/jobs/{id}/restore, never read from a create body
SIZE_PARAMS = ("min_size", "upscale")  # fix the processing size: a run from a kept stage 1 must share them
WEBHOOK_EVENTS: tuple[str, ...] = get_args(WebhookEvent)


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
    if stage1_job is not None:
        return await _from_preview_request(request, stage1_job, content_type)
    data: bytes | None = None
    declared: str | None = None
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form(max_files=1, max_fields=8, max_part_size=FORM_FIELD_BYTES)
        fields: dict[str, Any] = {k: v for k, v in form.items() if not isinstance(v, UploadFile)}
        upload = form.get("image")
        if "params" in fields:
            fields["params"] = _parse_json(fields["params"], "the params field", field="params")
        if isinstance(fields.get("webhook_events"), str):
            fields["webhook_events"] = _event_list(fields["webhook_events"])
        if isinstance(fields.get("preview"), str):
            fields["preview"] = {"true": True, "false": False}.get(fields["preview"].strip().lower(), fields["preview"])
        if isinstance(upload, UploadFile):
            data = await upload.read(settings.max_upload_bytes + 1)
            declared = upload.content_type
        elif "image_url" not in fields:
            raise ApiError(
                "missing_image", "send the photo as the multipart file field 'image' (or JSON image_url)", field="image"
            )
    elif content_type.startswith("application/json"):
        fields = _parse_json(await request.body(), "the request body")
        if not isinstance(fields, dict):
            raise ApiError("invalid_json", "the request body must be a JSON object")
    else:
        raise ApiError("unsupported_media_type", "send multipart/form-data with an image, or JSON with image_url")
    if "stage1_job" in fields:  # only from the path of POST /v1/jobs/{id}/restore
        raise ApiError("invalid_request", "unknown field 'stage1_job'", field="stage1_job")
    return _served(_validated(fields, data, declared, settings.default_params), settings)


def _served(job: JobRequest, settings: Settings) -> JobRequest:
    """Refuse, before anything is queued, a variant no worker pool of this deployment serves (its queue would
    wait forever); a request naming none gets the default, so the digest and the record name the variant."""
    if job.variant is None:
        return job if job.stage1_job else replace(job, variant=settings.default_variant)
    if job.variant not in settings.variant_files:
        served = ", ".join(settings.variant_files)
        message = (
            f"variant {job.variant[:40]!r} is not served here; choose one of {served} (the variants served are the "
            "service's SUPIR_VARIANTS setting, name → SUPIR file; without it, SUPIR_DEFAULT_VARIANT alone)"
        )
        raise ApiError("variant_unavailable", message, field="variant")
    return job


async def _from_preview_request(request: Request, stage1_job: str, content_type: str) -> JobRequest:
    body = await request.body()
    if body.strip() and not content_type.startswith("application/json"):
        raise ApiError("unsupported_media_type", "send JSON (params, preset, webhook_url, webhook_events) or nothing")
    fields = _parse_json(body, "the request body") if body.strip() else {}
    if not isinstance(fields, dict):
        raise ApiError("invalid_json", "the request body must be a JSON object")
    for name in ("image_url", "preview", "stage1_job"):
        if name in fields:  # the photo and stage 1 are the preview's
            raise ApiError("invalid_request", f"unknown field {name!r}", field=name)
    settings: Settings = request.app.state.services.settings
    return _served(_validated({**fields, "stage1_job": stage1_job}, None, None, settings.default_params), settings)


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


def _validated(
    fields: dict[str, Any], data: bytes | None, declared: str | None, defaults: dict[str, Any] | None = None
) -> JobRequest:
    unknown = set(fields) - ALLOWED_FIELDS
    if unknown:
        raise ApiError("invalid_request", f"unknown field {sorted(unknown)[0]!r}", field=sorted(unknown)[0])
    image_url, webhook_url, preset = fields.get("image_url"), fields.get("webhook_url"), fields.get("preset")
    # JSON can carry any type: each field's type is checked before anything uses it
    if image_url is not None and not isinstance(image_url, str):
        raise ApiError("invalid_url", "image_url must be a string", field="image_url")
    if webhook_url is not None and not isinstance(webhook_url, str):
        raise ApiError("invalid_webhook_url", "webhook_url must be a string", field="webhook_url")
    if preset is not None and not isinstance(preset, str):
        raise ApiError("invalid_parameter", "preset must be a string", field="preset")
    raw_params = fields.get("params")
    raw_params = {} if raw_params is None else raw_params
    if not isinstance(raw_params, dict):
        raise ApiError("invalid_request", "params must be a JSON object", field="params")
    preview, stage1_job = fields.get("preview", False), fields.get("stage1_job")
    variant = fields.get("variant")
    if variant is not None and not isinstance(variant, str):
        raise ApiError("invalid_request", "variant must be a string", field="variant")
    if not isinstance(preview, bool):
        raise ApiError("invalid_request", "preview must be true or false", field="preview")
    if stage1_job is not None and not (isinstance(stage1_job, str) and JOB_ID.fullmatch(stage1_job)):
        raise ApiError("not_found", f"no job {str(stage1_job)[:80]}")
    if data is not None and image_url:
        raise ApiError(
            "conflicting_image_sources", "send either an image file or image_url, not both", field="image_url"
        )
    if data is None and not image_url and not stage1_job:
        raise ApiError("missing_image", "send an image file or image_url", field="image")
    if image_url is not None and not _http_url(image_url):
        raise ApiError("invalid_url", "image_url must be an http or https URL", field="image_url")
    if webhook_url is not None and not _http_url(webhook_url):
        raise ApiError("invalid_webhook_url", "webhook_url must be an http or https URL", field="webhook_url")
    events = _webhook_events(fields.get("webhook_events"), webhook_url)
    try:
        params = validate_params(with_defaults(raw_params, preset, defaults or {}), preset=preset)
    except InvalidInput as exc:
        raise ApiError(
            exc.code, exc.message, field=f"params.{exc.field}" if exc.field and exc.field != "preset" else exc.field
        ) from None
    return JobRequest(
        params, preset, data, declared, image_url, webhook_url, events, raw_params, preview, stage1_job, variant
    )


def _webhook_events(raw: Any, webhook_url: str | None) -> tuple[str, ...]:
    """The events the webhook receives (default: only `completed`)."""
    if raw is None:
        return ("completed",)
    choices = ", ".join(WEBHOOK_EVENTS)
    if not isinstance(raw, list) or not raw or not all(isinstance(name, str) for name in raw):
        message = f"webhook_events must be a non-empty list of event names ({choices})"
        raise ApiError("invalid_request", message, field="webhook_events")
    unknown = [name for name in raw if name not in WEBHOOK_EVENTS]
    if unknown:
        message = f"unknown webhook event {unknown[0][:40]!r}; choose from {choices}"
        raise ApiError("invalid_request", message, field="webhook_events")
    if webhook_url is None:
        raise ApiError("invalid_request", "webhook_events needs a webhook_url", field="webhook_events")
    return tuple(name for name in WEBHOOK_EVENTS if name in raw)  # a fixed order, duplicates dropped


def _http_url(url: str) -> bool:
    """An http(s) URL with a host, of sane length; urlsplit raises on some malformed ones ("http://[")."""
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and len(url) <= MAX_URL_CHARS
    except ValueError:
        return False


async def create(
    services: Services, owner: str, quota: int, job: JobRequest, idempotency_key: str | None
) -> tuple[JobRecord, bool]:
    """(the job, whether it is an Idempotency-Key replay of an earlier request's job).

    Blocking work (Redis, storage, DNS, downloads, decodes) runs in the threadpool; downloads and decodes under
    their semaphores."""
    settings, store = services.settings, services.store
    if job.webhook_url is not None:
        await run_in_threadpool(
            check_public_url, job.webhook_url, settings, "webhook_url", settings.allow_private_webhooks
        )
    request_hash = await run_in_threadpool(job.digest)

    # the same Idempotency-Key with the same request returns the first job: claimed before any work
    job_id = new_job_id()
    if idempotency_key:
        replay = await _claim_or_replay(services, owner, idempotency_key, job_id, request_hash)
        if replay is not None:
            return replay, True
    claimed = False
    try:
        # one atomic check-and-claim: concurrent creates cannot all pass a separate count
        claimed = await run_in_threadpool(store.claim_slot, owner, job_id, quota)
        if not claimed:
            message = (
                f"at most {quota} jobs may be queued or running at once for this key (the service's "
                "SUPIR_MAX_ACTIVE_JOBS, or the key's max_active_jobs in SUPIR_API_KEYS)"
            )
            raise ApiError("quota_exceeded", message, headers={"Retry-After": "10"})
        declared: str | None
        if job.stage1_job is not None:
            job, image, declared = await _from_stage1(services, owner, job)
        elif job.image is not None:
            image, declared = job.image, job.declared_type
        else:
            assert job.image_url is not None  # _validated: one of the three
            async with services.fetches:
                image, declared = await run_in_threadpool(fetch_image, job.image_url, settings)
        image_sha256 = await run_in_threadpool(lambda: hashlib.sha256(image).hexdigest())
        hit = await run_in_threadpool(_answer_from_cache, services, owner, job, job_id, image_sha256, request_hash)
        if hit is not None:
            await run_in_threadpool(store.release_slot, owner, job_id)  # it ended at birth: no slot held
            claimed = False
        else:
            async with services.decodes:
                info = await run_in_threadpool(check_image, image, settings, job.params.upscale, declared)
            record = _record(job, job_id, owner, info, request_hash, image_sha256)
            # input first, record second, task last: a failure leaves no record pointing at a missing input
            await run_in_threadpool(services.objects.put, record.input_key, image, info.content_type)
            await run_in_threadpool(store.create, record)  # the record keeps the claimed slot
    except BaseException as exc:  # any failure, a cancelled request too, gives back the slot and the key
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(_undo_claims, store, owner, job_id, job_id if claimed else None, idempotency_key)
        if isinstance(exc, ApiError):
            metrics.REJECTED.labels(exc.code).inc()
        raise
    if idempotency_key:
        with contextlib.suppress(redis.RedisError):  # only informative: waiters look for the record itself
            await run_in_threadpool(store.confirm_idempotency_key, owner, idempotency_key, job_id, request_hash)
    if hit is not None:
        if hit.webhook is not None and hit.webhook.state == "pending":
            with contextlib.suppress(Exception):  # as for a job canceled while queued: the light worker posts it
                await run_in_threadpool(services.notify, job_id)
        return hit, False
    try:
        await run_in_threadpool(services.enqueue, job_id, record.variant)
    except Exception as exc:
        error = {"code": "queue_unavailable", "message": "the job queue is unavailable"}
        await run_in_threadpool(store.finish, job_id, "failed", error=error)  # ends it and frees its slot
        # the failed job stays visible, but its key is released: a retry with the key makes a new job
        await run_in_threadpool(_undo_claims, store, owner, job_id, None, idempotency_key)
        raise ApiError(
            "queue_unavailable", "the job queue is unavailable; try again", headers={"Retry-After": "5"}
        ) from exc
    metrics.JOBS_CREATED.inc()
    return record, False


async def _from_stage1(services: Services, owner: str, job: JobRequest) -> tuple[JobRequest, bytes, str]:
    """The preview job's photo, and the params with its processing size (a kept stage 1 fits only that size)."""
    assert job.stage1_job is not None
    source = await run_in_threadpool(services.store.get, job.stage1_job)
    if source is None or source.owner != owner:
        raise ApiError("not_found", f"no job {job.stage1_job[:80]}")
    if source.kind != "preview" or source.status != "succeeded":
        message = f"job {source.id} is no finished preview (a job created with preview: true that has succeeded)"
        raise ApiError("stage1_unavailable", message)
    for name in SIZE_PARAMS:
        if name in job.raw_params and job.raw_params[name] != source.params.get(name):
            message = f"{name} must be the stage-1 job's ({source.params.get(name)}): it fixes the processing size"
            raise ApiError("invalid_parameter", message, field=f"params.{name}")
    try:
        sizes = {n: source.params[n] for n in SIZE_PARAMS}
        raw = with_defaults({**job.raw_params, **sizes}, job.preset, services.settings.default_params)
        params = validate_params(raw, preset=job.preset)
    except InvalidInput as exc:
        raise ApiError(exc.code, exc.message, field=f"params.{exc.field}" if exc.field else None) from None
    if job.variant is not None and source.variant and job.variant != source.variant:
        message = f"variant must be the stage-1 job's ({source.variant}): stage 1 ran that variant's encoder"
        raise ApiError("invalid_parameter", message, field="variant")
    try:
        image = await run_in_threadpool(services.objects.get, source.input_key)
    except ObjectMissing:
        raise ApiError("stage1_unavailable", f"job {source.id}'s photo is past retention") from None
    variant = source.variant or services.settings.default_variant
    return replace(job, params=params, variant=variant), image, source.input_content_type


def _answer_from_cache(
    services: Services, owner: str, job: JobRequest, job_id: str, image_sha256: str, request_hash: str
) -> JobRecord | None:
    """A job born `succeeded` with copies of an earlier identical job's results (no GPU work), or None."""
    settings, store = services.settings, services.store
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
    if not cacheable(settings, probe):
        return None
    model = store.variant_info(probe.variant)  # what this variant's workers load (None before any has)
    if model is None:
        metrics.RESULT_CACHE.labels("miss").inc()
        return None
    key = record_key(settings, probe, model["model_id"])
    source_id = store.cached_job(key)
    source = store.get(source_id) if source_id else None
    if source is None or source.status != "succeeded" or not source.results:
        if source_id:
            store.forget_result(key, source_id)
        metrics.RESULT_CACHE.labels("miss").inc()
        return None
    try:
        results = [_copied(services, r, job_id, i) for i, r in enumerate(source.results)]
    except ObjectMissing:  # swept before its record expired: run it again
        store.forget_result(key, source.id)
        metrics.RESULT_CACHE.labels("miss").inc()
        return None
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
        }
    )
    store.create_finished(record)
    usage = UsageBook(store.r, store.p, store.retention_s)
    with contextlib.suppress(redis.RedisError):  # informative: the job itself is made
        usage.record(owner, images=len(results), gpu_seconds=0.0, cached=True)
    metrics.RESULT_CACHE.labels("hit").inc()
    return record


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
