"""What the service answers, as frozen dataclasses. Each is read leniently from its JSON (`from_json`): a field the
service adds later is kept in `.raw` rather than breaking the client, and a field it leaves out (a webhook's job
carries fewer than a `GET`) takes its default."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
TERMINAL = frozenset({"succeeded", "failed", "canceled"})


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class Progress:
    stage: str = "queued"
    step: int = 0
    steps: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Progress:
        data = data or {}
        return cls(str(data.get("stage", "queued")), int(data.get("step", 0)), int(data.get("steps", 0)))


@dataclass(frozen=True)
class JobError:
    code: str
    message: str

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> JobError | None:
        return None if not data else cls(str(data.get("code", "")), str(data.get("message", "")))


@dataclass(frozen=True)
class ResultImage:
    """One sample's stored image: `url` is a signed link, valid for an hour."""

    width: int
    height: int
    bytes: int
    content_type: str
    url: str | None = None
    seed: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ResultImage | None:
        if not data:
            return None
        return cls(
            int(data["width"]),
            int(data["height"]),
            int(data.get("bytes", 0)),
            str(data.get("content_type", "image/png")),
            _opt_str(data.get("url")),
            _opt_int(data.get("seed")),
        )

    @property
    def extension(self) -> str:
        return {"image/jpeg": ".jpg", "image/webp": ".webp"}.get(self.content_type, ".png")


@dataclass(frozen=True)
class InputImage:
    width: int
    height: int
    content_type: str


@dataclass(frozen=True)
class WebhookState:
    url: str
    events: tuple[str, ...]
    state: str
    attempts: int
    last_status: int | None

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> WebhookState | None:
        if not data:
            return None
        return cls(
            str(data.get("url", "")),
            tuple(data.get("events") or ()),
            str(data.get("state", "")),
            int(data.get("attempts", 0)),
            _opt_int(data.get("last_status")),
        )


@dataclass(frozen=True)
class Job:
    """A restoration job as its owner sees it (`GET /v1/jobs/{id}`)."""

    id: str
    status: JobStatus
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress = field(default_factory=Progress)
    queue_position: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # every value applied, the seed included
    preset: str | None = None
    input: InputImage | None = None
    caption: str | None = None
    attempts: int = 0
    error: JobError | None = None
    result: ResultImage | None = None
    results: tuple[ResultImage, ...] = ()
    webhook: WebhookState | None = None
    cancel_requested: bool = False
    kind: str = "restore"
    batch_id: str | None = None  # the batch that made it, if one did
    variant: str | None = None
    model_sha256: str | None = None
    gpu_seconds: float = 0.0
    cached: bool = False
    cached_from: str | None = None
    expires_after: int | None = None
    expires_at: str | None = None
    expected_start_s: float | None = None
    eta: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # the whole JSON, as answered

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def samples(self) -> int:
        """How many result images the job has (one per `params.num_samples` once it succeeded)."""
        return len(self.results) or (1 if self.result is not None else 0)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        image = data.get("input")
        results = tuple(r for r in (ResultImage.from_json(x) for x in data.get("results") or ()) if r is not None)
        return cls(
            id=str(data["id"]),
            status=data["status"],
            created_at=_opt_float(data.get("created_at")),
            started_at=_opt_float(data.get("started_at")),
            finished_at=_opt_float(data.get("finished_at")),
            progress=Progress.from_json(data.get("progress")),
            queue_position=_opt_int(data.get("queue_position")),
            seconds={str(k): float(v) for k, v in (data.get("seconds") or {}).items()},
            params=dict(data.get("params") or {}),
            preset=_opt_str(data.get("preset")),
            input=InputImage(int(image["width"]), int(image["height"]), str(image["content_type"])) if image else None,
            caption=_opt_str(data.get("caption")),
            attempts=int(data.get("attempts", 0)),
            error=JobError.from_json(data.get("error")),
            result=ResultImage.from_json(data.get("result")),
            results=results,
            webhook=WebhookState.from_json(data.get("webhook")),
            cancel_requested=bool(data.get("cancel_requested", False)),
            kind=str(data.get("kind", "restore")),
            batch_id=_opt_str(data.get("batch_id")),
            variant=_opt_str(data.get("variant")),
            model_sha256=_opt_str(data.get("model_sha256")),
            gpu_seconds=float(data.get("gpu_seconds") or 0.0),
            cached=bool(data.get("cached", False)),
            cached_from=_opt_str(data.get("cached_from")),
            expires_after=_opt_int(data.get("expires_after")),
            expires_at=_opt_str(data.get("expires_at")),
            expected_start_s=_opt_float(data.get("expected_start_s")),
            eta=_opt_str(data.get("eta")),
            raw=data,
        )


@dataclass(frozen=True)
class JobList:
    jobs: tuple[Job, ...]
    next_cursor: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobList:
        return cls(tuple(Job.from_json(j) for j in data.get("jobs") or ()), _opt_int(data.get("next_cursor")))


@dataclass(frozen=True)
class UploadTarget:
    """Where to send a photo's bytes (`POST /v1/uploads`): a `PUT` with `headers` (the API's signed URL) or a
    multipart `POST` of `fields` then the file as `file` (an S3 presigned POST)."""

    id: str
    method: Literal["PUT", "POST"]
    url: str
    fields: dict[str, str]
    headers: dict[str, str]
    content_type: str
    size: int
    expires_at: str  # the URL takes the bytes until then
    kept_until: str | None = None  # an upload no job used is erased then

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UploadTarget:
        return cls(
            str(data["id"]),
            data["method"],
            str(data["url"]),
            {str(k): str(v) for k, v in (data.get("fields") or {}).items()},
            {str(k): str(v) for k, v in (data.get("headers") or {}).items()},
            str(data["content_type"]),
            int(data["size"]),
            str(data["expires_at"]),
            data.get("kept_until"),
        )


@dataclass(frozen=True)
class BatchCounts:
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0
    deleted: int = 0  # erased (DELETE) or past their expiry

    @property
    def ended(self) -> int:
        return self.succeeded + self.failed + self.canceled + self.deleted


@dataclass(frozen=True)
class Batch:
    """A batch of jobs made by one request (`GET /v1/batches/{id}`); `job_ids` in the order of its items."""

    id: str
    status: Literal["running", "ended"]
    total: int
    counts: BatchCounts
    progress: float
    eta: str | None  # running: when its last job is expected to end (RFC 3339)
    created_at: float | None
    ended_at: float | None
    expires_after: int | None
    expires_at: str | None
    variant: str | None
    job_ids: tuple[str, ...]
    webhook: WebhookState | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ended(self) -> bool:
        return self.status == "ended"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Batch:
        counts = data.get("counts") or {}
        return cls(
            id=str(data["id"]),
            status=data["status"],
            total=int(data.get("total", 0)),
            counts=BatchCounts(**{k: int(counts.get(k, 0)) for k in BatchCounts.__dataclass_fields__}),
            progress=float(data.get("progress") or 0.0),
            eta=_opt_str(data.get("eta")),
            created_at=_opt_float(data.get("created_at")),
            ended_at=_opt_float(data.get("ended_at")),
            expires_after=_opt_int(data.get("expires_after")),
            expires_at=_opt_str(data.get("expires_at")),
            variant=_opt_str(data.get("variant")),
            job_ids=tuple(str(j) for j in data.get("job_ids") or ()),
            webhook=WebhookState.from_json(data.get("webhook")),
            raw=data,
        )


@dataclass(frozen=True)
class Size:
    width: int
    height: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Size:
        return cls(int(data["width"]), int(data["height"]))


@dataclass(frozen=True)
class Estimate:
    """What a job would do and cost (`POST /v1/estimates`); `queue` and `tiling` as the service answers them."""

    variant: str
    kind: str
    input: Size
    processing: Size
    output: Size
    steps: int
    num_samples: int
    gpu_seconds: float
    gpu_seconds_by_stage: dict[str, float]
    basis: str
    expected_wait_s: float | None
    tiling: dict[str, Any]
    queue: dict[str, Any]
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Estimate:
        queue = dict(data.get("queue") or {})
        return cls(
            variant=str(data["variant"]),
            kind=str(data["kind"]),
            input=Size.from_json(data["input"]),
            processing=Size.from_json(data["processing"]),
            output=Size.from_json(data["output"]),
            steps=int(data["steps"]),
            num_samples=int(data["num_samples"]),
            gpu_seconds=float(data["gpu_seconds"]),
            gpu_seconds_by_stage={str(k): float(v) for k, v in (data.get("gpu_seconds_by_stage") or {}).items()},
            basis=str(data["basis"]),
            expected_wait_s=_opt_float(queue.get("expected_wait_s")),
            tiling=dict(data.get("tiling") or {}),
            queue=queue,
            raw=data,
        )


@dataclass(frozen=True)
class UsageCounts:
    jobs: int
    images: int
    cached_jobs: int
    gpu_seconds: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UsageCounts:
        return cls(int(data["jobs"]), int(data["images"]), int(data["cached_jobs"]), float(data["gpu_seconds"]))


@dataclass(frozen=True)
class UsageDay(UsageCounts):
    date: dt.date = dt.date.min


@dataclass(frozen=True)
class Usage:
    """A key's usage per UTC day over an inclusive range (`GET /v1/usage`)."""

    key: str
    first: dt.date
    last: dt.date
    days: tuple[UsageDay, ...]
    total: UsageCounts

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Usage:
        days = tuple(
            UsageDay(**vars(UsageCounts.from_json(d)), date=dt.date.fromisoformat(d["date"])) for d in data["days"]
        )
        return cls(
            str(data["key"]),
            dt.date.fromisoformat(data["from"]),
            dt.date.fromisoformat(data["to"]),
            days,
            UsageCounts.from_json(data["total"]),
        )
