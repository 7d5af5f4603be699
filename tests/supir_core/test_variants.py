"""Several SUPIR variants over one SDXL base: shared modules, exact results, strict files, stable identities."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import FusedAttnProcessor2_0
from PIL import Image

from supir_core.checkpoints import IGNORED_KEYS, ModelOptions
from supir_core.conformance import Fixture
from supir_core.errors import WeightsError
from supir_core.models.connectors import ZeroCrossAttn
from supir_core.params import validate_params
from supir_core.pipeline import RestorationPipeline
from supir_core.speed import SpeedSettings
from supir_core.variants import load_variants, model_identity
from tests.paths import DATA
from tests.variant_files import make_variant_checkpoint

FAST = {"min_size": 64, "steps": 3, "seed": 11, "caption": "none"}
SHARED = ("unet.base", "vae.autoencoder", "text.clip_l", "text.clip_g")  # the SDXL file's components
OWN = ("unet.project_modules", "adaptor", "vae.robust_encoder")  # each SUPIR file's


@pytest.fixture(scope="module")
def options(fixture_a: Path) -> ModelOptions:
    return Fixture.open(fixture_a).model_options()


@pytest.fixture(scope="module")
def files(fixture_a: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    second = make_variant_checkpoint(fixture_a / "supir.ckpt", tmp_path_factory.mktemp("variants") / "v0F.ckpt", 1)
    return {"v0Q": fixture_a / "supir.ckpt", "v0F": second}


def load(fixture_a: Path, files: dict[str, Path], options: ModelOptions, **kwargs) -> dict[str, RestorationPipeline]:
    return load_variants(fixture_a / "sdxl.safetensors", files, device="cpu", options=options, **kwargs)


def load_alone(
    fixture_a: Path, files: dict[str, Path], options: ModelOptions, **kwargs
) -> dict[str, RestorationPipeline]:
    sdxl = fixture_a / "sdxl.safetensors"
    return {
        name: RestorationPipeline.from_checkpoints(sdxl, path, device="cpu", options=options, **kwargs)
        for name, path in files.items()
    }


@pytest.fixture(scope="module")
def shared(fixture_a: Path, files: dict[str, Path], options: ModelOptions) -> dict[str, RestorationPipeline]:
    return load(fixture_a, files, options)


@pytest.fixture(scope="module")
def alone(fixture_a: Path, files: dict[str, Path], options: ModelOptions) -> dict[str, RestorationPipeline]:
    return load_alone(fixture_a, files, options)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    with Image.open(DATA / "chelsea_degraded.jpg") as photo:
        return photo.convert("RGB").crop((40, 20, 104, 84))  # 64²: one 8×8 latent, a fraction of a second per run


def restored(pipeline: RestorationPipeline, image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pipeline(image, validate_params(FAST)).image).copy())


@pytest.fixture(scope="module")
def results(
    shared: dict[str, RestorationPipeline], alone: dict[str, RestorationPipeline], image: Image.Image
) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "shared": {name: restored(p, image) for name, p in shared.items()},
        "alone": {name: restored(p, image) for name, p in alone.items()},
    }


def storages(*models: torch.nn.Module) -> set[int]:
    tensors = [t for m in models for t in (*m.parameters(), *m.buffers()) if t.numel()]
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_sdxl_parts_are_the_same_objects_and_supir_parts_differ(shared: dict[str, RestorationPipeline]) -> None:
    q, f = shared["v0Q"].model, shared["v0F"].model
    for name in SHARED:
        assert q.get_submodule(name) is f.get_submodule(name), name
    for name in OWN:
        a, b = q.get_submodule(name), f.get_submodule(name)
        assert a is not b and not storages(a) & storages(b), name
        assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True)), name
    assert shared["v0Q"].prompts is shared["v0F"].prompts  # one prompt cache over the one pair of text encoders


def test_the_sdxl_weights_are_held_once(
    shared: dict[str, RestorationPipeline], alone: dict[str, RestorationPipeline]
) -> None:
    together = storages(*(p.model for p in shared.values()))
    apart = storages(*(p.model for p in alone.values()))
    sdxl = storages(*(shared["v0Q"].model.get_submodule(name) for name in SHARED))
    assert len(together) < len(apart)
    assert len(together) == len(apart) - len(sdxl)


def test_each_variant_restores_exactly_as_if_loaded_alone(
    shared: dict[str, RestorationPipeline], alone: dict[str, RestorationPipeline], results
) -> None:
    for name in shared:
        ours, theirs = shared[name].model.state_dict(), alone[name].model.state_dict()
        assert list(ours) == list(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
        assert torch.equal(results["shared"][name], results["alone"][name]), name


def test_the_variants_restore_differently(results) -> None:
    q, f = results["shared"]["v0Q"].double(), results["shared"]["v0F"].double()
    assert (q - f).abs().mean() > 1.0  # of 255: clearly another model, not float noise


def test_fp16_keeps_the_vae_in_bf16_like_a_single_load(
    fixture_a: Path, files: dict[str, Path], options: ModelOptions
) -> None:
    together = load(fixture_a, files, options, dtype=torch.float16)
    apart = load_alone(fixture_a, files, options, dtype=torch.float16)
    for name in files:
        model = together[name].model
        assert {p.dtype for p in model.vae.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in model.unet.parameters()} == {torch.float16}
        ours, theirs = model.state_dict(), apart[name].model.state_dict()
        assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours), name


def test_a_wrong_kind_second_variant_fails_naming_the_file(
    fixture_a: Path, files: dict[str, Path], options: ModelOptions
) -> None:
    sdxl = fixture_a / "sdxl.safetensors"
    with pytest.raises(WeightsError) as info:
        load(fixture_a, {"v0Q": files["v0Q"], "v0F": sdxl}, options)
    assert str(sdxl) in info.value.message and "SUPIR slot" in info.value.message


def test_a_broken_second_variant_fails_like_a_single_load(
    fixture_a: Path, files: dict[str, Path], options: ModelOptions, tmp_path: Path
) -> None:
    state = torch.load(files["v0F"], weights_only=True)
    gone = "model.diffusion_model.project_modules.0.zero_conv.weight"
    del state[gone]
    broken = tmp_path / "broken.ckpt"
    torch.save(state, broken)
    with pytest.raises(WeightsError) as info:
        load(fixture_a, {"v0Q": files["v0Q"], "v0F": broken}, options)
    with pytest.raises(WeightsError) as single:
        RestorationPipeline.from_checkpoints(fixture_a / "sdxl.safetensors", broken, device="cpu", options=options)
    assert str(broken) in info.value.message and "project_modules.0.zero_conv.weight" in info.value.message
    assert info.value.message == single.value.message


@pytest.mark.parametrize(
    "speed",
    [
        SpeedSettings(fuse_qkv=True, channels_last=True),
        SpeedSettings(fuse_qkv=True, fp8="weights"),  # a second pass must not quantize the shared layers again
        SpeedSettings(compile="regional", compile_backend="aot_eager"),
    ],
    ids=["fuse_qkv+channels_last", "fuse_qkv+fp8_weights", "regional_compile"],
)
def test_speed_settings_on_shared_modules_match_separate_loads(
    fixture_a: Path, files: dict[str, Path], options: ModelOptions, image: Image.Image, speed: SpeedSettings
) -> None:
    together = load(fixture_a, files, options, speed=speed)
    apart = load_alone(fixture_a, files, options, speed=speed)
    q, f = together["v0Q"].model, together["v0F"].model
    assert all(q.get_submodule(name) is f.get_submodule(name) for name in SHARED)
    if speed.fuse_qkv:  # each variant's own connectors are fused too, not only the first's
        cross = [m for m in f.unet.project_modules if isinstance(m, ZeroCrossAttn)]
        assert cross and all(isinstance(m.attn.processor, FusedAttnProcessor2_0) for m in cross)
    for name in files:
        assert torch.equal(restored(together[name], image), restored(apart[name], image)), name


def test_model_identity_is_stable_and_differs_per_file() -> None:
    sdxl, q, f = "a" * 64, "b" * 64, "c" * 64
    ident = model_identity(sdxl, q)
    assert ident == "bdd9a962defe3a53"  # pinned: result caches and job records outlive processes and releases
    assert len(ident) == 16 and int(ident, 16) >= 0
    assert model_identity(sdxl.upper(), q) == ident
    assert len({ident, model_identity(sdxl, f), model_identity("d" * 64, q), model_identity(q, sdxl)}) == 4
    with pytest.raises(ValueError, match="supir_sha256"):
        model_identity(sdxl, "not-a-hash")


def test_variants_import_without_torch() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'diffusers', 'transformers'): sys.modules[name] = None\n"
        "from supir_core.variants import model_identity\n"
        "print(model_identity('a' * 64, 'b' * 64))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_variant_file_keeps_the_official_layout(fixture_a: Path, files: dict[str, Path], tmp_path: Path) -> None:
    source, variant = fixture_a / "supir.ckpt", files["v0F"]
    assert zipfile.is_zipfile(variant)
    original, moved = torch.load(source, weights_only=True), torch.load(variant, weights_only=True)
    assert type(moved) is type(original) and list(moved) == list(original)
    for key, tensor in original.items():
        other = moved[key]
        assert other.shape == tensor.shape and other.dtype == tensor.dtype and other.is_contiguous(), key
        if key in IGNORED_KEYS:  # nothing reads it: left as it was
            assert torch.equal(other, tensor), key
            continue
        change = ((other - tensor).norm() / tensor.norm()).item()
        assert 0.01 < change < 0.1, (key, change)  # a few percent: another model, still a sane one
    again = torch.load(make_variant_checkpoint(source, tmp_path / "again.ckpt", 1), weights_only=True)
    other_seed = torch.load(make_variant_checkpoint(source, tmp_path / "seed2.ckpt", 2), weights_only=True)
    assert all(torch.equal(again[k], moved[k]) for k in moved)
    assert not any(torch.equal(other_seed[k], moved[k]) for k in moved if k not in IGNORED_KEYS)


def test_a_variant_file_of_the_fp16_safetensors_export(fixture_a: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    source = fixture_a / "supir.safetensors"
    variant = load_file(make_variant_checkpoint(source, tmp_path / "v0F.safetensors", 1))
    original = load_file(source)
    assert list(variant) == list(original)
    assert all(variant[k].dtype == original[k].dtype and variant[k].shape == original[k].shape for k in original)
    assert not any(torch.equal(variant[k], original[k]) for k in original if k not in IGNORED_KEYS)
