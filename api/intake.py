"""Everything checked before a job is stored or queued: the image bytes, its size, and image URLs."""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from jobs.netguard import ForbiddenAddress, check_addresses
from jobs.settings import Settings

from .errors import ApiError

# leading bytes of the formats we accept → (format name, content type)
MAGIC: list[tuple[bytes, str, str]] = [
    (b"\x89PNG\r\n\x1a\n", "PNG", "image/png"),
    (b"\xff\xd8\xff", "JPEG", "image/jpeg"),
    (b"GIF87a", "GIF", "image/gif"),
    (b"GIF89a", "GIF", "image/gif"),
    (b"II*\x00", "TIFF", "image/tiff"),
    (b"MM\x00*", "TIFF", "image/tiff"),
    (b"BM", "BMP", "image/bmp"),
]
MIN_SIDE = 8
MAX_REDIRECTS = 3


@dataclass(frozen=True)
class ImageInfo:
    content_type: str
    width: int
    height: int


def sniff(data: bytes) -> tuple[str, str] | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP", "image/webp"
    for magic, fmt, content_type in MAGIC:
        if data.startswith(magic):
            return fmt, content_type
    return None


def check_image(data: bytes, settings: Settings, upscale: float, declared_type: str | None = None) -> ImageInfo:
    """Format by magic bytes, then size limits from the header, then a full decode (catches truncation)."""
    if not data:
        raise ApiError("missing_image", "the image is empty", field="image")
    if len(data) > settings.max_upload_bytes:
        raise ApiError(
            "file_too_large",
            f"the image is {len(data):,} bytes; at most {settings.max_upload_bytes:,} are accepted",
            field="image",
        )
    found = sniff(data)
    if found is None:
        what = f" (sent as {declared_type})" if declared_type else ""
        raise ApiError("unsupported_media_type", f"not a PNG, JPEG, WebP, TIFF, BMP or GIF image{what}", field="image")
    fmt, content_type = found
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=[fmt]) as img:
                width, height = img.size
                if width * height > settings.max_input_pixels:
                    code = "decompression_bomb" if width * height > 50 * len(data) * 8 else "image_too_large"
                    raise ApiError(
                        code,
                        f"the image has {width * height:,} pixels; at most {settings.max_input_pixels:,}",
                        field="image",
                    )
                if min(width, height) < MIN_SIDE:
                    raise ApiError(
                        "image_too_small",
                        f"the image is {width}×{height}; both sides must be at least {MIN_SIDE} pixels",
                        field="image",
                    )
                out_pixels = round(width * upscale) * round(height * upscale)
                if out_pixels > settings.max_output_pixels:
                    raise ApiError(
                        "output_too_large",
                        f"upscale {upscale} makes {out_pixels:,} output pixels; at most {settings.max_output_pixels:,}",
                        field="params.upscale",
                    )
                img.load()
        except ApiError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ApiError(
                "decompression_bomb", f"the image decompresses to too many pixels ({exc})", field="image"
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ApiError("invalid_image", f"the {fmt} image is damaged or truncated ({exc})", field="image") from None
    return ImageInfo(content_type, width, height)


def _check_addresses(url: str, field: str) -> None:
    try:
        check_addresses(url)
    except ForbiddenAddress:
        message = f"{field} points to a private, loopback or link-local address"
        raise ApiError("url_forbidden", message, field=field) from None
    except OSError:
        raise ApiError("url_fetch_failed", f"cannot resolve the host of {field}", field=field) from None


def check_public_url(url: str, settings: Settings, field: str, allow_private: bool) -> None:
    """Scheme and, unless allowed, the resolved addresses of a URL the service will call."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(
            "invalid_url" if field == "image_url" else "invalid_webhook_url",
            f"{field} must be an http or https URL",
            field=field,
        )
    if not allow_private:
        _check_addresses(url, field)


def fetch_image(url: str, settings: Settings) -> tuple[bytes, str | None]:
    """Download an image URL: addresses checked at every redirect, size- and time-capped."""
    limit = settings.max_upload_bytes
    deadline = time.monotonic() + settings.url_timeout_s  # for the whole download, not per read
    with httpx.Client(timeout=settings.url_timeout_s, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            check_public_url(url, settings, "image_url", settings.allow_private_urls)
            try:
                with client.stream("GET", url) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise ApiError(
                            "url_fetch_failed", f"image_url answered HTTP {response.status_code}", field="image_url"
                        )
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > limit:
                        raise ApiError(
                            "url_too_large",
                            f"image_url is {int(declared):,} bytes; at most {limit:,} are accepted",
                            field="image_url",
                        )
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if time.monotonic() > deadline:
                            raise httpx.ReadTimeout("download too slow")
                        if len(body) > limit:
                            raise ApiError("url_too_large", f"image_url is over {limit:,} bytes", field="image_url")
                    return bytes(body), response.headers.get("content-type")
            except httpx.TimeoutException:
                raise ApiError(
                    "url_fetch_failed", f"image_url did not answer within {settings.url_timeout_s} s", field="image_url"
                ) from None
            except httpx.HTTPError as exc:
                raise ApiError(
                    "url_fetch_failed", f"cannot fetch image_url ({type(exc).__name__})", field="image_url"
                ) from None
    raise ApiError("url_fetch_failed", f"image_url redirects more than {MAX_REDIRECTS} times", field="image_url")
