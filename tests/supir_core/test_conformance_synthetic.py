"""The conformance runner on synthetic fixture folders: set A's weights, cases of other shapes than set A's.

Other fixture sets differ from A in batch size, image shape and tiling (FORMAT.md); these cases check that the
runner reads those settings from the case and returns FORMAT's shapes, with no reference values needed.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import supir_core.sampling as sampling
from supir_core.conformance import Fixture, _public_params, rel_l2, run_fixture
from supir_core.denoiser import Denoiser
from supir_core.errors import WeightsError

TILE, STRIDE = 8, 4
STEPS = 2


def _case_of(config_a: dict[str, Any], name: str) -> dict[str, Any]:
    return copy.deepcopy(next(c for c in config_a["cases"] if c["name"] == name))


def _declare(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()}


def _conditioning(config: dict[str, Any], batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    tokens, width = config["conditioning"]["context_tokens"], config["conditioning"]["context_dim"]
    vector = config["conditioning"]["vector_dim"]
    return {
        "c_crossattn": torch.randn(batch, tokens, width, generator=gen),
        "c_vector": torch.randn(batch, vector, generator=gen),
        "uc_crossattn": torch.randn(batch, tokens, width, generator=gen),
        "uc_vector": torch.randn(batch, vector, generator=gen),
    }


def _tiled_pipeline_case(config_a: dict[str, Any], gen: torch.Generator) -> tuple[dict[str, Any], dict]:
    """Set A's `pipeline` on a 96×128 image (latent 12×16), tiled by params.tiled; decoys at the top level."""
    case = _case_of(config_a, "pipeline")
    case["name"] = "pipeline_tiled"
    case["params"] |= {"num_steps": STEPS, "tiled": {"tile_size": TILE, "tile_stride": STRIDE}}
    case["params"] |= {"tile_size": 16, "tile_stride": 8}  # not the case's tiling: params.tiled wins
    h, w = 12, 16
    inputs = _conditioning(config_a, 1, gen) | {
        "image": torch.rand(1, 3, 8 * h, 8 * w, generator=gen) * 2 - 1,
        "posterior_noise": torch.randn(1, 4, h, w, generator=gen),
        "noise": torch.randn(1, 4, h, w, generator=gen),
        "churn_noise": torch.randn(STEPS, 1, 4, h, w, generator=gen),
    }
    case["inputs"] = _declare(inputs)
    image, latent = [1, 3, 8 * h, 8 * w], [1, 4, h, w]
    case["expected"] = {
        name: {"shape": shape, "dtype": "float32"}
        for name, shape in (
            ("lq_latent", latent),
            ("x_stage1", image),
            ("x_center", latent),
            ("sampled_latent", latent),
            ("decoded", image),
            ("image", image),
        )
    }
    return case, inputs


def _tiled_sampler_cases(config_a: dict[str, Any], gen: torch.Generator) -> list[tuple[dict[str, Any], dict]]:
    """A batch-2 `sampler_tiled` on a 12×8 latent with churn, and each of its rows as a batch-1 case."""
    case = _case_of(config_a, "sampler_tiled")
    h, w, batch = 12, 8, 2
    case["params"] |= {"num_steps": STEPS, "s_churn": 2.0, "tile_size": TILE, "tile_stride": STRIDE}
    case["params"]["latent_hw"] = [h, w]
    inputs = _conditioning(config_a, batch, gen) | {
        "control": torch.randn(batch, 4, h, w, generator=gen),
        "x_center": torch.randn(batch, 4, h, w, generator=gen),
        "noise": torch.randn(batch, 4, h, w, generator=gen),
        "churn_noise": torch.randn(STEPS, batch, 4, h, w, generator=gen),
    }
    cases = []
    for name, rows in (("tiled_b2", slice(0, 2)), ("tiled_row0", slice(0, 1)), ("tiled_row1", slice(1, 2))):
        sliced = {k: v[:, rows] if k == "churn_noise" else v[rows] for k, v in inputs.items()}
        one = copy.deepcopy(case) | {"name": name, "inputs": _declare(sliced)}
        b = sliced["noise"].shape[0]
        one["expected"] = {  # FORMAT §4.2; two windows: rows 0 and 4, one column
            "sigmas": {"shape": [STEPS + 1], "dtype": "float32"},
            "latent": {"shape": [b, 4, h, w], "dtype": "float32"},
            "trajectory_in": {"shape": [STEPS, b, 4, h, w], "dtype": "float32"},
            "tile_weights": {"shape": [1, 4, TILE, TILE], "dtype": "float32"},
            "tile_coords": {"shape": [2, 4], "dtype": "int64"},
        }
        cases.append((one, sliced))
    return cases


@pytest.fixture(scope="module")
def synthetic(fixture_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    """A fixture folder of set A's weight files, A's model and tolerance sections and cases of its own."""
    root = tmp_path_factory.mktemp("synthetic")
    for name in ("sdxl.safetensors", "supir.ckpt"):
        (root / name).symlink_to(fixture_a / name)
    config_a = json.loads((fixture_a / "config.json").read_text())
    gen = torch.Generator().manual_seed(20261130)
    built = [_tiled_pipeline_case(config_a, gen), *_tiled_sampler_cases(config_a, gen)]
    # clones: the row cases are views of the batch-2 tensors, and safetensors refuses shared storage
    inputs = {f"{case['name']}.{k}": v.clone() for case, tensors in built for k, v in tensors.items()}
    save_file(inputs, str(root / "inputs.safetensors"))
    config = {k: config_a[k] for k in ("format_version", "model", "conditioning", "tolerance")}
    config["cases"] = [case for case, _ in built]
    (root / "config.json").write_text(json.dumps(config, indent=1))
    return Fixture.open(root)


@pytest.fixture(scope="module")
def synthetic_model(synthetic: Fixture):
    return synthetic.load_model()


def _case(fixture: Fixture, name: str) -> dict[str, Any]:
    return next(c for c in fixture.config["cases"] if c["name"] == name)


def _assert_declared_shapes(fixture: Fixture, name: str, outputs: dict[str, torch.Tensor]) -> None:
    expected = _case(fixture, name)["expected"]
    got = {k.split(".", 1)[1]: tuple(v.shape) for k, v in outputs.items() if k.startswith(name + ".")}
    assert got == {k: tuple(v["shape"]) for k, v in expected.items()}


def test_tiled_pipeline_uses_the_tiling_of_params_tiled(
    synthetic: Fixture, synthetic_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-square tiled pipeline: the sampler tiles the 12×16 latent with T=8, S=4 from params.tiled."""
    windows_asked: list[tuple[int, ...]] = []
    window_lists: list[list[tuple[int, int, int, int]]] = []
    denoised_hw: set[tuple[int, ...]] = set()
    tile_windows = sampling.tile_windows
    denoiser_call = Denoiser.__call__

    def spy_windows(height: int, width: int, tile: int, stride: int) -> list[tuple[int, int, int, int]]:
        windows_asked.append((height, width, tile, stride))
        window_lists.append(tile_windows(height, width, tile, stride))
        return window_lists[-1]

    def spy_denoiser(self: Denoiser, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        denoised_hw.add(tuple(x.shape[-2:]))
        return denoiser_call(self, x, *args, **kwargs)

    monkeypatch.setattr(sampling, "tile_windows", spy_windows)
    monkeypatch.setattr(Denoiser, "__call__", spy_denoiser)
    result = run_fixture(synthetic, synthetic_model, only=["pipeline_tiled"])

    assert result.ran == ["pipeline_tiled"]
    assert windows_asked == [(12, 16, TILE, STRIDE)]
    rows, cols = (0, 4), (0, 4, 8)
    assert window_lists[0] == [(r, r + TILE, c, c + TILE) for r in rows for c in cols]
    assert denoised_hw == {(TILE, TILE)}  # the network only ever saw tiles
    _assert_declared_shapes(synthetic, "pipeline_tiled", result.outputs)
    assert all(torch.isfinite(v).all() for v in result.outputs.values())


def _official_tile_weights(tile: int) -> torch.Tensor:
    """FORMAT §4.2: g(y; T/2)·g(x; (T−1)/2), g(u; m) = exp(−(u − m)² / (2·0.01·T²)) / √(2π·0.01), float64."""

    def g(m: float) -> torch.Tensor:
        u = torch.arange(tile, dtype=torch.float64)
        return torch.exp(-((u - m) ** 2) / (2 * 0.01 * tile**2)) / math.sqrt(2 * math.pi * 0.01)

    return g(tile / 2)[:, None] * g((tile - 1) / 2)[None, :]


def test_batched_tiled_sampler_has_format_shapes_and_independent_rows(synthetic: Fixture, synthetic_model) -> None:
    """Batch 2: FORMAT §4.2 shapes (tile_weights [1, 4, T, T]), and each row equals its own batch-1 run."""
    out = run_fixture(synthetic, synthetic_model, only=["tiled_b2", "tiled_row0", "tiled_row1"]).outputs
    for name in ("tiled_b2", "tiled_row0", "tiled_row1"):
        _assert_declared_shapes(synthetic, name, out)
    assert out["tiled_b2.tile_coords"].tolist() == [[0, 8, 0, 8], [4, 12, 0, 8]]
    assert out["tiled_b2.tile_coords"].dtype == torch.int64
    want = _official_tile_weights(TILE).to(torch.float32).expand(1, 4, TILE, TILE)
    torch.testing.assert_close(out["tiled_b2.tile_weights"], want, rtol=0, atol=0)
    for b in (0, 1):  # float32 GEMMs round per batch size: equal up to float noise (measured 3e-6)
        row = f"tiled_row{b}"
        errors = (
            rel_l2(out["tiled_b2.latent"][b : b + 1], out[f"{row}.latent"]),
            rel_l2(out["tiled_b2.trajectory_in"][:, b : b + 1], out[f"{row}.trajectory_in"]),
        )
        assert max(errors) < 1e-4, (row, errors)  # rows mixed up: ~1
    # the rows had different inputs: equal rows would mean the batch was mixed up, not kept apart
    assert not torch.allclose(out["tiled_row0.latent"], out["tiled_row1.latent"], atol=1e-2)


def _pipeline_case(params: dict[str, Any]) -> dict[str, Any]:
    base = {"num_steps": 4, "s_churn": 0.0, "s_noise": 1.0, "restoration_scale": -1.0, "cfg_scale": 4.0}
    base |= {"cfg_scale_start": 1.0, "use_linear_CFG": True, "control_scale": 1.0}
    base |= {"use_linear_control_scale": False, "control_scale_start": 0.0, "color_fix_type": "Wavelet"}
    return {"name": "p", "kind": "pipeline", "params": base | params}


def test_pipeline_tiling_comes_from_params_tiled() -> None:
    tiled = _public_params(_pipeline_case({"tiled": {"tile_size": 8, "tile_stride": 4}, "tile_size": 64}))
    assert (tiled.tiling, tiled.tile_size, tiled.tile_stride) == ("always", 8, 4)
    fallback = _public_params(_pipeline_case({"tiled": True, "tile_size": 16, "tile_stride": 8}))
    assert (fallback.tiling, fallback.tile_size, fallback.tile_stride) == ("always", 16, 8)
    for untiled in (_public_params(_pipeline_case({})), _public_params(_pipeline_case({"tiled": False}))):
        assert untiled.tiling == "never"
    for params in (_public_params(_pipeline_case({})), tiled):
        assert params.vae_tile_size >= 2**20  # the VAE never tiles a fixture image
        assert not params.centered_tile_weights


@pytest.mark.parametrize("tiled", [True, {"tile_size": 8}, {}])
def test_tiled_pipeline_without_tile_settings_names_the_case(tiled: object) -> None:
    case = _pipeline_case({"tiled": tiled, "tile_stride": 4} if tiled is True else {"tiled": tiled, "tile_size": 8})
    with pytest.raises(WeightsError, match=r"case 'p' is tiled but .* has no tile_size and tile_stride"):
        _public_params(case)
