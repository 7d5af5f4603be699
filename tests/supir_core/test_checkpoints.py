"""Loading the official file layout: strict, lazy, and with short errors for the wrong files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from supir_core.checkpoints import ModelOptions, identify, load_supir, open_checkpoint
from supir_core.conformance import Fixture
from supir_core.errors import WeightsError


@pytest.fixture(scope="module")
def options(fixture_a: Path) -> ModelOptions:
    return Fixture.open(fixture_a).model_options()


@pytest.fixture(scope="module")
def supir_state(fixture_a: Path) -> dict[str, torch.Tensor]:
    return torch.load(fixture_a / "supir.ckpt", weights_only=True)


def load_error(sdxl: Path, supir: Path, options: ModelOptions) -> str:
    with pytest.raises(WeightsError) as info:
        load_supir(sdxl, supir, options=options)
    message = info.value.message
    assert "\n" not in message and len(message) < 600, message
    return message


def test_every_parameter_comes_from_the_files(tiny_model, fixture_a: Path) -> None:
    """Nothing is left at its initial value: spot-check one tensor of each component against the files."""
    sdxl = load_file(fixture_a / "sdxl.safetensors")
    supir = torch.load(fixture_a / "supir.ckpt", weights_only=True)
    assert not [n for n, p in tiny_model.named_parameters() if p.is_meta]
    pairs = [
        (tiny_model.unet.base.conv_in.weight, sdxl["model.diffusion_model.input_blocks.0.0.weight"]),
        (
            tiny_model.unet.project_modules[7].attn.to_k.weight,
            supir["model.diffusion_model.project_modules.7.attn.to_k.weight"],
        ),
        (tiny_model.adaptor.hint_conv.weight, supir["model.control_model.input_hint_block.0.weight"]),
        (tiny_model.vae.robust_encoder.conv_out.weight, supir["first_stage_model.denoise_encoder.conv_out.weight"]),
        (
            tiny_model.vae.autoencoder.decoder.mid_block.attentions[0].to_q.weight,
            sdxl["first_stage_model.decoder.mid.attn_1.q.weight"][:, :, 0, 0],
        ),
        (
            tiny_model.text.clip_l.encoder.layers[2].mlp.fc1.weight,
            sdxl["conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc1.weight"],
        ),
        (tiny_model.text.clip_g.text_projection.weight, sdxl["conditioner.embedders.1.model.text_projection"].T),
    ]
    width = tiny_model.spec.text.clip_g_width
    in_proj = sdxl["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
    pairs.append((tiny_model.text.clip_g.text_model.encoder.layers[1].self_attn.v_proj.weight, in_proj[2 * width :]))
    for got, want in pairs:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.float(), rtol=0, atol=0)


def test_fp16_safetensors_and_fp32_ckpt_give_the_same_model(fixture_a: Path, options: ModelOptions, tiny_model) -> None:
    half = load_supir(fixture_a / "sdxl.safetensors", fixture_a / "supir.safetensors", options=options)
    for (name, a), (_, b) in zip(tiny_model.named_parameters(), half.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_state_dict_wrapped_ckpt_loads(fixture_a: Path, tmp_path: Path, options: ModelOptions, supir_state) -> None:
    wrapped = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": supir_state, "global_step": 0}, wrapped)
    model = load_supir(fixture_a / "sdxl.safetensors", wrapped, options=options)
    assert torch.equal(model.adaptor.hint_conv.bias, supir_state["model.control_model.input_hint_block.0.bias"])


def test_bf16_on_request(fixture_a: Path, options: ModelOptions) -> None:
    model = load_supir(
        fixture_a / "sdxl.safetensors", fixture_a / "supir.safetensors", dtype=torch.bfloat16, options=options
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_truncated_files(fixture_a: Path, tmp_path: Path, options: ModelOptions) -> None:
    for name in ("sdxl.safetensors", "supir.ckpt"):
        cut = tmp_path / name
        cut.write_bytes((fixture_a / name).read_bytes()[:4_000_000])
        sdxl = cut if name.startswith("sdxl") else fixture_a / "sdxl.safetensors"
        supir = cut if name.startswith("supir") else fixture_a / "supir.ckpt"
        message = load_error(sdxl, supir, options)
        assert message.startswith(str(cut)) and "truncated" in message


def test_supir_file_in_the_sdxl_slot(fixture_a: Path, options: ModelOptions) -> None:
    message = load_error(fixture_a / "supir.ckpt", fixture_a / "supir.ckpt", options)
    assert "this is a SUPIR checkpoint" in message and "SDXL slot" in message


def test_sdxl_file_in_the_supir_slot(fixture_a: Path, options: ModelOptions) -> None:
    message = load_error(fixture_a / "sdxl.safetensors", fixture_a / "sdxl.safetensors", options)
    assert "SUPIR slot needs SUPIR-v0Q.ckpt" in message


def test_sd15_checkpoint_instead_of_sdxl(fixture_a: Path, tmp_path: Path, options: ModelOptions) -> None:
    sd15 = tmp_path / "v1-5-pruned-emaonly.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(32, 32, 1, 1),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(16, 8),
            "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
        },
        str(sd15),
    )
    assert "Stable Diffusion 1.x" in load_error(sd15, fixture_a / "supir.ckpt", options)


@pytest.mark.parametrize("kind", ["png", "text", "pickle-of-nothing", "missing"])
def test_files_that_are_not_checkpoints(fixture_a: Path, tmp_path: Path, options: ModelOptions, kind: str) -> None:
    path = tmp_path / ("weights.ckpt" if kind == "pickle-of-nothing" else "weights.safetensors")
    if kind == "png":
        Image.new("RGB", (8, 8)).save(path, format="PNG")
        expected = "not a checkpoint"
    elif kind == "text":
        path.write_text("these are not the weights you are looking for\n")
        expected = "not a checkpoint"
    elif kind == "pickle-of-nothing":
        torch.save({"epoch": 3}, path)
        expected = "holds no tensors"
    else:
        expected = "no such file"
    assert expected in load_error(path, fixture_a / "supir.ckpt", options)


def test_missing_extra_and_misshapen_keys_are_named(
    fixture_a: Path, tmp_path: Path, options: ModelOptions, supir_state
) -> None:
    broken = dict(supir_state)
    broken.pop("model.diffusion_model.project_modules.3.norm2.bias")
    broken["model.control_model.zero_convs.0.0.weight"] = torch.zeros(1)
    broken["first_stage_model.denoise_encoder.conv_in.bias"] = torch.zeros(7)
    path = tmp_path / "broken.ckpt"
    torch.save(broken, path)
    message = load_error(fixture_a / "sdxl.safetensors", path, options)
    assert "unet.project_modules.3.norm2.bias" in message
    assert "model.control_model.zero_convs.0.0.weight" in message
    assert "first_stage_model.denoise_encoder.conv_in.bias (7,)" in message


def test_identify() -> None:
    assert identify(["model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.0.x"]) == "sdxl"
    assert identify(["model.control_model.time_embed.0.weight"]) == "supir"
    assert identify(["cond_stage_model.model.transformer.resblocks.0.ln_1.weight"]) == "sd2"
    assert identify(["down_blocks.0.resnets.0.conv1.weight"]) == "diffusers"
    assert identify(["foo"]) == "unknown"


def test_open_is_lazy(fixture_a: Path) -> None:
    source = open_checkpoint(fixture_a / "sdxl.safetensors")
    assert source.shapes["model.diffusion_model.out.2.weight"] == (4, 32, 3, 3)
    assert source.load("model.diffusion_model.out.2.weight").dtype == torch.float16


def test_cli_reports_weights_errors_without_a_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "supir_core.cli", "weights", "check-keys", str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("supir: error:") and "Traceback" not in proc.stderr
