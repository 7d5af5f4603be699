"""Peak memory and time of `load_supir`, measured in a fresh child process.

    python bench/load_memory.py                                  # fixture set A (tiny), fp32
    python bench/load_memory.py --full-size --dtype bfloat16     # real sizes: synthesises the two files
                                                                 # from the key manifest (≈12 GB on disk)

Reports the model's own bytes beside the process's peak private (anonymous) memory and peak resident
set, sampled every 5 ms from /proc. Private memory is what loading costs; the resident set also counts
pages of the memory-mapped checkpoint files, which the kernel can drop at will.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFORMANCE = HERE.parent / "tests" / "data" / "conformance"
FIXTURE_A = CONFORMANCE / "A"
MANIFEST = CONFORMANCE / "manifest_full.json"
SUPIR_PREFIXES = (
    "model.control_model.",
    "model.diffusion_model.project_modules.",
    "first_stage_model.denoise_encoder.",
)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _measure(sdxl: str, supir: str, dtype: str, options: dict, queue: mp.Queue) -> None:
    import torch

    from supir_core.checkpoints import ModelOptions, load_supir

    peaks = {"RssAnon": 0, "VmRSS": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key in peaks:
                peaks[key] = max(peaks[key], _status_kb(key))
            time.sleep(0.005)

    base = {key: _status_kb(key) for key in peaks}
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    model = load_supir(sdxl, supir, dtype=getattr(torch, dtype), options=ModelOptions(**options))
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    queue.put(
        {
            "seconds": round(seconds, 2),
            "model_GB": round(model_bytes / 1e9, 3),
            "peak_private_GB": round(peaks["RssAnon"] / 1e6, 3),
            "peak_private_over_start_GB": round((peaks["RssAnon"] - base["RssAnon"]) / 1e6, 3),
            "peak_rss_GB": round(peaks["VmRSS"] / 1e6, 3),
            "start_private_GB": round(base["RssAnon"] / 1e6, 3),
        }
    )


def synthesise_full_size(workdir: Path) -> tuple[Path, Path]:
    """Write SDXL (fp16 safetensors) and SUPIR (fp32 .ckpt) files of the real key layout and sizes."""
    import torch
    from safetensors.torch import save_file

    sdxl, supir = workdir / "sdxl_full.safetensors", workdir / "supir_full.ckpt"
    keys = json.loads(MANIFEST.read_text())["keys"]
    workdir.mkdir(parents=True, exist_ok=True)
    if not sdxl.exists():
        part = {
            k: torch.full(s, 0.01, dtype=torch.float16) for k, s in keys.items() if not k.startswith(SUPIR_PREFIXES)
        }
        part["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        save_file(part, str(sdxl))
        del part
    if not supir.exists():
        part = {k: torch.full(s, 0.01) for k, s in keys.items() if k.startswith(SUPIR_PREFIXES)}
        part["model.control_model.mask_LQ"] = torch.zeros(1, 4, 64, 64)
        torch.save(part, supir)
        del part
    return sdxl, supir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="synthesise and load files of the real sizes")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/supir-bench"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    if args.full_size:
        sdxl, supir = synthesise_full_size(args.workdir)
        options: dict = {}
    else:
        from supir_core.conformance import Fixture, write_ckpt_twin

        sdxl, supir = FIXTURE_A / "sdxl.safetensors", write_ckpt_twin(FIXTURE_A)
        options = Fixture.open(FIXTURE_A).model_options().__dict__
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_measure, args=(str(sdxl), str(supir), args.dtype, options, queue))
    child.start()
    result = queue.get()
    child.join()
    files_gb = round((sdxl.stat().st_size + supir.stat().st_size) / 1e9, 3)
    print(json.dumps({"files": [str(sdxl), str(supir)], "files_GB": files_gb, "dtype": args.dtype, **result}, indent=1))


if __name__ == "__main__":
    main()
