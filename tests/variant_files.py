"""A second SUPIR checkpoint for tests: the fixture's layout, other weights (as v0F stands beside v0Q)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from supir_core.checkpoints import IGNORED_KEYS

NOISE = 0.05  # of each tensor's rms: outputs clearly differ, the networks stay sane


def _perturbed(tensors: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, tensor in tensors.items():  # file order, so the same seed gives the same weights
        if not tensor.is_floating_point() or key in IGNORED_KEYS or tensor.numel() == 0:
            out[key] = tensor
            continue
        t = tensor.float()
        rms = t.square().mean().sqrt().clamp(min=1e-3)  # zero-initialised tensors still move
        noise = torch.randn(t.shape, generator=generator)
        out[key] = (t + NOISE * rms * noise).to(tensor.dtype).contiguous()
    return out


def make_variant_checkpoint(source: Path, target: Path, seed: int) -> Path:
    """Write `target`: `source`'s container (torch zip with a state dict, optionally wrapped in {"state_dict": …},
    or safetensors with its metadata), keys, shapes and dtypes, each tensor moved by seeded noise."""
    source, target = Path(source), Path(target)
    if source.suffix == ".safetensors":
        with safe_open(str(source), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(_perturbed(tensors, seed), str(target), metadata=metadata)
        return target
    obj = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(obj.get("state_dict"), Mapping):
        obj = type(obj)({**obj, "state_dict": type(obj["state_dict"])(_perturbed(obj["state_dict"], seed))})
    else:
        obj = type(obj)(_perturbed(obj, seed))
    torch.save(obj, target)
    return target
