"""The OpenAPI document as clients need it: every error declared as the one `Error` envelope the API sends,
a bearer security scheme, and none of FastAPI's default `422 HTTPValidationError` entries (this API answers
request-validation failures with `400 invalid_request`)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .models import Error

# createJob's `image` part: the media types the API reads (api.intake.sniff), declared in the multipart encoding
# so that clients and generators (schemathesis) send images, not arbitrary bytes the API must refuse with 415
IMAGE_MEDIA_TYPES = "image/png, image/jpeg, image/webp, image/tiff, image/bmp, image/gif"
# createJob's image_url and webhook_url: what api.app._http_url accepts (other strings get 400 invalid_url)
HTTP_URL = {"format": "uri", "pattern": "^https?://[^/?#]"}
PUBLIC = ("/healthz", "/readyz", "/metrics")  # no key needed
REASONS = {
    400: "a malformed request (codes: invalid_request, invalid_json, missing_image, invalid_url, …)",
    401: "no key, or an unknown one (unauthorized)",
    403: "an image_url or webhook_url to a private address (url_forbidden)",
    404: "no such job for this key (not_found)",
    408: "the request body stalled (request_timeout)",
    409: "conflict (idempotency_conflict, idempotency_in_progress, job_not_cancelable, result_not_ready)",
    413: "the upload or body is too large (file_too_large, url_too_large)",
    415: "not an image format the service reads (unsupported_media_type)",
    422: "the image or a parameter is unusable (invalid_image, invalid_parameter, image_too_large, …)",
    429: "over a rate limit or the active-job quota (rate_limited, quota_exceeded); see Retry-After",
    503: "Redis or storage unavailable (queue_unavailable, storage_error); see Retry-After",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for a route: each status answered with the Error envelope."""
    return {status: {"model": Error, "description": REASONS[status]} for status in statuses}


def install(app: FastAPI) -> None:
    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes, tags=None
            )
            _tidy(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]


def _tidy(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key: `Authorization: Bearer sk_…`",
    }
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.get("responses", {})
            default_422 = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if default_422.get("$ref", "").endswith("/HTTPValidationError"):
                del responses["422"]
            if not path.startswith(PUBLIC):
                operation["security"] = [{"bearer": []}]
    _declare_create_body(schema)
    for unused in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(unused, None)


def _declare_create_body(schema: dict[str, Any]) -> None:
    """The createJob body is documented in api.app (CREATE_DOCS, moving to api.models); amended here, so the
    document states which media types the `image` part may have, which strings the URL fields accept, and that
    other fields are refused (400 invalid_request: api.app.ALLOWED_FIELDS).
    New dicts throughout: the ones FastAPI copied in may be api.app's module-level constants."""
    create = schema.get("paths", {}).get("/v1/jobs", {}).get("post", {})
    content = create.get("requestBody", {}).get("content", {})
    multipart = content.get("multipart/form-data")
    if multipart is not None:
        multipart["encoding"] = {**multipart.get("encoding", {}), "image": {"contentType": IMAGE_MEDIA_TYPES}}
    for body in content.values():
        body["schema"] = {**body.get("schema", {}), "additionalProperties": False}
        properties = body["schema"].get("properties", {})
        for name in ("image_url", "webhook_url"):
            if name in properties:
                properties[name] = {**properties[name], **HTTP_URL}
    json_properties = content.get("application/json", {}).get("schema", {}).get("properties", {})
    if "webhook_url" in json_properties:  # JSON null is taken as no webhook
        json_properties["webhook_url"] = {**json_properties["webhook_url"], "type": ["string", "null"]}
    # RestoreParams' validator wants tile sizes in multiples of 8 (stride ≤ size has no JSON Schema spelling)
    restore = schema.get("components", {}).get("schemas", {}).get("RestoreParams", {}).get("properties", {})
    for name in ("tile_size", "tile_stride"):
        if name in restore:
            restore[name] = {**restore[name], "multipleOf": 8}
