"""Image files in and out: orientation, colour profiles, modes and alpha; sizes for SUPIR (spec §4.1).

Whatever comes in (EXIF-rotated JPEG, 16-bit or palette PNG, CMYK TIFF with an ICC profile, grayscale,
RGBA) becomes an 8-bit sRGB RGB image plus, where there was one, an alpha channel that is resized and
re-attached to the result. Grayscale inputs come back grayscale. The input's EXIF and ICC profile are kept so
the result file can carry them (`LoadedImage.result_metadata`, `encode_image`).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from .errors import InvalidInput
from .formats import OUTPUT_FORMATS
from .plan import SIZE_MULTIPLE as SIZE_MULTIPLE  # the size plan is torch-free (the API estimates with it)
from .plan import Sizes as Sizes
from .plan import plan_caption_sizes as plan_caption_sizes
from .plan import plan_sizes as plan_sizes

MAX_INPUT_PIXELS = 64_000_000
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
ORIENTATION = 0x0112  # EXIF IFD0 tag
MAX_JPEG_EXIF = 65533  # one APP1 marker's payload; Pillow refuses more


@dataclass(frozen=True)
class ImageMetadata:
    """What a result file carries besides pixels: EXIF (TIFF-structured, "Exif\\0\\0"-prefixed as Pillow writes it)
    and an ICC profile. None fields are not written."""

    exif: bytes | None = None
    icc_profile: bytes | None = None


@dataclass
class LoadedImage:
    rgb: Image.Image  # 8-bit sRGB
    alpha: Image.Image | None  # 8-bit "L", or None
    grayscale: bool
    source_mode: str
    exif: bytes | None = None  # the input's EXIF, Orientation removed (the pixels are already upright)
    icc_profile: bytes | None = None  # the input's ICC profile as embedded
    icc_converted: bool = False  # whether `rgb` was converted to sRGB through `icc_profile`

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.size

    def result_metadata(self) -> ImageMetadata:
        """The metadata a restoration of this input should carry: its EXIF, and the ICC profile that describes
        the result's pixels.

        Pixels converted through a non-sRGB profile are sRGB now, so they are tagged sRGB, never with the
        original profile; an sRGB original is kept byte for byte. Pixels the profile was not applied to (a 16-bit
        gray PNG, whose values are only rescaled, or a profile LittleCMS cannot use for this mode) are still in
        its colour space: it is kept when its colour space is the pixels' own (GRAY, RGB), dropped otherwise (a
        damaged profile included). `encode_image` then drops a profile whose colour space is not the file's:
        grayscale results, sRGB-encoded gray after a conversion, are written untagged, which viewers read as
        sRGB gray (Pillow cannot make a gray sRGB profile, and an RGB profile on a gray PNG is invalid).
        """
        icc = None
        if self.icc_profile and self.icc_converted:
            icc = self.icc_profile if _is_srgb(self.icc_profile) else srgb_profile()
        elif self.icc_profile and _description(self.icc_profile) is not None:  # a profile LittleCMS reads
            own = _colour_space(self.icc_profile) == ("GRAY" if self.grayscale else "RGB")
            icc = self.icc_profile if own else None
        return ImageMetadata(exif=self.exif, icc_profile=icc)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Integer and float single-channel images → 8-bit "L" by their value range, not by clipping."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.clip(arr, 0.0, 1.0) * 255.0 if arr.max() <= 1.0 else np.clip(arr, 0.0, 255.0)
    elif arr.dtype != np.uint8:
        arr = arr.astype(np.float64) * (255.0 / 65535.0)
    return Image.fromarray(np.round(arr).astype(np.uint8), mode="L")


def _to_srgb(img: Image.Image) -> tuple[Image.Image, bool]:
    """Convert through the embedded ICC profile, if any, to sRGB RGB; and whether the profile was applied."""
    icc = img.info.get("icc_profile")
    if icc and img.mode in ("RGB", "CMYK", "L"):
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if converted is not None:
                return converted, True
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: fall back to a plain conversion
    return img.convert("RGB"), False


@cache
def srgb_profile() -> bytes:
    """LittleCMS's sRGB profile, with a fixed creation date so that equal results encode to equal bytes."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    data[24:36] = struct.pack(">6H", 2000, 1, 1, 0, 0, 0)  # header dateTimeNumber; the profile ID is left unset
    return bytes(data)


def _colour_space(icc: bytes) -> str:
    """The profile header's data colour space ("RGB", "GRAY", "CMYK", …); "" for bytes too short to be one."""
    return icc[16:20].decode("ascii", "replace").strip() if len(icc) >= 128 else ""


def _description(icc: bytes) -> str | None:
    """The profile's description; None when LittleCMS cannot read the profile."""
    try:
        return ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc)))
    except (ImageCms.PyCMSError, OSError):
        return None


def _is_srgb(icc: bytes) -> bool:
    """An RGB profile whose description names sRGB ("sRGB IEC61966-2.1", Pillow's "sRGB built-in", …)."""
    return _colour_space(icc) == "RGB" and "sRGB" in (_description(icc) or "")


def _exif_without_orientation(info: dict[str | tuple[int, int], Any]) -> bytes | None:
    """The EXIF block of a JPEG, WebP or PNG (eXIf chunk or ImageMagick's text chunk), re-serialised without
    Orientation; None when there is none or it does not parse.

    Re-serialising also drops IFD1, the embedded thumbnail: it shows the unrestored, unrotated photo. TIFF
    tags are the container's own, not an EXIF block, and are not carried.
    """
    try:
        raw = info.get("exif")
        if raw is None and isinstance(text := info.get("Raw profile type exif"), str):
            raw = bytes.fromhex("".join(text.split("\n")[3:]))  # as Image.getexif reads it
        if not isinstance(raw, bytes) or not raw:
            return None
        exif = Image.Exif()
        exif.load(raw)
        exif.pop(ORIENTATION, None)
        return exif.tobytes() if len(exif) else None
    except Exception:  # malformed EXIF of any kind: the photo is still restored, without it
        return None


def load_image(source: str | Path | bytes) -> LoadedImage:
    """Decode an image file into sRGB RGB (+ alpha); raise InvalidInput for anything that is not one."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if img.width * img.height > MAX_INPUT_PIXELS:
                raise InvalidInput(
                    f"image is {img.width}×{img.height}: at most {MAX_INPUT_PIXELS:,} pixels are accepted"
                )
            img.load()
            mode = img.mode
            return _normalise(ImageOps.exif_transpose(img) or img)
    except InvalidInput:
        raise
    except UnidentifiedImageError:
        raise InvalidInput("not an image file in a format we read (PNG, JPEG, WebP, TIFF, BMP, GIF)") from None
    except FileNotFoundError:
        raise InvalidInput(f"no such file: {source!r}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if "mode" in locals():
            raise InvalidInput(f"cannot convert a {mode} image to RGB ({exc})") from None
        raise InvalidInput(f"the image file is damaged or truncated ({exc})") from None


def _normalise(img: Image.Image) -> LoadedImage:
    """Split off alpha, bring grayscale of any depth to 8 bits, and convert colour to sRGB."""
    mode = img.mode
    alpha = None
    exif = _exif_without_orientation(img.info)
    icc = img.info.get("icc_profile") or None
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = img.getchannel("A")
        img = img.convert("L" if img.mode.startswith("L") else "RGB")
    grayscale = img.mode in GRAY_MODES
    if img.mode == "1":
        img = img.convert("L")
    elif img.mode.startswith("I;16"):
        img = _to_8bit(img.convert("I"))
    elif img.mode in ("I", "F"):
        img = _to_8bit(img)
    rgb, converted = _to_srgb(img)
    return LoadedImage(
        rgb=rgb,
        alpha=alpha,
        grayscale=grayscale,
        source_mode=mode,
        exif=exif,
        icc_profile=icc if isinstance(icc, bytes) else None,
        icc_converted=converted,
    )


def to_model_input(rgb: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize to the processing size, [1, 3, H, W] in [−1, 1]."""
    resized = rgb.resize(size, Image.Resampling.BICUBIC) if rgb.size != size else rgb
    arr = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy())
    return (arr.permute(2, 0, 1)[None] / 127.5 - 1.0).contiguous()


def to_pil(image: torch.Tensor, size: tuple[int, int], quantize: str = "truncate") -> Image.Image:
    """[1, 3, H, W] in about [−1, 1] → 8-bit RGB at `size`, resized with antialiased bicubic. Levels are truncated
    as the official `Tensor2PIL` does (`quantize="round"`: to the nearest, as the official gradio demo)."""
    if tuple(image.shape[-2:]) != (size[1], size[0]):
        antialias = size[0] < image.shape[-1] or size[1] < image.shape[-2]
        image = F.interpolate(
            image.float(), size=(size[1], size[0]), mode="bicubic", antialias=antialias, align_corners=False
        )
    levels = (image[0].float().clamp(-1, 1) + 1) * 127.5
    if quantize not in ("truncate", "round"):
        raise ValueError(f"quantize={quantize!r}: truncate or round")
    levels = levels.round() if quantize == "round" else levels.floor()
    arr = levels.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


def finish(rgb: Image.Image, loaded: LoadedImage) -> Image.Image:
    """Give the result the input's kind: grayscale stays grayscale, alpha is resized and re-attached."""
    out = rgb.convert("L") if loaded.grayscale else rgb
    if loaded.alpha is not None:
        alpha = loaded.alpha.resize(out.size, Image.Resampling.LANCZOS)
        out = out.convert("LA" if loaded.grayscale else "RGBA")
        out.putalpha(alpha)
    return out


def encode_image(image: Image.Image, output_format: str, quality: int, metadata: ImageMetadata | None) -> bytes:
    """A result as PNG, JPEG or WebP file bytes, with `metadata` written in (None: no EXIF, no ICC profile).

    PNG is lossless and ignores `quality`. JPEG has no alpha: RGBA and LA are composited onto white; L stays
    grayscale. WebP is lossy at `quality` and keeps alpha (it has no gray mode: L is written as RGB). An ICC
    profile whose colour space is not the file's pixels' (an RGB profile on a gray JPEG or PNG) is left out,
    as is EXIF too long for a JPEG marker. The same image and arguments always give the same bytes.
    """
    if output_format not in OUTPUT_FORMATS:
        message = f"output_format={output_format!r} is unknown: choose one of {', '.join(OUTPUT_FORMATS)}"
        raise InvalidInput(message, code="invalid_parameter", field="output_format")
    if not 1 <= quality <= 100:
        message = f"output_quality={quality!r} is out of range: allowed 1 to 100"
        raise InvalidInput(message, code="invalid_parameter", field="output_quality")
    if output_format == "jpeg":
        image = _flattened(image)
    elif image.mode not in OUTPUT_FORMATS[output_format].modes:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    if image.info:  # Pillow's savers fall back to info (icc_profile, transparency, comment): only what we pass
        image = image.copy()
        image.info = {}

    options: dict[str, Any] = {}
    if metadata is not None:
        if metadata.exif and (output_format != "jpeg" or len(metadata.exif) <= MAX_JPEG_EXIF):
            options["exif"] = metadata.exif
        icc = metadata.icc_profile
        if icc and _colour_space(icc) == ("GRAY" if image.mode in ("L", "LA") else "RGB"):
            options["icc_profile"] = icc
    if output_format == "jpeg":
        # At high quality chroma subsampling is the loss people see (colour bleeding along edges), so keep full
        # chroma (4:4:4) there; below 90 size matters more and libjpeg's 4:2:0 is the usual trade.
        options.update(quality=quality, optimize=True, subsampling="4:4:4" if quality >= 90 else "4:2:0")
    elif output_format == "webp":
        options.update(quality=quality, lossless=False)
    buffer = io.BytesIO()
    image.save(buffer, format=output_format.upper(), **options)
    return buffer.getvalue()


@dataclass(frozen=True)
class EncodedImage:
    """One result file: its bytes, the extension of its name and its media type, and its pixel size."""

    data: bytes
    extension: str
    media_type: str
    width: int
    height: int


def encode_results(
    images: Iterable[Image.Image], output_format: str, quality: int, metadata: ImageMetadata | None
) -> Iterator[EncodedImage]:
    """Each image as a file of `output_format` (`encode_image`), one at a time so that only one is held, with the
    file extension and media type of the format table (supir_core.formats)."""
    for image in images:
        data = encode_image(image, output_format, quality, metadata)  # checks the format before the table is read
        file_format = OUTPUT_FORMATS[output_format]
        yield EncodedImage(data, file_format.extension, file_format.media_type, image.width, image.height)


def _flattened(image: Image.Image) -> Image.Image:
    """Composite an image with alpha onto white (JPEG has no alpha); RGB and L as they are."""
    if image.mode in ("RGB", "L"):
        return image
    if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGB")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    flat = Image.alpha_composite(white, image.convert("RGBA"))
    return flat.convert("L" if image.mode in ("LA", "La") else "RGB")  # gray: R = G = B, so L is exact
