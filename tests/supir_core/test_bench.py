"""The benchmark scripts run (tiny sizes here; the figures come from runs by hand or on a GPU)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

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


# the smallest tiled run with more than one tile in each direction: a 320² photo is a 40² latent, 2 × 2 tiles of 32²
TILED = 320
TINY_RESTORE = ["--tiny", "--size", "128", "--tiled-size", str(TILED), "--tile-size", "32", "--steps", "2",
                "--repeats", "1", "--warmup-steps", "1"]  # fmt: skip
TINY_FACES = ["--tiny", "--faces", "1", "--steps", "1", "--min-size", "128", "--face-size", "256"]
# gpu_session.sh part → the configurations it runs, each with its run sizes (TILED: the tiled one)
SESSION_PARTS = {
    "main": {"baseline": [128], "tuned": [128]},
    "tiled": {"tuned": [TILED]},
    "fp8": {"lean": [128]},
    "fp8compute": {"fp8compute": [128]},
    "ablate": {key: [128] for key in ("bf16", "channels_last", "fuse_qkv", "fp8weights", "regional")},
    "graphs": {"full_graphs": [128]},
    "samples": {"tuned": [128]},
}


def _session(part: str, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """bash bench/gpu_session.sh PART as on the device, with this venv's python and no wheels to install."""
    env = {**os.environ, "OUT": str(out), "SKIP_WHEELS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    cmd = ["bash", str(BENCH / "gpu_session.sh"), part, *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("part", SESSION_PARTS)
def test_gpu_session_part_runs_end_to_end_on_the_tiny_model(part: str, tmp_path: Path) -> None:
    proc = _session(part, tmp_path, *TINY_RESTORE)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_restore.json").read_text())
    assert report["finished"] is True and (tmp_path / "env.txt").exists() and (tmp_path / "log.txt").exists()
    configs = {entry["key"]: entry for entry in report["configs"].values()}
    assert {key: [r["size"] for r in entry["runs"]] for key, entry in configs.items()} == SESSION_PARTS[part]
    for entry in configs.values():
        assert "error" not in entry and "skipped" not in entry and entry["load_s"] > 0
        for r in entry["runs"]:
            assert r["steps_per_s"] > 0 and r["warmup_s"] > 0
            assert r["tiled_sampling"] is (r["size"] == TILED)
            assert r["tflops_per_s"] > 0 if not r["tiled_sampling"] else "tflops_per_s" not in r
    if part == "main":
        assert configs["tuned"]["speed"]["fuse_qkv"] == "True" and configs["baseline"]["runs"][0]["repeats"] == 1
    if part == "tiled":
        assert configs["tuned"]["runs"][0]["tiles_per_batch"] == 1
    if part == "fp8":
        assert configs["lean"]["speed"]["fp8"] == "weights" and configs["lean"]["speed"]["offload_text"] == "True"
    if part == "fp8compute":
        assert configs["fp8compute"]["speed"]["fp8"] == "compute"
    if part == "samples":
        run = configs["tuned"]["runs"][0]
        assert run["num_samples"] == 3 and run["s_per_image"] == pytest.approx(run["total_s"] / 3, abs=1e-3)


def test_gpu_session_faces_part_runs_end_to_end_on_the_tiny_model(tmp_path: Path) -> None:
    proc = _session("faces", tmp_path, *TINY_FACES)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "faces.json").read_text())
    rows = summary["rows"]
    assert summary["finished"] is True and summary["detector"] == "opencv-haar-frontalface+eye-pair"
    assert rows["plain"]["faces_found"] == 0 and rows["plain"]["face_seconds"] is None
    for name in ("faces batched", "faces one per run"):
        assert rows[name]["faces_found"] == 1 and rows[name]["face_seconds"]["restore"] > 0


def test_faces_bench_without_opencv_places_the_boxes_the_detector_finds() -> None:
    """The GPU machines lack OpenCV: the face pass there works on the boxes the cascade finds here."""
    from supir_core.faces import HaarFaceDetector

    faces = _bench_module("faces")
    photo = faces.group_photo(4)
    with Image.open(faces.FACE) as img:
        known = faces.KnownFaces(4, img.width)
    found = sorted(HaarFaceDetector()(photo), key=lambda box: box.x0)
    for small in (1.0, 0.5):  # the photo as given and as a pipeline might load it smaller
        resized = photo.resize((round(photo.width * small), round(photo.height * small)))
        boxes = known(resized)
        assert len(boxes) == len(found) == 4
        for box, reference in zip(boxes, found, strict=True):
            got = (box.x0, box.y0, box.x1, box.y1)
            want = (reference.x0, reference.y0, reference.x1, reference.y1)
            assert got == pytest.approx([v * small for v in want], abs=2)


def test_gpu_restore_killed_half_way_leaves_the_finished_runs(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path)}
    cmd = [sys.executable, str(BENCH / "gpu_restore.py"), *TINY_RESTORE, "--configs", "tuned,bf16"]
    path, report, log = tmp_path / "gpu_restore.json", None, tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists():  # replaced whole, so never read half-written
                report = json.loads(path.read_text())
                if any(entry["runs"] for entry in report["configs"].values()):
                    break
            time.sleep(0.05)
        assert proc.poll() is None, f"ended before it was killed: {log.read_text()[-2000:]}"
    finally:
        with contextlib.suppress(ProcessLookupError):  # ended early: the assertion above says why
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group, as a device call's time limit does
        proc.wait()
    assert report is not None
    left = json.loads(path.read_text())
    tuned = left["configs"]["tuned"]
    # the 128² run is there; the tiled one (seconds on the CPU) was under way and never reached the file
    assert left["finished"] is False and list(left["configs"]) == ["tuned"] and tuned["load_s"] > 0
    assert [r["size"] for r in tuned["runs"]] == [128] and tuned["runs"][0]["total_s"] > 0


def test_gpu_restore_skips_configurations_past_its_deadline(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path)}
    cmd = [sys.executable, str(BENCH / "gpu_restore.py"), *TINY_RESTORE, "--configs", "baseline,tuned",
           "--deadline-s", "0"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_restore.json").read_text())
    assert report["finished"] is True and len(report["configs"]) == 2
    for entry in report["configs"].values():
        assert entry["skipped"] == "deadline" and entry["runs"] == [] and "load_s" not in entry


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
