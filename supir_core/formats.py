"""The result file formats: one table behind the `output_format` parameter, the result's file name and media
type, and the encoder's choices. Imports neither torch nor Pillow, so the API process reads it too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

OutputFormat = Literal["png", "jpeg", "webp"]


@dataclass(frozen=True)
class FileFormat:
    extension: str  # of the result's object key and of the CLI's file
    media_type: str
    modes: tuple[str, ...]  # Pillow modes the file stores as they are; others are converted first


OUTPUT_FORMATS: dict[str, FileFormat] = {
    "png": FileFormat("png", "image/png", ("RGB", "RGBA", "L", "LA")),
    "jpeg": FileFormat("jpg", "image/jpeg", ("RGB", "L")),
    "webp": FileFormat("webp", "image/webp", ("RGB", "RGBA")),
}
assert tuple(OUTPUT_FORMATS) == get_args(OutputFormat), "the table and the parameter's choices name the same formats"
DEFAULT_FORMAT: OutputFormat = "png"


def media_type_of(key: str) -> str:
    """The media type of a stored result or thumbnail, by the extension its key ends in."""
    extension = key.rsplit("/", 1)[-1].rpartition(".")[2].lower()
    return next((f.media_type for f in OUTPUT_FORMATS.values() if f.extension == extension), "application/octet-stream")
