"""Image intake (api.intake.check_image) under hostile files, in-process: what is checked before any decoding,
what the one decode may cost, and what a refusal says. Each test names the fault it injects."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from api.errors import ApiError
from api.intake import HEAD_BYTES, HEADER_READ_BYTES, ImageInfo, check_image, check_stored_image
from jobs.settings import Settings
from jobs.storage import StorageError

# the API process does not turn warnings into errors; Pillow warns about odd files it still reads
pytestmark = pytest.mark.filterwarnings("ignore")

REPO = Path(__file__).resolve().parents[2]
SETTINGS = Settings(max_upload_bytes=100_000_000, max_input_pixels=20_000_000, max_output_pixels=80_000_000)


def refusal(data: bytes, settings: Settings = SETTINGS) -> ApiError:
    with pytest.raises(ApiError) as caught:
        check_image(data, settings, 1.0)
    return caught.value


def pillow_reads(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return True
    except Exception:
        return False


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


ADAM7 = ((0, 8, 0, 8), (4, 8, 0, 8), (0, 4, 4, 8), (2, 4, 0, 4), (0, 2, 2, 4), (1, 2, 0, 2), (0, 1, 1, 2))


def png_bytes(
    width: int, height: int, depth: int, color: int, interlace: bool, cut: int = 0, bad_row: int = -1
) -> bytes:
    """A PNG written by hand (Pillow writes no interlaced PNGs): rows of random bytes with filter type 0, the
    last `cut` raw bytes left out, and row number `bad_row` given the unknown filter type 5."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
    rng = np.random.default_rng(width * 1000 + height)
    raw, n = bytearray(), 0
    for x0, dx, y0, dy in ADAM7 if interlace else ((0, 1, 0, 1),):
        pass_w, pass_h = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if pass_w == 0 or pass_h == 0:
            continue
        row_bytes = (pass_w * channels * depth + 7) // 8
        for _ in range(pass_h):
            raw += bytes([5 if n == bad_row else 0]) + rng.integers(0, 256, row_bytes, dtype=np.uint8).tobytes()
            n += 1
    raw = raw[: len(raw) - cut]
    head = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, int(interlace))
    body = chunk(b"IHDR", head)
    if color == 3:
        body += chunk(b"PLTE", bytes(range(256)) * 3)
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("depth", "color"), [(8, 0), (1, 0), (16, 2), (4, 3), (8, 4), (16, 6)])
@pytest.mark.parametrize("interlace", [False, True], ids=["plain", "adam7"])
def test_png_scan_refuses_exactly_what_pillow_cannot_decode(depth: int, color: int, interlace: bool) -> None:
    """Fault: PNG pixel data one byte short, or a row with an unknown filter type, at every size 8..20 and
    both layouts. The scan (rows counted while inflating, no pixels decoded) must agree with Pillow's decode:
    a complete file is accepted, a short or bad one is refused by the scan itself (its own message)."""
    for width in range(8, 21):
        for height in range(8, 21, 3):
            whole = png_bytes(width, height, depth, color, interlace)
            assert pillow_reads(whole)
            assert check_image(whole, SETTINGS, 1.0).width == width
            short = png_bytes(width, height, depth, color, interlace, cut=1)
            assert not pillow_reads(short)
            assert "pixel data ends early" in refusal(short).message
            bad = png_bytes(width, height, depth, color, interlace, bad_row=height // 2)
            assert not pillow_reads(bad)
            assert "unknown filter type" in refusal(bad).message


PEAK_SCRIPT = """
import gc, io, sys, time, warnings
warnings.simplefilter("ignore")
from PIL import Image
from api.errors import ApiError
from api.intake import check_image
from jobs.settings import Settings

def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024

def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) * 1024

settings = Settings(max_upload_bytes=100_000_000, max_input_pixels=20_000_000, max_output_pixels=80_000_000)
for fmt in ("PNG", "JPEG", "WEBP"):  # plugins and codecs loaded before measuring
    b = io.BytesIO(); Image.new("RGB", (16, 16)).save(b, format=fmt); check_image(b.getvalue(), settings, 1.0)
data = sys.stdin.buffer.read()
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = rss()
try:
    check_image(data, settings, 1.0)
    outcome = "accepted"
except ApiError as exc:
    outcome = exc.code
print(outcome, hwm() - before)
"""

SIDE = 4000  # 16 megapixels: one RGB(A) image in Pillow's memory is SIDE × SIDE × 4 bytes = 61 MiB
IMAGE_BYTES = SIDE * SIDE * 4


@pytest.fixture(scope="module")
def photo_16mp() -> Image.Image:
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    rgb = np.stack([x * 255 // SIDE, y * 255 // SIDE, (x + y) * 255 // (2 * SIDE)], -1).astype(np.uint8)
    return Image.fromarray(rgb + np.random.default_rng(0).integers(0, 8, rgb.shape, dtype=np.uint8))


def encode(img: Image.Image, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, **kwargs)
    return buf.getvalue()


def peak(data: bytes) -> tuple[str, float]:
    """(outcome, peak memory of check_image as a multiple of one 16-megapixel image), in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT], input=data, capture_output=True, cwd=REPO, timeout=120, check=True
    )
    outcome, extra = proc.stdout.decode().split()
    return outcome, int(extra) / IMAGE_BYTES


def test_decode_memory_is_a_bounded_multiple_of_one_image(photo_16mp: Image.Image) -> None:
    """Fault: 16-megapixel files, whole and truncated, in the formats with the cheapest and the dearest decode.
    Bounds, as multiples of one decoded image (4000×4000×4 bytes), with measured values on the 2-core VM:
    truncated PNG (55 KB of a 16-megapixel file): ≤ 0.05 (measured 0.00: the scan refuses it, nothing decoded);
    whole PNG ≤ 1.2 (1.00); progressive JPEG 4:4:4 ≤ 1.7 (1.52, libjpeg's coefficients; the image itself is
    decoded at 1/8 scale); baseline JPEG ≤ 0.1 (0.02); lossless WebP ≤ 4.2 (4.00: libwebp's two canvases,
    Pillow's copy and the image)."""
    png = encode(photo_16mp, format="PNG", compress_level=1)
    cases = {
        "truncated png": (png[:55_000], "invalid_image", 0.05),
        "png": (png, "accepted", 1.2),
        "progressive jpeg": (
            encode(photo_16mp, format="JPEG", progressive=True, subsampling=0),
            "accepted",
            1.7,
        ),
        "baseline jpeg": (encode(photo_16mp, format="JPEG"), "accepted", 0.1),
        "webp": (encode(Image.new("RGB", (SIDE, SIDE), "teal"), format="WEBP", lossless=True), "accepted", 4.2),
    }
    measured = {}
    for name, (data, expected, bound) in cases.items():
        outcome, multiple = peak(data)
        measured[name] = round(multiple, 2)
        assert outcome == expected, name
        assert multiple <= bound, f"{name}: {multiple:.2f} × one image > {bound}"
    print(measured)


def test_truncated_jpeg_is_caught_by_the_reduced_decode(photo_16mp: Image.Image) -> None:
    """Fault: a JPEG cut in half. The intake decodes JPEG at 1/8 scale; libjpeg still reads every coded block,
    so the truncation is found."""
    data = encode(photo_16mp.resize((1600, 1200)), format="JPEG", progressive=True)
    error = refusal(data[: len(data) // 2])
    assert error.code == "invalid_image" and error.message.startswith("the JPEG image is damaged or truncated")


def gif_frames(screen: tuple[int, int], frames: list[tuple[int, int]]) -> bytes:
    """A GIF written by hand: a global palette and one image descriptor per (width, height), each with a
    minimal LZW stream (a clear code and an end code); a frame larger than its data is fine for a header test."""
    out = b"GIF89a" + struct.pack("<HHBBB", *screen, 0xF7, 0, 0) + bytes(range(256)) * 3
    for width, height in frames:
        out += b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x08\x02\x00\x01\x00"
    return out + b"\x3b"


def test_frames_after_the_first_cost_nothing() -> None:
    """Fault: a GIF of 100 000 frames, whose second frame declares 65535×65535 pixels, and an APNG declaring
    2**31 − 1 frames. Only the first frame is used: the header checks read no frame count, parse no later
    frame, and take about as long as for one frame."""
    first = Image.new("P", (64, 64), 3)
    one = encode(first, format="GIF")
    many = one[:-1] + gif_frames((64, 64), [(65535, 65535)] + [(64, 64)] * 100_000)[6 + 7 + 768 : -1] + b"\x3b"
    started = time.perf_counter()
    assert check_image(many, SETTINGS, 1.0).width == 64
    assert time.perf_counter() - started < 0.5  # measured: under 1 ms
    apng = encode(Image.new("RGB", (64, 64), "red"), format="PNG", save_all=True,
                  append_images=[Image.new("RGB", (64, 64), "blue")])  # fmt: skip
    at = apng.index(b"acTL") + 4
    apng = apng[: at - 8] + chunk(b"acTL", struct.pack(">II", 2**31 - 1, 0)) + apng[at + 12 :]
    assert check_image(apng, SETTINGS, 1.0).height == 64


def test_first_frame_larger_than_the_screen_is_measured_before_decoding() -> None:
    """Fault: a 16×16 GIF screen whose first frame declares 30000×30000 pixels (900 million: Pillow grows the
    image to its first frame). Refused from the header as a decompression bomb, nothing allocated."""
    error = refusal(gif_frames((16, 16), [(30000, 30000)]))
    assert error.code == "decompression_bomb"


def tiff_with_tiles(width: int, height: int, tile: int) -> bytes:
    """An 8-bit grayscale, deflate-compressed TIFF with one declared tile of tile × tile pixels (hand-written)."""
    pixels = zlib.compress(bytes(tile * tile))
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1),
            (322, 4, tile), (323, 4, tile), (324, 4, 0), (325, 4, len(pixels))]  # fmt: skip
    ifd_at = 8
    data_at = ifd_at + 2 + 12 * len(tags) + 4
    tags = [(t, k, data_at if t == 324 else v) for t, k, v in tags]
    ifd = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        value_bytes = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + value_bytes
    return b"II*\x00" + struct.pack("<I", ifd_at) + ifd + b"\x00\x00\x00\x00" + pixels


def test_tiff_tiles_larger_than_the_image_are_refused() -> None:
    """Fault: a 64×64 TIFF declaring one 16384×16384 tile (256 MiB that libtiff would allocate to decode it).
    Refused from the header; the same file with 64×64 tiles is accepted."""
    assert check_image(tiff_with_tiles(64, 64, 64), SETTINGS, 1.0).width == 64
    error = refusal(tiff_with_tiles(64, 64, 16384))
    assert error.code == "invalid_image" and "strips or tiles" in error.message


def test_webp_canvas_is_checked_before_libwebp_allocates_it() -> None:
    """Fault: a WebP header declaring a 16383×16383 canvas (268 megapixels; libwebp allocates canvases when the
    file is opened). Refused from the header bytes, before Pillow opens the file."""
    data = encode(Image.new("RGB", (64, 64)), format="WEBP", lossless=True)
    bits = (16383 - 1) | ((16383 - 1) << 14)
    forged = data[:21] + struct.pack("<I", bits | (int.from_bytes(data[21:25], "little") & ~0x0FFFFFFF)) + data[25:]
    error = refusal(forged)
    assert error.code == "decompression_bomb" and "268,402,689 pixels" in error.message


@pytest.mark.parametrize(
    ("data", "start"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "the file starts like a PNG image but its header cannot be read"),
        (b"\xff\xd8\xff" + b"\x00" * 30, "the file starts like a JPEG image but its header cannot be read"),
        (b"BM" + b"\x00" * 60, "the BMP image is damaged or truncated (Unsupported BMP header type (0))"),
        (b"RIFF\0\0\0\0WEBPVP8 " + b"\x00" * 30, "the WEBP image is damaged or truncated"),
    ],
    ids=["png", "jpeg", "bmp", "webp"],
)
def test_messages_name_the_format_and_leak_nothing(data: bytes, start: str) -> None:
    """Fault: files with the right magic bytes and garbage after them; Pillow's own messages carry object reprs
    such as `<_io.BytesIO object at 0x…>`. The message is a sentence naming the format and the problem."""
    error = refusal(data)
    assert error.code == "invalid_image" and error.message.startswith(start), error.message
    assert "0x" not in error.message and "<" not in error.message and "/" not in error.message


def test_pillow_text_loses_reprs_and_paths() -> None:
    """Fault: an exception text with an object repr and a server path in it (as Pillow and libtiff write them)."""
    from api.intake import _unreadable

    exc = OSError("cannot read <_io.BytesIO object at 0x7f3a2c1b9e40> from /srv/app/tmp/upload.tif: bad strip")
    message = _unreadable("TIFF", exc)
    assert message == "the TIFF image is damaged or truncated (cannot read from …: bad strip)"


# ---------------------------------------------------------------------------------------------------------
# check_stored_image: a direct upload's object, its header read in ranges (never the whole object)


class Ranges:
    """A stored object read as api.creation reads one: its first HEAD_BYTES at once, then ranges, each counted."""

    def __init__(self, data: bytes, fail: Exception | None = None) -> None:
        self.data, self.fail, self.fetched = data, fail, 0
        self.head = data[:HEAD_BYTES]

    def read_at(self, start: int, length: int) -> bytes:
        if self.fail is not None:
            raise self.fail
        self.fetched += length
        return self.data[start : start + length]

    def check(self, settings: Settings = SETTINGS) -> ImageInfo:
        return check_stored_image(self.head, self.read_at, len(self.data), settings, 1.0)


def stored_refusal(data: bytes) -> ApiError:
    with pytest.raises(ApiError) as caught:
        Ranges(data).check()
    return caught.value


def with_chunk_before_pixels(png: bytes, kind: bytes, size: int) -> bytes:
    at = png.index(b"IDAT") - 4
    return png[:at] + chunk(kind, bytes(size)) + png[at:]


def test_stored_header_checks_agree_with_check_image_on_each_format() -> None:
    """Fault: none (the baseline): each accepted format, a JPEG with EXIF orientation and a PNG whose header
    runs past the first HEAD_BYTES (a 300 kB private chunk before the pixel data). What the header says is
    what check_image says, read with a few ranges at most."""
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = Image.new("RGB", (40, 24), "teal")
    files = [encode(photo, format=fmt) for fmt in ("PNG", "BMP", "GIF", "TIFF", "WEBP")]
    files += [encode(photo, format="JPEG", exif=exif.tobytes()), encode(photo, format="WEBP", lossless=True)]
    files.append(with_chunk_before_pixels(encode(photo, format="PNG"), b"prVt", 300_000))
    fetched = []
    for data in files:
        stored = Ranges(data)
        assert stored.check() == check_image(data, SETTINGS, 1.0)
        fetched.append(stored.fetched)
    assert Ranges(files[5]).check().upright == (24, 40)  # the JPEG's EXIF turns it a quarter
    # the small files lie within their head; the last one's header was read in ranges past it, and no further
    assert fetched[:-1] == [0] * (len(files) - 1) and 300_000 - HEAD_BYTES < fetched[-1] < 400_000, fetched


def test_stored_header_checks_read_a_few_kilobytes_of_a_40_mb_image() -> None:
    """Fault: none: a 40 MB uncompressed BMP, TIFF and PNG (Pillow's getexif would decode a PNG to look for
    EXIF after its pixels). The header check reads its head and little else."""
    big = Image.new("RGB", (4000, 3400), "gray")
    for fmt, options in (("BMP", {}), ("TIFF", {}), ("PNG", {"compress_level": 0})):
        stored = Ranges(encode(big, format=fmt, **options))
        assert stored.check().width == 4000 and len(stored.data) > 40_000_000
        assert stored.fetched < 1_000_000, (fmt, stored.fetched)


def test_stored_header_refusals_keep_their_codes() -> None:
    """Fault: a decompression bomb's header, raw rows cut short, a WebP header with no readable canvas, and a
    PNG whose header would need more than HEADER_READ_BYTES read (a 10 MB chunk before the pixel data)."""
    bomb = png_bytes(8, 8, 8, 0, False)
    at = bomb.index(b"IHDR")
    bomb = bomb[: at - 4] + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)) + bomb[at + 21 :]
    assert stored_refusal(bomb).code == refusal(bomb).code == "decompression_bomb"
    bmp = encode(Image.new("RGB", (64, 64)), format="BMP")
    cut = stored_refusal(bmp[:-500])
    assert cut.code == "invalid_image" and "truncated" in cut.message
    assert stored_refusal(b"RIFF\0\0\0\0WEBPVP8 " + b"\x00" * 30).code == "invalid_image"
    long_header = with_chunk_before_pixels(encode(Image.new("RGB", (16, 16)), format="PNG"), b"prVt", 10_000_000)
    stored = Ranges(long_header)
    with pytest.raises(ApiError) as caught:
        stored.check()
    assert caught.value.code == "invalid_image" and "header is over" in caught.value.message
    assert stored.fetched <= HEADER_READ_BYTES + 1_000_000
    assert stored_refusal(b"not an image at all").code == "unsupported_media_type"


def test_a_store_failure_while_reading_the_header_is_no_fault_of_the_file() -> None:
    """Fault: the store fails a ranged read (S3 down): its StorageError (a 503) comes through, not invalid_image."""
    data = with_chunk_before_pixels(encode(Image.new("RGB", (16, 16)), format="PNG"), b"prVt", 300_000)
    with pytest.raises(StorageError):
        Ranges(data, fail=StorageError("S3 get failed: unreachable")).check()
