"""Result files (issue 17): PNG, JPEG and WebP bytes with the input's EXIF and colour profile kept or stripped."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from supir_core.cli import _output_names, _param_values, build_parser
from supir_core.imageio import (
    ImageMetadata,
    encode_image,
    encode_results,
    finish,
    load_image,
    srgb_profile,
)
from tests.paths import DATA

EXIF_IFD, DATE_TIME_ORIGINAL, MAKE, MODEL, ORIENTATION = 0x8769, 0x9003, 0x010F, 0x0110, 0x0112
TAKEN = "2019:07:14 16:20:05"
FORMATS = ("png", "jpeg", "webp")


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def opened(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def camera_exif(orientation: int = 6) -> Image.Exif:
    exif = Image.Exif()
    exif[MAKE], exif[MODEL], exif[ORIENTATION] = "Canon", "EOS R5", orientation
    exif.get_ifd(EXIF_IFD)[DATE_TIME_ORIGINAL] = TAKEN
    return exif


def profile_bytes() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def gamma18_profile() -> bytes:
    """A non-sRGB RGB profile: LittleCMS's sRGB with a plain gamma-1.8 curve (ICC parametricCurve type 0, one
    shared tag) and its description renamed, so a converter must change the pixels and nothing calls it sRGB."""
    data = bytearray(profile_bytes())
    (count,) = struct.unpack(">I", data[128:132])
    tags = {
        bytes(data[132 + 12 * i : 136 + 12 * i]): struct.unpack(">II", data[136 + 12 * i : 144 + 12 * i])
        for i in range(count)
    }
    trc, _ = tags[b"rTRC"]
    data[trc + 8 : trc + 16] = struct.pack(">HHi", 0, 0, round(1.8 * 65536))  # function 0: Y = X^g
    old, new = "sRGB built-in".encode("utf-16-be"), "Gamma 1.8 RGB".encode("utf-16-be")
    desc, size = tags[b"desc"]
    assert data[desc : desc + size].count(old) == 1
    data[desc : desc + size] = data[desc : desc + size].replace(old, new)
    return bytes(data)


def gray_profile(gamma: float = 1.8) -> bytes:
    """A minimal ICC v4 gray display profile (desc, wtpt, kTRC), built by hand: Pillow only creates RGB, Lab
    and XYZ profiles."""
    text = "Gray gamma 1.8".encode("utf-16-be")
    desc = b"mluc" + bytes(4) + struct.pack(">II4sII", 1, 12, b"enUS", len(text), 28) + text
    desc += bytes(-len(desc) % 4)
    d50 = struct.pack(">3i", 63190, 65536, 54061)
    curve = b"curv" + bytes(4) + struct.pack(">IH2x", 1, round(gamma * 256))  # one entry: a plain gamma, u8.8
    tags = [(b"desc", desc), (b"wtpt", b"XYZ " + bytes(4) + d50), (b"kTRC", curve)]
    start = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        table, body = table + sig + struct.pack(">II", start + len(body), len(data)), body + data
    header = struct.pack(">I4sI4s4s4s12x4s", start + len(body), b"lcms", 0x04300000, b"mntr", b"GRAY", b"XYZ ", b"acsp")
    header = (header.ljust(68, b"\0") + d50).ljust(128, b"\0")  # 68: the PCS illuminant
    return header + struct.pack(">I", len(tags)) + table + body


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(DATA / "chelsea_degraded.jpg") as img:
        return img.convert("RGB").resize((96, 64))


@pytest.fixture(scope="module")
def camera_jpeg(photo: Image.Image) -> tuple[bytes, bytes]:
    """A 96×64 JPEG as a camera writes it: date, make, model, Orientation 6 (shown rotated) and an sRGB profile."""
    icc = profile_bytes()
    return encoded(photo, "JPEG", quality=90, exif=camera_exif(), icc_profile=icc), icc


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_files_open_with_their_mode_and_size(photo: Image.Image, fmt: str, mode: str) -> None:
    image = photo.convert(mode)
    if mode == "RGBA":
        image.putpixel((0, 0), (0, 0, 0, 0))  # all-opaque alpha is left out by libwebp
    [file] = encode_results([image], fmt, 90, None)  # what the worker stores and the CLI writes
    assert file.data == encode_image(image, fmt, 90, None)
    img = opened(file.data)
    assert img.format == fmt.upper() and img.size == (96, 64) == (file.width, file.height)
    expected = {"jpeg": {"RGBA": "RGB"}, "webp": {"L": "RGB"}}.get(fmt, {}).get(mode, mode)
    assert img.mode == expected
    assert file.media_type == Image.MIME[img.format] and file.extension in ("png", "jpg", "webp")


@pytest.mark.parametrize("fmt", FORMATS)
def test_camera_metadata_is_kept_and_orientation_reset(camera_jpeg: tuple[bytes, bytes], fmt: str) -> None:
    source, icc = camera_jpeg
    loaded = load_image(source)
    assert loaded.size == (64, 96)  # transposed by Orientation 6
    result = finish(loaded.rgb, loaded)
    img = opened(encode_image(result, fmt, 90, loaded.result_metadata()))
    exif = img.getexif()
    assert img.size == (64, 96)
    assert exif.get(ORIENTATION, 1) == 1
    assert exif.get(MAKE) == "Canon" and exif.get(MODEL) == "EOS R5"
    assert exif.get_ifd(EXIF_IFD).get(DATE_TIME_ORIGINAL) == TAKEN
    assert img.info.get("icc_profile") == icc  # an sRGB profile is kept byte for byte


def test_orientation_tag_is_gone_even_when_nothing_was_rotated(photo: Image.Image) -> None:
    """Orientation 1 needs no transpose and an out-of-range one cannot be applied; neither is written back."""
    for orientation in (1, 9):
        loaded = load_image(encoded(photo, "JPEG", exif=camera_exif(orientation)))
        assert loaded.size == (96, 64) and loaded.exif is not None
        exif = opened(encode_image(loaded.rgb, "jpeg", 90, loaded.result_metadata())).getexif()
        assert ORIENTATION not in exif and exif.get(MAKE) == "Canon"


@pytest.mark.parametrize("container", ["PNG", "WEBP"])
def test_exif_of_png_and_webp_inputs_is_read(photo: Image.Image, container: str) -> None:
    loaded = load_image(encoded(photo, container, exif=camera_exif()))
    assert loaded.size == (64, 96)
    exif = opened(encode_image(loaded.rgb, "jpeg", 90, loaded.result_metadata())).getexif()
    assert exif.get_ifd(EXIF_IFD).get(DATE_TIME_ORIGINAL) == TAKEN and ORIENTATION not in exif


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_converted_non_srgb_profile_is_written_as_srgb(photo: Image.Image, fmt: str) -> None:
    wide = gamma18_profile()
    loaded = load_image(encoded(photo, "PNG", icc_profile=wide))
    assert loaded.icc_converted
    assert np.abs(np.asarray(loaded.rgb, dtype=int) - np.asarray(photo, dtype=int)).mean() > 3  # really converted
    icc = opened(encode_image(loaded.rgb, fmt, 90, loaded.result_metadata())).info.get("icc_profile")
    assert icc == srgb_profile() != wide
    assert ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).startswith("sRGB")


def test_metadata_none_strips_everything(camera_jpeg: tuple[bytes, bytes]) -> None:
    loaded = load_image(camera_jpeg[0])
    tagged = loaded.rgb.copy()
    tagged.info["icc_profile"] = camera_jpeg[1]  # Pillow's savers would fall back to this
    for fmt in FORMATS:
        img = opened(encode_image(tagged, fmt, 90, None))
        assert "icc_profile" not in img.info and "exif" not in img.info and not img.getexif(), fmt


def test_quality_sets_the_jpeg_size_and_bytes_are_deterministic(photo: Image.Image) -> None:
    big = photo.resize((384, 256), Image.Resampling.BICUBIC)
    sizes = {q: len(encode_image(big, "jpeg", q, None)) for q in (30, 70, 95)}
    assert sizes[30] < sizes[70] < sizes[95]
    meta = ImageMetadata(exif=camera_exif().tobytes(), icc_profile=srgb_profile())
    for fmt in FORMATS:
        assert encode_image(big, fmt, 80, meta) == encode_image(big, fmt, 80, meta), fmt
    assert len(encode_image(big, "png", 10, None)) == len(encode_image(big, "png", 100, None))  # PNG ignores it


def test_rgba_to_jpeg_is_flattened_on_white() -> None:
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste((200, 30, 30, 255), (0, 0, 16, 32))
    img = opened(encode_image(rgba, "jpeg", 95, None))
    assert img.mode == "RGB"
    left, right = np.asarray(img, dtype=int)[:, :12].mean((0, 1)), np.asarray(img, dtype=int)[:, 20:].mean((0, 1))
    assert np.abs(left - (200, 30, 30)).max() < 6 and right.min() > 250  # transparent became white, not black
    webp = opened(encode_image(rgba, "webp", 90, None))
    assert webp.mode == "RGBA" and webp.getpixel((30, 0))[3] == 0  # type: ignore[index]


def test_grayscale_results_stay_gray_without_an_rgb_profile(photo: Image.Image) -> None:
    gray = photo.convert("L")
    loaded = load_image(encoded(gray, "PNG", icc_profile=profile_bytes()))  # an RGB profile on a gray image
    result = finish(loaded.rgb, loaded)
    assert result.mode == "L" and loaded.result_metadata().icc_profile is None
    for fmt in ("png", "jpeg"):
        img = opened(encode_image(result, fmt, 90, ImageMetadata(icc_profile=srgb_profile())))
        assert img.mode == "L" and "icc_profile" not in img.info, fmt  # an RGB profile never tags gray pixels
    la = opened(encode_image(finish(loaded.rgb, loaded).convert("LA"), "jpeg", 90, None))
    assert la.mode == "L"


def test_a_gray_profile_stays_on_gray_pixels_it_still_describes(photo: Image.Image) -> None:
    """16-bit gray is only rescaled to 8 bits, the profile not applied: its gray profile still fits and is kept.
    8-bit gray goes through the profile to sRGB: the file is then untagged gray, which viewers read as sRGB."""
    gray = gray_profile()
    sixteen = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    loaded = load_image(encoded(sixteen, "PNG", icc_profile=gray))
    assert loaded.grayscale and not loaded.icc_converted and loaded.result_metadata().icc_profile == gray
    for fmt in ("png", "jpeg"):
        img = opened(encode_image(finish(loaded.rgb, loaded), fmt, 90, loaded.result_metadata()))
        assert img.mode == "L" and img.info.get("icc_profile") == gray, fmt
    assert "icc_profile" not in opened(encode_image(loaded.rgb, "png", 90, loaded.result_metadata())).info  # RGB
    eight = load_image(encoded(photo.convert("L"), "PNG", icc_profile=gray))
    assert eight.icc_converted and eight.result_metadata().icc_profile == srgb_profile()
    assert "icc_profile" not in opened(encode_image(finish(eight.rgb, eight), "png", 90, eight.result_metadata())).info


def test_broken_profile_and_oversized_exif_are_left_out(photo: Image.Image) -> None:
    loaded = load_image(encoded(photo, "PNG", icc_profile=b"\0" * 200))
    assert not loaded.icc_converted and loaded.result_metadata().icc_profile is None
    exif = camera_exif()
    exif.get_ifd(EXIF_IFD)[0x9286] = b"ASCII\0\0\0" + b"x" * 70_000  # UserComment beyond one JPEG marker
    meta = ImageMetadata(exif=exif.tobytes())
    assert "exif" not in opened(encode_image(photo, "jpeg", 90, meta)).info
    assert opened(encode_image(photo, "png", 90, meta)).getexif().get(MAKE) == "Canon"


def test_output_names_per_sample_stay_unique() -> None:
    inputs = [Path("a.jpg"), Path("a-1.png"), Path("b/a.png")]
    assert _output_names(inputs) == [["a.png"], ["a-1.png"], ["a_png.png"]]
    two = _output_names(inputs, "jpg", 2)
    assert two[0] == ["a.jpg", "a-1.jpg"]
    flat = [name for names in two for name in names]
    assert len(flat) == len(set(flat)) == 6


def test_result_file_flags_come_from_the_params() -> None:
    flags = ["--output-format", "webp", "--output-quality", "70", "--num-samples", "3", "--no-keep-metadata"]
    args = build_parser().parse_args(["restore", "x.jpg", "-o", "out", *flags])
    values = _param_values(args)
    assert values["output_format"] == "webp" and values["output_quality"] == 70
    assert values["num_samples"] == 3 and values["keep_metadata"] is False
    assert "keep_metadata" not in _param_values(build_parser().parse_args(["restore", "x.jpg", "-o", "out"]))


def restore(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "supir_core.cli", "restore", *args, "--min-size", "64", "--steps", "2", "--quiet"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_cli_writes_jpeg_with_exif_and_one_file_per_sample(
    tmp_path: Path, env: dict[str, str], camera_jpeg: tuple[bytes, bytes]
) -> None:
    source = tmp_path / "camera.jpg"
    source.write_bytes(camera_jpeg[0])
    out = tmp_path / "out"
    proc = restore(str(source), "-o", str(out), "--output-format", "jpeg", "--output-quality", "80",
                   "--num-samples", "2", "--seed", "3", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["camera-1.jpg", "camera.jpg"]
    with Image.open(out / "camera.jpg") as img, Image.open(out / "camera-1.jpg") as second:
        assert img.format == "JPEG" and img.size == second.size == (64, 96)
        assert img.getexif().get_ifd(EXIF_IFD).get(DATE_TIME_ORIGINAL) == TAKEN and ORIENTATION not in img.getexif()
        assert img.info.get("icc_profile") == camera_jpeg[1]
        assert img.tobytes() != second.tobytes()  # seeds 3 and 4


def test_the_metadata_file_holds_the_whole_record() -> None:
    """`--metadata` writes RestorationResult.to_dict(): every typed field as JSON, in the keys the files had."""
    from supir_core.imageio import Sizes
    from supir_core.memory import TilingDecision
    from supir_core.pipeline import Prompts, RestorationResult

    gray = Image.new("L", (8, 6))
    result = RestorationResult(
        images=[gray, gray],
        stage1=Image.new("RGB", (64, 64)),
        seeds=[7, 8],
        prompts=Prompts("a cat", "a cat, sharp", "blurry"),
        sizes=Sizes(input=(4, 3), process=(64, 64), output=(8, 6)),
        sampler="edm",
        steps=2,
        tiling=TilingDecision("always", True, False, "tiling=always"),
        tile_captions={(0, 4, 0, 4): "fur"},
        seconds={"sampling": 1.5},
        device="cpu",
        dtype="float32",
    )
    record = json.loads(json.dumps(result.to_dict()))
    assert result.image is gray and result.seed == 7 and record["seeds"] == [7, 8]
    prompts = (record["caption"], record["positive_prompt"], record["negative_prompt"])
    assert prompts == ("a cat", "a cat, sharp", "blurry")
    sizes = (record["input_size"], record["process_size"], record["output_size"])
    assert sizes == ([4, 3], [64, 64], [8, 6])
    assert (record["tiled_sampling"], record["tiled_vae"], record["tiling"]["policy"]) == (True, False, "always")
    assert record["tile_captions"] == [{"window": [0, 4, 0, 4], "caption": "fur"}]
    assert (record["sampler"], record["steps"], record["seconds"], record["dtype"]) == (
        "edm",
        2,
        {"sampling": 1.5},
        "float32",
    )
