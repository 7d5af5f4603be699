"""Interactive API docs that work offline: Swagger UI and ReDoc served from the assets the `fastapi-offline`
package ships (FastAPI's defaults load them from a CDN, so `/docs` is blank on a closed network)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

ASSET_ROUTE = "/docs-assets"
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


def asset_dir() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def install(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc, with their scripts and styles under ASSET_ROUTE; create the app with
    docs_url=None and redoc_url=None so FastAPI's CDN pages are not registered."""
    assets = asset_dir()
    served = {p.name: p for p in assets.iterdir() if p.suffix in MEDIA_TYPES}
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get(f"{ASSET_ROUTE}/{{name}}", include_in_schema=False)
    def docs_asset(name: str) -> FileResponse:
        if name not in served:  # only the shipped files: no path from the request reaches the file system
            raise HTTPException(404)
        path = served[name]
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers={"Cache-Control": "max-age=86400"})

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} — API",
            swagger_js_url=f"{ASSET_ROUTE}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSET_ROUTE}/swagger-ui.css",
            swagger_favicon_url=f"{ASSET_ROUTE}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} — API reference",
            redoc_js_url=f"{ASSET_ROUTE}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSET_ROUTE}/favicon.png",
            with_google_fonts=False,
        )
