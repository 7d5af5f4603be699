"""The FastAPI app, built by `create_app(settings)`; its collaborators (Redis store, object store, queue) are
explicit seams on app.state, so tests run it against real servers without patching library internals."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import redis
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from jobs.queue import RESTORE_TASK, WEBHOOK_TASK, make_celery, webhook_queue
from jobs.record import TERMINAL, JobRecord, WebhookState, input_key, new_job_id
from jobs.settings import Settings, get_settings
from jobs.storage import LocalStore, ObjectStore, make_store
from jobs.store import JobStore
from supir_core.errors import InvalidInput
from supir_core.params import MAX_SEED, RestoreParams, validate_params

from . import docs, errors, events, metrics, openapi
from .auth import authenticate
from .errors import ApiError
from .intake import check_image, check_public_url, fetch_image
from .limits import BodyLimits
from .models import Job, JobList
from .openapi import errors as errors_doc

log = logging.getLogger("api.app")
RESULT_URL_TTL_S = 3600
UI_PAGE = Path(__file__).parent / "ui" / "index.html"
HEARTBEAT_FRESH_S = 60
MAX_JSON_DEPTH = 32  # nesting allowed in a JSON body or the params field
FORM_FIELD_BYTES = 64_000  # largest non-file multipart field (params is small)
MAX_URL_CHARS = 8192
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no spaces
IDEMPOTENCY_WAIT_S = 30.0  # how long a repeat waits for the first create's job to exist
IDEMPOTENCY_POLL_S = 0.1
IDEMPOTENCY_STALE_S = 300.0  # a claim this old with no job: its API process died; the next request takes it

# Set when the server starts shutting down (api.server's protocol) or the app's lifespan ends: open event
# streams end within events.WAKE_S instead of holding the process until their job ends.
SHUTTING_DOWN = threading.Event()


class Services:
    """What the routes use; built once per process."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        objects: ObjectStore,
        enqueue: Callable[[str], None],
        notify: Callable[[str], None] = lambda job_id: None,
    ):
        self.settings, self.store, self.objects, self.enqueue = settings, store, objects, enqueue
        self.notify = notify  # sends a job's webhook (to the light worker), for jobs the API itself ends
        # image_url downloads and full decodes run in the threadpool; these bound how many threads they take,
        # so slow URLs or big images cannot starve the other routes of threads
        self.fetches = asyncio.Semaphore(settings.max_concurrent_fetches)
        self.decodes = asyncio.Semaphore(settings.max_concurrent_decodes)

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, health_check_interval=30)
        store = JobStore(client, settings.key_prefix, retention_s=settings.retention_hours * 3600)
        celery = make_celery(settings)

        def enqueue(job_id: str) -> None:
            celery.send_task(RESTORE_TASK, args=[job_id], queue=settings.queue)

        def notify(job_id: str) -> None:
            celery.send_task(WEBHOOK_TASK, args=[job_id], queue=webhook_queue(settings))

        return cls(settings, store, make_store(settings), enqueue, notify)


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    settings = settings or get_settings()
    services = services or Services.from_settings(settings)
    streams = events.EventStreams(settings.redis_url, services.store, SHUTTING_DOWN)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        SHUTTING_DOWN.clear()
        yield
        SHUTTING_DOWN.set()
        await streams.aclose()

    app = FastAPI(
        title="supir-serve",
        version="0.1.0",
        description="Photo restoration with SUPIR, as queued jobs.",
        lifespan=lifespan,
        docs_url=None,  # api.docs serves /docs and /redoc from packaged assets, not a CDN
        redoc_url=None,
    )
    app.state.services = services
    errors.install(app)
    docs.install(app)
    openapi.install(app)

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Any]) -> Response:
        start = time.perf_counter()
        response: Response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.REQUESTS.labels(route, request.method, str(response.status_code)).inc()
        metrics.REQUEST_SECONDS.labels(route, request.method).observe(time.perf_counter() - start)
        return response

    # added last, so it is the outermost middleware: bodies are bounded before any other code sees them
    app.add_middleware(BodyLimits, settings=settings)

    def authorize(request: Request) -> str:
        """The caller's id, after its per-minute rate limit (reads and writes counted apart, so polling a job
        never uses up the creates); its job quota is left on request.state."""
        caller = authenticate(request, settings, services.store)
        if request.method in ("GET", "HEAD"):
            kind, bucket = "read", f"{caller.id}:read"
            limit = caller.read_rate_limit_per_minute or settings.read_rate_limit_per_minute
        else:
            kind, bucket = "write", caller.id
            limit = caller.rate_limit_per_minute or settings.rate_limit_per_minute
        wait = services.store.hit_rate_limit(bucket, limit)
        if wait is not None:
            metrics.REJECTED.labels("rate_limited").inc()
            message = f"over {limit} {kind} requests a minute"
            raise ApiError("rate_limited", message, headers={"Retry-After": str(wait)})
        request.state.max_active_jobs = caller.max_active_jobs or settings.max_active_jobs
        return caller.id

    def own_job(job_id: str, owner: str) -> JobRecord:
        record = services.store.get(job_id)
        if record is None or record.owner != owner:  # another key's job does not exist for you
            raise ApiError("not_found", f"no job {job_id}")
        return record

    # ---------------------------------------------------------------------------------------
    # jobs

    @app.post(
        "/v1/jobs",
        status_code=202,
        tags=["jobs"],
        operation_id="createJob",
        response_model=Job,
        responses={
            200: {"model": Job, "description": "an Idempotency-Key replay: the first job"},
            **errors_doc(400, 401, 403, 408, 409, 413, 415, 422, 429, 503),
        },
        openapi_extra=CREATE_DOCS,
    )
    async def create_job(request: Request) -> JSONResponse:
        """Queue a restoration: multipart (`image`, `params` JSON, `preset`, `webhook_url`) or JSON with `image_url`."""
        owner = await run_in_threadpool(authorize, request)  # Redis calls stay off the event loop
        fields, data, declared = await _read_create_request(request, settings)
        idempotency_key = request.headers.get("idempotency-key")
        if idempotency_key is not None and not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            message = "Idempotency-Key must be 1-255 printable ASCII characters without spaces"
            raise ApiError("invalid_request", message, field="Idempotency-Key")
        quota = request.state.max_active_jobs
        return await _create(services, owner, quota, fields, data, declared, idempotency_key)

    @app.get(
        "/v1/jobs",
        tags=["jobs"],
        operation_id="listJobs",
        response_model=JobList,
        responses=errors_doc(400, 401, 429, 503),
    )
    def list_jobs(
        request: Request,
        status: str | None = Query(None, pattern="^(queued|running|succeeded|failed|canceled)$"),
        limit: int = Query(20, ge=1, le=100),
        cursor: int = Query(0, ge=0, le=10**9),  # Redis ranges are 64-bit; a huge cursor would be a 500
    ) -> dict[str, Any]:
        owner = authorize(request)
        page, next_cursor = services.store.list_jobs(owner, status, cursor, limit)
        return {"jobs": [_view(r, services) for r in page], "next_cursor": next_cursor}

    @app.get(
        "/v1/jobs/{job_id}",
        tags=["jobs"],
        operation_id="getJob",
        response_model=Job,
        responses=errors_doc(401, 404, 429, 503),
    )
    def get_job(job_id: str, request: Request) -> dict[str, Any]:
        return _view(own_job(job_id, authorize(request)), services)

    @app.post(
        "/v1/jobs/{job_id}/cancel",
        tags=["jobs"],
        operation_id="cancelJob",
        response_model=Job,
        responses=errors_doc(401, 404, 409, 429, 503),
    )
    def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
        """Queued jobs end at once; running ones stop before their next sampler step."""
        record = own_job(job_id, authorize(request))
        if record.terminal:
            raise ApiError("job_not_cancelable", f"job {job_id} has already {record.status}")
        services.store.request_cancel(job_id)
        if record.status == "queued":
            ended = services.store.update(
                job_id,
                lambda r: (
                    r.model_copy(update={"status": "canceled", "finished_at": time.time()})
                    if r.status == "queued"
                    else None
                ),
            )
            if ended is not None and ended.webhook is not None and ended.webhook.state == "pending":
                # now, not when a GPU worker reaches the job's queued task (its safety net, if this send is lost)
                try:
                    services.notify(job_id)
                except Exception:
                    log.warning("job %s: its webhook could not be queued; the worker sends it later", job_id)
        return _view(services.store.get(job_id) or record, services)

    @app.get(
        "/v1/jobs/{job_id}/events",
        tags=["jobs"],
        operation_id="streamJobEvents",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "Server-Sent Events: `event: job`, `id: <version>`, `data: <Job as JSON>`",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            **errors_doc(401, 404, 429, 503),
        },
    )
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """Server-Sent Events: the job after every change, until it ends; `id:` is the job's version, and
        `Last-Event-ID` resumes after it. See api.events."""
        owner = await run_in_threadpool(authorize, request)
        await run_in_threadpool(own_job, job_id, owner)
        last_seen = events.parse_last_event_id(request.headers.get("last-event-id"))
        return streams.response(job_id, owner, last_seen, lambda record: _view(record, services))

    @app.get(
        "/v1/jobs/{job_id}/result",
        tags=["jobs"],
        operation_id="getJobResult",
        response_class=Response,
        responses={
            200: {
                "description": "the restored PNG",
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            },
            307: {"description": "a redirect to a presigned URL of the PNG (S3 storage)"},
            **errors_doc(401, 404, 409, 429, 503),
        },
    )
    def job_result(job_id: str, request: Request) -> Response:
        record = own_job(job_id, authorize(request))
        if record.status != "succeeded" or record.result is None:
            raise ApiError(
                "result_not_ready", f"job {job_id} is {record.status}; a result exists only when it has succeeded"
            )
        if isinstance(services.objects, LocalStore):
            return Response(services.objects.get(record.result.key), media_type=record.result.content_type)
        return RedirectResponse(services.objects.url(record.result.key, RESULT_URL_TTL_S), status_code=307)

    @app.get("/v1/files/{key:path}", include_in_schema=False)
    def signed_file(key: str, expires: int, signature: str) -> Response:
        objects = services.objects
        if not isinstance(objects, LocalStore) or not objects.verify(key, expires, signature):
            raise ApiError("not_found", "no such file, or the link has expired")
        return Response(objects.get(key), media_type="image/png")

    # ---------------------------------------------------------------------------------------
    # the web page: one static file, no build step, nothing fetched from elsewhere

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui", status_code=307)

    @app.get("/ui", include_in_schema=False)
    def ui() -> Response:
        return Response(UI_PAGE.read_bytes(), media_type="text/html; charset=utf-8")

    # ---------------------------------------------------------------------------------------
    # operations

    @app.get("/healthz", tags=["operations"], operation_id="healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        operation_id="readyz",
        responses={503: {"description": "Redis or storage unreachable, or no ready worker seen"}},
    )
    def readyz() -> JSONResponse:
        checks: dict[str, str] = {}
        try:
            services.store.r.ping()
            checks["redis"] = "ok"
            beat = services.store.last_heartbeat()
            fresh = beat is not None and time.time() - beat < HEARTBEAT_FRESH_S
            checks["worker"] = "ok" if fresh else "no ready worker seen in the last minute"
        except redis.RedisError as exc:
            checks["redis"] = f"unreachable: {type(exc).__name__}"
        try:
            services.objects.ping()
            checks["storage"] = "ok"
        except Exception as exc:  # the type only: messages name buckets, paths and hosts
            checks["storage"] = f"unreachable: {type(exc).__name__}"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get(
        "/metrics",
        tags=["operations"],
        operation_id="metrics",
        response_class=PlainTextResponse,
        responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}},
    )
    def prometheus() -> Response:
        body, content_type = metrics.render(services.store)
        return Response(body, media_type=content_type)

    return app


PRESET_SCHEMA = {"type": "string", "enum": ["quality", "fidelity", "lightning"], "description": "named settings"}
PARAMS_REF = {"$ref": "#/components/schemas/RestoreParams"}
CREATE_DOCS: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "title": "JobUpload",
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {
                            "type": "string",
                            "format": "binary",
                            "description": "PNG, JPEG, WebP, TIFF, BMP, GIF",
                        },
                        "params": PARAMS_REF,
                        "preset": PRESET_SCHEMA,
                        "webhook_url": {"type": "string", "description": "POSTed the job when it ends"},
                    },
                },
                "encoding": {"params": {"contentType": "application/json"}},
            },
            "application/json": {
                "schema": {
                    "title": "JobFromUrl",
                    "type": "object",
                    "required": ["image_url"],
                    "properties": {
                        "image_url": {"type": "string", "description": "an http(s) URL of the photo"},
                        "params": PARAMS_REF,
                        "preset": PRESET_SCHEMA,
                        "webhook_url": {"type": "string", "description": "POSTed the job when it ends"},
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
        }
    ],
}


async def _read_create_request(request: Request, settings: Settings) -> tuple[dict[str, Any], bytes | None, str | None]:
    """(fields, uploaded bytes or None, declared content type) from a multipart or JSON request.

    Body size is bounded by the BodyLimits middleware before any of this reads it."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form(max_files=1, max_fields=8, max_part_size=FORM_FIELD_BYTES)
        fields: dict[str, Any] = {k: v for k, v in form.items() if not isinstance(v, UploadFile)}
        upload = form.get("image")
        if "params" in fields:
            fields["params"] = _parse_json(fields["params"], "the params field", field="params")
        if isinstance(upload, UploadFile):
            data = await upload.read(settings.max_upload_bytes + 1)
            return fields, data, upload.content_type
        if "image_url" not in fields:
            raise ApiError(
                "missing_image", "send the photo as the multipart file field 'image' (or JSON image_url)", field="image"
            )
        return fields, None, None
    if content_type.startswith("application/json"):
        body = _parse_json(await request.body(), "the request body")
        if not isinstance(body, dict):
            raise ApiError("invalid_json", "the request body must be a JSON object")
        return body, None, None
    raise ApiError("unsupported_media_type", "send multipart/form-data with an image, or JSON with image_url")


def _parse_json(raw: str | bytes, what: str, field: str | None = None) -> Any:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser's stack
        raise ApiError("invalid_json", f"{what} is not valid JSON", field=field) from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise ApiError("invalid_json", f"{what} is nested deeper than {MAX_JSON_DEPTH} levels", field=field)
    return value


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


ALLOWED_FIELDS = {"params", "preset", "webhook_url", "image_url"}


def _validated(
    fields: dict[str, Any], data: bytes | None
) -> tuple[dict[str, Any], RestoreParams, str | None, str | None, str | None]:
    """Cheap checks, no I/O: (raw params, params, preset, image_url, webhook_url)."""
    unknown = set(fields) - ALLOWED_FIELDS
    if unknown:
        raise ApiError("invalid_request", f"unknown field {sorted(unknown)[0]!r}", field=sorted(unknown)[0])
    image_url, webhook_url, preset = fields.get("image_url"), fields.get("webhook_url"), fields.get("preset")
    # JSON can carry any type: each field's type is checked before anything uses it
    if image_url is not None and not isinstance(image_url, str):
        raise ApiError("invalid_url", "image_url must be a string", field="image_url")
    if webhook_url is not None and not isinstance(webhook_url, str):
        raise ApiError("invalid_webhook_url", "webhook_url must be a string", field="webhook_url")
    if preset is not None and not isinstance(preset, str):
        raise ApiError("invalid_parameter", "preset must be a string", field="preset")
    raw_params = fields.get("params")
    raw_params = {} if raw_params is None else raw_params
    if not isinstance(raw_params, dict):
        raise ApiError("invalid_request", "params must be a JSON object", field="params")
    if data is not None and image_url:
        raise ApiError(
            "conflicting_image_sources", "send either an image file or image_url, not both", field="image_url"
        )
    if data is None and not image_url:
        raise ApiError("missing_image", "send an image file or image_url", field="image")
    if image_url is not None and not _http_url(image_url):
        raise ApiError("invalid_url", "image_url must be an http or https URL", field="image_url")
    if webhook_url is not None and not _http_url(webhook_url):
        raise ApiError("invalid_webhook_url", "webhook_url must be an http or https URL", field="webhook_url")
    try:
        params = validate_params(raw_params, preset=preset)
    except InvalidInput as exc:
        raise ApiError(
            exc.code, exc.message, field=f"params.{exc.field}" if exc.field and exc.field != "preset" else exc.field
        ) from None
    return raw_params, params, preset, image_url, webhook_url


def _http_url(url: str) -> bool:
    """An http(s) URL with a host, of sane length; urlsplit raises on some malformed ones ("http://[")."""
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and len(url) <= MAX_URL_CHARS
    except ValueError:
        return False


def _request_hash(
    params: RestoreParams, preset: str | None, image_url: str | None, webhook_url: str | None, data: bytes | None
) -> str:
    """Over the validated request (params with their defaults, so `2` and `2.0` or an omitted default match)."""
    request = {
        "params": params.model_dump(mode="json"),
        "preset": preset,
        "image_url": image_url,
        "webhook_url": webhook_url,
        "image": hashlib.sha256(data).hexdigest() if data else None,
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


async def _create(
    services: Services,
    owner: str,
    quota: int,
    fields: dict[str, Any],
    data: bytes | None,
    declared: str | None,
    idempotency_key: str | None,
) -> JSONResponse:
    """Validate, claim a quota slot, fetch and decode (bounded), store the input, create the record, enqueue.

    Blocking work (Redis, storage, DNS, downloads, decodes) runs in the threadpool; downloads and decodes
    under their semaphores."""
    settings, store = services.settings, services.store
    _, params, preset, image_url, webhook_url = _validated(fields, data)
    if webhook_url is not None:
        await run_in_threadpool(check_public_url, webhook_url, settings, "webhook_url", settings.allow_private_webhooks)
    request_hash = await run_in_threadpool(_request_hash, params, preset, image_url, webhook_url, data)

    # the same Idempotency-Key with the same request returns the first job: claimed before any work
    job_id = new_job_id()
    if idempotency_key:
        replay = await _claim_or_replay(services, owner, idempotency_key, job_id, request_hash)
        if replay is not None:
            return replay
    claimed = False
    try:
        # one atomic check-and-claim: concurrent creates cannot all pass a separate count
        claimed = await run_in_threadpool(store.claim_slot, owner, job_id, quota)
        if not claimed:
            message = f"at most {quota} jobs may be queued or running at once"
            raise ApiError("quota_exceeded", message, headers={"Retry-After": "10"})
        if data is not None:
            image = data
        else:
            assert image_url is not None  # _validated: one of the two
            async with services.fetches:
                image, declared = await run_in_threadpool(fetch_image, image_url, settings)
        async with services.decodes:
            info = await run_in_threadpool(check_image, image, settings, params.upscale, declared)
        seed = (
            params.seed
            if params.seed is not None
            else int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:4]) % (MAX_SEED + 1)
        )
        record = JobRecord(
            id=job_id,
            owner=owner,
            params=params.model_copy(update={"seed": seed}).model_dump(),
            preset=preset,
            input_key=input_key(job_id),
            input_content_type=info.content_type,
            input_width=info.width,
            input_height=info.height,
            webhook=WebhookState(url=webhook_url) if webhook_url else None,
            request_hash=request_hash,
        )
        # input first, record second, task last: a failure leaves no record pointing at a missing input
        await run_in_threadpool(services.objects.put, record.input_key, image, info.content_type)
        await run_in_threadpool(store.create, record)  # the record keeps the claimed slot
    except BaseException as exc:  # any failure, a cancelled request too, gives back the slot and the key
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(_undo_claims, store, owner, job_id, job_id if claimed else None, idempotency_key)
        if isinstance(exc, ApiError):
            metrics.REJECTED.labels(exc.code).inc()
        raise
    if idempotency_key:
        with contextlib.suppress(redis.RedisError):  # only informative: waiters look for the record itself
            await run_in_threadpool(store.confirm_idempotency_key, owner, idempotency_key, job_id, request_hash)
    try:
        await run_in_threadpool(services.enqueue, job_id)
    except Exception as exc:
        error = {"code": "queue_unavailable", "message": "the job queue is unavailable"}
        await run_in_threadpool(store.finish, job_id, "failed", error=error)  # ends it and frees its slot
        # the failed job stays visible, but its key is released: a retry with the key makes a new job
        await run_in_threadpool(_undo_claims, store, owner, job_id, None, idempotency_key)
        raise ApiError(
            "queue_unavailable", "the job queue is unavailable; try again", headers={"Retry-After": "5"}
        ) from exc
    metrics.JOBS_CREATED.inc()
    view = await run_in_threadpool(_view, record, services)
    return JSONResponse(view, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


async def _claim_or_replay(
    services: Services, owner: str, key: str, job_id: str, request_hash: str
) -> JSONResponse | None:
    """Claim the key for job_id (None: this request makes the job), or answer with the job of the request that
    holds it: waits (async, bounded) while that request is still creating it, and takes the key over if that
    request fails and releases it, so one job results."""
    store = services.store
    deadline = time.monotonic() + IDEMPOTENCY_WAIT_S
    while True:
        holder = await run_in_threadpool(store.claim_idempotency_key, owner, key, job_id, request_hash)
        if holder is None:
            return None
        if holder.get("hash") != request_hash:
            message = "this Idempotency-Key was used with a different request"
            raise ApiError("idempotency_conflict", message, field="Idempotency-Key")
        record = await run_in_threadpool(store.get, holder["job"])
        queue_failed = record is not None and record.error is not None and record.error.code == "queue_unavailable"
        if record is not None and not queue_failed:  # a queue failure releases the key next: wait for that
            view = await run_in_threadpool(_view, record, services)
            return JSONResponse(view, status_code=200, headers={"Idempotent-Replayed": "true"})
        if time.time() - float(holder.get("at", 0)) > IDEMPOTENCY_STALE_S:
            await run_in_threadpool(store.release_idempotency_key, owner, key, holder["job"])
            continue
        if time.monotonic() > deadline:
            message = "a request with this Idempotency-Key is still being created; try again"
            raise ApiError("idempotency_in_progress", message, field="Idempotency-Key", headers={"Retry-After": "5"})
        await asyncio.sleep(IDEMPOTENCY_POLL_S)


def _undo_claims(
    store: JobStore, owner: str, job_id: str, slot_job_id: str | None, idempotency_key: str | None
) -> None:
    """After a failed create: give back its quota slot and its Idempotency-Key (best effort: Redis may be down)."""
    with contextlib.suppress(redis.RedisError):
        if slot_job_id is not None:
            store.release_slot(owner, slot_job_id)
    with contextlib.suppress(redis.RedisError):
        if idempotency_key:
            store.release_idempotency_key(owner, idempotency_key, job_id)


def _view(record: JobRecord, services: Services) -> dict[str, Any]:
    """What a client sees of a job (never its owner or storage keys)."""
    view: dict[str, Any] = {
        "id": record.id,
        "status": record.status,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "progress": record.progress.model_dump(),
        "queue_position": services.store.queue_position(record.id) if record.status == "queued" else None,
        "seconds": record.seconds,
        "params": record.params,
        "preset": record.preset,
        "input": {
            "width": record.input_width,
            "height": record.input_height,
            "content_type": record.input_content_type,
        },
        "caption": record.caption,
        "positive_prompt": record.positive_prompt,
        "negative_prompt": record.negative_prompt,
        "attempts": record.attempts,
        "error": record.error.model_dump() if record.error else None,
        "result": None,
        "webhook": record.webhook.model_dump() if record.webhook else None,
        # the cancel was taken: a running job stops at its next step (one EXISTS, for active jobs only)
        "cancel_requested": record.status == "canceled"
        or (record.status not in TERMINAL and services.store.cancel_requested(record.id)),
    }
    if record.status == "succeeded" and record.result is not None:
        result = record.result.model_dump(exclude={"key"})
        result["url"] = services.objects.url(record.result.key, RESULT_URL_TTL_S)
        view["result"] = result
    if record.status in TERMINAL:
        view["queue_position"] = None
    return view
