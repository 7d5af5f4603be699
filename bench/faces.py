"""The face pass timed: a group photo of N small faces, restored plain and with faces=auto, the faces batched in one
run and one run per face (a tiny memory budget), same script, same device.

    python bench/faces.py                                   # GPU: full-size architecture, random weights, bf16
    python bench/faces.py --tiny --faces 3 --steps 2        # CPU: fixture A's tiny model, fp32

The photo: tests/data/astronaut_small.jpg (a face of about 40 px) tiled N times on a row (mirrored every other
copy). Random weights sample nonsense, but the work is the real one: detection runs on the input, and every face
region is restored at face_size × 1.5 pixels. Prints a table; writes faces.json to $OUT when set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from stages import full_size_pipeline, tiny_pipeline  # noqa: E402

from supir_core.params import validate_params  # noqa: E402
from supir_core.pipeline import RestorationPipeline  # noqa: E402

FACE = HERE.parent / "tests" / "data" / "astronaut_small.jpg"


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="fixture A's tiny model on the CPU")
    parser.add_argument("--faces", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--min-size", type=int, default=1024)
    parser.add_argument("--face-size", type=int, default=512)
    args = parser.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if args.tiny:
        pipeline = tiny_pipeline(device)
    else:
        pipeline = full_size_pipeline(device, torch.bfloat16 if device == "cuda" else torch.float32)
    photo = group_photo(args.faces)
    base = {"steps": args.steps, "min_size": args.min_size, "seed": 0, "caption": "none"}
    faces = {**base, "faces": "auto", "face_size": args.face_size, "max_faces": args.faces}
    timed(pipeline, photo, {**base, "steps": 1})  # warm-up: kernels, allocator, the memory plan's trace
    rows = {"plain": timed(pipeline, photo, base), "faces batched": timed(pipeline, photo, faces)}
    budget, pipeline.memory_budget_gb = pipeline.memory_budget_gb, 1e-6  # one face per run
    rows["faces one per run"] = timed(pipeline, photo, faces)
    pipeline.memory_budget_gb = budget
    print(f"{device}, {photo.size[0]}×{photo.size[1]} photo, {args.faces} faces, {args.steps} steps, min_size "
          f"{args.min_size}, face_size {args.face_size}")  # fmt: skip
    for name, row in rows.items():
        print(f"{name:18} {row['seconds']:8.2f} s  faces {row['faces_found']}  {row['face_seconds']}  "
              f"peak {row['peak_gb']} GB")  # fmt: skip
    if os.environ.get("OUT"):
        summary = {"device": device, "args": vars(args), "rows": rows}
        (Path(os.environ["OUT"]) / "faces.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
