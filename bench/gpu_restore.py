"""Full restorations timed side by side: a plain eager fp16 baseline and the tuned settings, same script, same card.

    python bench/gpu_restore.py                                  # GPU: full-size architecture, random weights
    python bench/gpu_restore.py --sdxl F --supir F               # GPU: the real files (also times the load)
    python bench/gpu_restore.py --configs bf16,fuse_qkv          # GPU: chosen configurations (ablation)
    python bench/gpu_restore.py --tiny --size 128 --tiled-size 256 --steps 2   # CPU smoke test (fixture A)

Configurations (--configs): baseline = eager fp16; tuned = bf16, channels_last, fused QKV, regional compile;
lean = tuned with fp8 weights and offloaded text encoders; fp8compute = tuned with fp8 matmuls; and for an ablation
each setting alone over eager bf16 (bf16, channels_last, fuse_qkv, regional, full_graphs, fp8weights).
For each configuration: per-stage seconds at --size (default 1024²) and, for tuned, tiled at --tiled-size (default
2048²; --runs picks either), sampler steps/s, achieved TFLOP/s (FLOPs of one guided network call counted with torch's
FlopCounterMode), peak GPU memory, the load time and the warm-up time (compiling included).

Time: each size starts with a warm-up of --warmup-steps sampler steps (same shapes as the timed runs, so the same
compiled graphs and kernels, at a fraction of a run's cost). Tiles go --tiles-per-batch at a time (default 1: a
2048² tile call has the shapes of a 1024² call, so the tiled run reuses the 1024² graphs). A configuration starts only
while the time left before --deadline-s (from the script's start) covers the longest configuration so far; the ones
left out are recorded as "skipped": "deadline". Prints a table; writes $OUT/gpu_restore.json (when $OUT is set)
after every load and every run, replaced whole, so a run killed at its limit keeps every finished figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from stages import FIXTURE_A, MANIFEST, PHOTO, randomize, save_json  # noqa: E402

from supir_core.checkpoints import TensorSource, build_empty, load_supir, spec_from_checkpoint  # noqa: E402
from supir_core.cli import default_plan_cache_dir  # noqa: E402
from supir_core.params import validate_params  # noqa: E402
from supir_core.pipeline import RestorationPipeline  # noqa: E402
from supir_core.speed import SpeedSettings, optimize  # noqa: E402


def build(
    args: argparse.Namespace, device: str, dtype: torch.dtype, speed: SpeedSettings
) -> tuple[RestorationPipeline, float]:
    start = time.perf_counter()
    if args.tiny:
        from supir_core.conformance import Fixture

        fixture = Fixture.open(FIXTURE_A)
        model = fixture.load_model().to(device=device, dtype=dtype)
    elif args.sdxl and args.supir:
        model = load_supir(args.sdxl, args.supir, device=device, dtype=dtype)
    else:
        keys = json.loads(MANIFEST.read_text())["keys"]
        model = randomize(build_empty(spec_from_checkpoint(TensorSource.from_shapes("manifest", keys))), device, dtype)
    if dtype == torch.float16:
        model.vae.to(torch.bfloat16)
    optimize(model, speed)
    if device == "cuda":
        torch.cuda.synchronize()
    pipeline = RestorationPipeline(model, speed=dataclasses.replace(speed, plan_cache_dir=default_plan_cache_dir()))
    return pipeline, round(time.perf_counter() - start, 2)


def network_flops(pipeline: RestorationPipeline, latent: int) -> float:
    """FLOPs of one guided network evaluation (adaptor + UNet, CFG batch of 2) at a square latent."""
    from torch.utils.flop_counter import FlopCounterMode

    model, device = pipeline.model, pipeline.device
    spec = model.spec.unet
    x = torch.randn(2, 4, latent, latent, device=device)
    context = torch.randn(2, 77, spec.context_dim, device=device)
    vector = torch.randn(2, spec.adm_in_channels, device=device)
    # eager: the count is the same, and a compiled block must not compile again under the counting mode
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        model.eps(x, torch.tensor([500, 500], device=device), context, vector, x)
    return float(counter.get_total_flops())


def run(
    pipeline: RestorationPipeline,
    size: int,
    steps: int,
    repeats: int,
    device: str,
    *,
    warmup_steps: int,
    tile: int = 128,
    tiled: bool = False,
    tiles_per_batch: int = 1,
    num_samples: int = 1,
) -> dict:
    with Image.open(PHOTO) as img:
        photo = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    settings = {"min_size": size, "steps": steps, "seed": 0, "caption": "none", "tile_size": tile,
                "tile_stride": tile // 2, "tiles_per_batch": tiles_per_batch, "num_samples": num_samples,
                "tiling": "always" if tiled else "auto"}  # fmt: skip  # tiled: that path, even where it fits
    params = validate_params(settings)
    warmup_s = None
    if warmup_steps > 0:  # kernels, compilation, allocator: every step has the same shapes, so a few steps suffice
        start = time.perf_counter()
        pipeline(photo, validate_params({**settings, "steps": min(warmup_steps, steps)}))
        warmup_s = round(time.perf_counter() - start, 2)
    results = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = pipeline(photo, params)
        results.append((time.perf_counter() - start, result))
    total, fastest = min(results, key=lambda r: r[0])
    sampling = fastest.seconds["sampling"]
    out = {
        "size": size,
        "num_samples": num_samples,
        "repeats": repeats,
        "warmup_s": warmup_s,  # on the first size of a compiled configuration: mostly compiling
        "total_s": round(total, 3),
        "s_per_image": round(total / num_samples, 3),  # what a batch of samples saves over separate jobs
        "stages_s": fastest.seconds,
        "steps_per_s": _figure(steps / sampling),
        "tiled_sampling": fastest.tiling.sampling,
        "tiles_per_batch": tiles_per_batch if fastest.tiling.sampling else None,
        "tiling": fastest.tiling.metadata(),  # the plan's activations per stage, to hold against the measured peak
        "peak_gpu_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None,
    }
    if not fastest.tiling.sampling:
        try:
            flops = network_flops(pipeline, size // 8) * steps
            out["tflops_per_s"] = _figure(flops / sampling / 1e12)
        except Exception as exc:  # a counter that cannot see inside some kernel must not lose the timings
            out["tflops_per_s"] = f"not counted: {type(exc).__name__}"
    return out


Config = tuple[str, torch.dtype, SpeedSettings, bool]  # label, dtype, settings, whether to run the tiled size too
DEFAULT_CONFIGS = "baseline,tuned,lean,fp8compute"
ABLATION = "bf16,channels_last,fuse_qkv,regional,full_graphs,fp8weights"


def configs(args: argparse.Namespace, device: str) -> dict[str, Config]:
    """key → configuration. Off the GPU: fp32, nothing compiled (a smoke test of every path)."""
    gpu = device == "cuda"
    fast = torch.bfloat16 if gpu else torch.float32
    base = torch.float16 if gpu else torch.float32
    fast_name, base_name = str(fast).removeprefix("torch."), str(base).removeprefix("torch.")
    compile_ = args.compile if gpu else "none"
    regional = "regional" if gpu else "none"
    tuned = SpeedSettings(channels_last=True, fuse_qkv=True, compile=compile_)  # type: ignore[arg-type]
    return {
        "baseline": (f"baseline (eager {base_name})", base, SpeedSettings(), False),
        "tuned": ("tuned", fast, tuned, True),
        "lean": ("tuned + fp8 weights + text offload", fast, replace(tuned, fp8="weights", offload_text=True), False),
        "fp8compute": ("tuned + fp8 compute", fast, replace(tuned, fp8="compute"), False),
        # each setting on its own, over eager bf16
        "bf16": (f"{fast_name} eager", fast, SpeedSettings(), False),
        "channels_last": (f"{fast_name} + channels_last", fast, SpeedSettings(channels_last=True), False),
        "fuse_qkv": (f"{fast_name} + fuse_qkv", fast, SpeedSettings(fuse_qkv=True), False),
        "regional": (f"{fast_name} + compile regional", fast, SpeedSettings(compile=regional), False),  # type: ignore[arg-type]
        "full_graphs": (
            f"{fast_name} + compile full + CUDA graphs",
            fast,
            SpeedSettings(compile="full" if gpu else "none", cuda_graphs=gpu),
            False,
        ),
        "fp8weights": (f"{fast_name} + fp8 weights", fast, SpeedSettings(fp8="weights"), False),
    }


def main() -> None:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="fixture A's tiny model (CPU smoke test)")
    parser.add_argument("--sdxl", type=Path)
    parser.add_argument("--supir", type=Path)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tiled-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps of the warm-up run per size (0: none)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs at --size (the fastest is reported)")
    parser.add_argument("--tiled-repeats", type=int, default=1, help="timed runs at --tiled-size")
    parser.add_argument("--runs", default="untiled,tiled", help="untiled (--size), tiled (--tiled-size; tuned only)")
    parser.add_argument("--compile", default="regional", choices=["none", "regional", "full"])
    parser.add_argument("--tile-size", type=int, default=128, help="sampler tile in latent pixels (official: 128)")
    parser.add_argument("--tiles-per-batch", type=int, default=1, help="tiles per network call in the tiled run")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per run, one batched sampler run")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated keys (ablation: {ABLATION})")
    parser.add_argument("--deadline-s", type=float, default=480, help="no configuration starts that would end later")
    args = parser.parse_args()
    runs = set(args.runs.split(","))
    if not runs or runs - {"untiled", "tiled"}:
        parser.error(f"--runs takes untiled, tiled or both, not {args.runs!r}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    available = configs(args, device)
    keys = args.configs.split(",")
    for key in keys:
        if key not in available:
            parser.error(f"unknown configuration {key!r}; known: {', '.join(available)}")
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                    "steps": args.steps, "warmup_steps": args.warmup_steps, "deadline_s": args.deadline_s,
                    "elapsed_s": 0.0, "finished": False, "configs": {}}  # fmt: skip

    def save() -> None:
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        save_json("gpu_restore.json", report)

    longest = 0.0  # seconds of the longest configuration so far: what the next one is expected to need at most
    for key in keys:
        name, dtype, speed, tiled = available[key]
        entry: dict = {"key": key, "dtype": str(dtype).removeprefix("torch."),
                       "speed": {k: str(v) for k, v in asdict(speed).items()}, "runs": []}  # fmt: skip
        report["configs"][name] = entry
        config_started = time.monotonic()
        if config_started - started + longest > args.deadline_s:
            entry["skipped"] = "deadline"
            save()
            continue
        try:
            pipeline, entry["load_s"] = build(args, device, dtype, speed)
            save()
            if "untiled" in runs:
                entry["runs"].append(run(pipeline, args.size, args.steps, args.repeats, device,
                                         warmup_steps=args.warmup_steps, num_samples=args.num_samples))  # fmt: skip
                save()
            if tiled and "tiled" in runs:
                if time.monotonic() - started > args.deadline_s:
                    entry["skipped"] = "deadline"  # the tiled run; the untiled one above stands
                else:
                    entry["runs"].append(run(pipeline, args.tiled_size, args.steps, args.tiled_repeats, device,
                                             warmup_steps=args.warmup_steps, tile=args.tile_size, tiled=True,
                                             tiles_per_batch=args.tiles_per_batch))  # fmt: skip
        except Exception as exc:  # one failing configuration (a missing package, OOM) must not lose the others
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            print(f"{name}: {entry['error']}", file=sys.stderr)
        pipeline = None
        longest = max(longest, time.monotonic() - config_started)
        save()
        print(json.dumps({name: entry}), flush=True)
        torch._dynamo.reset()  # this configuration's compiled graphs (and CUDA graph pools) go with it
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    report["finished"] = True
    save()
    for name, entry in report["configs"].items():
        if "skipped" in entry and not entry["runs"]:
            print(f"{name:<36} skipped: {entry['skipped']}")
        for r in entry["runs"]:
            tiled_label = " tiled" if r["tiled_sampling"] else ""
            print(f"{name:<36} {entry['dtype']:<9} {r['size']}²{tiled_label}: {r['total_s']:.2f} s, "
                  f"{r['steps_per_s']} steps/s, {r.get('tflops_per_s', '-')} TFLOP/s, peak {r['peak_gpu_GB']} GB, "
                  f"load {entry.get('load_s')} s, warm-up {r['warmup_s']} s")  # fmt: skip


def _figure(value: float) -> float:
    """Three significant digits: a tiny model's 0.004 TFLOP/s on a busy CPU stays a figure, not 0.0."""
    return float(f"{value:.3g}")


if __name__ == "__main__":
    main()
