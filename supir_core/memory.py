"""Planned device memory of a restoration, so that `tiling="auto"` runs untiled whenever the run fits.

The official code samples and decodes untiled unless told otherwise; tiling is only a way to fit a large image
into a device. So the pipeline asks this module, per job, how many bytes of activations each stage would take
untiled and how many the device can spare, and tiles only the stages that would not fit.

Activation bytes are traced, not guessed: the model's own networks run once on fake tensors (shapes and dtypes, no
data, no device memory) at a reference size while a dispatch mode counts the bytes of live tensor storages. Every
stage's activations grow with the pixel count (convolutions, and attention through SDPA's memory-efficient
kernels), so bytes per pixel at the reference size scale to any size. The trace runs once per pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import json
import logging
import os
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .models.supir import SupirModel
from .plan import GB, Budget, StageBytes
from .plan import TilingDecision as TilingDecision  # the plan's arithmetic is torch-free (the API estimates with it)
from .plan import decide_tiling as decide_tiling

log = logging.getLogger(__name__)
REFERENCE_SIDE = 512  # image pixels: a 64² latent, big enough that fixed-size tensors (text, embeddings) are noise


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode that are still alive; `peak` is the most at once.

    Tensors on the meta device are not counted: under fake tensors they stand for host memory (the tiled VAE's
    maps, bench/memory_plan.py --vae-maps host).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakSet[torch.UntypedStorage] = weakref.WeakSet()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            if id(t.untyped_storage()) not in inputs:  # not a view, not in place
                self._count(t.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        if storage in self._seen:
            return
        self._seen.add(storage)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size


def peak_bytes(run: Callable[[], Any]) -> int:
    """Peak bytes of the tensors `run` creates (its result included), above what existed before."""
    with torch.no_grad(), LiveBytes() as tracker:
        result = run()
        del result
    return tracker.peak


_traced: weakref.WeakKeyDictionary[SupirModel, dict[tuple[Any, ...], StageBytes]] = weakref.WeakKeyDictionary()


def trace_stage_bytes(model: SupirModel, side: int = REFERENCE_SIDE, cache_dir: Path | None = None) -> StageBytes:
    """Each stage's activations at side² on fake tensors of the model's dtype and device, per pixel.

    Compiled graphs run eagerly here (their memory is the eager one's or less); the trace allocates nothing.
    Kept per model, dtype, device and side: pipelines sharing a model trace it once. With `cache_dir`, also kept
    on disk under the model's fingerprint (`plan_fingerprint`): the trace takes seconds to a minute of CPU (tens of
    thousands of fake-tensor ops), and a restarted worker process of the same model and code reads it back instead.
    """
    dtype = next(model.unet.parameters()).dtype
    device = next(model.unet.parameters()).device
    key = (dtype, device, side)
    known = _traced.setdefault(model, {})
    if key not in known:
        path = cache_dir / f"memory-plan-{plan_fingerprint(model, side)}.json" if cache_dir is not None else None
        cached = _read_plan(path) if path is not None else None
        known[key] = cached or _trace(model, side, dtype, device)
        if path is not None and cached is None:
            _write_plan(path, known[key])
    return known[key]


def plan_fingerprint(model: SupirModel, side: int) -> str:
    """What a trace depends on: the networks' structure (every module's class and attention processor, every
    parameter's name, shape and dtype), the device type, the reference side, torch's version and supir_core's own
    source. Weights' values do not matter, so two checkpoints of one architecture share a plan."""
    digest = hashlib.sha256(f"{torch.__version__}|{side}|{next(model.unet.parameters()).device.type}".encode())
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        digest.update(f"{name}:{type(module).__qualname__}:{type(processor).__qualname__}\n".encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
    digest.update(_source_digest().encode())
    return digest.hexdigest()[:32]


@functools.cache
def _source_digest() -> str:
    """sha256 of supir_core's Python files: a code change (a network, the tiled VAE, this trace) traces again."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _read_plan(path: Path) -> StageBytes | None:
    """A plan written by an earlier trace, or None (absent, unreadable, or not one)."""
    try:
        fields = json.loads(path.read_text())
        return StageBytes(**{f.name: float(fields[f.name]) for f in dataclasses.fields(StageBytes)})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_plan(path: Path, stage_bytes: StageBytes) -> None:
    """Written whole (a temporary file renamed), so concurrent workers never read half a plan; a cache that cannot
    be written (a read-only or full disk) only costs the next process a trace."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(dataclasses.asdict(stage_bytes)))
        temporary.replace(path)
    except OSError as exc:
        log.warning("memory plan not cached in %s (%s): the next worker process traces it again", path.parent, exc)


def _trace(model: SupirModel, side: int, dtype: torch.dtype, device: torch.device) -> StageBytes:
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = model.spec.unet
    latent = side // 8
    with torch.compiler.set_stance("force_eager"), FakeTensorMode(allow_non_fake_inputs=True):
        image = torch.zeros(1, 3, side, side, dtype=dtype, device=device)
        z = torch.zeros(1, 4, latent, latent, dtype=dtype, device=device)
        x = torch.zeros(2, 4, latent, latent, dtype=dtype, device=device)
        context = torch.zeros(2, 77, spec.context_dim, dtype=dtype, device=device)
        vector = torch.zeros(2, spec.adm_in_channels, dtype=dtype, device=device)
        t = torch.full((2,), 500, dtype=torch.long, device=device)
        vae = model.vae
        stage1 = peak_bytes(lambda: vae.encode(vae.decode(vae.encode_lq(image)), z))
        sampling = peak_bytes(lambda: model.eps(x, t, context, vector, x))
        decode = peak_bytes(lambda: vae.decode(z))
        maps = max(
            _growth(side, lambda z_, chunk: vae.decode(z_, chunk), z),
            _growth(side, lambda x_, chunk: vae.encode(x_, None, chunk), image),
        )
    pixels = side * side
    return StageBytes(stage1 / pixels, sampling / pixels, decode / pixels, maps)


def _growth(side: int, tiled_pass: Callable[..., Any], full: torch.Tensor) -> float:
    """Bytes per image pixel that a tiled VAE pass adds as the image grows with its chunk size fixed: its full-size
    maps and its output. Two sizes (side/2 and side, chunks of side/4) differ by nothing else."""
    chunk = side // 4
    half = full[..., : full.shape[-2] // 2, : full.shape[-1] // 2]
    small = peak_bytes(lambda: tiled_pass(half.contiguous(), chunk))
    large = peak_bytes(lambda: tiled_pass(full, chunk))
    return (large - small) / (side * side * 3 / 4)


def memory_budget(
    device: torch.device, models_bytes: int, override_gb: float | None = None, graph_pools: int = 0
) -> Budget:
    """Bytes of activations a run may use on `device`: its total memory less what the loaded models hold there,
    what CUDA-graph pools hold (`graph_pool_bytes`: kept for the graphs' replays, of no use to other work) and a
    margin (10%, at least 1 GiB) for kernels' workspace and fragmentation; `override_gb` (SUPIR_MEMORY_BUDGET_GB)
    replaces it. CPU: total RAM, or the container's memory limit when lower.

    Not free memory: that changes with whatever else runs, and with it the path a job takes and its bytes."""
    if override_gb is not None:
        return Budget(override_gb * GB, "the memory_budget_gb setting")
    if device.type == "cuda":
        total, what = torch.cuda.get_device_properties(device).total_memory, "total CUDA memory"
    else:
        total, what = total_ram(), "total RAM"
    margin = max(total // 10, 2**30)
    inputs = {"total_gb": total / GB, "models_gb": models_bytes / GB, "margin_gb": margin / GB}
    source = f"{what} less the loaded models and a 10% margin"
    if graph_pools:
        inputs["graph_pools_gb"] = graph_pools / GB
        source = f"{what} less the loaded models, the CUDA-graph pools and a 10% margin"
    usable = total - models_bytes - graph_pools - margin
    return Budget(float(usable), source, {k: round(v, 4) for k, v in inputs.items()})


def graph_pool_bytes(device: torch.device) -> int:
    """Bytes the CUDA-graph private pools hold on `device` (compile with cuda_graphs records one per graph and
    size): reserved for the graphs' replays, free or not. 0 off CUDA."""
    if device.type != "cuda":
        return 0
    segments = torch.cuda.memory._snapshot(device)["segments"]
    return sum(int(s["total_size"]) for s in segments if tuple(s.get("segment_pool_id", (0, 0))) != (0, 0))


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (on whatever device they are)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def total_ram() -> int:
    """The machine's RAM (MemTotal), or the cgroup's memory limit when it is lower (a container's)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


# How running out of device memory reads when it is not torch.OutOfMemoryError: cuBLAS and cuDNN failing to allocate
# their workspace, Triton failing to load a compiled kernel's module, a CUDA call's cudaErrorMemoryAllocation.
# All are plain RuntimeErrors; matched in lower case.
OUT_OF_MEMORY_MARKERS = (
    "out of memory",  # "CUDA out of memory", "CUDA error: out of memory", "Triton Error [CUDA]: out of memory"
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cudnn_status_not_enough_workspace",
    "cuda_error_out_of_memory",  # the driver API's name (module loading)
    "cudaerrormemoryallocation",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from, such as a compiler's wrapper) is the device running out
    of memory, in any of the forms torch, cuBLAS, cuDNN and Triton raise it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.OutOfMemoryError):
            return True
        if isinstance(current, RuntimeError):
            message = str(current).lower()
            if any(marker in message for marker in OUT_OF_MEMORY_MARKERS):
                return True
        current = current.__cause__
    return False


def release_after_failure(exc: BaseException) -> None:
    """Give back the device memory a failed run held. Its traceback's frames keep the run's tensors alive (their
    locals), so `empty_cache` alone frees nothing of them: the frames are cleared first, then collected."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # the chained exceptions' frames hold tensors too
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)  # frames still running (the caller's) are left alone
        current = current.__cause__ or current.__context__
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def free_device_cache(device: torch.device) -> None:
    """Give the caching allocator's free blocks back, so a smaller retry gets whole segments (CUDA only). Call it
    after the failed call's error is out of scope: its traceback's frames hold the call's tensors."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
