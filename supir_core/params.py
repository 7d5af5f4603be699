"""Restoration parameters, presets and their validation: one place for the CLI, the API and the worker.

Torch-free, so the API process can validate a request before it queues it.
"""

from __future__ import annotations

from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InvalidInput
from .formats import DEFAULT_FORMAT, OutputFormat

DEFAULT_QUESTION = "Describe this image and its style in a very detailed manner."

# The official default prompts (options/SUPIR_v0.yaml p_p / n_p, test.py --a_prompt / --n_prompt).
QUALITY_PROMPT = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, hyper detailed photo - "
    "realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing, skin pore detailing, "
    "hyper sharpness, perfect without deformations."
)
NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, 3D render, "
    "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, "
    "jpeg artifacts, deformed, lowres, over-smooth"
)
MAX_SEED = 2**31 - 1
MAX_SAMPLES = 4
# dtype names the CLI and the worker accept (SUPIR_DTYPE, --dtype) → torch attribute names
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}  # fmt: skip


def dtype_name(name: str) -> str:
    """The torch dtype name for a user's spelling; InvalidInput naming the choices otherwise."""
    if name not in DTYPES:
        raise InvalidInput(f"dtype={name!r} is unknown: choose one of {', '.join(DTYPES)}", field="dtype")
    return DTYPES[name]


Preset = Literal["quality", "fidelity", "lightning", "portrait"]

# Named settings from the official README ("empirical" presets) and its Lightning config (spec §3.9, §6.3);
# portrait is ours: the official defaults plus a second pass over every face (supir_core.faces).
PRESETS: dict[str, dict[str, Any]] = {
    "quality": {"cfg_scale": 6.0, "cfg_scale_start": 3.0, "s_noise": 1.02},
    "fidelity": {"cfg_scale": 4.0, "cfg_scale_start": 1.0, "s_noise": 1.01},
    "lightning": {"sampler": "dpmpp_2m", "steps": 8, "cfg_scale": 2.0, "cfg_scale_start": 2.0, "s_noise": 1.003},
    "portrait": {"faces": "auto"},
}
FACE_SIZE = 512  # image pixels a face spans when restored again: 64 latent positions across


class RestoreParams(BaseModel):
    """Everything a restoration run can be told. Defaults are the official test.py's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # sizes (spec §4.1)
    upscale: float = Field(1.0, ge=1.0, le=8.0, description="output size = upscale × input size")
    min_size: int = Field(1024, ge=64, le=4096, description="short side the image is processed at, at least")
    # sampler (spec §3)
    sampler: Literal["edm", "dpmpp_2m"] = "edm"
    steps: int = Field(50, ge=1, le=200)
    cfg_scale: float = Field(4.0, ge=0.0, le=20.0, description="text guidance at the end of sampling (s_cfg)")
    cfg_scale_start: float = Field(1.0, ge=0.0, le=20.0, description="text guidance at the start (spt_linear_CFG)")
    linear_cfg: bool = True
    control_scale: float = Field(1.0, ge=0.0, le=1.0, description="adaptor strength at the end (s_stage2)")
    control_scale_start: float = Field(0.0, ge=0.0, le=1.0)
    linear_control_scale: bool = False
    restoration_scale: float = Field(
        -1.0, ge=-1.0, le=10.0, description="τ of restoration guidance (s_stage1); ≤ 0 off"
    )
    s_churn: float = Field(5.0, ge=0.0, le=40.0)
    s_noise: float = Field(1.01, ge=0.0, le=1.2)
    dpmpp_full_guidance: bool = Field(False, description="DPM++: also apply restoration guidance and the control ramp")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="None picks one at random (reported back)")
    num_samples: int = Field(
        1,
        ge=1,
        le=MAX_SAMPLES,
        description="restorations of the photo from one batched sampler run; sample i has seed + i",
    )
    # prompts (spec §3.7, §5)
    caption: Literal["auto", "none"] = Field("auto", description="caption the stage-1 image when a captioner is loaded")
    caption_question: str = Field(DEFAULT_QUESTION, max_length=1000, description="what the captioner is asked")
    caption_input: Literal["official", "full"] = Field(
        "official",
        description="official: caption the stage-1 image of the input at a 512-px short side; full: at the "
        "processing size",
    )
    caption_tiles: bool = Field(
        False, description="tiled sampling: caption every sampler tile for its own prompt (not official)"
    )
    prompt: str = Field("", max_length=2000, description="your text: replaces the caption (caption=none) or follows it")
    prompt_style: Literal["official", "fit"] = Field(
        "official",
        description="official: caption, your text and the quality prompt joined as the official code joins them "
        "(CLIP's 77-token cut may drop the quality prompt's end); fit: shorten the caption so the quality prompt "
        "survives",
    )
    positive_prompt: str = Field(QUALITY_PROMPT, max_length=2000)
    negative_prompt: str = Field(NEGATIVE_PROMPT, max_length=2000)
    # post-processing (spec §4.3)
    color_fix: Literal["wavelet", "adain", "none"] = "wavelet"
    quantize: Literal["truncate", "round"] = Field(
        "truncate",
        description="how the result's values become 8-bit levels: truncate (official test.py) or round (the "
        "official gradio demo; 0.5 level brighter on average)",
    )
    # faces (supir_core.faces): restored again at a size where SUPIR has enough latent positions, blended back
    faces: Literal["off", "auto"] = Field(
        "off", description="auto: find faces and restore each again at face_size pixels, blended into the result"
    )
    max_faces: int = Field(8, ge=1, le=32, description="faces: auto restores at most this many, the largest first")
    face_size: int = Field(
        FACE_SIZE, ge=256, le=1024, multiple_of=64, description="image pixels a face's box spans in its second pass"
    )
    # the result file
    output_format: OutputFormat = Field(DEFAULT_FORMAT, description="PNG is lossless; JPEG and WebP are smaller")
    output_quality: int = Field(95, ge=1, le=100, description="JPEG and WebP quality (PNG ignores it)")
    keep_metadata: bool = Field(
        True,
        description="write the photo's EXIF (orientation reset) and ICC profile into the result, unless the "
        "service strips metadata",
    )
    # tiling (spec §3.8, §4.4)
    tiling: Literal["auto", "always", "never"] = Field(
        "auto",
        description="auto: sample and run the VAE untiled when the planned memory fits the device, tiled otherwise; "
        "always: tile whatever is larger than a tile; never: untiled",
    )
    tile_size: int = Field(
        128, ge=32, le=256, multiple_of=8, description="latent pixels per sampler tile (×8 image pixels)"
    )
    tile_stride: int = Field(64, ge=16, le=256, multiple_of=8, description="at most tile_size")
    tiles_per_batch: int = Field(
        0, ge=0, le=64, description="tiles per UNet call; 0 = as many as memory holds (halved on GPU out-of-memory)"
    )
    centered_tile_weights: bool = False
    vae_tile_size: int = Field(1024, ge=256, le=4096, description="image pixels per VAE tile")

    @model_validator(mode="after")
    def _consistent(self) -> RestoreParams:
        if self.tile_stride > self.tile_size:
            raise ValueError(f"tile_stride={self.tile_stride} must not exceed tile_size={self.tile_size}")
        return self


def _describe(error: Any, fields: dict[str, Any]) -> str:
    name = ".".join(str(p) for p in error["loc"]) or "params"
    value = error.get("input")
    field = fields.get(name)
    if error["type"] == "extra_forbidden":
        return f"{name}: unknown parameter"
    if field is not None:
        bounds = {type(m).__name__: m for m in field.metadata}
        lo = next((getattr(m, a) for m in bounds.values() for a in ("ge", "gt") if hasattr(m, a)), None)
        hi = next((getattr(m, a) for m in bounds.values() for a in ("le", "lt") if hasattr(m, a)), None)
        if lo is not None and hi is not None and error["type"] in ("greater_than_equal", "less_than_equal"):
            return f"{name}={value!r} is out of range: allowed {lo} to {hi}"
    detail = error["msg"].removeprefix("Value error, ")
    return f"{name}={value!r}: {detail}" if error["loc"] else detail


def _json_types(annotation: Any) -> set[type]:
    """The JSON kinds a field takes: bool, str (strings and Literal choices), int/float (numbers), NoneType."""
    if get_origin(annotation) is Literal:
        return {type(choice) for choice in get_args(annotation)}
    if get_origin(annotation) in (Union, UnionType):
        return set().union(*(_json_types(arg) for arg in get_args(annotation)))
    return {annotation}


def _check_json_type(name: str, value: Any) -> None:
    """Refuse what pydantic's lax mode would coerce but JSON Schema calls another type: `true` as a seed, "5" as a
    step count, a number as a switch, `null` for a field that has no such value. (Strict mode would go too far:
    JSON Schema counts 347.0 as an integer.)"""
    field = RestoreParams.model_fields.get(name)
    if field is None:
        return  # pydantic names it an unknown parameter
    allowed = _json_types(field.annotation)
    if isinstance(value, bool):
        ok = bool in allowed
    elif isinstance(value, int | float):
        ok = bool(allowed & {int, float})
    elif value is None:
        ok = type(None) in allowed
    else:
        ok = type(value) in allowed
    if not ok:
        kinds = sorted({_JSON_NAMES.get(t, t.__name__) for t in allowed})
        message = f"{name}={value!r}: must be {' or '.join(kinds)}"
        raise InvalidInput(message, code="invalid_parameter", field=name)


_JSON_NAMES = {bool: "true or false", str: "a string", int: "a number", float: "a number", type(None): "null"}


def sample_seeds(seed: int, num_samples: int) -> list[int]:
    """Each sample's seed: seed, seed + 1, … (wrapping past MAX_SEED), so sample i of a batch is the single run
    with seed + i."""
    return [(seed + i) % (MAX_SEED + 1) for i in range(num_samples)]


def validate_params(raw: dict[str, Any] | None = None, preset: str | None = None) -> RestoreParams:
    """Build RestoreParams from user values over a named preset; every error names the parameter and range."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            message = f"preset={preset!r} is unknown: choose one of {', '.join(PRESETS)}"
            raise InvalidInput(message, code="invalid_parameter", field="preset")
        values.update(PRESETS[preset])
    values.update(raw or {})
    for name, value in (raw or {}).items():
        _check_json_type(name, value)
    try:
        return RestoreParams.model_validate(values)
    except ValidationError as exc:
        fields = RestoreParams.model_fields
        errors = exc.errors()
        code = "unknown_parameter" if errors[0]["type"] == "extra_forbidden" else "invalid_parameter"
        field = ".".join(str(p) for p in errors[0]["loc"]) or None
        message = "; ".join(_describe(e, fields) for e in errors)
        raise InvalidInput(message, code=code, field=field) from None
