"""Everything checked before a job is stored or queued: the image bytes, its size, and image URLs."""

from __future__ import annotations

import contextlib
import io
import re
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from jobs.netguard import (
    ForbiddenAddress,
    InvalidURL,
    PinnedTarget,
    Resolver,
    resolve_checked,
    send_pinned,
    system_resolver,
)
from jobs.settings import Settings
from supir_core.errors import SupirError

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
HEAD_BYTES = 1 << 16  # a stored object's first bytes, read at once: the whole header of most files
# what Pillow's header parsers may read of a stored object beyond its head (JPEG APP segments, TIFF IFDs, PNG
# chunks before the pixel data): a header that needs more is refused rather than read
HEADER_READ_BYTES = 8 << 20


@dataclass(frozen=True)
class ImageInfo:
    content_type: str
    width: int  # as stored: before the worker turns the photo upright
    height: int
    quarter_turn: bool = False  # its EXIF orientation turns it a quarter (the worker's exif_transpose)

    @property
    def upright(self) -> tuple[int, int]:
        """(width, height) of the photo the worker restores."""
        return (self.height, self.width) if self.quarter_turn else (self.width, self.height)


def sniff(data: bytes) -> tuple[str, str] | None:
    """(format name, content type) from the leading bytes, or None when it is none of the accepted formats."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP", "image/webp"
    for magic, fmt, content_type in MAGIC:
        if data.startswith(magic):
            return fmt, content_type
    return None


# What Pillow may call a file of each sniffed format when it opens it as the worker does, with every plugin
# (a JPEG with a multi-picture index opens as MPO). Anything else would be decoded by another plugin: refused.
PILLOW_FORMATS = {
    "PNG": {"PNG"},
    "JPEG": {"JPEG", "MPO"},
    "GIF": {"GIF"},
    "TIFF": {"TIFF"},
    "BMP": {"BMP"},
    "WEBP": {"WEBP"},
}
# A TIFF strip or tile is decoded whole into one buffer (libtiff): its declared size may not exceed this many
# bytes per image pixel, or TIFF_PART_FLOOR bytes for small images (a 256×256 tile of an 8×8 image is fine).
TIFF_PART_BYTES_PER_PIXEL = 8
TIFF_PART_FLOOR = 4 << 20
# PNG raw modes (IHDR bit depth × channels) → bits per pixel in the compressed rows
PNG_RAW_BITS = {
    "1": 1, "L;2": 2, "L;4": 4, "L": 8, "I;16B": 16, "P;1": 1, "P;2": 2, "P;4": 4, "P": 8,
    "LA": 16, "LA;16B": 32, "RGB": 24, "RGB;16B": 48, "RGBA": 32, "RGBA;16B": 64,
}  # fmt: skip
# Adam7 passes: first column, column step, first row, row step
ADAM7 = ((0, 8, 0, 8), (4, 8, 0, 8), (0, 4, 4, 8), (2, 4, 0, 4), (0, 2, 2, 4), (1, 2, 0, 2), (0, 1, 1, 2))
PNG_DATA_CHUNKS = (b"IDAT", b"DDAT", b"fdAT")  # what Pillow reads as the first frame's pixel data
INFLATE_STEP = 1 << 16  # bytes of rows inflated at a time by the PNG scan
_OBJECT_REPR = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>")
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.~+-]+){2,}[\\/]?")


def check_image(data: bytes, settings: Settings, upscale: float, declared_type: str | None = None) -> ImageInfo:
    """Accept only an image the worker can decode, without ever decoding more than one bounded image.

    Order: format by magic bytes; the header (first frame only: frame counts are never read, later frames
    never parsed; WebP's canvas read from its bytes before libwebp allocates it) against the pixel limits and,
    for TIFF, the declared strip/tile size; for PNG and raw rows (BMP, uncompressed TIFF) a scan that finds
    short or corrupt pixel data without decoding any pixel; then one decode of the first frame, opened with
    every plugin exactly as the worker opens it, and the EXIF the worker reads.

    Peak memory of one call, in units of one decoded image W×H×4 bytes (4 bytes a pixel: Pillow's widest
    mode), measured at 4000×4000: refused by the header or the scan ≈ 0; PNG, TIFF, BMP 1.0 (less for 1- and
    2-byte modes: GIF 0.25); JPEG is decoded at 1/8 scale (0.02 baseline) but progressive JPEG keeps libjpeg's
    coefficient buffer (0.76 for 4:2:0, 1.5 for 4:4:4, 2.0 for CMYK); WebP 4.0 (libwebp's two canvases,
    Pillow's copy and the image). So one call stays under 4 × W×H×4 bytes plus a few MB, W×H at most
    settings.max_input_pixels. The caller runs at most settings.max_concurrent_decodes calls at once, so with
    the defaults (2, 16 M pixels: 64 MB an image) decodes hold at most 2 × 4 × 64 MB = 512 MB (two WebPs),
    128 MB for PNG, TIFF or BMP.
    """
    fmt, content_type = _sniffed(data, len(data), settings, declared_type)
    declared = _webp_canvas(data) if fmt == "WEBP" else None
    if declared:  # libwebp allocates its canvases as soon as Pillow opens the file
        _check_limits(*declared, len(data), settings, upscale)
    # no warnings filter here: it is process-wide and this runs in many threads; the limits below are ours
    with _refusals(fmt), Image.open(io.BytesIO(data)) as img:
        width, height = _checked_header(img, fmt, len(data), settings, upscale)
        problem = _scan_pixel_data(img, data)
        if problem:
            raise ApiError("invalid_image", f"the {fmt} image is {problem}", field="image")
        if img.format in ("JPEG", "MPO"):
            # 1/8 scale: libjpeg still reads every coded block, so truncation and corruption still fail
            img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
        img.load()
        quarter_turn = _check_orientation(img)
    return ImageInfo(content_type, width, height, quarter_turn)


def check_stored_image(
    head: bytes,
    read_at: Callable[[int, int], bytes],
    size: int,
    settings: Settings,
    upscale: float,
    declared_type: str | None = None,
) -> ImageInfo:
    """check_image's checks that need only the header, on a stored object of `size` bytes that is never read
    whole: `head` is its first bytes (HEAD_BYTES, or all of a smaller object), `read_at(start, length)` reads any
    other range. What a header says is checked as check_image checks it (format, the pixel limits and
    decompression bombs, TIFF strips and tiles, raw rows that end past the object, EXIF in the header); Pillow's
    header parsers read at most HEADER_READ_BYTES beyond `head`. Not checked without the pixel data: PNG rows (the
    scan), a PNG's EXIF after its pixels, and the one decode. A photo that fails those fails its job when the
    worker decodes it (invalid_input), not here.
    WebP: its header's canvas only (Pillow's WebP plugin reads the whole file to open it)."""
    fmt, content_type = _sniffed(head, size, settings, declared_type)
    if fmt == "WEBP":
        declared = _webp_canvas(head)
        if declared is None:
            raise ApiError(
                "invalid_image", "the file starts like a WEBP image but its header cannot be read", field="image"
            )
        _check_limits(*declared, size, settings, upscale)
        return ImageInfo(content_type, *declared)
    with (
        io.BufferedReader(_StoredFile(head, read_at, size), HEAD_BYTES) as stored,
        _refusals(fmt),
        Image.open(stored) as img,
    ):
        width, height = _checked_header(img, fmt, size, settings, upscale)
        problem = _short_raw_rows(img, size)
        if problem:
            raise ApiError("invalid_image", f"the {fmt} image is {problem}", field="image")
        # a PNG's getexif decodes it, for an eXIf after the pixels
        quarter_turn = _check_orientation(img) if img.format != "PNG" or "exif" in img.info else False
    return ImageInfo(content_type, width, height, quarter_turn)


def _checked_header(img: Image.Image, fmt: str, size: int, settings: Settings, upscale: float) -> tuple[int, int]:
    """The first frame's (width, height), once its header passes the checks that need no pixel data."""
    if img.format not in PILLOW_FORMATS[fmt]:
        raise ApiError("invalid_image", f"the file starts like a {fmt} image but is not a readable one", field="image")
    width, height = img.size
    _check_limits(width, height, size, settings, upscale)
    _check_parts(img, width, height)
    return width, height


@contextlib.contextmanager
def _refusals(fmt: str) -> Iterator[None]:
    """Whatever Pillow raises on this file as the file's problem (an ApiError): never a 500."""
    try:
        yield
    except (ApiError, SupirError):  # ours, and a store's failure to read the object (a 503, not the file's fault)
        raise
    except HeaderTooLong:
        message = f"the {fmt} image's header is over {HEADER_READ_BYTES:,} bytes"
        raise ApiError("invalid_image", message, field="image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning, if made an error
        raise ApiError(
            "decompression_bomb", f"the {fmt} image declares too many pixels ({_pillow_detail(exc)})", field="image"
        ) from None
    except MemoryError:
        raise  # the server's trouble, not the image's
    except Exception as exc:
        raise ApiError("invalid_image", _unreadable(fmt, exc), field="image") from None


class HeaderTooLong(Exception):
    """Pillow's header parser read more than HEADER_READ_BYTES of a stored object."""


class _StoredFile(io.RawIOBase):
    """A stored object as a read-only, seekable file: reads within `head` come from it, others from the store
    (read_at), at most HEADER_READ_BYTES of them in all; nothing read is kept."""

    def __init__(self, head: bytes, read_at: Callable[[int, int], bytes], size: int) -> None:
        super().__init__()
        self.head, self.read_at, self.size = head, read_at, size
        self.pos = self.fetched = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self.pos = base + offset
        return self.pos

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), self.size - self.pos)
        if wanted <= 0:
            return 0
        if self.pos + wanted <= len(self.head):
            data = self.head[self.pos : self.pos + wanted]
        else:
            self.fetched += wanted
            if self.fetched > HEADER_READ_BYTES:
                raise HeaderTooLong
            data = self.read_at(self.pos, wanted)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _sniffed(data: bytes, size: int, settings: Settings, declared_type: str | None) -> tuple[str, str]:
    """(format name, content type) of an image of `size` bytes that starts with `data`, of an accepted size and
    format, before Pillow sees it."""
    if not size:
        raise ApiError("missing_image", "the image is empty", field="image")
    if size > settings.max_upload_bytes:
        raise ApiError(
            "file_too_large",
            f"the image is {size:,} bytes; at most {settings.max_upload_bytes:,} are accepted (SUPIR_MAX_UPLOAD_BYTES)",
            field="image",
        )
    found = sniff(data)
    if found is None:
        what = f" (sent as {declared_type})" if declared_type else ""
        raise ApiError("unsupported_media_type", f"not a PNG, JPEG, WebP, TIFF, BMP or GIF image{what}", field="image")
    return found


def _check_limits(width: int, height: int, size: int, settings: Settings, upscale: float) -> None:
    pixels = width * height
    if pixels > settings.max_input_pixels:
        code = "decompression_bomb" if pixels > 50 * size * 8 else "image_too_large"
        message = f"the image has {pixels:,} pixels; at most {settings.max_input_pixels:,} (SUPIR_MAX_INPUT_PIXELS)"
        raise ApiError(code, message, field="image")
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
            f"upscale {upscale} makes {out_pixels:,} output pixels; at most {settings.max_output_pixels:,} "
            "(SUPIR_MAX_OUTPUT_PIXELS)",
            field="params.upscale",
        )


def _webp_canvas(data: bytes) -> tuple[int, int] | None:
    """The size a WebP header declares: the VP8X canvas, else the single lossless or lossy frame's."""
    kind = data[12:16]
    if kind == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if kind == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if kind == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def _check_parts(img: Image.Image, width: int, height: int) -> None:
    """Sizes a TIFF header declares for the strips or tiles of the first frame, each decoded whole."""
    tags = getattr(img, "tag_v2", None)
    if tags is None:
        return
    try:
        samples = int(tags.get(277, 1))  # SamplesPerPixel
        depth = int(max(tags.get(258, (1,)) or (1,)))  # BitsPerSample
        if 322 in tags:  # TileWidth, TileLength
            part_w, part_h = int(tags[322]), int(tags.get(323, height))
        else:  # strips of RowsPerStrip rows (libtiff caps them at the image height)
            part_w, part_h = width, min(height, int(tags.get(278, height)))
        part_bytes = max(part_w, 1) * max(part_h, 1) * samples * max(1, (depth + 7) // 8)
    except (TypeError, ValueError):
        return  # odd tag values: left to the decoder, whose failure is caught like any other
    if part_bytes > max(TIFF_PART_BYTES_PER_PIXEL * width * height, TIFF_PART_FLOOR):
        raise ApiError(
            "invalid_image",
            f"the TIFF image declares strips or tiles of {part_bytes:,} bytes for {width}×{height} pixels",
            field="image",
        )


def _scan_pixel_data(img: Image.Image, data: bytes) -> str | None:
    """What is wrong with the first frame's pixel data, found without decoding pixels; None if nothing is."""
    problem = _short_raw_rows(img, len(data))
    if problem:
        return problem
    tiles = getattr(img, "tile", [])
    if img.format == "PNG" and len(tiles) == 1 and tiles[0].codec_name == "zip" and tiles[0].extents:
        x0, y0, x1, y1 = tiles[0].extents
        bits = PNG_RAW_BITS.get(tiles[0].args if isinstance(tiles[0].args, str) else "")
        if bits is not None:
            rows = _png_rows(x1 - x0, y1 - y0, bits, bool(img.info.get("interlace")))
            return _scan_png(rows, tiles[0].offset, data)
    return None


def _short_raw_rows(img: Image.Image, size: int) -> str | None:
    """Raw rows (BMP, uncompressed TIFF) that end past the file's `size` bytes: every row but the last is a full
    stride, from the offsets the header declares."""
    for tile in getattr(img, "tile", []):
        args = tile.args
        if tile.codec_name == "raw" and isinstance(args, tuple) and len(args) >= 2 and isinstance(args[1], int):
            rows = tile.extents[3] - tile.extents[1] if tile.extents else img.height
            if args[1] > 0 and tile.offset + args[1] * (rows - 1) + 1 > size:
                return "truncated (the pixel rows end early)"
    return None


def _png_rows(width: int, height: int, bits: int, interlaced: bool) -> list[tuple[int, int]]:
    """(bytes per row with its filter byte, rows) of each non-empty pass."""
    passes = ADAM7 if interlaced else ((0, 1, 0, 1),)
    rows = []
    for x0, dx, y0, dy in passes:
        pass_w, pass_h = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if pass_w > 0 and pass_h > 0:
            rows.append((1 + (pass_w * bits + 7) // 8, pass_h))
    return rows


def _scan_png(passes: list[tuple[int, int]], offset: int, data: bytes) -> str | None:
    """Inflate the first frame's pixel data in small steps, counting rows and checking each row's filter type.

    Refuses only what Pillow cannot decode either: data that ends before the last row, corrupt deflate data
    before it, or a row with an unknown filter type. Memory: INFLATE_STEP bytes, whatever the image size.
    """
    bounds, start = [], 0  # (first byte, row length, end) of each pass in the inflated stream
    for row_len, rows in passes:
        bounds.append((start, row_len, start + row_len * rows))
        start += row_len * rows
    need, done = start, 0
    inflater = zlib.decompressobj()
    view = memoryview(data)
    # the chunk Pillow found the pixel data in: IDAT, or fdAT whose data starts after a sequence number
    pos = offset - 8 if data[offset - 4 : offset] == b"IDAT" else offset - 12
    if pos < 0 or data[pos + 4 : pos + 8] not in PNG_DATA_CHUNKS:
        return None
    while done < need:
        if pos + 8 > len(data) or bytes(view[pos + 4 : pos + 8]) not in PNG_DATA_CHUNKS:
            return "truncated (the pixel data ends early)"
        length = int.from_bytes(view[pos : pos + 4], "big")
        begin = pos + 8 + (4 if view[pos + 4 : pos + 8] == b"fdAT" else 0)
        pending: bytes | memoryview = view[begin : min(pos + 8 + length, len(data))]
        while pending and done < need:
            try:
                out = inflater.decompress(pending, min(INFLATE_STEP, need - done))
            except zlib.error:
                return "damaged (its compressed pixel data is corrupt)"
            for first, row_len, end in bounds:
                lo, hi = max(done, first), min(done + len(out), end)
                if lo < hi:
                    row = first + -(-(lo - first) // row_len) * row_len  # first row start at or after lo
                    if row < hi and max(out[row - done : hi - done : row_len]) > 4:
                        return "damaged (a pixel row has an unknown filter type)"
            done += len(out)
            pending = inflater.unconsumed_tail
            if inflater.eof and done < need:
                return "truncated (the compressed pixel data ends early)"
        pos += 8 + length + 4  # data and CRC (Pillow does not check pixel-data CRCs, nor do we)
    return None


def _check_orientation(img: Image.Image) -> bool:
    """What the worker does with EXIF when it turns the image upright (ImageOps.exif_transpose), without pixels;
    whether that turns it a quarter."""
    exif = img.getexif()
    orientation = exif.get(0x0112, 1)
    if orientation in range(2, 9) and ("exif" in img.info or "Raw profile type exif" in img.info):
        exif.tobytes()
    return orientation in (5, 6, 7, 8)


def _pillow_detail(exc: BaseException) -> str:
    """Pillow's message without object reprs or file paths, on one line, short."""
    text = _PATH.sub("…", _OBJECT_REPR.sub("", str(exc)))
    text = " ".join(text.split()).strip(" :;,.")
    return text if len(text) <= 160 else text[:157] + "…"


def _unreadable(fmt: str, exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return f"the file starts like a {fmt} image but its header cannot be read"
    variant = isinstance(exc, NotImplementedError)
    problem = "uses a variant that cannot be read" if variant else "is damaged or truncated"
    detail = _pillow_detail(exc)
    return f"the {fmt} image {problem}" + (f" ({detail})" if detail else "")


def _check_addresses(
    url: str, field: str, allow_private: bool = False, resolver: Resolver = system_resolver
) -> PinnedTarget:
    """Resolve the host once and check every address (unless allowed): the target to connect to, and only it."""
    try:
        return resolve_checked(url, allow_private, resolver)
    except InvalidURL:
        code = "invalid_url" if field == "image_url" else "invalid_webhook_url"
        raise ApiError(code, f"{field} must be an http or https URL", field=field) from None
    except ForbiddenAddress:
        # no resolved address in the message: the client learns nothing about our network it did not send
        setting = "SUPIR_ALLOW_PRIVATE_URLS" if field == "image_url" else "SUPIR_ALLOW_PRIVATE_WEBHOOKS"
        message = f"{field} points to a private, loopback or link-local address (allowed with {setting}=true)"
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


def fetch_image(url: str, settings: Settings, resolver: Resolver = system_resolver) -> tuple[bytes, str | None]:
    """Download an image URL, size- and time-capped. Every hop (the URL, each redirect) is resolved once,
    checked, and fetched from the checked address: a second DNS answer never decides where we connect."""
    limit = settings.max_upload_bytes
    deadline = time.monotonic() + settings.url_timeout_s  # for the whole download, not per read
    # no kept-alive connections: the pool knows a connection by IP and port only, so another host's request
    # could reuse a TLS session verified for the first host's name
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(timeout=settings.url_timeout_s, follow_redirects=False, limits=limits) as client:
        for _ in range(MAX_REDIRECTS + 1):
            check_public_url(url, settings, "image_url", allow_private=True)  # the scheme; addresses just below
            target = _check_addresses(url, "image_url", settings.allow_private_urls, resolver)
            try:
                request = client.build_request("GET", url)
                with contextlib.closing(send_pinned(client, request, target, stream=True)) as response:
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
                            f"image_url is {int(declared):,} bytes; at most {limit:,} are accepted "
                            "(SUPIR_MAX_UPLOAD_BYTES)",
                            field="image_url",
                        )
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if time.monotonic() > deadline:
                            raise httpx.ReadTimeout("download too slow")
                        if len(body) > limit:
                            message = f"image_url is over {limit:,} bytes (SUPIR_MAX_UPLOAD_BYTES)"
                            raise ApiError("url_too_large", message, field="image_url")
                    return bytes(body), response.headers.get("content-type")
            except httpx.TimeoutException:
                raise ApiError(
                    "url_fetch_failed",
                    f"image_url did not answer within {settings.url_timeout_s} s (SUPIR_URL_TIMEOUT_S)",
                    field="image_url",
                ) from None
            except httpx.HTTPError as exc:
                raise ApiError(
                    "url_fetch_failed", f"cannot fetch image_url ({type(exc).__name__})", field="image_url"
                ) from None
    raise ApiError("url_fetch_failed", f"image_url redirects more than {MAX_REDIRECTS} times", field="image_url")
