"""Schemathesis extension hooks (loaded by the CLI run in test_schemathesis), so that positive cases are requests
the API must accept: createJob's `image` part is a real, small photo in each media type the document declares
for it (not random bytes, rightly refused with 415/422), and a `uri` is the photo test_schemathesis serves (any
other URL is rightly refused: unreachable offline, or private)."""

from __future__ import annotations

import io
import os

import schemathesis
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from api.intake import MIN_SIDE

# Pillow's writer for each media type the document declares for `image` (api.openapi.IMAGE_MEDIA_TYPES)
WRITERS = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/webp": "WEBP",
    "image/tiff": "TIFF",
    "image/bmp": "BMP",
    "image/gif": "GIF",
}
# small, so a case is quick to make and send; 64² × the largest upscale (8) stays far under max_output_pixels
MAX_SIDE = 64

colours = st.tuples(*[st.integers(0, 255)] * 3)


@st.composite
def photos(draw: st.DrawFn, pillow_format: str) -> bytes:
    width = draw(st.integers(MIN_SIDE, MAX_SIDE))
    height = draw(st.integers(MIN_SIDE, MAX_SIDE))
    image = Image.new("RGB", (width, height), draw(colours))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=draw(colours))
    out = io.BytesIO()
    image.save(out, format=pillow_format)
    return out.getvalue()


for media_type, pillow_format in WRITERS.items():
    schemathesis.openapi.media_type(media_type, photos(pillow_format))

schemathesis.openapi.format("uri", st.just(os.environ["PHOTO_URL"]))


@schemathesis.hook
def filter_body(ctx: schemathesis.HookContext, body: object) -> bool:
    """RestoreParams' rule tile_stride ≤ tile_size has no JSON Schema spelling: bodies breaking it are not
    schema-valid requests the API must accept (422 invalid_parameter), so they are not sent. A batch's items
    apply their params over the shared ones: each item's params as they will run are checked."""
    fields = getattr(body, "body", body)  # a multipart body with per-part media types wraps its fields
    if not isinstance(fields, dict):
        return True
    shared = fields.get("params") if isinstance(fields.get("params"), dict) else {}
    items = fields.get("items") if isinstance(fields.get("items"), list) else []
    runs = [shared] + [
        {**shared, **item["params"]}
        for item in items
        if isinstance(item, dict) and isinstance(item.get("params"), dict)
    ]
    return all(_strides_fit(params) for params in runs)


def _strides_fit(params: dict) -> bool:
    size, stride = params.get("tile_size", 128), params.get("tile_stride", 64)
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (size, stride))  # 128.0 too
    return not numbers or stride <= size
