"""`/v1/uploads`: direct uploads. `POST` answers where to send a photo's bytes (an S3 presigned POST, or with local
storage a signed `PUT` on this API that streams to the store); a job then names the upload by id (`upload_id`),
and its intake checks run on the stored object (api.creation). Each upload makes one job (jobs.uploads)."""

from __future__ import annotations

import hmac
import time
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from jobs.record import rfc3339
from jobs.storage import LocalStore, S3Store, sign
from jobs.uploads import Upload, UploadBook

from ..creation import _json_object
from ..deps import CallerDep, ServicesDep
from ..errors import ApiError
from ..models import UPLOAD_TYPES, UploadRequest, UploadTarget, body_schema
from ..openapi import errors
from ..services import Services

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])
CREATE_UPLOAD_DOCS: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": body_schema(UploadRequest)}}}
}


def upload_signature(secret: str, upload: Upload, expires: int) -> str:
    """Over the id, the exact size and the type: a URL signed for one upload fits no other size or type."""
    return sign(secret, f"upload\n{upload.id}\n{upload.size}\n{upload.content_type}", expires)


@router.post(
    "",
    status_code=201,
    operation_id="createUpload",
    response_model=UploadTarget,
    responses=errors(400, 401, 413, 415, 422, 429, 503),
    openapi_extra=CREATE_UPLOAD_DOCS,
)
async def create_upload(request: Request, caller: CallerDep, services: ServicesDep) -> dict[str, Any]:
    """Where to send a photo of this type and exact size, before `expires_at`; then create the job with JSON
    `{"upload_id": …}`. An upload no job uses is erased after the service's SUPIR_UPLOAD_RETENTION_S."""
    wanted = _upload_request(_json_object(await request.body()), services)
    return await run_in_threadpool(_target, services, caller.id, wanted)


def _upload_request(fields: dict[str, Any], services: Services) -> UploadRequest:
    try:
        wanted = UploadRequest.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else ""
        if error["type"] == "extra_forbidden":
            raise ApiError("invalid_request", f"unknown field {name!r}", field=name) from None
        if name == "content_type" and error["type"] == "literal_error":
            message = f"content_type must be one of {', '.join(UPLOAD_TYPES)}"
            raise ApiError("unsupported_media_type", message, field=name) from None
        if name == "expires_after":
            message = "expires_after must be a whole number of seconds, at least 1"
            raise ApiError("invalid_parameter", message, field=name) from None
        message = "size must be a whole number of bytes, at least 1" if name == "size" else f"{name}: {error['msg']}"
        raise ApiError("invalid_request", message, field=name or None) from None
    longest = services.settings.upload_retention_s
    if wanted.expires_after is not None and wanted.expires_after > longest:
        message = f"expires_after={wanted.expires_after}: at most {longest} seconds (SUPIR_UPLOAD_RETENTION_S)"
        raise ApiError("invalid_parameter", message, field="expires_after")
    limit = services.settings.max_upload_bytes
    if wanted.size > limit:
        message = f"size {wanted.size:,}: at most {limit:,} bytes are accepted (SUPIR_MAX_UPLOAD_BYTES)"
        raise ApiError("file_too_large", message, field="size")
    return wanted


def _target(services: Services, owner: str, wanted: UploadRequest) -> dict[str, Any]:
    settings, objects = services.settings, services.objects
    keep_s = wanted.expires_after or settings.upload_retention_s
    expires_s = min(settings.upload_url_expires_s, keep_s)  # no bytes taken after the upload is to be erased
    upload = UploadBook(services.store.r, services.store.p).create(
        owner, wanted.size, wanted.content_type, expires_s, keep_s
    )
    expires = int(upload.expires_at)
    view = {
        "id": upload.id,
        "content_type": upload.content_type,
        "size": upload.size,
        "expires_at": rfc3339(expires),
        "kept_until": rfc3339(upload.created_at + keep_s),
    }
    if isinstance(objects, S3Store):  # S3 itself refuses another size, another type or a late upload
        post = objects.presigned_post(upload.key, upload.content_type, upload.size, expires_s)
        return {**view, "method": "POST", "url": post["url"], "fields": post["fields"], "headers": {}}
    secret = settings.signing_secret.get_secret_value()
    query = urlencode({"expires": expires, "signature": upload_signature(secret, upload, expires)})
    url = f"{settings.public_url.rstrip('/')}/v1/uploads/{upload.id}?{query}"
    return {**view, "method": "PUT", "url": url, "fields": {}, "headers": {"Content-Type": upload.content_type}}


# Not in the OpenAPI document: clients call the URL `POST /v1/uploads` answered, signed, with no key.
@router.put("/{upload_id}", include_in_schema=False)
async def receive_upload(
    upload_id: str, request: Request, services: ServicesDep, expires: int = Query(), signature: str = Query()
) -> dict[str, Any]:
    """Local storage: the body streamed to the store in chunks, never held whole; exactly the signed size and
    type, before the signed expiry."""
    objects = services.objects
    book = UploadBook(services.store.r, services.store.p)
    upload = await run_in_threadpool(book.get, upload_id)
    if upload is None or not isinstance(objects, LocalStore):
        raise ApiError("not_found", "no such upload, or it has expired")
    expected = upload_signature(services.settings.signing_secret.get_secret_value(), upload, expires)
    if not hmac.compare_digest(expected, signature):
        raise ApiError("invalid_signature", "the upload URL's signature does not match it", field="signature")
    if expires < time.time():
        raise ApiError("upload_expired", "the upload URL has expired; ask POST /v1/uploads for a new one")
    sent_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if sent_type != upload.content_type:
        message = f"this URL takes {upload.content_type}, not {sent_type or 'a body without Content-Type'}"
        raise ApiError("unsupported_media_type", message, field="Content-Type")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > upload.size:
        raise ApiError("file_too_large", _too_long(upload), field="Content-Length")
    if upload.used_by is not None:
        raise ApiError("upload_used", f"upload {upload.id} was already used by a job")
    received = 0
    with objects.writing(upload.key) as file:
        async for chunk in request.stream():
            received += len(chunk)
            if received > upload.size:  # leaving the block by an error removes what was written
                raise ApiError("file_too_large", _too_long(upload))
            await run_in_threadpool(file.write, chunk)
        if received < upload.size:
            message = f"the body ended after {received:,} of the {upload.size:,} bytes signed for"
            raise ApiError("upload_incomplete", message)
    return {"id": upload.id, "size": received, "content_type": upload.content_type}


def _too_long(upload: Upload) -> str:
    return f"this URL takes exactly {upload.size:,} bytes"
