"""The web page (one static file, no build step, nothing fetched from elsewhere) and the signed links to files
in local-disk storage. Not part of the documented API."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from jobs.storage import LocalStore, ObjectMissing
from supir_core.formats import media_type_of

from ..deps import ServicesDep
from ..errors import ApiError

router = APIRouter(include_in_schema=False)
JOB_IN_KEY = re.compile(r"job_[0-9a-f]{32}")  # every object key names its job (jobs.record)
UI_PAGE = Path(__file__).parent.parent / "ui" / "index.html"


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
def ui() -> Response:
    return Response(UI_PAGE.read_bytes(), media_type="text/html; charset=utf-8")


FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    b'<rect width="32" height="32" rx="6" fill="#0b57d0"/>'
    b'<path d="M9 21l5-6 4 4 3-3 3 5z" fill="#fff"/><circle cx="21" cy="11" r="3" fill="#fff"/></svg>'
)


@router.get("/favicon.ico")
def favicon() -> Response:
    return Response(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"})


@router.get("/v1/files/{key:path}")
def signed_file(key: str, expires: int, signature: str, services: ServicesDep) -> Response:
    objects = services.objects
    if not isinstance(objects, LocalStore) or not objects.verify(key, expires, signature):
        raise ApiError("not_found", "no such file, or the link has expired")
    try:
        data = objects.get(key)
    except ObjectMissing:
        erased = JOB_IN_KEY.search(key)
        if erased is not None and services.store.tombstone(erased.group(0)) is not None:
            raise ApiError("job_deleted", f"job {erased.group(0)} was erased: its files are gone") from None
        raise ApiError("not_found", "no such file, or the link has expired") from None
    # by the extension its key ends in (jobs.record's key helpers); thumbnails are .jpg
    return Response(data, media_type=media_type_of(key), headers={"X-Content-Type-Options": "nosniff"})
