"""A typed client for supir-serve: `Client(url, key).restore("photo.jpg").save("out/")`. Depends on httpx only."""

from .client import (
    BatchResult,
    BatchSample,
    Client,
    Restoration,
    __version__,
    image_files,
    sniff_content_type,
)
from .errors import (
    ApiError,
    BadRequest,
    BatchDeleted,
    Conflict,
    Forbidden,
    Gone,
    IdempotencyConflict,
    InvalidParameter,
    InvalidSignature,
    JobCanceled,
    JobDeleted,
    JobEnded,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    StaleWebhook,
    SupirError,
    TransportError,
    Unauthorized,
    UnsupportedMediaType,
    WaitTimeout,
    WebhookError,
)
from .models import Batch, BatchCounts, Estimate, Job, JobError, JobList, Progress, ResultImage, UploadTarget, Usage

__all__ = [
    "ApiError", "BadRequest", "Batch", "BatchCounts", "BatchDeleted", "BatchResult", "BatchSample", "Client",
    "Conflict", "Estimate", "Forbidden", "Gone", "IdempotencyConflict", "InvalidParameter", "InvalidSignature",
    "Job", "JobCanceled", "JobDeleted", "JobEnded", "JobError", "JobFailed", "JobList", "NotFound",
    "PayloadTooLarge", "Progress", "QuotaExceeded", "RateLimited", "Restoration", "ResultImage", "ServerError",
    "ServiceUnavailable", "StaleWebhook", "SupirError", "TransportError", "Unauthorized", "UnsupportedMediaType",
    "UploadTarget", "Usage", "WaitTimeout", "WebhookError", "__version__", "image_files", "sniff_content_type",
]  # fmt: skip
