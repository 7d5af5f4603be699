"""Image files in and out: orientation, colour profiles, modes and alpha; sizes for SUPIR (spec §4.1).

Whatever comes in (EXIF-rotated JPEG, 16-bit or palette PNG, CMYK TIFF with an ICC profile, grayscale,
RGBA) becomes an 8-bit sRGB RGB image plus, where there was one, an alpha channel that is resized and
re-attached to the result. Grayscale inputs come back grayscale.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from .errors import InvalidInput

SIZE_MULTIPLE = 64  # processing sides are rounded to this (latent /8, UNet /4 more, and the adaptor likewise)
MAX_INPUT_PIXELS = 64_000_000
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class LoadedImage:
    rgb: Image.Image  # 8-bit sRGB
    alpha: Image.Image | None  # 8-bit "L", or None
    grayscale: bool
    source_mode: str

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.size


def _to_8bit(img: Image.Image) -> Image.Image:
    """Integer and float single-channel images → 8-bit "L" by their value range, not by clipping."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.clip(arr, 0.0, 1.0) * 255.0 if arr.max() <= 1.0 else np.clip(arr, 0.0, 255.0)
    elif arr.dtype != np.uint8:
        arr = arr.astype(np.float64) * (255.0 / 65535.0)
    return Image.fromarray(np.round(arr).astype(np.uint8), mode="L")


def _to_srgb(img: Image.Image) -> Image.Image:
    """Convert through the embedded ICC profile, if any, to sRGB RGB."""
    icc = img.info.get("icc_profile")
    if icc and img.mode in ("RGB", "CMYK", "L"):
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if converted is not None:
                return converted
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: fall back to a plain conversion
    return img.convert("RGB")


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
    return LoadedImage(rgb=_to_srgb(img), alpha=alpha, grayscale=grayscale, source_mode=mode)


@dataclass(frozen=True)
class Sizes:
    """Input, processing and output sizes, (width, height)."""

    input: tuple[int, int]
    process: tuple[int, int]
    output: tuple[int, int]


def plan_sizes(size: tuple[int, int], upscale: float, min_size: int) -> Sizes:
    """Output = upscale × input; processing size = that, raised to a min_size short side, sides rounded to 64."""
    w, h = size
    out_w, out_h = max(round(w * upscale), 1), max(round(h * upscale), 1)
    scale = max(1.0, min_size / min(out_w, out_h))
    proc_w = max(SIZE_MULTIPLE, round(out_w * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    proc_h = max(SIZE_MULTIPLE, round(out_h * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    return Sizes(input=(w, h), process=(proc_w, proc_h), output=(out_w, out_h))


def plan_caption_sizes(size: tuple[int, int], upscale: float, short_side: int = 512) -> Sizes:
    """The official caption input: the upscaled input's shape at a `short_side` short side; processed with sides
    rounded to 64 (`process`), handed to the captioner at the unrounded size (`output`)."""
    w, h = size[0] * upscale, size[1] * upscale
    scale = short_side / min(w, h)
    out_w, out_h = round(w * scale), round(h * scale)
    proc_w = max(SIZE_MULTIPLE, round(w * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    proc_h = max(SIZE_MULTIPLE, round(h * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    return Sizes(input=size, process=(proc_w, proc_h), output=(out_w, out_h))


def to_model_input(rgb: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize to the processing size, [1, 3, H, W] in [−1, 1]."""
    resized = rgb.resize(size, Image.Resampling.BICUBIC) if rgb.size != size else rgb
    arr = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy())
    return (arr.permute(2, 0, 1)[None] / 127.5 - 1.0).contiguous()


def to_pil(image: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """[1, 3, H, W] in about [−1, 1] → 8-bit RGB at `size`, resized with antialiased bicubic."""
    if tuple(image.shape[-2:]) != (size[1], size[0]):
        antialias = size[0] < image.shape[-1] or size[1] < image.shape[-2]
        image = F.interpolate(
            image.float(), size=(size[1], size[0]), mode="bicubic", antialias=antialias, align_corners=False
        )
    arr = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


def finish(rgb: Image.Image, loaded: LoadedImage) -> Image.Image:
    """Give the result the input's kind: grayscale stays grayscale, alpha is resized and re-attached."""
    out = rgb.convert("L") if loaded.grayscale else rgb
    if loaded.alpha is not None:
        alpha = loaded.alpha.resize(out.size, Image.Resampling.LANCZOS)
        out = out.convert("LA" if loaded.grayscale else "RGBA")
        out.putalpha(alpha)
    return out


def save_png(image: Image.Image, path: str | Path) -> None:
    image.save(path, format="PNG")
