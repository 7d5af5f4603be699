"""The FastAPI app, built by `create_app(settings)`: middleware, error handlers, docs and one router per
resource (api.routes). The routes reach their collaborators (Redis store, object store, queue, event streams)
through the dependencies in api.deps, backed by app.state, so tests run the app against real servers without
patching library internals."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from jobs.redis_memory import check_redis_at_start
from jobs.settings import Settings, get_settings

from . import docs, errors, events, metrics, openapi
from .admin import AdminPort
from .limits import BodyLimits
from .ratelimit import RateLimitHeaders
from .routes import batches, estimates, jobs, operations, pages, uploads, usage
from .services import Services
from .shutdown import DRAIN, SHUTTING_DOWN, ShutdownGuard


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    settings = settings or get_settings()
    services = services or Services.from_settings(settings)
    streams = events.EventStreams(settings, services.store, SHUTTING_DOWN)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # a Redis that may evict job records: in production startup fails (uvicorn exits non-zero)
        await run_in_threadpool(check_redis_at_start, settings, "the API")
        DRAIN.reset()
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
    app.state.services, app.state.streams = services, streams
    errors.install(app)
    docs.install(app)
    openapi.install(
        app,
        tuple(settings.variant_files),
        settings.default_params,
        settings.retention_s,
        settings.max_upload_bytes,
        settings.max_batch_items,
        settings.upload_retention_s,
    )
    routers = (jobs.router, batches.router, estimates.router, uploads.router, usage.router, pages.router)
    for router in (*routers, operations.router):
        app.include_router(router)

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Any]) -> Response:
        start = time.perf_counter()
        response: Response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.REQUESTS.labels(route, request.method, str(response.status_code)).inc()
        metrics.REQUEST_SECONDS.labels(route, request.method).observe(time.perf_counter() - start)
        return response

    app.add_middleware(RateLimitHeaders)  # api.ratelimit: the per-key limiter's headers on every response
    app.add_middleware(ShutdownGuard)  # api.shutdown: a 503 with Retry-After, never a 500, once SIGTERM came
    app.add_middleware(AdminPort, admin_port=settings.api_admin_port)  # /metrics, /status: the admin port only
    # added last, so it is the outermost middleware: bodies are bounded before any other code sees them
    app.add_middleware(BodyLimits, settings=settings)
    return app
