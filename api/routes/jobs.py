"""`/v1/jobs`: create, list, read, cancel, follow (Server-Sent Events) and download restoration jobs."""

from __future__ import annotations

import io
import logging
import re
import time
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from PIL import Image
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from jobs.record import JobRecord, JobResult, thumbnail_key
from jobs.retention import erase, erase_objects
from jobs.storage import LocalStore, ObjectMissing
from supir_core.formats import OUTPUT_FORMATS
from supir_core.params import MAX_SAMPLES

from .. import events
from ..creation import create, idempotency_key_of, read_job_request
from ..deps import CallerDep, OwnedJobDep, ServicesDep, StreamsDep, missing_job
from ..errors import ApiError
from ..models import Job, JobList
from ..openapi import CREATE_JOB_DOCS, FROM_PREVIEW_DOCS, OCTET_STREAM, binary_content, errors
from ..services import RESULT_URL_TTL_S, results_of

log = logging.getLogger("api.jobs")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
RESULT_MEDIA_TYPES = tuple(f.media_type for f in OUTPUT_FORMATS.values())
SAMPLE_INDEX = Query(0, ge=0, le=MAX_SAMPLES - 1, description="which sample (0: the first)")
PREFER_WAIT = re.compile(r"(?:^|[,;])\s*wait\s*=\s*(\d{1,6})\s*(?=$|[,;])", re.IGNORECASE)


def preferred_wait(request: Request, limit_s: float) -> float:
    """Seconds asked for with `Prefer: wait=N` (RFC 7240), capped; 0 when absent or unreadable (a preference
    the server cannot honour is ignored, never an error)."""
    match = PREFER_WAIT.search(request.headers.get("prefer", ""))
    return min(float(match.group(1)), limit_s) if match else 0.0


def created(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route that makes a job: 202 (the route's own), 200, and these errors."""
    ended = {"model": Job, "description": "the job ended within `Prefer: wait`, or an Idempotency-Key replay"}
    return {200: ended, **errors(*statuses)}


@router.post(
    "",
    status_code=202,
    operation_id="createJob",
    response_model=Job,
    responses=created(400, 401, 403, 404, 408, 409, 410, 413, 415, 422, 429, 503),
    openapi_extra=CREATE_JOB_DOCS,
)
async def create_job(request: Request, caller: CallerDep, services: ServicesDep, streams: StreamsDep) -> JSONResponse:
    """Queue a restoration: multipart (`image`, `params` JSON, `preset`, `preview`, `webhook_url`,
    `webhook_events`) or JSON with `image_url` or `upload_id` (a direct upload, `POST /v1/uploads`). With `preview`,
    only stage 1 and its caption run."""
    return await _create(request, caller, services, streams)


@router.post(
    "/{job_id}/restore",
    status_code=202,
    operation_id="restoreFromPreview",
    response_model=Job,
    responses=created(400, 401, 403, 404, 408, 409, 410, 413, 415, 422, 429, 503),
    openapi_extra=FROM_PREVIEW_DOCS,
)
async def restore_from_preview(
    job_id: str, request: Request, caller: CallerDep, services: ServicesDep, streams: StreamsDep
) -> JSONResponse:
    """The official demo's second step: restore a finished preview's photo from its stage 1 (not run again), with
    the caption corrected in `params.prompt` (and `params.caption: none`). Sizes are the preview's."""
    return await _create(request, caller, services, streams, stage1_job=job_id)


async def _create(
    request: Request, caller: CallerDep, services: ServicesDep, streams: StreamsDep, stage1_job: str | None = None
) -> JSONResponse:
    idempotency_key = idempotency_key_of(request)
    job = await read_job_request(request, services.settings, stage1_job)
    record, replayed = await create(
        services, caller.id, caller.max_active_jobs, job, idempotency_key, caller.share_weight
    )
    headers = {"Location": f"/v1/jobs/{record.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    wait_s = preferred_wait(request, services.settings.max_prefer_wait_s)
    if wait_s > 0 and not record.terminal:
        ended = await streams.wait_for_end(record.id, caller.id, wait_s)
        if ended is not None:
            record = ended
            headers["Preference-Applied"] = f"wait={int(wait_s)}"
    view = await run_in_threadpool(services.view, record)
    return JSONResponse(view, status_code=200 if replayed or record.terminal else 202, headers=headers)


@router.get("", operation_id="listJobs", response_model=JobList, responses=errors(400, 401, 429, 503))
def list_jobs(
    caller: CallerDep,
    services: ServicesDep,
    status: str | None = Query(None, pattern="^(queued|running|succeeded|failed|canceled)$"),
    limit: int = Query(20, ge=1, le=100),
    cursor: int = Query(0, ge=0, le=10**9),  # Redis ranges are 64-bit; a huge cursor would be a 500
) -> dict[str, Any]:
    page, next_cursor = services.store.list_jobs(caller.id, status, cursor, limit)
    return {"jobs": [services.view(r) for r in page], "next_cursor": next_cursor}


@router.get("/{job_id}", operation_id="getJob", response_model=Job, responses=errors(401, 404, 410, 429, 503))
def get_job(job: OwnedJobDep, services: ServicesDep) -> dict[str, Any]:
    return services.view(job)


@router.delete(
    "/{job_id}",
    operation_id="deleteJob",
    status_code=204,
    response_class=Response,
    responses={
        204: {"description": "erased (or erased already): the job's reads now answer 410 job_deleted"},
        **errors(401, 404, 429, 503),
    },
)
def delete_job(job_id: str, caller: CallerDep, services: ServicesDep) -> Response:
    """Erase the job now: its photo, results, thumbnails and stage-1 files, and its record. A queued or running job
    is canceled first (a run stops before its next step and writes nothing more); no webhook follows. Its reads
    answer `410 job_deleted` for the retention window. Idempotent: a second DELETE answers the same."""
    store = services.store
    record = store.get(job_id)
    if record is None or record.owner != caller.id:
        error = missing_job(store, job_id, caller.id)
        if error.code != "job_deleted":
            raise error
        erase_objects(services.objects, job_id)  # erased already: again, in case that erase was cut short
    else:
        erase(store, services.objects, record, "deleted")
    return Response(status_code=204)


@router.post(
    "/{job_id}/cancel", operation_id="cancelJob", response_model=Job, responses=errors(401, 404, 409, 410, 429, 503)
)
def cancel_job(job: OwnedJobDep, services: ServicesDep) -> dict[str, Any]:
    """Queued jobs end at once; running ones stop before their next sampler step."""
    if job.terminal:
        raise ApiError("job_not_cancelable", f"job {job.id} has already {job.status}")
    store = services.store
    store.request_cancel(job.id)
    if job.status == "queued":

        def end_if_queued(r: JobRecord) -> JobRecord | None:
            if r.status != "queued":
                return None  # a worker took it meanwhile: it stops at its next step
            return r.model_copy(update={"status": "canceled", "finished_at": time.time()})

        ended = store.update(job.id, end_if_queued)
        if ended is not None and ended.webhook is not None and ended.webhook.state == "pending":
            # now, not when a GPU worker reaches the job's queued task (its safety net, if this send is lost)
            try:
                services.notify(job.id)
            except Exception:
                log.warning("job %s: its webhook could not be queued; the worker sends it later", job.id)
    return services.view(store.get(job.id) or job)


@router.get(
    "/{job_id}/events",
    operation_id="streamJobEvents",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-Sent Events: `event: job`, `id: <version>`, `data: <Job as JSON>`",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **errors(401, 404, 410, 429, 503),
    },
)
async def job_events(job: OwnedJobDep, request: Request, services: ServicesDep, streams: StreamsDep) -> Response:
    """Server-Sent Events: the job after every change, until it ends; `id:` is the job's version, and
    `Last-Event-ID` resumes after it. See api.events."""
    last_seen = events.parse_last_event_id(request.headers.get("last-event-id"))
    return streams.response(job.id, job.owner, last_seen, services.view)


@router.get(
    "/{job_id}/result",
    operation_id="getJobResult",
    response_class=Response,
    responses={
        200: {
            "description": "the restored image (params.output_format)",
            "content": binary_content(*RESULT_MEDIA_TYPES),
        },
        307: {"description": "a redirect to a presigned URL of the image (S3 storage)"},
        **errors(400, 401, 404, 409, 410, 422, 429, 503),
    },
)
def job_result(job: OwnedJobDep, services: ServicesDep, request: Request, index: int = SAMPLE_INDEX) -> Response:
    """One sample's image (`index`, 0 = the first; `params.num_samples` of them)."""
    result = _sample(job, index)
    # zero retention: served here, whatever the storage, so the service knows the bytes went out; then erased
    delivered = _delivered(services, job, index) if services.settings.delete_after_delivery else None
    if isinstance(services.objects, LocalStore) or delivered is not None:
        data = _read(services, job, result.key)
        return Response(data, media_type=labelled(request, result.content_type), background=delivered)
    return RedirectResponse(services.objects.url(result.key, RESULT_URL_TTL_S), status_code=307)


def _read(services: ServicesDep, job: JobRecord, key: str) -> bytes:
    """One of the job's objects; 410 when the job was erased since its record was read."""
    try:
        return services.objects.get(key)
    except ObjectMissing:
        error = missing_job(services.store, job.id, job.owner)
        if error.code == "job_deleted":
            raise error from None
        raise


def _delivered(services: ServicesDep, job: JobRecord, index: int) -> BackgroundTask | None:
    """SUPIR_DELETE_AFTER_DELIVERY: once this response is sent, count the sample delivered; the last of a
    restoration's samples erases the job. A preview is kept (its restore needs its photo and stage 1)."""
    if job.kind != "restore":
        return None

    def after_sending() -> None:
        if services.store.mark_delivered(job.id, index) >= len(results_of(job)):
            erase(services.store, services.objects, job, "delivered")

    return BackgroundTask(after_sending)


def _sample(job: JobRecord, index: int) -> JobResult:
    results = results_of(job) if job.status == "succeeded" else []
    if not results:
        raise ApiError("result_not_ready", f"job {job.id} is {job.status}; a result exists only when it has succeeded")
    if index >= len(results):
        message = f"index={index}: job {job.id} has {len(results)} result(s), numbered from 0"
        raise ApiError("invalid_parameter", message, field="index")
    return results[index]


@router.get(
    "/{job_id}/thumbnail",
    operation_id="getJobThumbnail",
    response_class=Response,
    responses={
        200: {
            "description": "a JPEG of the result, its longer side `size` pixels (made once, then kept)",
            "content": binary_content("image/jpeg"),
        },
        **errors(400, 401, 404, 409, 410, 422, 429, 503),
    },
)
async def job_thumbnail(
    job: OwnedJobDep,
    services: ServicesDep,
    request: Request,
    size: int = Query(256, ge=32, le=1024),
    index: int = SAMPLE_INDEX,
) -> Response:
    """A small picture of a result for lists (the web page's history), instead of the full image."""
    sample = _sample(job, index)
    key = thumbnail_key(job.id, size, index)
    try:
        data = await run_in_threadpool(services.objects.get, key)
    except ObjectMissing:  # the first request for this size makes it: one decode, bounded like the API's others
        result = await run_in_threadpool(_read, services, job, sample.key)
        async with services.decodes:
            data = await run_in_threadpool(_thumbnail, result, size)
        await run_in_threadpool(_keep, services, job, key, data)
    headers = {"Cache-Control": "private, max-age=3600", "Vary": "Accept"}
    return Response(data, media_type=labelled(request, "image/jpeg"), headers=headers)


def _keep(services: ServicesDep, job: JobRecord, key: str, data: bytes) -> None:
    """Store a thumbnail, unless the job was erased meanwhile (the tombstone comes before the erase, so a put that
    raced it is found here and removed): then 410."""
    services.objects.put(key, data, "image/jpeg")
    if services.store.tombstone(job.id) is not None:
        erase_objects(services.objects, job.id)
        raise missing_job(services.store, job.id, job.owner)


def labelled(request: Request, media_type: str) -> str:
    """The image's own media type, or application/octet-stream where Accept asks for bytes and for no image."""
    accepted = {part.split(";")[0].strip().lower() for part in request.headers.get("accept", "").split(",")}
    wants_image = bool(accepted & {media_type, "image/*", "*/*"})
    return OCTET_STREAM if OCTET_STREAM in accepted and not wants_image else media_type


def _thumbnail(image: bytes, size: int) -> bytes:
    """The result scaled to fit size×size, on white where it was transparent, as a JPEG."""
    with Image.open(io.BytesIO(image)) as source:
        source.thumbnail((size, size), Image.Resampling.LANCZOS)
        rgba = source.convert("RGBA")
    flat = Image.new("RGB", rgba.size, (255, 255, 255))
    flat.paste(rgba, mask=rgba.getchannel("A"))
    out = io.BytesIO()
    flat.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue()
