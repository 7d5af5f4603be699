"""Every API error is JSON `{"error": {"code", "message", "field"}}` with a stable code; mapped in one place."""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from jobs.storage import StorageError
from supir_core.errors import InvalidInput, SupirError

log = logging.getLogger("api.errors")
QUEUE_FULL_RETRY_S = 30
QUEUE_FULL_MESSAGE = "the service holds as many jobs as it has room for (Redis memory); try again later"

# code → HTTP status. Codes are part of the API: never rename one.
STATUS: dict[str, int] = {
    "invalid_request": 400,
    "invalid_json": 400,
    "missing_image": 400,
    "conflicting_image_sources": 400,
    "invalid_url": 400,
    "invalid_webhook_url": 400,
    "unauthorized": 401,
    "url_forbidden": 403,
    "invalid_signature": 403,
    "upload_expired": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "job_not_cancelable": 409,
    "result_not_ready": 409,
    "stage1_unavailable": 409,
    "idempotency_conflict": 409,
    "idempotency_in_progress": 409,
    "upload_incomplete": 409,
    "upload_used": 409,
    "job_deleted": 410,
    "batch_deleted": 410,
    "file_too_large": 413,
    "url_too_large": 413,
    "unsupported_media_type": 415,
    "invalid_image": 422,
    "image_too_large": 422,
    "output_too_large": 422,
    "decompression_bomb": 422,
    "image_too_small": 422,
    "invalid_parameter": 422,
    "variant_unavailable": 422,
    "too_many_items": 422,
    "unknown_parameter": 422,
    "url_fetch_failed": 422,
    "rate_limited": 429,
    "quota_exceeded": 429,
    "storage_error": 503,
    "queue_unavailable": 503,
    "shutting_down": 503,
    "queue_full": 503,
    "internal_error": 500,
}


class ApiError(Exception):
    def __init__(self, code: str, message: str, *, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.message, self.field, self.headers = code, message, field, headers
        self.status = STATUS[code]


def error_response(
    code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "field": field}}
    if STATUS[code] == 429 and "Retry-After" not in (headers or {}):  # every 429 says when to come back
        headers = {**(headers or {}), "Retry-After": "60"}
    return JSONResponse(body, status_code=STATUS[code], headers=headers)


def queue_full() -> JSONResponse:
    """Redis is (nearly) full: it frees memory as ended jobs pass their retention, so come back later."""
    return error_response("queue_full", QUEUE_FULL_MESSAGE, headers={"Retry-After": str(QUEUE_FULL_RETRY_S)})


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(InvalidInput)
    async def _invalid(request: Request, exc: InvalidInput) -> JSONResponse:
        code = exc.code if exc.code in STATUS else "invalid_parameter"
        return error_response(code, exc.message, exc.field)

    @app.exception_handler(StorageError)
    async def _storage(request: Request, exc: StorageError) -> JSONResponse:
        return error_response(
            "storage_error", "the object store is unavailable; try again", headers={"Retry-After": "5"}
        )

    @app.exception_handler(redis.RedisError)
    async def _redis(request: Request, exc: redis.RedisError) -> JSONResponse:
        if isinstance(exc, redis.OutOfMemoryError):  # noeviction at maxmemory: Redis refuses writes until it frees
            return queue_full()
        # Redis holds the records, the queue and the limits: without it no route can answer, but it comes back
        return error_response(
            "queue_unavailable", "the job queue is unavailable; try again", headers={"Retry-After": "5"}
        )

    # From here on, messages are fixed strings: an unexpected exception's text can carry paths, bucket names
    # or object reprs, and belongs in the logs only.
    @app.exception_handler(SupirError)
    async def _supir(request: Request, exc: SupirError) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response("internal_error", "internal error; the request id is in the logs")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first["loc"][1:]) or None
        return error_response("invalid_request", str(first["msg"]), field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return error_response(code, message, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response("internal_error", "internal error; the request id is in the logs")


def _allowed_methods(request: Request) -> str:
    """A 405's Allow header (RFC 9110): every method some route on the path takes. Starlette's own names only
    the first route that matched the path (`/v1/jobs` has a GET and a POST route); each method is asked of the
    router's public `matches`, so included routers count too."""
    allowed = [
        method
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL for route in request.app.router.routes
        )
    ]
    return ", ".join(allowed)
