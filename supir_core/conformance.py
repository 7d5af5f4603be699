"""Run conformance fixture cases (tests/data/conformance/FORMAT.md) through the production code and compare.

A fixture folder is a complete tiny SUPIR install: the model is built from its checkpoint files by
`load_supir`, exactly as from the real files. Sizes and settings come from its `config.json`.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .captioning import compose_prompt
from .checkpoints import ModelOptions, load_supir, options_from_config
from .colorfix import adain_color_fix, wavelet_color_fix
from .denoiser import Conditioning, Denoiser
from .errors import WeightsError
from .guidance import RestoreSettings, sample, sampler_sigmas
from .models.supir import SupirModel
from .models.text import size_embedding
from .params import RestoreParams
from .pipeline import PipelineNoise, PromptEncoder, RestorationPipeline
from .sampling import noise_from
from .tiling import gaussian_weights, tile_windows

Tensors = dict[str, torch.Tensor]


@dataclass
class Fixture:
    root: Path
    config: dict[str, Any]
    inputs: Tensors
    expected: Tensors | None

    @classmethod
    def open(cls, root: str | Path) -> Fixture:
        root = Path(root)
        config_path = root / "config.json"
        if not config_path.is_file():
            raise WeightsError(f"{root}: not a conformance fixture folder (no config.json)")
        expected = root / "expected.safetensors"
        return cls(
            root,
            json.loads(config_path.read_text()),
            load_file(root / "inputs.safetensors"),
            load_file(expected) if expected.is_file() else None,
        )

    def case_inputs(self, name: str) -> Tensors:
        prefix = name + "."
        return {k[len(prefix) :]: v for k, v in self.inputs.items() if k.startswith(prefix)}

    def model_options(self) -> ModelOptions:
        return options_from_config(self.config)

    def supir_file(self) -> Path:
        for name in ("supir.ckpt", "supir.safetensors"):
            if (self.root / name).is_file():
                return self.root / name
        raise WeightsError(f"{self.root}: no supir.ckpt or supir.safetensors")

    def load_model(self, supir_file: Path | None = None, dtype: torch.dtype = torch.float32) -> SupirModel:
        """The model built by the production loader, its weights cast to dtype (FORMAT.md: float32)."""
        return load_supir(
            self.root / "sdxl.safetensors", supir_file or self.supir_file(), dtype=dtype, options=self.model_options()
        )


def write_ckpt_twin(root: str | Path) -> Path:
    """`supir.ckpt` of a fixture folder, written from `supir.safetensors` when absent, and its path.

    The official SUPIR files are `torch.save` pickles of a flat float32 OrderedDict; a fixture ships only the fp16
    safetensors twin (every value exact in fp16, so the float32 copy holds the same numbers) to stay small, and the
    pickle form the loader must also read is made here. Written to a temporary name and renamed, so concurrent
    callers never see half a file.
    """
    root = Path(root)
    target = root / "supir.ckpt"
    if target.is_file():
        return target
    source = root / "supir.safetensors"
    if not source.is_file():
        raise WeightsError(f"{root}: neither supir.ckpt nor supir.safetensors to write it from")
    weights = OrderedDict(
        (name, tensor.float() if tensor.is_floating_point() else tensor) for name, tensor in load_file(source).items()
    )
    partial = root / f".supir.ckpt.{os.getpid()}.partial"
    torch.save(weights, partial)
    partial.replace(target)
    return target


# --------------------------------------------------------------------------------------------
# One function per case kind: (model, case, inputs) → outputs named as in the case's `expected`

CaseFn = Callable[[SupirModel, dict[str, Any], Tensors], Tensors]


def _denoise_encode(model: SupirModel, case: dict[str, Any], x: Tensors) -> Tensors:
    return {"latent": model.vae.encode_lq(x["image"])}


def _encode_sample(model: SupirModel, case: dict[str, Any], x: Tensors) -> Tensors:
    return {"latent": model.vae.encode(x["image"], noise=x["posterior_noise"])}


def _decode(model: SupirModel, case: dict[str, Any], x: Tensors) -> Tensors:
    return {"image": model.vae.decode(x["latent"])}


def _denoiser(model: SupirModel, case: dict[str, Any], x: Tensors) -> Tensors:
    scale = case["params"]["control_scale"]
    cond = Conditioning(x["context"], x["vector"], x["control"])
    out = Denoiser(model.eps).run(x["x"], x["sigma"], cond, scale)
    c_in = (1.0 / (out.sigma_quantized**2 + 1).sqrt())[:, None, None, None]
    features = model.adaptor(x["x"] * c_in, out.timestep, x["context"], x["vector"], x["control"])
    result = {
        "denoised": out.denoised,
        "eps": out.eps,
        "timestep": out.timestep,
        "sigma_quantized": out.sigma_quantized,
    }
    result.update({f"control_{i}": f for i, f in enumerate(features)})
    return result


def _colorfix_wavelet(model: SupirModel, case: dict[str, Any], x: Tensors) -> Tensors:
    return {"image": wavelet_color_fix(x["content"], x["style"])}


def _colorfix_adain(model: SupirModel, case: dict[str, Any], x: Tensors) -> Tensors:
    return {"image": adain_color_fix(x["content"], x["style"])}


def _size_embedding(model: SupirModel, case: dict[str, Any], x: Tensors) -> Tensors:
    dim = case["params"]["outdim"]
    parts = [size_embedding(x[k], dim) for k in ("original_size", "crop_coords_top_left", "target_size")]
    return {"vector_tail": torch.cat(parts, dim=-1)}


def _text_conditioning(model: SupirModel, case: dict[str, Any], x: Tensors) -> Tensors:
    prompts = case["params"]["prompts"]
    dim = model.text.size_embed_dim
    sizes = torch.cat(
        [size_embedding(x[k], dim) for k in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")],
        dim=-1,
    )
    result: Tensors = {}
    texts = {"positive": [default_positive(model, p["caption"], p["p_p"]) for p in prompts]}
    texts["negative"] = [p["n_p"] for p in prompts]
    for tag, field in (("c", "positive"), ("uc", "negative")):
        ids_l, ids_g = model.text.tokenize(texts[field])
        crossattn, pooled = model.text.encode_tokens(ids_l, ids_g)
        result.update(
            {
                f"{tag}_tokens_clip_l": ids_l,
                f"{tag}_tokens_clip_g": ids_g,
                f"{tag}_crossattn": crossattn,
                f"{tag}_pooled": pooled,
                f"{tag}_vector": torch.cat([pooled, sizes], dim=-1),
            }
        )
    return result


def _tile_settings(case: dict[str, Any]) -> tuple[int, int] | None:
    """(tile size, stride) of a tiled case, None when it is not tiled.

    `sampler_tiled` gives them at the top level of params (FORMAT §4.2); a pipeline in `params.tiled` when that
    is an object (§4.3), at the top level only when `tiled` is just true.
    """
    params = case["params"]
    tiled = params.get("tiled", case["kind"] == "sampler_tiled")
    if tiled is None or tiled is False:  # an empty object still asks for tiling, and fails below
        return None
    source = tiled if isinstance(tiled, dict) else params
    if "tile_size" not in source or "tile_stride" not in source:
        where = "params.tiled" if isinstance(tiled, dict) else "params"
        raise WeightsError(f"case {case['name']!r} is tiled but {where} has no tile_size and tile_stride")
    return int(source["tile_size"]), int(source["tile_stride"])


def _public_params(case: dict[str, Any]) -> RestoreParams:
    """The case's settings under RestoreParams' names: the one place the runner translates FORMAT.md's (official)
    names. Unvalidated, since fixtures use tiles far below real sizes; what a case does not set keeps its default.

    restore_cfg → restoration_scale (a pipeline case gives both, equal), use_linear_control_scale →
    linear_control_scale, use_linear_CFG → linear_cfg (sampler cases have none: linear, FORMAT §4.1),
    num_steps → steps, color_fix_type → color_fix; the kind names the sampler and the tiling (§4.2, §4.3).
    """
    params, kind = case["params"], case["kind"]
    tiles = _tile_settings(case)
    defaults = RestoreParams()
    values = defaults.model_dump() | {
        "sampler": "dpmpp_2m" if kind == "sampler_dpmpp" else "edm",
        "steps": params["num_steps"],
        "s_churn": params["s_churn"],
        "s_noise": params["s_noise"],
        "restoration_scale": params.get("restoration_scale", params.get("restore_cfg", defaults.restoration_scale)),
        "cfg_scale": params["cfg_scale"],
        "cfg_scale_start": params["cfg_scale_start"],
        "linear_cfg": params.get("use_linear_CFG", True),
        "control_scale": params["control_scale"],
        "control_scale_start": params["control_scale_start"],
        "linear_control_scale": params["use_linear_control_scale"],
        "color_fix": params.get("color_fix_type", defaults.color_fix).lower(),
        "tiling": "always" if tiles else "never",
        "tile_size": tiles[0] if tiles else defaults.tile_size,
        "tile_stride": tiles[1] if tiles else defaults.tile_stride,
        "tiles_per_batch": 1 if kind == "sampler_tiled" else defaults.tiles_per_batch,  # §4.2: a window at a time
        "centered_tile_weights": False,  # the official, off-centre blend weights
        "vae_tile_size": 2**30,  # larger than any image: the official pipeline does not tile its VAE unless asked
    }
    return RestoreParams.model_construct(**values)


def _settings(case: dict[str, Any]) -> RestoreSettings:
    """The sampler settings of a case, with the official constants it restates (restoration threshold, DPM++ η)."""
    params = case["params"]
    settings = RestoreSettings.from_params(_public_params(case))
    return replace(
        settings,
        restoration_min_sigma=params.get("restore_cfg_s_tmin", settings.restoration_min_sigma),
        eta=params.get("eta", settings.eta),
    )


def _conditioning(x: Tensors) -> tuple[Conditioning, Conditioning]:
    """(cond, uncond) of a sampler case: both with the case's control latent."""
    return (
        Conditioning(x["c_crossattn"], x["c_vector"], x["control"]),
        Conditioning(x["uc_crossattn"], x["uc_vector"], x["control"]),
    )


def _sample(
    model: SupirModel, case: dict[str, Any], x: Tensors, step_noise: str
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """The case's sampler from its recorded noise (the input named `step_noise`, if any): (latent, sigmas, steps)."""
    settings = _settings(case)
    denoiser = Denoiser(model.eps)
    cond, uncond = _conditioning(x)
    steps: list[dict[str, Any]] = []
    latent = sample(
        settings,
        denoiser,
        x["noise"],
        cond,
        uncond,
        x_center=x["x_center"],
        step_noise=noise_from(x[step_noise]) if step_noise in x else None,
        tiled=_tile_settings(case) is not None,
        callback=steps.append,
    )
    return latent, sampler_sigmas(settings, denoiser.train_sigmas), steps


def _sampler(model: SupirModel, case: dict[str, Any], x: Tensors) -> Tensors:
    latent, sigmas, steps = _sample(model, case, x, "churn_noise")
    batch = latent.shape[0]
    return {
        "latent": latent,
        "sigmas": sigmas,
        "trajectory": torch.stack([s["x"] for s in steps]),
        "step_sigma_hat": torch.tensor([[s["sigma_hat"]] * batch for s in steps]),
        "step_control_scale": torch.tensor([s["control_scale"] for s in steps]),
        "step_denoised_cfg": torch.stack([s["denoised_cfg"] for s in steps]),
    }


def _sampler_tiled(model: SupirModel, case: dict[str, Any], x: Tensors) -> Tensors:
    latent, sigmas, steps = _sample(model, case, x, "churn_noise")
    start = x["noise"] * (1 + sigmas[0] ** 2).sqrt()
    tile, stride = _settings(case).tile(tuple(latent.shape[-2:]))
    # one set of weights for every batch row: [1, C, T, T] whatever the batch (FORMAT §4.2)
    weights = gaussian_weights(tile).to(torch.float32).expand(1, latent.shape[1], tile, tile)
    return {
        "latent": latent,
        "sigmas": sigmas,
        "trajectory_in": torch.stack([start] + [s["x"] for s in steps[:-1]]),
        "tile_weights": weights,
        "tile_coords": torch.tensor(tile_windows(latent.shape[-2], latent.shape[-1], tile, stride)),
    }


def _sampler_dpmpp(model: SupirModel, case: dict[str, Any], x: Tensors) -> Tensors:
    """RestoreDPMPP2MSampler from the recorded noise (FORMAT §4.7); the guidance it ignores is passed, and ignored."""
    latent, sigmas, steps = _sample(model, case, x, "step_noise")
    return {
        "latent": latent,
        "sigmas": sigmas,
        "trajectory": torch.stack([s["x"] for s in steps]),
        "step_denoised_cfg": torch.stack([s["denoised_cfg"] for s in steps]),
    }


def _pipeline(model: SupirModel, case: dict[str, Any], x: Tensors, encode_prompts: PromptEncoder) -> Tensors:
    """The production recipe (RestorationPipeline.restore_tensor) replayed with the recorded noise (FORMAT §4.3)."""
    stages = RestorationPipeline(model).restore_tensor(
        x["image"],
        _public_params(case),
        noise=PipelineNoise.recorded(x["posterior_noise"], x["noise"], x.get("churn_noise")),
        encode_prompts=encode_prompts,
    )
    return {
        "lq_latent": stages.lq_latent,
        "x_stage1": stages.x_stage1,
        "x_center": stages.x_center,
        "sampled_latent": stages.sampled_latent,
        "decoded": stages.decoded,
        "image": stages.restored,
    }


def default_positive(model: SupirModel, caption: str, quality: str) -> str:
    """The positive prompt our defaults make of a caption and a quality prompt (no user text): the fixtures' token
    ids, made from the official joining, check it."""
    params = RestoreParams(positive_prompt=quality)
    return compose_prompt(caption, params.prompt, quality, params.prompt_style, model.text.tokenizer.count)


def _pipeline_given_conditioning(model: SupirModel, case: dict[str, Any], x: Tensors) -> Tensors:
    given = ((x["c_crossattn"], x["c_vector"]), (x["uc_crossattn"], x["uc_vector"]))
    return _pipeline(model, case, x, lambda x_stage1, tiles: given)


def _pipeline_text(model: SupirModel, case: dict[str, Any], x: Tensors) -> Tensors:
    params = case["params"]
    batch = x["image"].shape[0]  # each row is restored with the same prompts
    c = model.text([default_positive(model, params["caption"], params["p_p"])] * batch)
    uc = model.text([params["n_p"]] * batch)
    result = _pipeline(model, case, x, lambda x_stage1, tiles: ((c.crossattn, c.vector), (uc.crossattn, uc.vector)))
    for tag, t in (("c", c), ("uc", uc)):
        result.update(
            {
                f"{tag}_tokens_clip_l": t.tokens_clip_l,
                f"{tag}_tokens_clip_g": t.tokens_clip_g,
                f"{tag}_crossattn": t.crossattn,
                f"{tag}_vector": t.vector,
            }
        )
    return result


CASES: dict[str, CaseFn] = {
    "sampler": _sampler,
    "sampler_tiled": _sampler_tiled,
    "sampler_dpmpp": _sampler_dpmpp,
    "pipeline": _pipeline_given_conditioning,
    "pipeline_text": _pipeline_text,
    "vae_denoise_encode": _denoise_encode,
    "vae_encode_sample": _encode_sample,
    "vae_decode": _decode,
    "denoiser": _denoiser,
    "colorfix_wavelet": _colorfix_wavelet,
    "colorfix_adain": _colorfix_adain,
    "size_embedding": _size_embedding,
    "text_conditioning": _text_conditioning,
}


@dataclass
class Result:
    outputs: Tensors  # "<case>.<tensor>"
    ran: list[str]
    skipped: list[tuple[str, str]]  # (case, kind)


def run_fixture(fixture: Fixture, model: SupirModel, only: list[str] | None = None) -> Result:
    """Every case (or those named in `only`) through the model; cases of an unknown kind are listed as skipped.

    Inputs go in as stored, float32, whatever the model's dtype: so does production, whose VAE and text encoder
    return float32 and whose noise is drawn in float32; the networks cast at their entry. Outputs are float32.
    """
    outputs: Tensors = {}
    ran, skipped = [], []
    with torch.no_grad():
        for case in fixture.config["cases"]:
            if only and case["name"] not in only:
                continue
            fn = CASES.get(case["kind"])
            if fn is None:
                skipped.append((case["name"], case["kind"]))
                continue
            for key, value in fn(model, case, fixture.case_inputs(case["name"])).items():
                value = value.float() if value.is_floating_point() else value
                outputs[f"{case['name']}.{key}"] = value.detach().cpu().contiguous()
            ran.append(case["name"])
    return Result(outputs, ran, skipped)


def save_outputs(result: Result, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(result.outputs, str(path))


# --------------------------------------------------------------------------------------------
# Comparison


@dataclass
class Row:
    case: str
    output: str
    error: float  # rel-L2, or mismatching elements for integer tensors
    tolerance: float
    exact: bool

    @property
    def passed(self) -> bool:
        return self.error == 0 if self.exact else self.error <= self.tolerance


MULTI_STEP_KINDS = {"sampler", "sampler_tiled", "sampler_dpmpp", "pipeline", "pipeline_text"}

# Bounds for a bfloat16 model against the float32 references (FORMAT.md's tolerances are for float32). They
# are measured worst cases on set A with about 3x margin (docs/performance.md, "bf16 on the conformance
# fixtures"): bf16 rounding gives up to 4.4e-2, a path in a wrong dtype or a precision collapse gives ~1.
BF16_TOLERANCE = {"single_pass": 0.1, "sampler_and_pipeline": 0.15}


def tolerance_for(fixture: Fixture, dtype: torch.dtype) -> dict[str, Any]:
    """The fixture's own tolerances for float32, the measured bf16 bounds for bfloat16."""
    if dtype == torch.float32:
        return dict(fixture.config["tolerance"])
    if dtype == torch.bfloat16:
        return fixture.config["tolerance"] | BF16_TOLERANCE
    raise WeightsError(f"no conformance tolerances for {dtype}: use float32 or bfloat16")


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    want64, got64 = want.double(), got.double()
    return float((got64 - want64).norm() / max(float(want64.norm()), 1e-12))


def compare(fixture: Fixture, result: Result, tolerance: dict[str, Any] | None = None) -> list[Row]:
    """One row per expected tensor of every case that ran; a missing or misshapen output fails.

    `tolerance` (default: the fixture's) maps "single_pass" and "sampler_and_pipeline" to rel-L2 bounds;
    integer tensors are always compared exactly.
    """
    if fixture.expected is None:
        raise WeightsError(f"{fixture.root}: no expected.safetensors to check against")
    tolerance = tolerance or fixture.config["tolerance"]
    rows = []
    for case in fixture.config["cases"]:
        if case["name"] not in result.ran:
            continue
        tol = tolerance["sampler_and_pipeline"] if case["kind"] in MULTI_STEP_KINDS else tolerance["single_pass"]
        for name in case["expected"]:
            key = f"{case['name']}.{name}"
            want, got = fixture.expected[key], result.outputs.get(key)
            exact = not want.is_floating_point()
            if got is None or got.shape != want.shape:
                error = float("inf")
            elif exact:
                error = float((got != want).sum())
            else:
                error = rel_l2(got, want)
            rows.append(Row(case["name"], name, error, tol, exact))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [f"{'case':<24} {'output':<20} {'rel-L2 error':>13} {'tolerance':>10}  pass"]
    for r in rows:
        err = f"{int(r.error)} diff" if r.exact and r.error != float("inf") else f"{r.error:.3e}"
        tol = "exact" if r.exact else f"{r.tolerance:.2g}"
        lines.append(f"{r.case:<24} {r.output:<20} {err:>13} {tol:>10}  {'yes' if r.passed else 'NO'}")
    return "\n".join(lines)
