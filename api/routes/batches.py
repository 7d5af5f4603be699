"""`/v1/batches`: many photos in one request (api.batches), followed, canceled, erased and downloaded together."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .. import batches
from ..creation import idempotency_key_of
from ..deps import CallerDep, ServicesDep
from ..errors import ApiError
from ..models import Batch, BatchCreate, BatchUpload, JobList, body_schema
from ..openapi import IMAGE_MEDIA_TYPES, binary_content, errors
from .jobs import labelled

router = APIRouter(prefix="/v1/batches", tags=["batches"])
CREATE_BATCH_DOCS: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": body_schema(BatchCreate)},
            "multipart/form-data": {
                "schema": body_schema(BatchUpload),
                "encoding": {
                    "images": {"contentType": IMAGE_MEDIA_TYPES},
                    "params": {"contentType": "application/json"},
                    "items": {"contentType": "application/json"},
                },
            },
        },
    }
}


@router.post(
    "",
    status_code=201,
    operation_id="createBatch",
    response_model=Batch,
    responses={
        200: {"model": Batch, "description": "an Idempotency-Key replay: the batch that key made"},
        **errors(400, 401, 403, 404, 409, 410, 413, 415, 422, 429, 503),
    },
    openapi_extra=CREATE_BATCH_DOCS,
)
async def create_batch(request: Request, caller: CallerDep, services: ServicesDep) -> JSONResponse:
    """Queue one job per photo: JSON `items` (each an `upload_id` or `image_url`, with optional `params` and
    `preset` over the shared ones), or multipart `images` files. Every photo is checked before anything is
    queued; an item at fault refuses the whole batch and names it (`field`: `items[3].upload_id`)."""
    idempotency_key = idempotency_key_of(request)
    batch_request, form = await batches.read_batch_request(request, services.settings)
    try:
        batch, replayed = await batches.create_batch(
            services, caller.id, caller.share_weight, batch_request, idempotency_key
        )
    finally:
        if form is not None:
            await form.close()
    view = await run_in_threadpool(batches.batch_view, services, batch)
    headers = {"Location": f"/v1/batches/{batch.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(view, status_code=200 if replayed else 201, headers=headers)


@router.get("/{batch_id}", operation_id="getBatch", response_model=Batch, responses=errors(401, 404, 410, 429, 503))
def get_batch(batch_id: str, caller: CallerDep, services: ServicesDep) -> dict[str, Any]:
    """Counts by status, progress, and the expected end while it runs."""
    return batches.batch_view(services, batches.owned_batch(services, caller.id, batch_id))


@router.get(
    "/{batch_id}/jobs",
    operation_id="listBatchJobs",
    response_model=JobList,
    responses=errors(400, 401, 404, 410, 429, 503),
)
def list_batch_jobs(
    batch_id: str,
    caller: CallerDep,
    services: ServicesDep,
    status: str | None = Query(None, pattern="^(queued|running|succeeded|failed|canceled)$"),
    limit: int = Query(20, ge=1, le=100),
    cursor: int = Query(0, ge=0, le=10**6),
) -> dict[str, Any]:
    """The batch's jobs in the order of its items (of one status, with `status`)."""
    batch = batches.owned_batch(services, caller.id, batch_id)
    found: list[dict[str, Any]] = []
    position = cursor
    while position < len(batch.job_ids) and len(found) < limit:
        chunk = batch.job_ids[position : position + 2 * limit]
        for record in batches.batch_records_of(services, chunk):
            position += 1
            if record is not None and (status is None or record.status == status):
                found.append(services.view(record))
                if len(found) == limit:
                    break
    return {"jobs": found, "next_cursor": position if position < len(batch.job_ids) else None}


@router.post(
    "/{batch_id}/cancel", operation_id="cancelBatch", response_model=Batch, responses=errors(401, 404, 410, 429, 503)
)
def cancel_batch(batch_id: str, caller: CallerDep, services: ServicesDep) -> dict[str, Any]:
    """Queued jobs end canceled at once; running ones stop before their next sampler step. Ended jobs keep
    their results. The batch's webhook follows once its last job has ended."""
    batch = batches.owned_batch(services, caller.id, batch_id)
    batches.cancel_batch(services, batch)
    return batches.batch_view(services, batch)


@router.delete(
    "/{batch_id}",
    operation_id="deleteBatch",
    status_code=204,
    response_class=Response,
    responses={
        204: {"description": "erased: every job of the batch and the batch itself"},
        **errors(401, 404, 429, 503),
    },
)
def delete_batch(batch_id: str, caller: CallerDep, services: ServicesDep) -> Response:
    """Erase every job of the batch now (photos, results, thumbnails, stage 1, records), as `DELETE
    /v1/jobs/{id}` does each, then the batch: its reads answer `410 batch_deleted`. A second DELETE answers the
    same."""
    try:
        batch = batches.owned_batch(services, caller.id, batch_id)
    except ApiError as exc:
        if exc.code == "batch_deleted":
            return Response(status_code=204)
        raise
    batches.delete_batch(services, batch)
    return Response(status_code=204)


@router.get(
    "/{batch_id}/results.zip",
    operation_id="getBatchResults",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "every succeeded job's results (`0007-job_….png`: the item's index, the job, the "
            "sample) and manifest.json (every job's status and error), streamed as it is made",
            "content": binary_content("application/zip"),
        },
        **errors(401, 404, 410, 429, 503),
    },
)
def batch_results(batch_id: str, request: Request, caller: CallerDep, services: ServicesDep) -> StreamingResponse:
    """The zip holds what has succeeded so far; ask again after the batch ends for all of it."""
    batch = batches.owned_batch(services, caller.id, batch_id)
    disposition = f'attachment; filename="{batch.id}.zip"'
    media_type = labelled(request, "application/zip")  # application/octet-stream to a client that asks for bytes
    return StreamingResponse(
        batches.zip_stream(services, batch), media_type=media_type, headers={"Content-Disposition": disposition}
    )
