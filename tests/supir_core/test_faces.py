"""The face pass (faces=auto) on real photographs: detection, a second restoration at a size SUPIR can work with,
a feathered blend that leaves everything outside the face's region byte for byte alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from supir_core.errors import Canceled
from supir_core.faces import FaceBox, HaarFaceDetector, feather_mask, plan_regions, restored_side
from supir_core.params import validate_params
from supir_core.pipeline import PipelineNoise, Progress, RestorationPipeline
from supir_core.speed import SpeedSettings
from tests.paths import DATA

BASE = {"min_size": 256, "steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def pipeline(tiny_model) -> RestorationPipeline:
    return RestorationPipeline(tiny_model)


def test_the_detector_finds_the_astronauts_face_and_nothing_in_photos_without_one() -> None:
    detect = HaarFaceDetector()
    (face,) = detect(Image.open(DATA / "astronaut_small.jpg").convert("RGB"))
    # Eileen Collins' face in the 200 × 200 photo: about x 68–108, y 25–65
    assert 60 <= face.x0 <= 75 and 100 <= face.x1 <= 115 and 18 <= face.y0 <= 32 and 58 <= face.y1 <= 72
    assert face.side < 100
    assert detect(Image.open(DATA / "chelsea_degraded.jpg").convert("RGB")) == []  # a cat
    assert detect(Image.open(DATA / "coffee_rgba.png").convert("RGB")) == []


def test_regions_are_squares_inside_the_photo_largest_first() -> None:
    boxes = [FaceBox(0, 0, 40, 40), FaceBox(150, 150, 170, 170)]
    regions = plan_regions(boxes, (200, 200), (400, 400), (1024, 1024), face_size=512, max_faces=8)
    assert [r.source for r in regions] == [(0, 0, 60, 60), (145, 145, 175, 175)]  # moved in, not shrunk
    assert [r.target for r in regions] == [(0, 0, 120, 120), (290, 290, 350, 350)]
    assert [r.edges for r in regions] == [(True, True, False, False), (False, False, False, False)]
    assert all(r.restored for r in regions)
    assert len(plan_regions(boxes, (200, 200), (400, 400), (1024, 1024), 512, max_faces=1)) == 1
    # the main pass sampled the face at the processing size: 600 px there is enough, whatever the output size
    big = plan_regions([FaceBox(0, 0, 300, 300)], (400, 400), (400, 400), (800, 800), face_size=512, max_faces=8)
    assert not big[0].restored
    small = plan_regions([FaceBox(0, 0, 300, 300)], (400, 400), (800, 800), (400, 400), face_size=512, max_faces=8)
    assert small[0].restored
    assert restored_side(512) == 768 and restored_side(256) == 384  # the face then spans ≥ face_size
    mask = feather_mask(60, 60)
    assert mask[30, 30] == 1 and mask[0, 0] < 0.01 and mask[0, 30] < 0.01 and 0 < mask[5, 30] < 1
    on_edge = feather_mask(60, 60, (True, True, False, False))  # the photo's own edge: no seam to hide
    assert on_edge[0, 0] == 1 and on_edge[0, 30] == 1 and on_edge[59, 30] < 0.01


def border_steps(image: np.ndarray, region: list[int], offset: int = 0) -> float:
    """Mean |difference| between neighbouring pixels across the region's four edges (moved `offset` px inward)."""
    x0, y0, x1, y1 = region
    a = image.astype(np.float64)
    steps = [
        np.abs(a[y0:y1, x0 + offset] - a[y0:y1, x0 + offset - 1]),
        np.abs(a[y0:y1, x1 - 1 - offset] - a[y0:y1, x1 - offset]),
        np.abs(a[y0 + offset, x0:x1] - a[y0 + offset - 1, x0:x1]),
        np.abs(a[y1 - 1 - offset, x0:x1] - a[y1 - offset, x0:x1]),
    ]
    return float(np.mean(np.concatenate(steps)))


def seamless(result: np.ndarray, plain: np.ndarray, region: list[int]) -> bool:
    """The blended border's gradient stays within the surrounding image's: across each line parallel to the
    region's edges (the edges themselves and 1–6 px inward), the result's mean step is no larger than the largest
    the plain restoration has across lines there and nearby (±6 px), with 10% to spare."""
    surrounding = max(border_steps(plain, region, k) for k in range(-6, 7))
    return max(border_steps(result, region, k) for k in range(0, 7)) <= 1.1 * surrounding


def test_a_small_face_is_restored_again_at_512_px_and_blended_in_only_its_region(pipeline, monkeypatch) -> None:
    plain = pipeline(DATA / "astronaut_small.jpg", validate_params(BASE))
    assert plain.faces is None and plain.to_dict()["faces"] is None

    runs: list[tuple[int, ...]] = []
    restore_tensor = pipeline.restore_tensor
    monkeypatch.setattr(
        pipeline, "restore_tensor", lambda lq, *a, **k: runs.append(tuple(lq.shape)) or restore_tensor(lq, *a, **k)
    )
    seen: list[Progress] = []
    result = pipeline(DATA / "astronaut_small.jpg", validate_params({**BASE, "faces": "auto"}), on_progress=seen.append)

    assert runs == [(1, 3, 256, 256), (1, 3, 768, 768)]  # the photo, then its face at 768 px: the face spans 512
    assert [p.step for p in seen if p.stage == "faces"] == [1, 2]  # one sampler run of 2 steps for the face
    meta = result.to_dict()["faces"]
    assert meta["restored_size"] == 768 and meta["face_size"] == 512
    (face,) = meta["faces"]
    assert face["restored"] and face["seconds"] > 0 and result.seconds["faces"] > 0
    x0, y0, x1, y1 = face["region"]
    assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 200  # output = input size here (upscale 1)

    before, after = np.asarray(plain.image), np.asarray(result.image)
    outside = np.ones(before.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(before[outside], after[outside])  # identical bytes outside the face's region
    assert (np.abs(before[y0:y1, x0:x1].astype(int) - after[y0:y1, x0:x1]).sum(-1) > 0).mean() > 0.5
    assert seamless(after, before, face["region"])
    hard = after.copy()  # the check sees a seam: the same region pasted without feathering, a little brighter
    hard[y0:y1, x0:x1] = np.clip(before[y0:y1, x0:x1].astype(int) + 24, 0, 255)
    assert not seamless(hard, before, face["region"])


def test_a_photo_without_a_face_gives_exactly_the_plain_result(pipeline) -> None:
    plain = pipeline(DATA / "chelsea_degraded.jpg", validate_params(BASE))
    faces = pipeline(DATA / "chelsea_degraded.jpg", validate_params({**BASE, "faces": "auto"}))
    assert faces.image.tobytes() == plain.image.tobytes()
    assert faces.to_dict()["faces"]["faces"] == []


def test_faces_of_every_sample_run_batched_and_chunks_change_nothing(tiny_model) -> None:
    astronaut = Image.open(DATA / "astronaut_small.jpg").convert("RGB")
    pair = Image.new("RGB", (400, 200))
    pair.paste(astronaut, (0, 0))
    pair.paste(ImageOps.mirror(astronaut).resize((150, 150)), (230, 40))  # a second, smaller face
    params = {**BASE, "steps": 1, "faces": "auto", "face_size": 256, "num_samples": 2}

    runs: list[int] = []
    whole = RestorationPipeline(tiny_model)
    restore_tensor = whole.restore_tensor
    whole.restore_tensor = lambda lq, *a, **k: runs.append(lq.shape[0]) or restore_tensor(lq, *a, **k)  # type: ignore[method-assign]
    one_run = whole(pair, validate_params(params))
    assert runs == [1, 4]  # the photo (2 samples share stage 1), then 2 faces × 2 samples in one batch
    boxes = [f["box"] for f in one_run.to_dict()["faces"]["faces"]]
    assert len(boxes) == 2 and boxes[0][2] - boxes[0][0] > boxes[1][2] - boxes[1][0]  # largest first

    tiny_budget = RestorationPipeline(tiny_model, speed=SpeedSettings(memory_budget_gb=1e-6))
    chunked = tiny_budget(pair, validate_params(params))  # a row per run
    for alone, batched in zip(chunked.images, one_run.images, strict=True):  # as samples: float order only
        assert np.abs(np.asarray(alone, dtype=int) - np.asarray(batched, dtype=int)).max() <= 1

    largest = whole(pair, validate_params({**params, "max_faces": 1, "num_samples": 1}))
    assert len(largest.to_dict()["faces"]["faces"]) == 1 and runs[-1] == 1


def test_the_cli_restores_faces_of_a_grayscale_photo(tmp_path: Path, env: dict[str, str]) -> None:
    photo = str(DATA / "astronaut_gray.png")
    flags = ["--min-size", "256", "--steps", "1", "--seed", "1", "--faces", "auto", "--face-size", "256", "--metadata"]
    cmd = [sys.executable, "-m", "supir_core.cli", "restore", photo, "-o", str(tmp_path), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "astronaut_gray.json").read_text())
    (face,) = meta["faces"]["faces"]
    assert face["restored"] and 20 <= face["box"][0] <= 40  # the 96-px photo's face, about x 32–52
    with Image.open(tmp_path / "astronaut_gray.png") as out:
        assert out.mode == "L" and out.size == (96, 96)


def test_the_portrait_preset_turns_faces_on() -> None:
    assert validate_params(preset="portrait").faces == "auto"
    assert validate_params().faces == "off"


def test_the_two_stage_flow_restores_the_same_faces(pipeline) -> None:
    """A preview's stage 1, then a faces run from it, gives the single run's image, faces included."""
    params = validate_params({**BASE, "steps": 1, "faces": "auto", "face_size": 256, "prompt": "an astronaut"})
    preview = pipeline.preview(DATA / "astronaut_small.jpg", params)
    resumed = pipeline(DATA / "astronaut_small.jpg", params, stage1=preview.stage1)
    direct = pipeline(DATA / "astronaut_small.jpg", params)

    def found(result) -> list[tuple]:
        return [(f["box"], f["region"], f["restored"]) for f in result.to_dict()["faces"]["faces"]]

    assert "stage1" not in resumed.seconds and found(resumed) == found(direct) and len(found(direct)) == 1
    assert resumed.image.tobytes() == direct.image.tobytes()


def test_cancel_during_the_face_pass_stops_within_one_step(pipeline) -> None:
    seen: list[Progress] = []
    params = validate_params({**BASE, "steps": 3, "faces": "auto", "face_size": 256})
    with pytest.raises(Canceled):
        pipeline(
            DATA / "astronaut_small.jpg",
            params,
            on_progress=seen.append,
            should_stop=lambda: any(p.stage == "faces" for p in seen),
        )
    assert [p.step for p in seen if p.stage == "faces"] == [1]


def test_each_row_of_a_batch_of_crops_is_restored_as_alone(pipeline) -> None:
    """restore_tensor on the face rows: one prompt (one row, expanded) for all, each row its own control and seed."""
    lq = torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(3)) * 2 - 1
    spec, gen = pipeline.model.spec.unet, torch.Generator().manual_seed(5)
    prompt = (torch.randn(1, 77, spec.context_dim, generator=gen), torch.randn(1, spec.adm_in_channels, generator=gen))
    params = validate_params({"steps": 3, "tiling": "never"})

    def run(rows: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            noise = PipelineNoise.seeded(seeds, pipeline.device)
            return pipeline.restore_tensor(
                rows, params, noise=noise, encode_prompts=lambda x, t: (prompt, prompt)
            ).restored

    batch = run(lq, [7, 8, 9])
    for i, seed in enumerate([7, 8, 9]):
        torch.testing.assert_close(batch[i : i + 1], run(lq[i : i + 1], [seed]), rtol=1e-4, atol=1e-4)
    assert (batch[0] - batch[1]).abs().max() > 0.1
