"""What the API sends and takes: pydantic models for responses (the OpenAPI document is generated from these, so
a client generated from `/openapi.json` gets typed jobs, errors and parameters), and the create request's
bodies. The restoration parameters are the worker's own `RestoreParams` (one source for ranges and defaults);
a job's sub-models are its record's (jobs.record).

`POST /v1/jobs` reads its body by hand (multipart with a file, or JSON; bounded, with field-level error codes),
then validates it with the body models here; their JSON Schema is the operation's request body (api.openapi)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    field_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from jobs.record import (
    Faces,
    JobError,
    JobProgress,
    JobRecord,
    ResultImage,
    Status,
    Tiling,
    WebhookEvent,
    WebhookState,
    rfc3339,
)
from supir_core.params import PRESETS, RestoreParams

__all__ = [
    "Error", "ErrorBody", "Estimate", "EstimateFromUpload", "EstimateRequest", "Job", "JobFromUrl", "JobList",
    "JobUpload", "RestoreFromPreview", "RestoreParams", "body_schema",
]  # fmt: skip


# Every field is sent (null where it has none), so the document marks each one required
SENT = ConfigDict(json_schema_serialization_defaults_required=True)


# the record's own sub-models, under the names the API's document has always given them


class Progress(JobProgress):
    model_config = SENT


class JobErrorInfo(JobError):
    model_config = SENT


class Webhook(WebhookState):
    model_config = SENT


class JobResultInfo(ResultImage):
    model_config = SENT

    url: str = Field(description="a signed link to the restored image, valid for an hour")


class TilingInfo(Tiling):
    model_config = SENT


class FacesInfo(Faces):
    model_config = SENT


class InputImage(BaseModel):
    width: int
    height: int
    content_type: str


class Job(BaseModel):
    """A restoration job as its owner sees it."""

    model_config = SENT

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
    batch_id: str | None = Field(None, description="the batch it was submitted in (`POST /v1/batches`), if any")
    variant: str | None = Field(None, description="the SUPIR variant (checkpoint) that runs the job")
    model_sha256: str | None = Field(None, description="sha256 of that variant's SUPIR file, once a worker ran it")
    gpu_seconds: float = Field(0.0, description="the worker's pipeline seconds (what usage counts); 0 when cached")
    cached: bool = Field(False, description="answered from the result cache (an identical earlier request): no GPU")
    cached_from: str | None = Field(None, description="the earlier job whose result a cached job copied")
    tiling: TilingInfo | None = Field(
        None, description="which parts of the restoration ran tiled, and why; null for previews and older jobs"
    )
    faces: FacesInfo | None = Field(
        None, description="the faces found and restored again (params.faces=auto); null when faces is off"
    )
    expires_after: int = Field(
        description="seconds the job is kept after it ends (the request's `expires_after`, else the service's "
        "retention, SUPIR_RETENTION_HOURS)"
    )
    expires_at: str | None = Field(
        json_schema_extra={"format": "date-time"},
        description="when the job's record and files (photo, results, thumbnails, stage 1) are erased, RFC 3339 "
        "UTC: `expires_after` after it ends; null while it is queued or running. Its reads then answer 404",
    )
    expected_start_s: float | None = Field(
        None,
        description="queued: seconds until a worker is expected to start it, from its queue position, the jobs "
        "running, the ready workers of its variant and their measured mean job time (docs/service.md, Estimates); "
        "null once it runs, or while no worker of its variant is ready",
    )
    eta: datetime | None = Field(None, description="queued: when it is expected to start (now + expected_start_s)")

    @classmethod
    def from_record(
        cls,
        record: JobRecord,
        *,
        queue_position: int | None,
        cancel_requested: bool,
        results: list[JobResultInfo],
        retention_s: int,
        expected_start_s: float | None = None,
    ) -> Job:
        """What a client sees of a record (never its owner, worker or storage keys): each field the record has
        by the same name as stored, so a new one is shown by declaring it here; the rest derived."""
        shown = {"input", "result", "results", "variant", "queue_position", "cancel_requested", "expected_start_s"}
        shown |= {"expires_after", "expires_at"}
        shared = (set(cls.model_fields) & set(JobRecord.model_fields)) - shown
        return cls.model_validate(
            {
                **record.model_dump(include=shared),
                "input": {
                    "width": record.input_width,
                    "height": record.input_height,
                    "content_type": record.input_content_type,
                },
                "result": results[0] if results else None,
                "results": results,
                "variant": record.variant or None,  # "" in records from before variants
                "queue_position": queue_position,
                "cancel_requested": cancel_requested,
                "expires_after": record.expires_after or retention_s,
                "expires_at": rfc3339(record.expires_at),
                "expected_start_s": expected_start_s,
                "eta": None if expected_start_s is None else datetime.now(UTC) + timedelta(seconds=expected_start_s),
            }
        )


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


# ---------------------------------------------------------------------------------------------------------
# The create request's bodies. api.creation reads them by hand (multipart with a file, bounded, JSON depth
# limited) and validates what it read with these; their JSON Schema is the OpenAPI request body.

MAX_URL_CHARS = 8192
VARIANT_PATTERN = r"^[A-Za-z0-9_.]{1,32}$"  # as jobs.settings names variants: another name is never served
WEBHOOK_EVENTS: tuple[str, ...] = get_args(WebhookEvent)


def _http_url(url: str) -> str:
    """An http(s) URL with a host; urlsplit raises on some malformed ones ("http://[")."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError("not an http(s) URL with a host")
    return url


def _known_preset(name: str) -> str:
    if name not in PRESETS:
        message = "preset={preset} is unknown: choose one of {choices}"  # supir_core.params' own words
        raise PydanticCustomError("invalid_parameter", message, {"preset": repr(name), "choices": ", ".join(PRESETS)})
    return name


def _json_object(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PydanticCustomError("dict_type", "Input should be a valid dictionary")
    return value


def _whole_number(value: object) -> object:
    """JSON Schema's integer includes 3600.0: taken as 3600 (strict mode refuses every float otherwise)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _in_fixed_order(events: list[WebhookEvent]) -> list[WebhookEvent]:
    return [name for name in get_args(WebhookEvent) if name in events]  # duplicates dropped, not refused


# the schema's pattern is what clients check; the validator is what urlsplit (the fetcher's parser) accepts
HttpUrl = Annotated[
    str,
    Field(max_length=MAX_URL_CHARS, json_schema_extra={"format": "uri", "pattern": "^https?://[^/?#]"}),
    AfterValidator(_http_url),
]
Preset = Annotated[
    str, Field(description="named settings", json_schema_extra={"enum": list(PRESETS)}), AfterValidator(_known_preset)
]
Variant = Annotated[
    str,
    Field(
        pattern=VARIANT_PATTERN,
        description="the SUPIR checkpoint: v0Q (heavy degradation) or v0F (fidelity), as this service serves "
        "them (`GET /v1/service` lists them); default: the service's. One no worker pool serves: 422 "
        "variant_unavailable",
    ),
]
WebhookEvents = Annotated[
    list[WebhookEvent],
    Field(
        min_length=1,
        description="which events to POST (default: completed); progress is sent at most every few seconds",
        json_schema_extra={"uniqueItems": True},
    ),
    AfterValidator(_in_fixed_order),
]
# validated by supir_core.params.validate_params, over this deployment's defaults and the preset
ParamsObject = Annotated[dict[str, Any], PlainValidator(_json_object, json_schema_input_type=RestoreParams)]
WEBHOOK_URL = "POSTed the job (signed) on the events asked for"
PREVIEW = (
    "stop after stage 1 and its caption (as the official demo's first step): the result is the stage-1 image, "
    "`caption` what the captioner saw; correct it and run `POST /v1/jobs/{id}/restore`"
)
EXPIRES_AFTER = (
    "seconds to keep the job, its record and its files after it ends (at least 1; at most, and by default, the "
    "service's retention, SUPIR_RETENTION_HOURS: the document's maximum); a longer one is 422 invalid_parameter"
)
# webhook_events without a (non-null) webhook_url is refused: 400 invalid_request
NEEDS_WEBHOOK_URL: dict[str, Any] = {
    "webhook_events": {"required": ["webhook_url"], "properties": {"webhook_url": {"type": "string"}}}
}


class _JobOptions(BaseModel):
    """What every create body may say besides its photo. Strict: JSON's types as they are (`"true"` is no
    boolean); a form's strings are turned into JSON values before (api.creation)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"dependentSchemas": NEEDS_WEBHOOK_URL})

    # SkipJsonSchema[None]: JSON null is taken as absent, but the document offers no null
    params: ParamsObject | SkipJsonSchema[None] = None
    preset: Preset | SkipJsonSchema[None] = None
    variant: Variant | SkipJsonSchema[None] = None
    webhook_url: HttpUrl | SkipJsonSchema[None] = Field(None, description=WEBHOOK_URL)
    webhook_events: WebhookEvents | SkipJsonSchema[None] = None
    expires_after: (
        Annotated[int, Field(ge=1, description=EXPIRES_AFTER), BeforeValidator(_whole_number)] | SkipJsonSchema[None]
    ) = None

    @field_validator("webhook_events")
    @classmethod
    def _needs_webhook_url(cls, events: list[WebhookEvent] | None, info: ValidationInfo) -> list[WebhookEvent] | None:
        # webhook_url is declared (so validated) first; a refused one is answered before this
        if events is not None and info.data.get("webhook_url") is None:
            raise PydanticCustomError("invalid_request", "webhook_events needs a webhook_url")
        return events


class JobUpload(_JobOptions):
    """`POST /v1/jobs` as multipart/form-data: the photo as the file part `image`; `params` a JSON object,
    `webhook_events` a JSON array (or names separated by commas), `preview` true or false."""

    image: bytes = Field(description="PNG, JPEG, WebP, TIFF, BMP, GIF")
    preview: bool = Field(False, description=PREVIEW)


class JobFromUrl(_JobOptions):
    """`POST /v1/jobs` as JSON: the photo at `image_url` (a form without a file is read as this too)."""

    image_url: HttpUrl = Field(description="an http(s) URL of the photo")
    preview: bool = Field(False, description=PREVIEW)
    webhook_url: HttpUrl | None = Field(None, description=WEBHOOK_URL)  # JSON null: no webhook


UPLOAD_ID_PATTERN = r"^upl_[0-9a-f]{32}$"


class JobFromUpload(_JobOptions):
    """`POST /v1/jobs` as JSON: the photo sent before through `POST /v1/uploads` (each upload makes one job)."""

    upload_id: str = Field(pattern=UPLOAD_ID_PATTERN, description="the id `POST /v1/uploads` answered")
    preview: bool = Field(False, description=PREVIEW)
    webhook_url: HttpUrl | None = Field(None, description=WEBHOOK_URL)  # JSON null: no webhook


UPLOAD_TYPES = ("image/png", "image/jpeg", "image/webp", "image/tiff", "image/bmp", "image/gif")


class UploadRequest(BaseModel):
    """`POST /v1/uploads`: what will be sent; the URL accepts exactly this many bytes of this type."""

    model_config = ConfigDict(extra="forbid", strict=True)

    content_type: Literal[UPLOAD_TYPES] = Field(description="the photo's media type")  # type: ignore[valid-type]
    size: Annotated[int, BeforeValidator(_whole_number)] = Field(
        ge=1, description="the photo's exact size in bytes (at most the service's upload limit)"
    )
    expires_after: (
        Annotated[
            int,
            Field(
                ge=1,
                description="seconds to keep the upload while no job uses it, from now (at most, and by default, "
                "the service's SUPIR_UPLOAD_RETENTION_S; a longer one is 422 invalid_parameter); the URL takes the "
                "bytes for at most this long too",
            ),
            BeforeValidator(_whole_number),
        ]
        | None  # JSON null: the service's retention
    ) = None


class UploadTarget(BaseModel):
    """Where to send the photo's bytes, and how: `PUT` the body (local storage) with `headers`, or a multipart
    `POST` (S3) with every `fields` entry, then the file as the last field `file`."""

    id: str = Field(description="name it as `upload_id` in `POST /v1/jobs`")
    method: Literal["PUT", "POST"]
    url: str
    fields: dict[str, str] = Field(description="form fields of a POST (S3's signed policy); empty for PUT")
    headers: dict[str, str] = Field(description="headers to send with the bytes")
    content_type: str
    size: int
    expires_at: str = Field(description="the URL refuses the bytes after this time (RFC 3339, UTC)")
    kept_until: str = Field(
        description="an upload no job has used is erased at this time (RFC 3339, UTC): `expires_after` from its "
        "request; a job makes its own copy, kept by the job's retention"
    )


class RestoreFromPreview(_JobOptions):
    """`POST /v1/jobs/{id}/restore`: the photo and stage 1 are the preview's; `variant` may only be its own
    (stage 1 ran that variant's encoder)."""

    webhook_url: HttpUrl | None = Field(None, description=WEBHOOK_URL)


MAX_DECLARED_SIDE = 65_535  # the largest side any format the intake reads can declare (TIFF's a little more)


Side = Annotated[int, BeforeValidator(_whole_number)]


class _EstimateOptions(BaseModel):
    """What an estimate takes of a job's body besides its photo. Strict, as the create bodies."""

    model_config = ConfigDict(extra="forbid", strict=True)

    params: ParamsObject | SkipJsonSchema[None] = None
    preset: Preset | SkipJsonSchema[None] = None
    variant: Variant | SkipJsonSchema[None] = None
    preview: bool = Field(False, description="estimate a preview (stage 1 and its caption only)")


class EstimateRequest(_EstimateOptions):
    """`POST /v1/estimates`: what a job would be sent (params, preset, variant, preview), with the photo's size in
    place of the photo."""

    width: Side = Field(ge=1, le=MAX_DECLARED_SIDE, description="the photo's width in pixels (upright: after EXIF)")
    height: Side = Field(ge=1, le=MAX_DECLARED_SIDE, description="the photo's height in pixels")


class EstimateFromUpload(_EstimateOptions):
    """`POST /v1/estimates`: what a job would be sent, the photo a received direct upload (its size read from the
    stored photo's header; the upload is not used: a job can still be made from it)."""

    upload_id: str = Field(pattern=UPLOAD_ID_PATTERN, description="the id `POST /v1/uploads` answered")


class Size(BaseModel):
    width: int
    height: int


class EstimateTiling(BaseModel):
    """Which parts would run tiled: decided as the worker decides (params.tiling; auto: its traced memory plan
    against its budget, which each worker publishes); unknown when that needs a plan no worker has published."""

    model_config = SENT

    sampling: Literal["tiled", "untiled", "unknown"]
    vae: Literal["tiled", "untiled", "unknown"]
    reason: str


class EstimateQueue(BaseModel):
    """The variant's queue now, and when a job sent now is expected to start (docs/service.md, Estimates)."""

    model_config = SENT

    queued: int = Field(description="jobs of the variant waiting")
    running: int = Field(description="jobs of the variant running")
    ready_workers: int = Field(description="worker processes of the variant that are ready")
    job_seconds: float = Field(description="a job's mean wall seconds on a worker of the variant")
    job_seconds_basis: Literal["default", "measured"] = Field(
        description="measured: from the variant's succeeded jobs; default: none yet (a documented constant)"
    )
    expected_wait_s: float | None = Field(
        description="seconds until a job sent now is expected to start; null while no worker of the variant is ready"
    )


class Estimate(BaseModel):
    """What a job would do and cost, before it is sent (`POST /v1/estimates`)."""

    model_config = SENT

    variant: str
    kind: Literal["restore", "preview"]
    input: Size
    processing: Size = Field(description="the size the model runs at (params.upscale, params.min_size; sides ÷ 64)")
    output: Size
    steps: int
    sampler: str
    num_samples: int
    tiling: EstimateTiling
    gpu_seconds: float = Field(description="predicted pipeline seconds on a worker (what usage counts)")
    gpu_seconds_by_stage: dict[str, float]
    basis: Literal["default", "measured", "mixed"] = Field(
        description="measured: every stage from the rates the variant's workers measured; default: none measured "
        "yet (documented default rates); mixed: some stages not yet measured (`default_stages`)"
    )
    measured_jobs: int = Field(description="succeeded jobs of the variant the measured rates rest on")
    default_stages: list[str] = Field(description="stages predicted from the default rates")
    queue: EstimateQueue


class BatchWebhookInfo(BaseModel):
    url: str
    state: Literal["pending", "delivered", "failed"]
    attempts: int


class BatchItem(BaseModel):
    """One photo of a batch: a direct upload or a URL, and what it changes of the batch's shared settings."""

    # exactly one of upload_id and image_url
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        title="BatchItem",
        json_schema_extra={"oneOf": [{"required": ["upload_id"]}, {"required": ["image_url"]}]},
    )

    upload_id: Annotated[str, Field(pattern=UPLOAD_ID_PATTERN)] | SkipJsonSchema[None] = Field(
        None, description="the id `POST /v1/uploads` answered (or image_url)"
    )
    image_url: HttpUrl | SkipJsonSchema[None] = Field(None, description="an http(s) URL of the photo (or upload_id)")
    params: ParamsObject | SkipJsonSchema[None] = Field(
        None, description="over the batch's params, for this photo only"
    )
    preset: Preset | SkipJsonSchema[None] = None


class BatchCreate(BaseModel):
    """`POST /v1/batches` as JSON: the photos as `items` (direct uploads or URLs), with what they share. As
    multipart: the files as repeated `images` parts, `params` a JSON object, `items` an optional JSON array of
    per-photo `params`/`preset` in the files' order."""

    model_config = ConfigDict(extra="forbid", strict=True)

    items: list[BatchItem] = Field(min_length=1, description="the photos, in order (at most SUPIR_MAX_BATCH_ITEMS)")
    params: ParamsObject | SkipJsonSchema[None] = None
    preset: Preset | SkipJsonSchema[None] = None
    variant: Variant | SkipJsonSchema[None] = None
    webhook_url: HttpUrl | None = Field(  # JSON null: no webhook
        None, description="POSTed once, signed, when the batch's last job ends (`batch.completed`)"
    )
    expires_after: (
        Annotated[int, Field(ge=1, description=EXPIRES_AFTER), BeforeValidator(_whole_number)] | SkipJsonSchema[None]
    ) = None


class BatchOverride(BaseModel):
    """What one photo of a multipart batch changes of the shared settings (in the files' order)."""

    model_config = ConfigDict(extra="forbid", strict=True, title="BatchOverride")

    params: ParamsObject | SkipJsonSchema[None] = None
    preset: Preset | SkipJsonSchema[None] = None


class BatchUpload(BaseModel):
    """`POST /v1/batches` as multipart/form-data: the photos as repeated file parts `images`; `params` a JSON
    object, `items` a JSON array of per-photo overrides in the files' order (at most one per file)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    images: list[bytes] = Field(min_length=1, description="the photos: PNG, JPEG, WebP, TIFF, BMP, GIF")
    items: list[BatchOverride] | SkipJsonSchema[None] = None
    params: ParamsObject | SkipJsonSchema[None] = None
    preset: Preset | SkipJsonSchema[None] = None
    variant: Variant | SkipJsonSchema[None] = None
    webhook_url: HttpUrl | SkipJsonSchema[None] = Field(
        None, description="POSTed once, signed, when the batch's last job ends (`batch.completed`)"
    )
    expires_after: (
        Annotated[int, Field(ge=1, description=EXPIRES_AFTER), BeforeValidator(_whole_number)] | SkipJsonSchema[None]
    ) = None


class BatchCounts(BaseModel):
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int
    deleted: int = Field(description="erased (DELETE) or past their expiry")


class Batch(BaseModel):
    """A batch as its owner sees it: its jobs by status, progress and when it should end."""

    model_config = SENT

    id: str
    status: Literal["running", "ended"] = Field(description="ended: every job has ended (or was erased)")
    total: int = Field(description="jobs in the batch, one per photo")
    counts: BatchCounts
    progress: float = Field(description="0 to 1 over its jobs (a running job by its sampler steps)")
    created_at: float = Field(description="Unix time")
    ended_at: float | None = Field(description="Unix time its last job ended")
    variant: str | None
    expires_after: int = Field(description="seconds the batch and each of its jobs are kept after they end")
    expires_at: str | None = Field(
        json_schema_extra={"format": "date-time"}, description="when the batch's record is erased (RFC 3339, UTC)"
    )
    eta: datetime | None = Field(
        description="running: when its last job is expected to end, from the queue and the measured job time"
    )
    webhook: BatchWebhookInfo | None
    job_ids: list[str] = Field(description="its jobs, in the order of its items")
    jobs_url: str
    results_url: str = Field(description="a zip of every result, streamed (`GET /v1/batches/{id}/results.zip`)")


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON Schema as an inline request body (generated clients name the body after its title), in
    the document's spelling: refs into components, a nullable field as a type list, no per-field titles, no
    null defaults."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    # the Job response puts RestoreParams in the components already; another sub-model is written in place
    defs = schema.pop("$defs", {})
    for name, sub in defs.items():
        if name != "RestoreParams":
            _inline(schema, f"#/components/schemas/{name}", body_schema_of(sub))
    for field in schema["properties"].values():
        _spell(field)
    return schema


def body_schema_of(schema: dict[str, Any]) -> dict[str, Any]:
    """A sub-model's schema in the document's spelling (as body_schema's)."""
    for field in schema.get("properties", {}).values():
        _spell(field)
    return schema


def _spell(field: dict[str, Any]) -> None:
    field.pop("title", None)
    if field.get("default", ...) is None:
        field.pop("default")
    options = field.pop("anyOf", None)
    if options is not None:
        nullable = [o for o in options if o != {"type": "null"}]
        assert len(nullable) == 1 and isinstance(nullable[0].get("type"), str), options
        field.update({**nullable[0], "type": [nullable[0]["type"], "null"]})


def _inline(node: Any, ref: str, replacement: dict[str, Any]) -> None:
    """Replace every {"$ref": ref} under node with the schema itself."""
    if isinstance(node, dict):
        for key, value in list(node.items()):
            if isinstance(value, dict) and value.get("$ref") == ref:
                node[key] = dict(replacement)
            else:
                _inline(value, ref, replacement)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, dict) and value.get("$ref") == ref:
                node[i] = dict(replacement)
            else:
                _inline(value, ref, replacement)
