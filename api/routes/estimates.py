"""`/v1/estimates`: what a job would do and cost before it is sent — its sizes, steps and tiling, its GPU-seconds
from the rates the workers measure, and its wait in the queue (jobs.estimates holds the model)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from jobs.estimates import expected_start_s, job_seconds, predict, ready_workers, tiling_of
from jobs.settings import Settings
from supir_core.params import RestoreParams
from supir_core.plan import plan_sizes

from ..creation import read_estimate_request, stored_upload_info
from ..deps import CallerDep, ServicesDep
from ..errors import ApiError
from ..intake import MIN_SIDE
from ..models import Estimate, EstimateFromUpload, EstimateRequest
from ..openapi import ESTIMATE_DOCS, errors
from ..services import Services

router = APIRouter(prefix="/v1/estimates", tags=["estimates"])


@router.post(
    "",
    operation_id="estimateJob",
    response_model=Estimate,
    responses=errors(400, 401, 404, 409, 413, 415, 422, 429, 503),
    openapi_extra=ESTIMATE_DOCS,
)
async def estimate_job(request: Request, caller: CallerDep, services: ServicesDep) -> dict[str, Any]:
    """A job's processing size, steps, tiling, predicted GPU-seconds and expected wait, from the body a job would
    be sent with and, instead of the photo, its size or a received direct upload (whose header gives the size;
    the upload stays unused). Nothing is queued or stored."""
    content_type = request.headers.get("content-type", "")
    body = await request.body()
    if body.strip() and not content_type.startswith("application/json"):
        message = "send JSON: width and height (or upload_id), and params, preset, variant, preview"
        raise ApiError("unsupported_media_type", message)
    estimate, params, variant = read_estimate_request(body, services.settings)
    if isinstance(estimate, EstimateFromUpload):
        info = await run_in_threadpool(stored_upload_info, services, caller.id, estimate.upload_id, params.upscale)
        size = info.upright
    else:
        _check_size(estimate, params, services.settings)
        size = (estimate.width, estimate.height)
    return await run_in_threadpool(_estimate, services, size, estimate.preview, params, variant)


def _check_size(estimate: EstimateRequest, params: RestoreParams, settings: Settings) -> None:
    """The limits a photo of this size would meet at intake (api.intake), with the same codes."""
    width, height = estimate.width, estimate.height
    if width * height > settings.max_input_pixels:
        message = f"the image has {width * height:,} pixels; at most {settings.max_input_pixels:,}"
        raise ApiError("image_too_large", message + " (SUPIR_MAX_INPUT_PIXELS)", field="width")
    if min(width, height) < MIN_SIDE:
        message = f"the image is {width}×{height}; both sides must be at least {MIN_SIDE} pixels"
        raise ApiError("image_too_small", message, field="width" if width < MIN_SIDE else "height")
    out_pixels = round(width * params.upscale) * round(height * params.upscale)
    if out_pixels > settings.max_output_pixels:
        message = f"upscale {params.upscale} makes {out_pixels:,} output pixels; at most {settings.max_output_pixels:,}"
        raise ApiError("output_too_large", message + " (SUPIR_MAX_OUTPUT_PIXELS)", field="params.upscale")


def _estimate(
    services: Services, size: tuple[int, int], preview: bool, params: RestoreParams, variant: str
) -> dict[str, Any]:
    """size: the photo's upright (width, height)."""
    sizes = plan_sizes(size, params.upscale, params.min_size)
    rates = services.rates.rates(variant)
    decision = tiling_of(params, sizes.process, services.rates.plan(variant))
    if decision is None:
        unknown = f"unknown until a worker of variant {variant} reports its memory plan (tiling=auto needs it)"
        tiling = {"sampling": "unknown", "vae": "unknown", "reason": unknown}
        tiled = None
    else:
        tiling = {k: v for k, v in decision.metadata().items() if k in ("sampling", "vae", "reason")}
        tiled = {"sampling": decision.sampling, "vae": decision.vae}
    predicted = predict(rates, params, sizes.process, preview=preview, tiling=tiled)
    per_job, measured = job_seconds(rates)
    queued, running = services.store.queued_count(variant), services.store.running_count(variant)
    workers = ready_workers(services.store, variant)
    return Estimate.model_validate(
        {
            "variant": variant,
            "kind": "preview" if preview else "restore",
            "input": dict(zip(("width", "height"), sizes.input, strict=True)),
            "processing": dict(zip(("width", "height"), sizes.process, strict=True)),
            "output": dict(zip(("width", "height"), sizes.output, strict=True)),
            "steps": params.steps,
            "sampler": params.sampler,
            "num_samples": params.num_samples,
            "tiling": tiling,
            "gpu_seconds": predicted.gpu_seconds,
            "gpu_seconds_by_stage": predicted.stages,
            "basis": predicted.basis,
            "measured_jobs": predicted.jobs,
            "default_stages": predicted.default_stages,
            "queue": {
                "queued": queued,
                "running": running,
                "ready_workers": workers,
                "job_seconds": round(per_job, 3),
                "job_seconds_basis": "measured" if measured else "default",
                "expected_wait_s": expected_start_s(queued, running, workers, per_job),
            },
        }
    ).model_dump(mode="json")
