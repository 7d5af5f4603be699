"""Checkpoint files by their key names and tensors, without the model: open an official file (safetensors, or a
pickled .ckpt read as data only), tell what kind it is from its key names, and the key prefixes of its parts. Kept
apart from `checkpoints` (which builds and loads the model, importing diffusers and transformers) so that
`supir weights verify` and `download` identify a file in a fraction of a second."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import WeightsError

UNET = "model.diffusion_model."
CONNECTORS = "model.diffusion_model.project_modules."
ADAPTOR = "model.control_model."
VAE = "first_stage_model."
ROBUST_ENCODER = "first_stage_model.denoise_encoder."
CLIP_L = "conditioner.embedders.0.transformer.text_model."
CLIP_G = "conditioner.embedders.1.model."

# Keys the official files carry that no part of the model reads.
IGNORED_KEYS: dict[str, str] = {
    CLIP_L + "embeddings.position_ids": "a buffer of 0…76 that transformers rebuilds",
    CLIP_G + "logit_scale": "CLIP's contrastive temperature, unused for text conditioning",
    ADAPTOR + "mask_LQ": "a training leftover of the SUPIR files",
    "denoiser.sigmas": "derived from the noise schedule",
}
SHOWN = 5  # offenders named in an error message


# --------------------------------------------------------------------------------------------
# Reading files


class TensorSource:
    """Lazily readable tensors of one checkpoint file: names and shapes first, data on demand."""

    def __init__(self, path: str, shapes: dict[str, tuple[int, ...]], loader: Callable[[str], torch.Tensor]) -> None:
        self.path = path
        self.shapes = shapes
        self._loader = loader

    def keys(self) -> list[str]:
        return list(self.shapes)

    def load(self, key: str) -> torch.Tensor:
        return self._loader(key)

    @classmethod
    def from_shapes(cls, label: str, shapes: Mapping[str, Iterable[int]]) -> TensorSource:
        """A source of meta tensors (no data), e.g. from a manifest of the real files."""
        dims = {k: tuple(v) for k, v in shapes.items()}
        return cls(label, dims, lambda k: torch.empty(dims[k], device="meta"))


def _fail(path: str | Path, problem: str) -> WeightsError:
    return WeightsError(f"{path}: {problem}")


def _sniff(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "torch-pickle"
    return "unknown"


def _brief(exc: Exception) -> str:
    """First sentence of a library's error, for a one-line message."""
    return str(exc).strip().split(". ")[0].split("\n")[0][:160]


def _open_safetensors(path: Path) -> TensorSource:
    size = path.stat().st_size
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = f.read(header_len) if 8 + header_len <= size else b""
    try:
        entries = json.loads(header)
        data_end = (
            8 + header_len + max((v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"), default=0)
        )
    except (ValueError, KeyError, TypeError):
        raise _fail(path, "file is truncated or corrupt (its safetensors header cannot be read)") from None
    if data_end > size:
        raise _fail(path, f"file is truncated: {size:,} bytes of the {data_end:,} its header describes")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise _fail(path, f"not a readable safetensors file ({_brief(exc)})") from exc
    return TensorSource(str(path), shapes, handle.get_tensor)


def _open_torch(path: Path, mmap: bool) -> TensorSource:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise _fail(
            path, f"file is truncated or corrupt, or not a weights-only torch checkpoint ({_brief(exc)})"
        ) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise _fail(path, f"holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise _fail(path, "holds no tensors")
    return TensorSource(str(path), {k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__)


def open_checkpoint(path: str | Path) -> TensorSource:
    """Open a .safetensors file or a torch pickle (.ckpt/.pt/.bin, read weights-only) without loading its data."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file")
    kind = _sniff(path)
    if kind == "safetensors":
        return _open_safetensors(path)
    if kind in ("torch-zip", "torch-pickle"):
        return _open_torch(path, mmap=kind == "torch-zip")
    raise _fail(path, "not a checkpoint: neither a safetensors file nor a torch pickle")


# --------------------------------------------------------------------------------------------
# What a file is


def identify(keys: Iterable[str]) -> str:
    """'sdxl', 'supir', 'sd1', 'sd2', 'diffusers' or 'unknown', from key names alone."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(UNET + "label_emb.") and has("conditioner.embedders."):
        return "sdxl"
    if has(ADAPTOR) or has(CONNECTORS) or has(ROBUST_ENCODER):
        return "supir"
    if has("cond_stage_model.transformer."):
        return "sd1"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("down_blocks.") or has("text_model."):
        return "diffusers"
    return "unknown"


KIND_NAMES = {
    "sdxl": "an SDXL single-file checkpoint",
    "supir": "a SUPIR checkpoint (adaptor, connectors, robust encoder)",
    "sd1": "a Stable Diffusion 1.x checkpoint (SUPIR needs SDXL)",
    "sd2": "a Stable Diffusion 2.x checkpoint (SUPIR needs SDXL)",
    "diffusers": "a diffusers/transformers-format component file, not an LDM single file",
    "unknown": "a file with none of the SDXL or SUPIR key prefixes",
}
SLOT_NEEDS = {
    "sdxl": "an SDXL base single file such as sd_xl_base_1.0_0.9vae.safetensors (or an SDXL fine-tune)",
    "supir": "SUPIR-v0Q.ckpt or SUPIR-v0F.ckpt (or their fp16 .safetensors re-exports)",
}


def _expect_kind(source: TensorSource, slot: str) -> None:
    kind = identify(source.keys())
    if kind != slot:
        raise _fail(source.path, f"this is {KIND_NAMES[kind]}; the {slot.upper()} slot needs {SLOT_NEEDS[slot]}")


# --------------------------------------------------------------------------------------------
# Sizes from shapes
