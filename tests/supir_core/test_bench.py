"""The benchmark scripts run (tiny sizes here; the figures come from runs by hand or on a GPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from supir_core.memory import LiveBytes
from tests.paths import BENCH, DATA


def test_stage_timings_script_runs_on_the_tiny_model(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path)}
    cmd = [sys.executable, str(BENCH / "stages.py"), "--size", "128", "--steps", "2", "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "stages.json").read_text())
    assert report["size"] == [128, 128] and report["steps"] == 2
    assert set(report["median_s"]) >= {"stage1", "sampling", "decoding", "total"}


def test_random_weights_for_the_full_size_run_give_a_working_model(fixture_a: Path) -> None:
    """The GPU benchmark's weight initialisation, on a meta-built model of the fixture's sizes."""
    from supir_core.checkpoints import build_empty, open_checkpoint, spec_from_checkpoint
    from supir_core.conformance import Fixture
    from supir_core.params import validate_params
    from supir_core.pipeline import RestorationPipeline

    loader = importlib.util.spec_from_file_location("bench_stages", BENCH / "stages.py")
    assert loader is not None and loader.loader is not None
    stages = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(stages)

    options = Fixture.open(fixture_a).model_options()
    spec = spec_from_checkpoint(open_checkpoint(fixture_a / "sdxl.safetensors"), options)
    model = stages.randomize(build_empty(spec), "cpu", torch.float32)
    assert not any(p.is_meta for p in model.parameters())
    photo = DATA / "astronaut_gray.png"
    result = RestorationPipeline(model)(photo, validate_params({"min_size": 64, "steps": 2, "seed": 0}))
    assert result.image.size == (96, 96)


def test_side_by_side_restore_benchmark_runs_on_the_tiny_model(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path)}
    cmd = [sys.executable, str(BENCH / "gpu_restore.py"), "--tiny", "--size", "128", "--tiled-size", "384",
           "--tile-size", "32", "--steps", "2", "--repeats", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_restore.json").read_text())
    baseline, tuned, lean, fp8compute = report["configs"].values()
    assert baseline["runs"][0]["tflops_per_s"] > 0 and baseline["runs"][0]["steps_per_s"] > 0
    assert tuned["speed"]["fuse_qkv"] == "True" and tuned["runs"][1]["tiled_sampling"] is True
    assert lean["speed"]["fp8"] == "weights" and lean["runs"][0]["steps_per_s"] > 0
    assert fp8compute["speed"]["fp8"] == "compute" and "error" not in fp8compute


def test_face_pass_benchmark_runs_on_the_tiny_model(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path)}
    cmd = [sys.executable, str(BENCH / "faces.py"), "--tiny", "--faces", "1", "--steps", "1", "--min-size", "128",
           "--face-size", "256"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "faces.json").read_text())["rows"]
    assert rows["plain"]["faces_found"] == 0 and rows["plain"]["face_seconds"] is None
    for name in ("faces batched", "faces one per run"):
        assert rows[name]["faces_found"] == 1 and rows[name]["face_seconds"]["restore"] > 0


def _bench_module(name: str):
    loader = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def test_live_bytes_counts_allocations_and_frees_not_views() -> None:
    memory_plan = _bench_module("memory_plan")

    def run(weights: torch.Tensor) -> None:
        a = torch.zeros(1000)  # 4000 bytes
        b = a * 2  # 8000 live
        del a
        weights.t().view(-1)  # views of an existing tensor allocate nothing
        c = b + 1  # 8000 live
        del b
        c.add_(1)  # in place: nothing new
        torch.zeros(3000)  # 4000 + 12000 = 16000: the peak, freed at once
        del c

    weights = torch.zeros(1000)
    with LiveBytes() as real:
        run(weights)
    with memory_plan.fake_mode():
        weights = torch.zeros(1000)
        with LiveBytes() as fake:
            run(weights)
    assert (real.peak, real.live) == (fake.peak, fake.live) == (16000, 0)


def test_memory_plan_of_the_tiny_model_matches_a_real_run(fixture_a: Path, tmp_path: Path) -> None:
    """Fake tensors count the same bytes as real ones: the plan of a full-size model needs no device."""
    memory_plan = _bench_module("memory_plan")
    from supir_core.speed import weight_bytes

    spec = memory_plan.model_spec(tiny=True)
    model = memory_plan.build(spec, torch.float32)
    u = spec.unet
    x, t = torch.zeros(2, 4, 16, 16), torch.full((2,), 500.0)
    context, vector = torch.zeros(2, 77, u.context_dim), torch.zeros(2, u.adm_in_channels)
    real = memory_plan.peak_bytes(lambda: model.eps(x, t, context, vector, x))
    report = memory_plan.plan(tiny=True, size=128, tiles=1, dtype=torch.float32, vae_tile=None)
    assert report["activations_GB"]["guided network call (batch 2)"] * memory_plan.GB == real
    assert report["weights_GB"]["total"] * memory_plan.GB == weight_bytes(model)

    env = {**os.environ, "OUT": str(tmp_path)}
    cmd = [sys.executable, str(BENCH / "memory_plan.py"), "--tiny", "--size", "256", "--tiles", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "memory_plan.json").read_text())
    assert 0 < saved["weights_GB"]["total_fp8_offload_text"] < saved["weights_GB"]["total"] < saved["peak_GB"]
