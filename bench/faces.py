"""The face pass timed: a group photo of N small faces, restored plain and with faces=auto, the faces batched in one
run and one run per face (a tiny memory budget), same script, same device.

    python bench/faces.py                                   # GPU: full-size architecture, random weights, bf16
    python bench/faces.py --tiny --faces 3 --steps 2        # CPU: fixture A's tiny model, fp32

The photo: tests/data/astronaut_small.jpg (a face of about 40 px) tiled N times on a row (mirrored every other
copy). Random weights sample nonsense, but the work is the real one: detection runs on the input, and every face
region is restored at face_size × 1.5 pixels. Where OpenCV is missing (the GPU machines' image lacks it, and its
62 MB wheel does not fit what travels there), the detector is replaced by the faces' known boxes: the restoration work
is the same, the detection time (milliseconds on the CPU) is not counted. Prints a table; writes $OUT/faces.json
(when $OUT is set) after every row, replaced whole; rows not started by --deadline-s are recorded as skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from stages import full_size_pipeline, save_json, tiny_pipeline  # noqa: E402

from supir_core.faces import FaceBox  # noqa: E402
from supir_core.params import validate_params  # noqa: E402
from supir_core.pipeline import RestorationPipeline  # noqa: E402

FACE = HERE.parent / "tests" / "data" / "astronaut_small.jpg"
FACE_BOX = (68, 25, 108, 65)  # what HaarFaceDetector finds in FACE (200×200 px); mirrored: (92, 25, 132, 65)


class KnownFaces:
    """The boxes of group_photo(faces), for a machine without OpenCV."""

    name = "known boxes (no OpenCV here)"

    def __init__(self, faces: int, face_width: int) -> None:
        self.faces, self.face_width = faces, face_width

    def __call__(self, rgb: Image.Image) -> list[FaceBox]:
        scale = rgb.width / (self.faces * self.face_width)  # the photo as the pipeline loaded it
        x0, y0, x1, y1 = FACE_BOX
        boxes = []
        for i in range(self.faces):
            left, right = (self.face_width - x1, self.face_width - x0) if i % 2 else (x0, x1)
            offset = i * self.face_width
            box = ((offset + left) * scale, y0 * scale, (offset + right) * scale, y1 * scale)
            boxes.append(FaceBox(*(round(v) for v in box)))
        return boxes


def group_photo(faces: int) -> Image.Image:
    with Image.open(FACE) as img:
        face = img.convert("RGB")
    photo = Image.new("RGB", (face.width * faces, face.height))
    for i in range(faces):
        photo.paste(ImageOps.mirror(face) if i % 2 else face, (i * face.width, 0))
    return photo


def timed(pipeline: RestorationPipeline, photo: Image.Image, params: dict) -> dict:
    if pipeline.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = pipeline(photo, validate_params(params))
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1e9 if pipeline.device.type == "cuda" else None
    faces = result.to_dict()["faces"]
    return {
        "seconds": round(seconds, 3),
        "stages": result.seconds,
        "faces_found": len(faces["faces"]) if faces else 0,
        "face_seconds": faces["seconds"] if faces else None,
        "peak_gb": round(peak, 2) if peak is not None else None,
    }


def main() -> None:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="fixture A's tiny model on the CPU")
    parser.add_argument("--faces", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--min-size", type=int, default=1024)
    parser.add_argument("--face-size", type=int, default=512)
    parser.add_argument("--deadline-s", type=float, default=480, help="no row starts that would end later")
    args = parser.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if args.tiny:
        pipeline = tiny_pipeline(device)
    else:
        pipeline = full_size_pipeline(device, torch.bfloat16 if device == "cuda" else torch.float32)
    photo = group_photo(args.faces)
    if importlib.util.find_spec("cv2") is None:
        with Image.open(FACE) as img:
            pipeline.face_detector = KnownFaces(args.faces, img.width)
    base = {"steps": args.steps, "min_size": args.min_size, "seed": 0, "caption": "none"}
    faces = {**base, "faces": "auto", "face_size": args.face_size, "max_faces": args.faces}
    rows: dict = {}
    summary = {"device": device, "args": vars(args), "detector": pipeline.face_detector.name, "finished": False,
               "rows": rows}  # fmt: skip
    timed(pipeline, photo, {**base, "steps": 1})  # warm-up: kernels, allocator
    pipeline.memory_plan()  # the trace the face pass plans its batches by (once per model): not in a row's seconds
    budget = pipeline.memory_budget_gb
    longest = 0.0
    for name, params, memory_budget_gb in [
        ("plain", base, budget),
        ("faces batched", faces, budget),
        ("faces one per run", faces, 1e-6),  # a budget too small for two faces: one per run
    ]:
        if time.monotonic() - started + longest > args.deadline_s:
            rows[name] = {"skipped": "deadline"}
        else:
            pipeline.memory_budget_gb = memory_budget_gb
            rows[name] = timed(pipeline, photo, params)
            longest = max(longest, rows[name]["seconds"])
        save_json("faces.json", summary)
    pipeline.memory_budget_gb = budget
    summary["finished"] = True
    save_json("faces.json", summary)
    print(f"{device}, {photo.size[0]}×{photo.size[1]} photo, {args.faces} faces, {args.steps} steps, min_size "
          f"{args.min_size}, face_size {args.face_size}, detector {summary['detector']}")  # fmt: skip
    for name, row in rows.items():
        if "skipped" in row:
            print(f"{name:18} skipped: {row['skipped']}")
            continue
        print(f"{name:18} {row['seconds']:8.2f} s  faces {row['faces_found']}  {row['face_seconds']}  "
              f"peak {row['peak_gb']} GB")  # fmt: skip


if __name__ == "__main__":
    main()
