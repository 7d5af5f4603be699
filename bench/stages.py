"""Time each stage of RestorationPipeline on the device present.

    python bench/stages.py                         # CPU: the tiny fixture model (set A), fp32
    python bench/stages.py --full-size             # GPU: the real architecture with random weights, bf16
    python bench/stages.py --size 2048 --steps 50  # any processing size / step count

Prints a table of per-stage seconds (median over --repeats runs after one warm-up) and, where $OUT is
set, writes the same as JSON there. Random weights make the pictures meaningless but the work real.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
CONFORMANCE = HERE.parent / "tests" / "data" / "conformance"  # the tiny model and the full-size key manifest
FIXTURE_A = CONFORMANCE / "A"
MANIFEST = CONFORMANCE / "manifest_full.json"
PHOTO = HERE.parent / "tests" / "data" / "chelsea_degraded.jpg"


def save_json(name: str, report: dict) -> None:
    """$OUT/name (where $OUT is set), replaced whole: a run killed mid-write leaves the previous version, never half
    a file. Called after every run, so a part cut off at its time limit keeps every figure it finished."""
    if not os.environ.get("OUT"):
        return
    path = Path(os.environ["OUT"], name)
    partial = path.with_name(f".{name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(report, indent=1))
    os.replace(partial, path)


def cached_plans():
    """SpeedSettings with nothing on but the CLI's plan cache: each part of a GPU session traces a model once."""
    from supir_core.cli import default_plan_cache_dir
    from supir_core.speed import SpeedSettings

    return SpeedSettings(plan_cache_dir=default_plan_cache_dir())


def tiny_pipeline(device: str):
    from supir_core.conformance import Fixture
    from supir_core.pipeline import RestorationPipeline

    fixture = Fixture.open(FIXTURE_A)
    return RestorationPipeline(fixture.load_model().to(device), speed=cached_plans())


def randomize(model: torch.nn.Module, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Materialise a meta-device model on `device` with random weights of sane scale (norms: 1 and 0)."""
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias") or "norm" in name:
                param.zero_()
            else:
                fan_in = param[0].numel() if param.dim() > 1 else 1
                param.normal_(0.0, fan_in**-0.5, generator=generator)
        for name, buffer in model.named_buffers():
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1], device=device).expand_as(buffer))
    return model.eval().requires_grad_(False)


def full_size_pipeline(device: str, dtype: torch.dtype):
    """The real sizes (from the key manifest) with random weights, built straight on the device."""
    from supir_core.checkpoints import TensorSource, build_empty, spec_from_checkpoint
    from supir_core.pipeline import RestorationPipeline

    keys = json.loads(MANIFEST.read_text())["keys"]
    model = build_empty(spec_from_checkpoint(TensorSource.from_shapes("manifest", keys)))
    return RestorationPipeline(randomize(model, device, dtype), speed=cached_plans())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="real architecture, random weights (needs a GPU)")
    parser.add_argument("--size", type=int, default=1024, help="processing short side (min_size)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sampler", default="edm", choices=["edm", "dpmpp_2m"])
    args = parser.parse_args()

    from supir_core.params import validate_params

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    started = time.perf_counter()
    pipeline = full_size_pipeline(device, dtype) if args.full_size else tiny_pipeline(device)
    build_s = time.perf_counter() - started
    with Image.open(PHOTO) as img:
        photo = img.convert("RGB").resize((args.size, args.size), Image.Resampling.BICUBIC)
    params = validate_params({"min_size": args.size, "steps": args.steps, "seed": 0, "sampler": args.sampler})

    runs = []
    for i in range(args.repeats + 1):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = pipeline(photo, params)
        total = time.perf_counter() - start
        if i > 0:  # the first run warms up kernels and allocators
            runs.append({**result.seconds, "total": total})
    stages = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    report = {
        "model": "SUPIR full size, random weights" if args.full_size else "fixture A (tiny)",
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "dtype": str(dtype).removeprefix("torch."),
        "size": list(result.sizes.process),
        "steps": args.steps,
        "sampler": args.sampler,
        "tiled_sampling": result.tiling.sampling,
        "tiled_vae": result.tiling.vae,
        "build_s": round(build_s, 2),
        "median_s": {k: round(v, 4) for k, v in stages.items()},
        "ms_per_step": round(1000 * stages["sampling"] / args.steps, 2),
        "peak_gpu_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None,
        "torch": torch.__version__,
    }
    print(f"{report['model']} on {report['device']}, {report['dtype']}, {report['size'][0]}×{report['size'][1]}, "
          f"{args.steps} steps ({args.sampler}), median of {args.repeats}:")  # fmt: skip
    for stage, seconds in report["median_s"].items():
        print(f"  {stage:<14} {seconds:9.3f} s")
    print(f"  {'per step':<14} {report['ms_per_step']:9.1f} ms")
    if report["peak_gpu_GB"] is not None:
        print(f"  peak GPU memory {report['peak_gpu_GB']} GB")
    save_json("stages.json", report)


if __name__ == "__main__":
    main()
