"""One exception tree for everything the client raises:

    SupirError
    ├── TransportError            the service could not be reached (after the retries)
    ├── WaitTimeout               a job or batch did not end within the time given (.job / .batch: the last view)
    ├── JobEnded                  a job ended without results
    │   ├── JobFailed             status failed (.job.error says why)
    │   └── JobCanceled
    ├── WebhookError              a webhook that must not be trusted
    │   ├── InvalidSignature
    │   └── StaleWebhook          its timestamp is outside the tolerance (a replay, or a skewed clock)
    └── ApiError                  the service answered an error: .status, .code, .message, .field
        ├── BadRequest            400
        ├── Unauthorized          401
        ├── Forbidden             403
        ├── NotFound              404
        ├── Conflict              409 (IdempotencyConflict for idempotency_conflict / _in_progress)
        ├── Gone                  410 (JobDeleted: job_deleted; BatchDeleted: batch_deleted)
        ├── PayloadTooLarge       413
        ├── UnsupportedMediaType  415
        ├── InvalidParameter      422 (every 422 code: invalid_parameter, invalid_image, image_too_large, …)
        ├── RateLimited           429 (.retry_after; QuotaExceeded for quota_exceeded)
        └── ServerError           5xx (ServiceUnavailable for 503: storage_error, queue_unavailable, …)

`ApiError` is built from the service's error body, `{"error": {"code", "message", "field"}}`; the codes are the
service's stable ones (docs/service.md, Errors)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models import Batch, Job


class SupirError(Exception):
    """Everything this package raises."""


class TransportError(SupirError):
    """No answer from the service: connection refused or reset, or a timeout, on every try."""


class WaitTimeout(SupirError):
    def __init__(self, message: str, *, job: Job | None = None, batch: Batch | None = None) -> None:
        super().__init__(message)
        self.job, self.batch = job, batch


class JobEnded(SupirError):
    """A job that was waited for ended without results."""

    def __init__(self, job: Job) -> None:
        reason = f": {job.error.code}: {job.error.message}" if job.error else ""
        super().__init__(f"job {job.id} {job.status}{reason}")
        self.job = job


class JobFailed(JobEnded):
    pass


class JobCanceled(JobEnded):
    pass


class WebhookError(SupirError):
    pass


class InvalidSignature(WebhookError):
    pass


class StaleWebhook(WebhookError):
    pass


class ApiError(SupirError):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (field {field})" if field else ""))
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers: dict[str, str] = {k.lower(): v for k, v in (headers or {}).items()}


class BadRequest(ApiError):
    pass


class Unauthorized(ApiError):
    pass


class Forbidden(ApiError):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class IdempotencyConflict(Conflict):
    pass


class Gone(ApiError):
    pass


class JobDeleted(Gone):
    pass


class BatchDeleted(Gone):
    pass


class PayloadTooLarge(ApiError):
    pass


class UnsupportedMediaType(ApiError):
    pass


class InvalidParameter(ApiError):
    pass


class RateLimited(ApiError):
    def __init__(self, *args: Any, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class QuotaExceeded(RateLimited):
    pass


class ServerError(ApiError):
    pass


class ServiceUnavailable(ServerError):
    pass


BY_CODE: dict[str, type[ApiError]] = {
    "job_deleted": JobDeleted,
    "batch_deleted": BatchDeleted,
    "quota_exceeded": QuotaExceeded,
    "rate_limited": RateLimited,
    "idempotency_conflict": IdempotencyConflict,
    "idempotency_in_progress": IdempotencyConflict,
}
BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidParameter,
    429: RateLimited,
    503: ServiceUnavailable,
}


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait before the next try: `Retry-After` (seconds), else the `RateLimit` header's `t` (the
    seconds until the window resets, IETF httpapi-ratelimit-headers) when it says nothing is left (`r=0`)."""
    lower = {k.lower(): v for k, v in headers.items()}
    value = lower.get("retry-after", "").strip()
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            pass  # an HTTP date: servers of this service send seconds; fall back below
    limit = parse_ratelimit(lower.get("ratelimit", ""))
    if limit.get("r") == 0 and "t" in limit:
        return float(limit["t"])
    return None


def parse_ratelimit(header: str) -> dict[str, int]:
    """`"write";r=117;t=42` → {"r": 117, "t": 42} (the first policy's numeric parameters)."""
    values: dict[str, int] = {}
    for part in header.split(",")[0].split(";")[1:]:
        name, _, value = part.strip().partition("=")
        if value.strip().isdigit():
            values[name.strip()] = int(value)
    return values


def error_from_response(status: int, body: Any, headers: Mapping[str, str]) -> ApiError:
    """The typed error for an error answer; a body that is not the service's envelope (a proxy's page) still gives
    an ApiError with the status and a generic code."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        code, message = error["code"], str(error.get("message") or "")
        field = error.get("field") if isinstance(error.get("field"), str) else None
    else:
        code, message, field = ("server_error" if status >= 500 else "http_error"), f"HTTP {status}", None
    kind = BY_CODE.get(code) or BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    if issubclass(kind, RateLimited):
        return kind(status, code, message, field, headers, retry_after=retry_after_s(headers))
    return kind(status, code, message, field, headers)
