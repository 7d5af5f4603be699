"""What the API sends and takes, as pydantic models: the OpenAPI document is generated from these, so a client
generated from `/openapi.json` gets typed jobs, errors and parameters. The restoration parameters are the
worker's own `RestoreParams` (one source for ranges and defaults)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from jobs.record import Status
from supir_core.params import RestoreParams

__all__ = ["Error", "ErrorBody", "Job", "JobList", "RestoreParams"]


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
    url: str = Field(description="a signed link to the restored PNG, valid for an hour")
    width: int
    height: int
    bytes: int
    content_type: str


class Webhook(BaseModel):
    url: str
    state: Literal["pending", "delivered", "failed"]
    attempts: int
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
    result: JobResultInfo | None
    webhook: Webhook | None
    cancel_requested: bool = False


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
