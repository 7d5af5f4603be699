"""Image decoding: orientation, profiles, modes, alpha, and the size plan (spec §4.1)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from supir_core.errors import InvalidInput
from supir_core.imageio import finish, load_image, plan_sizes, to_pil
from tests.paths import DATA


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(DATA / "chelsea_degraded.jpg") as img:
        return img.convert("RGB")


def test_exif_orientation_is_applied(photo: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    loaded = load_image(encoded(photo, "JPEG", exif=exif.tobytes()))
    assert loaded.size == (photo.height, photo.width)


def test_rgba_keeps_its_alpha() -> None:
    loaded = load_image(DATA / "coffee_rgba.png")
    assert loaded.rgb.mode == "RGB" and loaded.alpha is not None and not loaded.grayscale
    out = finish(loaded.rgb.resize((240, 160)), loaded)
    assert out.mode == "RGBA" and out.size == (240, 160)
    corner, centre = out.getpixel((0, 0)), out.getpixel((120, 80))
    assert isinstance(corner, tuple) and isinstance(centre, tuple)
    assert corner[3] == 0 and centre[3] == 255


def test_grayscale_stays_grayscale() -> None:
    loaded = load_image(DATA / "astronaut_gray.png")
    assert loaded.grayscale and loaded.rgb.mode == "RGB"
    assert finish(loaded.rgb, loaded).mode == "L"


def test_sixteen_bit_grayscale_is_scaled_not_clipped(photo: Image.Image) -> None:
    gray8 = np.asarray(photo.convert("L"), dtype=np.uint16)
    loaded = load_image(encoded(Image.fromarray(gray8 * 257)))
    got = np.asarray(loaded.rgb.convert("L"), dtype=np.int32)
    assert loaded.grayscale and np.abs(got - gray8).max() <= 1


def test_palette_with_transparency(photo: Image.Image) -> None:
    pal = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    loaded = load_image(encoded(pal, transparency=0))
    assert loaded.alpha is not None and loaded.rgb.mode == "RGB"


def test_cmyk_and_icc_profiles_become_srgb(photo: Image.Image) -> None:
    cmyk = load_image(encoded(photo.convert("CMYK"), "JPEG", quality=95))
    assert cmyk.rgb.mode == "RGB"
    assert np.abs(np.asarray(cmyk.rgb, dtype=int) - np.asarray(photo, dtype=int)).mean() < 12
    # a tagged image goes through its profile (sRGB → sRGB: the same pixels); a broken profile is ignored
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    tagged = load_image(encoded(photo, icc_profile=srgb))
    assert np.abs(np.asarray(tagged.rgb, dtype=int) - np.asarray(photo, dtype=int)).mean() < 2
    broken = load_image(encoded(photo, icc_profile=b"not a profile"))
    assert broken.rgb.tobytes() == photo.tobytes()


def test_non_images_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not an image file"):
        load_image(b"%PDF-1.4 not a picture")
    cut = (DATA / "coffee_rgba.png").read_bytes()[:3000]
    with pytest.raises(InvalidInput, match="damaged or truncated"):
        load_image(cut)


@pytest.mark.parametrize(
    ("size", "upscale", "min_size", "process", "output"),
    [
        ((150, 113), 1, 1024, (1344, 1024), (150, 113)),
        ((500, 333), 2, 1024, (1536, 1024), (1000, 666)),
        ((2000, 1500), 1, 1024, (1984, 1472), (2000, 1500)),
        ((100, 100), 1, 64, (128, 128), (100, 100)),
    ],
)
def test_size_plan(size, upscale, min_size, process, output) -> None:
    sizes = plan_sizes(size, upscale, min_size)
    assert sizes.process == process and sizes.output == output
    assert all(side % 64 == 0 for side in sizes.process)


def test_results_are_truncated_to_8_bits_as_test_py_does_or_rounded_when_asked() -> None:
    """Official Tensor2PIL: (x · 127.5 + 127.5).clip(0, 255).astype(uint8), a truncation; gradio rounds."""
    levels = torch.tensor([0.3, 10.7, 127.2, 200.9, 254.6, 300.0, -3.0])
    x = (levels / 127.5 - 1).reshape(1, 1, 1, -1).expand(1, 3, 1, -1)
    size = (levels.numel(), 1)
    truncated = np.asarray(to_pil(x, size))[0, :, 0]
    rounded = np.asarray(to_pil(x, size, "round"))[0, :, 0]
    official = np.clip(x[0, 0, 0].double().numpy() * 127.5 + 127.5, 0, 255).astype(np.uint8)
    assert truncated.tolist() == official.tolist() == [0, 10, 127, 200, 254, 255, 0]
    assert rounded.tolist() == [0, 11, 127, 201, 255, 255, 0]
    assert to_pil(x, size).tobytes() == to_pil(x, size, "truncate").tobytes()
    with pytest.raises(ValueError, match="truncate or round"):
        to_pil(x, size, "nearest")
