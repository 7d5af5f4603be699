"""The chunked VAE (supir_core/models/vae_tiling.py) equals the untiled one; independent feathered tiles do not."""

from __future__ import annotations

import copy
import importlib.util
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from supir_core.models.vae import SupirVAE
from supir_core.models.vae_tiling import ChunkGrid, Conv, Upsample, alignment, decoder_ops, encoder_ops, run_tiled
from tests import feathered_vae
from tests.paths import BENCH, DATA

# Tiled vs untiled, fp32. Tile-local GroupNorm statistics and attention put feathered tiles 0.1 and more away on
# these inputs. The chunked result is ~2e-6 from a float64 run; the untiled fp32 network itself is up to ~1e-4 from
# it (torch's CPU GroupNorm loses precision on these photos), which sets the bound.
BOUND = 1e-3
TILE = 64  # image pixels: 3 × 5 chunks on a 192 × 320 image, 8 latent pixels for decoding


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def vae(tiny_model) -> SupirVAE:
    return tiny_model.vae


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Two different photos, 192 × 320, in [−1, 1]: batch 2 with per-sample statistics that differ."""
    with Image.open(DATA / "chelsea_degraded.jpg") as img:
        photo = np.asarray(img.convert("RGB").resize((320, 192)), dtype=np.float32)
    with Image.open(DATA / "astronaut_gray.png") as img:
        gray = np.asarray(img.convert("RGB").resize((320, 192)), dtype=np.float32)
    batch = torch.from_numpy(np.stack([photo, gray])).permute(0, 3, 1, 2)
    return batch / 127.5 - 1


@pytest.fixture(scope="module")
def latents(vae: SupirVAE, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        latent = vae.encode_lq(images)
    assert latent.shape == (2, 4, 24, 40)
    return latent


def check_against_untiled(untiled: torch.Tensor, tiled: torch.Tensor, feathered: torch.Tensor) -> None:
    assert tiled.shape == feathered.shape == untiled.shape
    assert rel_l2(tiled, untiled) <= BOUND
    assert rel_l2(feathered, untiled) > BOUND  # the bound does catch tile-local statistics


@torch.no_grad()
def test_chunked_encode_lq_equals_untiled(vae: SupirVAE, images: torch.Tensor) -> None:
    untiled, tiled = vae.encode_lq(images), vae.encode_lq(images, tile=TILE)
    check_against_untiled(untiled, tiled, feathered_vae.encode_lq(vae, images, TILE))


@torch.no_grad()
def test_chunked_encode_with_noise_equals_untiled(vae: SupirVAE, images: torch.Tensor) -> None:
    noise = torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(0))
    untiled, tiled = vae.encode(images, noise), vae.encode(images, noise, tile=TILE)
    check_against_untiled(untiled, tiled, feathered_vae.encode(vae, images, noise, TILE))


@torch.no_grad()
def test_chunked_decode_equals_untiled(vae: SupirVAE, latents: torch.Tensor) -> None:
    untiled, tiled = vae.decode(latents), vae.decode(latents, tile=TILE)
    assert tiled.shape == (2, 3, 192, 320)
    check_against_untiled(untiled, tiled, feathered_vae.decode(vae, latents, TILE))


@torch.no_grad()
def test_uneven_sizes_and_tiles_equal_untiled(vae: SupirVAE, images: torch.Tensor, latents: torch.Tensor) -> None:
    """Sides that are not multiples of the tile (nor, for the encoder, of 8), one sample."""
    image = images[:1, :, :100, :212]
    assert rel_l2(vae.encode_lq(image, tile=48), vae.encode_lq(image)) <= BOUND
    latent = latents[1:, :, :13, :29]
    assert rel_l2(vae.decode(latent, tile=40), vae.decode(latent)) <= BOUND


@torch.no_grad()
def test_one_chunk_equals_untiled(vae: SupirVAE, images: torch.Tensor, latents: torch.Tensor) -> None:
    encoder = vae.robust_encoder
    ops = [*encoder_ops(encoder), Conv(vae.autoencoder.quant_conv)]
    one = ChunkGrid.split(192, 320, 320, 8)
    assert len(one) == 1
    untiled = vae.autoencoder.quant_conv(encoder(images))
    assert rel_l2(run_tiled(ops, images, one), untiled) <= BOUND
    # a tile as large as the image runs the plain network
    assert torch.equal(vae.decode(latents, tile=320), vae.decode(latents))


@torch.no_grad()
def test_chunked_is_closer_to_float64_than_the_untiled_fp32_network(vae: SupirVAE, images: torch.Tensor) -> None:
    """The bound above is the fp32 network's own rounding: measured against float64, chunking adds nothing."""
    encoder, quant_conv = vae.autoencoder.encoder, vae.autoencoder.quant_conv
    exact = copy.deepcopy(quant_conv).double()(copy.deepcopy(encoder).double()(images.double()))
    untiled = quant_conv(encoder(images))
    chunked = run_tiled([*encoder_ops(encoder), Conv(quant_conv)], images, ChunkGrid.split(192, 320, TILE, 8))
    assert rel_l2(chunked.double(), exact) <= 1e-5
    assert rel_l2(chunked.double(), exact) <= rel_l2(untiled.double(), exact)


@torch.no_grad()
def test_maps_on_another_device_give_the_same_result(vae: SupirVAE, latents: torch.Tensor) -> None:
    latent = latents[:1, :, :16, :16]  # 2 × 2 chunks
    expected = vae.decode(latent, tile=TILE)
    vae.map_device = "cpu"  # the only device here; on a GPU this keeps the full maps in host memory
    try:
        assert torch.equal(vae.decode(latent, tile=TILE), expected)
    finally:
        vae.map_device = None


def test_chunk_grid_cores_are_disjoint_aligned_and_cover_every_resolution(vae: SupirVAE) -> None:
    ops = encoder_ops(vae.robust_encoder)
    assert alignment(ops) == 8 and alignment(decoder_ops(vae.autoencoder.decoder)) == 1
    grid = ChunkGrid.split(200, 100, 64, 8)
    assert grid.rows == (0, 48, 96, 144, 200) and grid.cols == (0, 48, 100)
    for scale, size in [(1, (200, 100)), (0.5, (100, 50)), (0.25, (50, 25)), (0.125, (25, 12))]:
        covered = torch.zeros(size, dtype=torch.int64)
        for (h0, h1), (w0, w1) in grid.cores(Fraction(scale), size):
            covered[h0:h1, w0:w1] += 1
        assert bool((covered == 1).all())
    with pytest.raises(ValueError, match="not whole pixels"):
        ChunkGrid.split(200, 100, 60, 4).cores(Fraction(1, 8), (25, 12))


def test_halos_follow_kernels_strides_and_upsampling() -> None:
    conv = Conv(nn.Conv2d(1, 1, 3, padding=1))
    assert conv.needed((4, 8), 16) == (3, 9)  # one pixel either side
    assert conv.needed((0, 16), 16) == (0, 16)  # none beyond the border: the zero padding is the network's
    down = Conv(nn.Conv2d(1, 1, 3, stride=2), extra_pad=(0, 1))  # Downsample2D
    assert down.needed((2, 4), 16) == (4, 9) and down.needed((6, 8), 16) == (12, 16)
    assert down.out_size(16) == 8 and down.out_size(25) == 12
    strided = Conv(nn.Conv2d(1, 1, 3, stride=2, padding=1))
    assert strided.needed((3, 5), 16) == (4, 10)  # 5 rounded down to the stride grid
    assert Upsample().needed((3, 7), 8) == (1, 4)


def test_memory_plan_runs_the_chunked_vae_on_fake_tensors() -> None:
    """bench/memory_plan.py traces the tiled VAE with fake tensors; its byte count equals a real run's."""
    loader = importlib.util.spec_from_file_location("bench_memory_plan", BENCH / "memory_plan.py")
    assert loader is not None and loader.loader is not None
    memory_plan = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(memory_plan)
    spec = memory_plan.model_spec(tiny=True)

    report = memory_plan.plan(tiny=True, size=128, tiles=1, dtype=torch.float32, vae_tile=64)  # 2 × 2 chunks
    model = memory_plan.build(spec, torch.float32)
    z = torch.zeros(1, 4, 16, 16)
    tiled = memory_plan.peak_bytes(lambda: model.vae.decode(z, 64))
    assert round(report["activations_GB"]["decode"] * memory_plan.GB) == tiled
    assert tiled < memory_plan.peak_bytes(lambda: model.vae.decode(z))

    with memory_plan.fake_mode():  # full maps in host memory (meta stands for it): only chunks count
        model = memory_plan.build(spec, torch.float32)
        model.vae.map_device = "meta"
        host_maps = memory_plan.peak_bytes(lambda: model.vae.decode(torch.zeros(1, 4, 16, 16), 64))
    assert 0 < host_maps < tiled / 2
