"""The benchmark scripts run (tiny sizes here; the figures come from runs by hand or on a GPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


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
    photo = Path(__file__).parent / "data" / "astronaut_gray.png"
    result = RestorationPipeline(model)(photo, validate_params({"min_size": 64, "steps": 2, "seed": 0}))
    assert result.image.size == (96, 96)


def test_side_by_side_restore_benchmark_runs_on_the_tiny_model(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path)}
    cmd = [sys.executable, str(BENCH / "gpu_restore.py"), "--tiny", "--size", "128", "--tiled-size", "384",
           "--tile-size", "32", "--steps", "2", "--repeats", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_restore.json").read_text())
    baseline, tuned = report["configs"].values()
    assert baseline["runs"][0]["tflops_per_s"] > 0 and baseline["runs"][0]["steps_per_s"] > 0
    assert tuned["speed"]["fuse_qkv"] == "True" and tuned["runs"][1]["tiled_sampling"] is True
