"""The OpenAPI document as clients need it: every error declared as the one `Error` envelope the API sends,
a bearer security scheme, and none of FastAPI's default `422 HTTPValidationError` entries (this API answers
request-validation failures with `400 invalid_request`)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from supir_core.params import PRESETS

from .models import (
    Error,
    EstimateFromUpload,
    EstimateRequest,
    JobFromUpload,
    JobFromUrl,
    JobUpload,
    RestoreFromPreview,
    body_schema,
)

PUBLIC = ("/healthz", "/readyz", "/status", "/metrics", "/v1/service")  # no key needed
REASONS = {
    400: "a malformed request (codes: invalid_request, invalid_json, missing_image, invalid_url, …)",
    401: "no key, or an unknown one (unauthorized)",
    403: "an image_url or webhook_url to a private address (url_forbidden); an upload URL whose signature is "
    "forged (invalid_signature) or past its expires_at (upload_expired)",
    404: "no such job or upload for this key (not_found)",
    408: "the request body stalled (request_timeout)",
    409: "a conflict (idempotency_conflict, idempotency_in_progress, job_not_cancelable, result_not_ready, "
    "stage1_unavailable, upload_incomplete, upload_used)",
    410: "the job was erased: deleted by its owner, or after delivery; or the Idempotency-Key's job was (job_deleted)",
    413: "the upload or body is too large (file_too_large, url_too_large)",
    415: "not an image format the service reads (unsupported_media_type)",
    422: "the image or a parameter is unusable (invalid_image, invalid_parameter, image_too_large, "
    "variant_unavailable, …)",
    429: "over a rate limit or the active-job quota (rate_limited, quota_exceeded); see Retry-After",
    503: "Redis or storage unavailable, or Redis too full for new jobs (queue_unavailable, storage_error, "
    "queue_full); see Retry-After",
}


OCTET_STREAM = "application/octet-stream"
# the per-key limiter's headers (api.ratelimit), on every answer to a keyed request that got past authentication
RATE_LIMIT_HEADERS: dict[str, Any] = {
    "RateLimit-Policy": {
        "description": 'the policy this request was counted against (IETF draft httpapi-ratelimit-headers): `"read";'
        'q=1200;w=60` (GET) or `"write";q=120;w=60`: q requests per w seconds for this key',
        "required": False,
        "schema": {"type": "string"},
    },
    "RateLimit": {
        "description": 'what is left of that policy: `"read";r=1187;t=42`: r requests in the next t seconds',
        "required": False,
        "schema": {"type": "string"},
    },
}
RETRY_AFTER: dict[str, Any] = {
    "description": "seconds to wait before sending the request again",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}


def binary_content(*media_types: str) -> dict[str, Any]:
    """A binary answer's `content`: its image types, then application/octet-stream, which generators (such as
    openapi-python-client) read as bytes without configuration; the routes answer it to `Accept:
    application/octet-stream` (api.routes.jobs)."""
    return {media: {"schema": {"type": "string", "format": "binary"}} for media in (*media_types, OCTET_STREAM)}


# the `image` part's media types: what api.intake reads, so clients and generators send images, not any bytes
IMAGE_MEDIA_TYPES = "image/png, image/jpeg, image/webp, image/tiff, image/bmp, image/gif"
# read by hand (api.creation, api.routes.jobs), so declared here
CREATE_HEADERS: list[dict[str, Any]] = [
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
        "description": "the same key and request return the first job (200, Idempotent-Replayed: true)",
    },
    {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "examples": ["wait=30"]},
        "description": "`wait=N` (RFC 7240): hold the request up to N seconds (at most the server's limit, "
        "60 by default) and answer 200 with the ended job if it ends in time; 202 otherwise",
    },
]
# `POST /v1/jobs` and `POST /v1/jobs/{id}/restore` read their bodies by hand (a file, bounded sizes, JSON depth):
# their request bodies are the models api.creation validates them with
CREATE_JOB_DOCS: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": body_schema(JobUpload),
                "encoding": {
                    "image": {"contentType": IMAGE_MEDIA_TYPES},
                    "params": {"contentType": "application/json"},
                    "webhook_events": {"contentType": "application/json"},
                },
            },
            "application/json": {"schema": {"oneOf": [body_schema(JobFromUrl), body_schema(JobFromUpload)]}},
        },
    },
    "parameters": CREATE_HEADERS,
}
FROM_PREVIEW_DOCS: dict[str, Any] = {
    "requestBody": {"required": False, "content": {"application/json": {"schema": body_schema(RestoreFromPreview)}}},
    "parameters": CREATE_HEADERS,
}

# read by hand too (api.creation.read_estimate_request: the create bodies' checks and codes)
ESTIMATE_DOCS: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"oneOf": [body_schema(EstimateRequest), body_schema(EstimateFromUpload)]}}
        },
    },
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for a route: each status answered with the Error envelope."""
    return {status: {"model": Error, "description": REASONS[status]} for status in statuses}


def install(
    app: FastAPI,
    variants: tuple[str, ...] = (),
    default_params: dict[str, Any] | None = None,
    max_expires_after: int | None = None,
    max_upload_bytes: int | None = None,
    max_batch_items: int | None = None,
    upload_retention_s: int | None = None,
) -> None:
    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes, tags=None
            )
            _tidy(schema)
            if variants:
                _served_variants(schema, variants)
            if default_params:
                _deployment_defaults(schema, default_params)
            if max_expires_after is not None:
                _retention(schema, max_expires_after)
            if max_upload_bytes is not None:
                _upload_limit(schema, max_upload_bytes, upload_retention_s)
            if max_batch_items is not None:
                _batch_limit(schema, max_batch_items)
            _request_params(schema)
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
                for status, response in responses.items():
                    if status != "401":  # an unauthenticated request is never counted
                        response.setdefault("headers", {}).update(copy.deepcopy(RATE_LIMIT_HEADERS))
            if "429" in responses:
                responses["429"].setdefault("headers", {})["Retry-After"] = copy.deepcopy(RETRY_AFTER)
    for unused in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(unused, None)
    restore = components.get("schemas", {}).get("RestoreParams")
    if restore is not None:  # what each named preset sets: clients (the web page) show it, one source
        restore["x-presets"] = PRESETS


def _body_properties(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The `properties` of every request body, each alternative of a `oneOf` body too."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                body = media.get("schema", {})
                for alternative in body.get("oneOf", [body]):
                    yield alternative.get("properties", {})


def _served_variants(schema: dict[str, Any], variants: tuple[str, ...]) -> None:
    """The `variant` request fields list the variants this deployment serves (its settings), so generated
    clients and the web page offer exactly those."""
    for properties in _body_properties(schema):
        if "variant" in properties:
            field = {k: v for k, v in properties["variant"].items() if k != "pattern"}
            properties["variant"] = {**field, "enum": list(variants)}


def _retention(schema: dict[str, Any], longest_s: int) -> None:
    """A request's `expires_after` is bounded by this deployment's retention (SUPIR_RETENTION_HOURS): its maximum."""
    for properties in _body_properties(schema):
        field = properties.get("expires_after")
        if field is not None:
            field["maximum"] = longest_s


def _upload_limit(schema: dict[str, Any], largest: int, longest_s: int | None) -> None:
    """A direct upload's `size` is bounded by this deployment's SUPIR_MAX_UPLOAD_BYTES, its `expires_after` by
    SUPIR_UPLOAD_RETENTION_S (not the jobs' retention): their maximums."""
    body = schema.get("paths", {}).get("/v1/uploads", {}).get("post", {}).get("requestBody", {})
    properties = body.get("content", {}).get("application/json", {}).get("schema", {}).get("properties", {})
    if "size" in properties:
        properties["size"]["maximum"] = largest
    if "expires_after" in properties and longest_s is not None:
        properties["expires_after"]["maximum"] = longest_s


def _batch_limit(schema: dict[str, Any], most: int) -> None:
    """A batch's photos (JSON `items`, multipart `images` and `items`) are bounded by SUPIR_MAX_BATCH_ITEMS."""
    body = schema.get("paths", {}).get("/v1/batches", {}).get("post", {}).get("requestBody", {})
    for media in body.get("content", {}).values():
        for name in ("items", "images"):
            field = media.get("schema", {}).get("properties", {}).get(name)
            if field is not None:
                field["maxItems"] = most


def _deployment_defaults(schema: dict[str, Any], defaults: dict[str, Any]) -> None:
    """The parameters' defaults are this deployment's where it sets its own (SUPIR_DEFAULT_PARAMS), so clients and
    the web page show what a request that leaves them out gets; `x-official-default` keeps the official value."""
    restore = schema.get("components", {}).get("schemas", {}).get("RestoreParams")
    if restore is None:
        return
    restore["x-deployment-defaults"] = defaults
    for name, value in defaults.items():
        field = restore.get("properties", {}).get(name)
        if field is not None:
            field["x-official-default"] = field.get("default")
            field["default"] = value


REQUEST_PARAMS = "RestoreParamsInput"
REQUEST_PARAMS_ABOUT = (
    "The restoration parameters a request sets. No field has a schema default, on purpose: a generated client "
    "then sends only the fields its caller set, and a field left out takes the preset's value (`preset`), else "
    "the default its description names; `POST /v1/jobs/{id}/restore` takes the preview's value instead. The "
    "job's `params` (`RestoreParams`) show every value used."
)


def _request_params(schema: dict[str, Any]) -> None:
    """The request bodies' `params` as `RestoreParamsInput`: `RestoreParams` without schema defaults, each field's
    effective default named in its description. Generators give a field with a schema default that value and
    send it, so a preset would be overridden by defaults the caller never chose; the response's `RestoreParams`
    keeps its defaults (the web page builds its form from them)."""
    components = schema.get("components", {}).get("schemas", {})
    restore = components.get("RestoreParams")
    if restore is None:
        return
    request = {k: copy.deepcopy(v) for k, v in restore.items() if not k.startswith("x-")}
    request.update(title=REQUEST_PARAMS, description=REQUEST_PARAMS_ABOUT)
    for field in request["properties"].values():
        default = field.pop("default", None)
        official = field.pop("x-official-default", default)
        said = f"default {json.dumps(default)}"
        if official != default:
            said += f" (this service's; officially {json.dumps(official)})"
        field["description"] = f"{field['description']}; {said}" if field.get("description") else said
    components[REQUEST_PARAMS] = request
    ref = {"$ref": f"#/components/schemas/{REQUEST_PARAMS}"}
    for properties in _body_properties(schema):
        if properties.get("params", {}).get("$ref", "").endswith("/RestoreParams"):
            properties["params"] = ref
