"""The job: one record, one lifecycle, one vocabulary for API, Redis, metrics and webhooks."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from supir_core.formats import DEFAULT_FORMAT, OUTPUT_FORMATS

Status = Literal["queued", "running", "succeeded", "failed", "canceled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})
ACTIVE: frozenset[str] = frozenset({"queued", "running"})


def new_job_id() -> str:
    return "job_" + uuid.uuid4().hex


def input_key(job_id: str) -> str:
    return f"inputs/{job_id}"


def output_key(job_id: str, index: int = 0, extension: str = OUTPUT_FORMATS[DEFAULT_FORMAT].extension) -> str:
    """Derived from the id (and the sample's index) alone, so a redelivered job overwrites its results instead
    of adding some. The first sample keeps the name a one-sample job has always had."""
    return f"results/{job_id}.{extension}" if index == 0 else f"results/{job_id}-{index}.{extension}"


def thumbnail_key(job_id: str, size: int, index: int = 0) -> str:
    """A result's thumbnail, made on first request and kept (until retention) for the next."""
    return f"thumbs/{job_id}-{size}.jpg" if index == 0 else f"thumbs/{job_id}-{index}-{size}.jpg"


def stage1_key(job_id: str) -> str:
    """A preview job's stage-1 tensors, which a later job (`stage1_job`) samples from."""
    return f"stage1/{job_id}.safetensors"


def object_prefixes(job_id: str) -> tuple[str, ...]:
    """Every object a job may own, as key prefixes (the keys above): erasing these erases the job's files, whatever
    its formats, samples and thumbnail sizes. Ids have one length, so no prefix reaches another job's keys."""
    return (input_key(job_id), f"results/{job_id}", f"thumbs/{job_id}-", f"stage1/{job_id}.")


def rfc3339(unix: float | None) -> str | None:
    """A Unix time as RFC 3339 in UTC, to the second: `expires_at` in views and webhooks."""
    return None if unix is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


# The sub-models below are also what the API shows of them (api.models.Job): their descriptions are its document's


class JobProgress(BaseModel):
    stage: str = Field(
        "queued", description="queued, starting, stage1, caption, conditioning, sampling, decoding, faces, done"
    )
    step: int = Field(0, description="sampler steps done (faces: over every face's run)")
    steps: int = Field(0, description="sampler steps in all (0 before sampling)")


class JobError(BaseModel):
    code: str = Field(description="stable: invalid_image, storage_error, worker_lost, time_limit, …")
    message: str


class ResultImage(BaseModel):
    """A sample's image, as stored (JobResult) and as shown (api.models.JobResultInfo, with a link for the key)."""

    width: int
    height: int
    bytes: int
    content_type: str = Field(
        OUTPUT_FORMATS[DEFAULT_FORMAT].media_type,
        description="image/png, image/jpeg or image/webp (params.output_format)",
    )
    seed: int | None = Field(None, description="this sample's seed (the job's seed + its index)")


class JobResult(ResultImage):
    key: str


class Tiling(BaseModel):
    """How a restoration was tiled and why (supir_core.memory.TilingDecision.metadata())."""

    policy: str = Field(description="params.tiling as asked: auto, always or never")
    sampling: Literal["tiled", "untiled"] = Field(description="whether the sampler ran on overlapping latent tiles")
    vae: Literal["tiled", "untiled"] = Field(description="whether the VAE encoded and decoded in tiles")
    reason: str = Field(description="why, in words: the planned activations against the memory budget, or the policy")
    planned_gb: dict[str, float] | None = Field(
        description="auto: the untiled activations each stage would take (stage1, sampling, decode), GB"
    )
    budget_gb: float | None = Field(description="auto: the activations' memory budget the plan was held to, GB")
    budget_inputs: dict[str, float] | None = Field(
        description="what the budget was computed from (total_gb, models_gb, margin_gb); null when set by hand"
    )


class Face(BaseModel):
    box: list[int] = Field(min_length=4, max_length=4, description="[x0, y0, x1, y1] in the input's pixels")
    region: list[int] = Field(
        min_length=4, max_length=4, description="[x0, y0, x1, y1] of the result it was blended into, output pixels"
    )
    restored: bool = Field(
        description="false: it already spanned face_size pixels where the main pass sampled it (the processing "
        "size), so it was left as it was"
    )
    seconds: float = Field(description="its share of the second pass (0 when not restored again)")


class Faces(BaseModel):
    """The face pass (params.faces=auto): each face found and restored again at face_size, blended back."""

    policy: str = Field(description="params.faces: auto")
    detector: str = Field(description="the face detector that found them")
    face_size: int = Field(description="params.face_size: the pixels a face's box spans in its second pass")
    restored_size: int = Field(description="the side, in pixels, each face was restored at")
    faces: list[Face] = Field(description="the faces found, the largest max_faces of them")
    seconds: dict[str, float] = Field(description="detect, and restore and blend when a face was restored again")


WebhookEvent = Literal["started", "progress", "completed"]


class WebhookState(BaseModel):
    url: str
    events: list[WebhookEvent] = Field(["completed"], description="the events this webhook is sent")
    # retried until delivered or failed
    state: Literal["pending", "delivered", "failed", "not_requested"] = Field(
        "pending", description="of the `completed` delivery; not_requested when `events` leaves it out"
    )
    attempts: int = Field(0, description="POSTs of the `completed` event so far")
    last_status: int | None = None
    last_error: str | None = None


class JobRecord(BaseModel):
    id: str = Field(default_factory=new_job_id)
    owner: str
    status: Status = "queued"
    params: dict[str, Any] = Field(default_factory=dict)  # validated RestoreParams, seed filled in
    preset: str | None = None
    input_key: str = ""
    input_content_type: str = ""
    input_width: int = 0
    input_height: int = 0
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0  # runs started by a worker; > 1 after a worker died
    lost: int = 0  # runs whose worker died (or dropped them) before they ended
    worker: str | None = None  # the worker process running it ("host:pid"); fences its writes
    progress: JobProgress = Field(default_factory=JobProgress)
    seconds: dict[str, float] = Field(default_factory=dict)
    caption: str | None = None
    positive_prompt: str | None = None
    negative_prompt: str | None = None
    error: JobError | None = None
    result: JobResult | None = None
    webhook: WebhookState | None = None
    request_hash: str = ""
    # preview: stop after stage 1 and its caption (the result is the stage-1 image); restore: the whole recipe
    kind: Literal["restore", "preview"] = "restore"
    stage1_job: str | None = None  # a preview job whose stage 1 this job samples from
    results: list[JobResult] = Field(default_factory=list)  # every sample; `result` is the first
    variant: str = ""  # the SUPIR checkpoint (v0Q, v0F, …) that runs it; its own Celery queue
    model_sha256: str | None = None  # the worker's SUPIR file of that variant (sha256)
    model_id: str | None = None  # the identity of SDXL + SUPIR files the result came from (cache keys use it)
    input_sha256: str = ""
    seed_given: bool = False  # the request named its seed: the result is reproducible, so it may be cached
    cached: bool = False  # answered from the result cache: no GPU work
    cached_from: str | None = None  # the job whose result this one copied
    gpu_seconds: float = 0.0  # the pipeline's stage seconds on the worker (usage)
    tiling: Tiling | None = None  # a restoration's; None for previews and records from before it was kept
    faces: Faces | None = None  # the face pass's; None when params.faces is off, for previews and older records
    expires_after: int | None = None  # seconds the job is kept after it ends (None: the deployment's retention)
    batch_id: str | None = None  # the batch it was submitted in (jobs.batches)
    expires_at: float | None = None  # set when it ends (JobStore.update): then its record and files are erased

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL
