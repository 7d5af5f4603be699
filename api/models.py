"""What the API sends and takes: pydantic models for responses (the OpenAPI document is generated from these, so
a client generated from `/openapi.json` gets typed jobs, errors and parameters), and the create request's
schema. The restoration parameters are the worker's own `RestoreParams` (one source for ranges and defaults).

`POST /v1/jobs` reads its body by hand (multipart with a file, or JSON; bounded, with field-level error codes),
so its request schema is declared here as OpenAPI rather than inferred from a signature."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from jobs.record import Status, WebhookEvent
from supir_core.params import RestoreParams

__all__ = ["CREATE_JOB_DOCS", "FROM_PREVIEW_DOCS", "Error", "ErrorBody", "Job", "JobList", "RestoreParams"]


class Progress(BaseModel):
    stage: str = Field(description="queued, starting, stage1, caption, sampling, decoding, done")
    step: int = Field(description="sampler steps done")
    steps: int = Field(description="sampler steps in all (0 before sampling)")


class InputImage(BaseModel):
    width: int
    height: int
    content_type: str


class JobErrorInfo(BaseModel):
    code: str = Field(description="stable: invalid_image, storage_error, worker_lost, time_limit, …")
    message: str


class JobResultInfo(BaseModel):
    url: str = Field(description="a signed link to the restored image, valid for an hour")
    width: int
    height: int
    bytes: int
    content_type: str = Field(description="image/png, image/jpeg or image/webp (params.output_format)")
    seed: int | None = Field(None, description="this sample's seed (the job's seed + its index)")


class Webhook(BaseModel):
    url: str
    events: list[WebhookEvent] = Field(["completed"], description="the events this webhook is sent")
    state: Literal["pending", "delivered", "failed", "not_requested"] = Field(
        description="of the `completed` delivery; not_requested when `events` leaves it out"
    )
    attempts: int = Field(description="POSTs of the `completed` event so far")
    last_status: int | None = None
    last_error: str | None = None


class Job(BaseModel):
    """A restoration job as its owner sees it."""

    id: str
    status: Status
    created_at: float = Field(description="Unix time")
    started_at: float | None
    finished_at: float | None
    progress: Progress
    queue_position: int | None = Field(description="jobs ahead of this one while it is queued (0: next)")
    seconds: dict[str, float] = Field(description="time per stage once it has run")
    # a record written by an older release (or by hand) may not validate: shown as it is rather than a 500
    params: RestoreParams | dict[str, Any] = Field(description="the parameters applied, the seed included")
    preset: str | None
    input: InputImage
    caption: str | None
    positive_prompt: str | None
    negative_prompt: str | None
    attempts: int = Field(description="runs started; more than 1 after a worker was lost")
    error: JobErrorInfo | None
    result: JobResultInfo | None = Field(description="the first sample's result (also `results[0]`)")
    results: list[JobResultInfo] = Field(
        [], description="every sample's result, in order (`params.num_samples`); empty until the job succeeds"
    )
    webhook: Webhook | None
    cancel_requested: bool = False
    kind: Literal["restore", "preview"] = Field(
        "restore", description="preview: stage 1 and its caption only; `result` is the stage-1 image"
    )
    stage1_job: str | None = Field(None, description="the preview whose stage 1 this job sampled from")
    variant: str | None = Field(None, description="the SUPIR variant (checkpoint) that runs the job")
    model_sha256: str | None = Field(None, description="sha256 of that variant's SUPIR file, once a worker ran it")
    gpu_seconds: float = Field(0.0, description="the worker's pipeline seconds (what usage counts); 0 when cached")
    cached: bool = Field(False, description="answered from the result cache (an identical earlier request): no GPU")
    cached_from: str | None = Field(None, description="the earlier job whose result a cached job copied")


class JobList(BaseModel):
    jobs: list[Job]
    next_cursor: int | None = Field(description="pass as `cursor` for the next page; null on the last")


class ErrorBody(BaseModel):
    code: str = Field(description="stable, machine-readable (docs/service.md lists them)")
    message: str = Field(description="a sentence for people")
    field: str | None = Field(None, description="the request field at fault, where there is one")


class Error(BaseModel):
    """Every error the API answers, whatever its status."""

    error: ErrorBody


PRESET_SCHEMA = {"type": "string", "enum": ["quality", "fidelity", "lightning"], "description": "named settings"}
PARAMS_REF = {"$ref": "#/components/schemas/RestoreParams"}
# what api.creation accepts as a URL (other strings get 400 invalid_url / invalid_webhook_url)
HTTP_URL = {"type": "string", "format": "uri", "pattern": "^https?://[^/?#]"}
# the `image` part's media types: what api.intake reads, so clients and generators send images, not any bytes
IMAGE_MEDIA_TYPES = "image/png, image/jpeg, image/webp, image/tiff, image/bmp, image/gif"
TWO_STAGE_FIELDS: dict[str, Any] = {
    "preview": {
        "type": "boolean",
        "description": "stop after stage 1 and its caption (as the official demo's first step): the result is the "
        "stage-1 image, `caption` what the captioner saw; correct it and run `POST /v1/jobs/{id}/restore`",
    },
}
VARIANT_FIELD: dict[str, Any] = {
    "variant": {
        "type": "string",
        "pattern": "^[A-Za-z0-9_.]{1,32}$",
        "description": "the SUPIR checkpoint: v0Q (heavy degradation) or v0F (fidelity), as this service serves "
        "them (`GET /status` lists them); default: the service's. One no worker pool serves: 422 "
        "variant_unavailable",
    }
}
WEBHOOK_FIELDS: dict[str, Any] = {
    "webhook_url": {**HTTP_URL, "description": "POSTed the job (signed) on the events asked for"},
    "webhook_events": {
        "type": "array",
        "items": {"type": "string", "enum": ["started", "progress", "completed"]},
        "minItems": 1,
        "uniqueItems": True,
        "description": "which events to POST (default: completed); progress is sent at most every few seconds",
    },
}
# webhook_events without a (non-null) webhook_url is refused: 400 invalid_request
NEEDS_WEBHOOK_URL = {"webhook_events": {"required": ["webhook_url"], "properties": {"webhook_url": {"type": "string"}}}}
CREATE_JOB_DOCS: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "title": "JobUpload",
                    "type": "object",
                    "required": ["image"],
                    "additionalProperties": False,  # other fields: 400 invalid_request
                    "dependentSchemas": NEEDS_WEBHOOK_URL,
                    "properties": {
                        "image": {
                            "type": "string",
                            "format": "binary",
                            "description": "PNG, JPEG, WebP, TIFF, BMP, GIF",
                        },
                        "params": PARAMS_REF,
                        "preset": PRESET_SCHEMA,
                        **TWO_STAGE_FIELDS,
                        **VARIANT_FIELD,
                        **WEBHOOK_FIELDS,
                    },
                },
                "encoding": {
                    "image": {"contentType": IMAGE_MEDIA_TYPES},
                    "params": {"contentType": "application/json"},
                    "webhook_events": {"contentType": "application/json"},
                },
            },
            "application/json": {
                "schema": {
                    "title": "JobFromUrl",
                    "type": "object",
                    "required": ["image_url"],
                    "additionalProperties": False,
                    "dependentSchemas": NEEDS_WEBHOOK_URL,
                    "properties": {
                        "image_url": {**HTTP_URL, "description": "an http(s) URL of the photo"},
                        "params": PARAMS_REF,
                        "preset": PRESET_SCHEMA,
                        **TWO_STAGE_FIELDS,
                        **VARIANT_FIELD,
                        **WEBHOOK_FIELDS,
                        # JSON null is taken as no webhook
                        "webhook_url": {**WEBHOOK_FIELDS["webhook_url"], "type": ["string", "null"]},
                    },
                }
            },
        },
    },
    "parameters": [
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
    ],
}


FROM_PREVIEW_DOCS: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "title": "RestoreFromPreview",
                    "type": "object",
                    "additionalProperties": False,
                    "dependentSchemas": NEEDS_WEBHOOK_URL,
                    "properties": {
                        "params": PARAMS_REF,
                        "preset": PRESET_SCHEMA,
                        **VARIANT_FIELD,  # only the preview's own: stage 1 ran that variant's encoder
                        **WEBHOOK_FIELDS,
                        "webhook_url": {**WEBHOOK_FIELDS["webhook_url"], "type": ["string", "null"]},
                    },
                }
            }
        },
    },
    "parameters": CREATE_JOB_DOCS["parameters"],
}
