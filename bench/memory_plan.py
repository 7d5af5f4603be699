"""Device memory and compute of a restoration, worked out without the device: weights, peak activations, FLOPs.

    python bench/memory_plan.py                      # full size (from the key manifest), bf16, 1024²
    python bench/memory_plan.py --size 2048 --tiles 9
    python bench/memory_plan.py --tiny --size 128    # fixture A's sizes (the smoke test in make test)
    python bench/memory_plan.py --size 2048 --vae-tile 1024 --vae-maps host  # chunked VAE, full-size maps in host RAM

The networks are built and run under FakeTensorMode: every operator computes its output's shape and dtype but no
data, so a full-size 1024² pass takes seconds on a CPU and no memory. A dispatch mode counts the bytes of every
live tensor storage (freed when its last tensor goes) and keeps the peak. The kernels of a GPU may hold a little
extra workspace (cuDNN, cuBLAS) and the caching allocator rounds blocks up; figures here are the tensors' own bytes.
Weights: the model's, and what they would be with fp8 weight-only Linear layers and the text encoders offloaded.
FLOPs of each stage are counted on the same fake run (torch's FlopCounterMode).
Prints a table; writes JSON to $OUT when set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from supir_core.memory import peak_bytes  # noqa: E402  (after the path insert)

CONFORMANCE = HERE.parent / "tests" / "data" / "conformance"
FIXTURE_A = CONFORMANCE / "A"
MANIFEST = CONFORMANCE / "manifest_full.json"

GB = 1e9


@contextmanager
def fake_mode() -> Iterator[Any]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        yield mode


def tflop(run: Callable[[], Any]) -> float:
    """TFLOP of `run` (torch's FlopCounterMode; the CPU's flash-attention kernel counted like CUDA's)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash_attention(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
        return sdpa_flop_count(query, key, value)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_attention}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        run()
    return counter.get_total_flops() / 1e12


def weights_report(model: nn.Module) -> dict[str, float]:
    from supir_core.speed import weight_bytes

    parts = {
        "unet": model.unet,
        "adaptor": model.adaptor,
        "vae": model.vae,
        "text": model.text,
    }
    out = {name: weight_bytes(part) / GB for name, part in parts.items()}
    # fp8 weight-only: every Linear of UNet (+ connectors) and adaptor at 1 byte a weight plus a fp32 scale per row
    saved = 0
    for net in (model.unet, model.adaptor):
        for m in net.modules():
            if isinstance(m, nn.Linear):
                saved += m.weight.numel() * (m.weight.element_size() - 1) - m.weight.shape[0] * 4
    out["total"] = sum(out[name] for name in parts)
    out["fp8_linear_saving"] = saved / GB
    out["total_fp8_offload_text"] = out["total"] - out["fp8_linear_saving"] - out["text"]
    return out


def model_spec(tiny: bool) -> Any:
    from supir_core.checkpoints import ModelOptions, TensorSource, open_checkpoint, spec_from_checkpoint

    if tiny:
        from supir_core.conformance import Fixture

        fixture = Fixture.open(FIXTURE_A)
        return spec_from_checkpoint(open_checkpoint(fixture.root / "sdxl.safetensors"), fixture.model_options())
    keys = json.loads(MANIFEST.read_text())["keys"]
    return spec_from_checkpoint(TensorSource.from_shapes("manifest", keys), ModelOptions())


def build(spec: Any, dtype: torch.dtype) -> nn.Module:
    from supir_core.models.supir import SupirModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = SupirModel(spec)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def plan(
    tiny: bool, size: int, tiles: int, dtype: torch.dtype, vae_tile: int | None, vae_maps: str = "device"
) -> dict[str, Any]:
    spec = model_spec(tiny)
    with fake_mode():
        model = build(spec, dtype)
        if vae_maps == "host":
            model.vae.map_device = "meta"  # fake tensors cannot be CUDA on a CPU build: meta stands for host memory
        spec = model.spec.unet
        latent = size // 8
        image = torch.zeros(1, 3, size, size, dtype=dtype)
        x = torch.zeros(2 * tiles, 4, latent if tiles == 1 else 128, latent if tiles == 1 else 128, dtype=dtype)
        context = torch.zeros(2 * tiles, 77, spec.context_dim, dtype=dtype)
        vector = torch.zeros(2 * tiles, spec.adm_in_channels, dtype=dtype)
        t = torch.full((2 * tiles,), 500.0)
        z = torch.zeros(1, 4, latent, latent, dtype=dtype)
        vae = model.vae

        def stage1() -> torch.Tensor:
            return vae.encode(vae.decode(vae.encode_lq(image, vae_tile), vae_tile), None, vae_tile)

        report = {
            "tflop": {
                "stage1": tflop(stage1),
                f"guided network call (batch {2 * tiles})": tflop(lambda: model.eps(x, t, context, vector, x)),
                "decode": tflop(lambda: vae.decode(z, vae_tile)),
            },
            "weights_GB": weights_report(model),
            "activations_GB": {
                "stage1 (robust encode + decode + encode)": peak_bytes(stage1) / GB,
                f"guided network call (batch {2 * tiles})": peak_bytes(lambda: model.eps(x, t, context, vector, x))
                / GB,
                "decode": peak_bytes(lambda: vae.decode(z, vae_tile)) / GB,
            },
        }
    acts = report["activations_GB"]
    weights = report["weights_GB"]
    report["peak_GB"] = weights["total"] + max(acts.values())
    report["peak_fp8_offload_text_GB"] = weights["total_fp8_offload_text"] + max(acts.values())
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="fixture A's sizes")
    parser.add_argument("--size", type=int, default=1024, help="processing size (square), pixels")
    parser.add_argument("--tiles", type=int, default=1, help="N>1: N sampler tiles of 128² latent per network call")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--vae-tile", type=int, default=None, help="VAE tile in pixels (default: none)")
    parser.add_argument("--vae-maps", default="device", choices=["device", "host"],
                        help="where the tiled VAE keeps its full-size maps (host: not counted)")  # fmt: skip
    args = parser.parse_args()

    figures = plan(args.tiny, args.size, args.tiles, getattr(torch, args.dtype), args.vae_tile, args.vae_maps)
    report = {"size": args.size, "tiles": args.tiles, "dtype": args.dtype, "vae_tile": args.vae_tile,
              "vae_maps": args.vae_maps, **figures}  # fmt: skip
    for name, value in report["tflop"].items():
        print(f"compute {name:<44} {value:8.3f} TFLOP")
    for name, value in report["weights_GB"].items():
        print(f"weights {name:<28} {value:8.3f} GB")
    for name, value in report["activations_GB"].items():
        print(f"activations {name:<40} {value:8.3f} GB")
    lean = report["peak_fp8_offload_text_GB"]
    print(f"peak: {report['peak_GB']:.2f} GB; with fp8 weights and text offload: {lean:.2f} GB")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "memory_plan.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
