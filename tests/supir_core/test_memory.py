"""The memory plan behind tiling=auto: traced bytes against a real run, the budget, and the decision."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from supir_core.memory import (
    GB,
    Budget,
    LiveBytes,
    decide_tiling,
    is_out_of_memory,
    memory_budget,
    module_bytes,
    release_after_failure,
    total_ram,
    trace_stage_bytes,
)
from supir_core.params import validate_params
from supir_core.pipeline import RestorationPipeline
from tests.paths import DATA


def test_traced_bytes_are_what_a_real_run_allocates(tiny_model) -> None:
    side = 128
    traced = trace_stage_bytes(tiny_model, side)
    vae = tiny_model.vae
    z = torch.randn(1, 4, side // 8, side // 8)
    with torch.no_grad(), LiveBytes() as real:
        vae.decode(z)
    assert traced.decode * side * side == pytest.approx(real.peak, rel=0.01)
    assert trace_stage_bytes(tiny_model, side) is traced  # traced once per model, dtype, device and size
    planned = traced.at(4 * side * side, batch=2)
    assert planned["decode"] == pytest.approx(8 * real.peak, rel=0.01)  # bytes grow with pixels × batch


def test_a_traced_plan_is_kept_on_disk_and_read_back_by_the_next_process(
    fixture_a, tmp_path, monkeypatch, caplog
) -> None:
    """With a cache directory the first trace writes the plan under the model's fingerprint; a fresh load of the
    same model (a restarted worker process) reads it instead of tracing. Another dtype or side is another file; a
    damaged file is traced again and replaced; an unwritable directory costs a trace, not the job."""
    from supir_core import memory
    from supir_core.conformance import Fixture

    side, cache = 128, tmp_path / "plans"
    first = Fixture.open(fixture_a).load_model()
    traced = trace_stage_bytes(first, side, cache_dir=cache)
    [written] = cache.iterdir()
    assert written.name == f"memory-plan-{memory.plan_fingerprint(first, side)}.json"

    def no_trace(*args: object) -> None:
        raise AssertionError("traced although the plan was on disk")

    monkeypatch.setattr(memory, "_trace", no_trace)
    second = Fixture.open(fixture_a).load_model()  # what a restarted worker process loads
    assert trace_stage_bytes(second, side, cache_dir=cache) == traced
    fingerprint = memory.plan_fingerprint(second, side)
    assert memory.plan_fingerprint(second, 2 * side) != fingerprint
    assert memory.plan_fingerprint(Fixture.open(fixture_a).load_model().double(), side) != fingerprint

    retraced = memory.StageBytes(1.0, 2.0, 3.0, 4.0)
    monkeypatch.setattr(memory, "_trace", lambda *args: retraced)
    written.write_text('{"stage1": 1.0')  # cut short
    assert trace_stage_bytes(Fixture.open(fixture_a).load_model(), side, cache_dir=cache) == retraced
    assert trace_stage_bytes(Fixture.open(fixture_a).load_model(), side, cache_dir=cache) == retraced  # replaced

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert trace_stage_bytes(Fixture.open(fixture_a).load_model(), side, cache_dir=blocked / "plans") == retraced
    assert "memory plan not cached" in caplog.text


def test_a_tiled_vae_passs_maps_are_traced_and_grow_with_the_pixels(tiny_model) -> None:
    """The maps' bytes per pixel traced on fake tensors are what real tiled decodes allocate: two sizes decoded in
    chunks of one size differ only by their maps."""
    traced = trace_stage_bytes(tiny_model)
    peaks = {}
    for side in (256, 512):
        z = torch.randn(1, 4, side // 8, side // 8)
        with torch.no_grad(), LiveBytes() as real:
            tiny_model.vae.decode(z, 128)
        peaks[side] = real.peak
    per_pixel = (peaks[512] - peaks[256]) / (512 * 512 - 256 * 256)
    assert traced.vae_maps > 0 and traced.vae_maps == pytest.approx(per_pixel, rel=0.05)


def test_tiled_vae_maps_stay_on_the_device_when_they_fit_the_budget(tiny_model) -> None:
    from supir_core.speed import SpeedSettings

    params = validate_params({"vae_tile_size": 256})
    traced = trace_stage_bytes(tiny_model)
    pixels = 2048 * 2048
    maps = traced.vae_maps * pixels
    chunk = max(traced.at(256 * 256)["stage1"], traced.at(256 * 256)["decode"])
    roomy = RestorationPipeline(tiny_model, speed=SpeedSettings(memory_budget_gb=(maps + chunk) * 1.01 / GB))
    tight = RestorationPipeline(tiny_model, speed=SpeedSettings(memory_budget_gb=(maps + chunk) * 0.99 / GB))
    assert roomy.vae_maps_fit(params, pixels, 1) and not tight.vae_maps_fit(params, pixels, 1)
    assert not roomy.vae_maps_fit(params, pixels, 2)  # two rows: twice the maps


def never_called() -> tuple[dict[str, float], Budget]:
    raise AssertionError("no plan is needed")


def plan(stage1: float, sampling: float, decode: float, budget: float):
    return lambda: (
        {"stage1": stage1 * GB, "sampling": sampling * GB, "decode": decode * GB},
        Budget(budget * GB, "test"),
    )


def test_forced_policies_and_single_tiles_need_no_plan() -> None:
    never = decide_tiling("never", sampler_can_tile=True, vae_can_tile=True, plan=never_called)
    assert (never.sampling, never.vae, never.reason) == (False, False, "tiling=never")
    always = decide_tiling("always", sampler_can_tile=True, vae_can_tile=False, plan=never_called)
    assert (always.sampling, always.vae, always.reason) == (True, False, "tiling=always")
    small = decide_tiling("auto", sampler_can_tile=False, vae_can_tile=False, plan=never_called)
    assert (small.sampling, small.vae, small.reason) == (False, False, "the image fits in one tile")


@pytest.mark.parametrize(
    ("sizes", "sampling", "vae"),
    [
        ((1.6, 0.6, 1.6, 10.0), False, False),  # everything fits: the official untiled path
        ((6.4, 2.5, 6.4, 5.0), False, True),  # the VAE is the first to outgrow the budget
        ((6.4, 5.5, 6.4, 5.0), True, True),
        ((1.0, 5.5, 1.0, 5.0), True, False),
    ],
)
def test_auto_tiles_only_the_parts_that_do_not_fit(sizes: tuple, sampling: bool, vae: bool) -> None:
    decision = decide_tiling("auto", sampler_can_tile=True, vae_can_tile=True, plan=plan(*sizes))
    assert (decision.sampling, decision.vae) == (sampling, vae)
    assert decision.budget_gb == sizes[-1]
    assert decision.planned_gb == {"stage1": sizes[0], "sampling": sizes[1], "decode": sizes[2]}
    assert ("exceeds" if sampling or vae else "fits in") in decision.reason
    meta = decision.metadata()
    assert (meta["sampling"], meta["vae"]) == ("tiled" if sampling else "untiled", "tiled" if vae else "untiled")


def test_a_part_that_cannot_tile_is_not_tiled() -> None:
    decision = decide_tiling("auto", sampler_can_tile=False, vae_can_tile=True, plan=plan(1.0, 9.0, 1.0, 5.0))
    assert (decision.sampling, decision.vae) == (False, False)  # DPM++ or a latent within one tile: whole


def _resident_bytes() -> int:
    """This process's resident memory (VmRSS) in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def _meminfo(field: str) -> int:
    """A /proc/meminfo figure in bytes, read here on its own."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pytest.skip(f"no {field} in /proc/meminfo on this machine")


def test_the_budget_is_total_memory_less_the_models_and_a_margin(tiny_model) -> None:
    cpu = torch.device("cpu")
    assert memory_budget(cpu, 10**9, 3.5) == Budget(3.5 * GB, "the memory_budget_gb setting")
    models = module_bytes(tiny_model)
    assert models == sum(p.numel() * 4 for p in tiny_model.parameters()) + sum(
        b.numel() * b.element_size() for b in tiny_model.buffers()
    )
    total = _meminfo("MemTotal")
    assert total_ram() <= total  # a container's limit may be lower
    budget = memory_budget(cpu, models)
    margin = max(total_ram() // 10, 2**30)
    assert budget.bytes == total_ram() - models - margin
    assert budget.source == "total RAM less the loaded models and a 10% margin"
    assert budget.inputs == {
        "total_gb": round(total_ram() / GB, 4),
        "models_gb": round(models / GB, 4),
        "margin_gb": round(margin / GB, 4),
    }


def test_cuda_graph_pools_are_not_counted_as_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Faked CUDA (none here): 80 GB, two segments in graph pools, one in the default pool."""
    from types import SimpleNamespace

    from supir_core.memory import graph_pool_bytes

    segments = [
        {"total_size": 6 * 2**30, "segment_pool_id": (1, 0)},
        {"total_size": 2 * 2**30, "segment_pool_id": (2, 0)},
        {"total_size": 9 * 2**30, "segment_pool_id": (0, 0)},  # the caching allocator's own: not a graph's
    ]
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda device=None: {"segments": segments})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 10**9))
    cuda = torch.device("cuda", 0)
    pools = graph_pool_bytes(cuda)
    assert pools == 8 * 2**30 and graph_pool_bytes(torch.device("cpu")) == 0
    plain, with_pools = memory_budget(cuda, 10 * 10**9), memory_budget(cuda, 10 * 10**9, graph_pools=pools)
    assert plain.bytes - with_pools.bytes == pools
    assert with_pools.inputs is not None and with_pools.inputs["graph_pools_gb"] == round(pools / GB, 4)
    assert "CUDA-graph pools" in with_pools.source and "graph_pools_gb" not in (plain.inputs or {})


def test_memory_others_hold_does_not_move_the_budget() -> None:
    """The old budget (available RAM) shrank with whatever else ran: a job's path, and its bytes, with it."""
    cpu = torch.device("cpu")
    before = memory_budget(cpu, 10**9)
    available = _meminfo("MemAvailable")
    size = min(2 * GB, available // 4)
    ballast = torch.ones(int(size) // 4)  # written, so its pages are really taken
    assert _meminfo("MemAvailable") < available - size / 2
    assert memory_budget(cpu, 10**9) == before
    del ballast


def test_a_job_replays_to_the_same_bytes_while_other_memory_is_in_use(tiny_model) -> None:
    """tiling=auto decides from the budget; with memory taken by someone else the job takes the same path and
    gives the same bytes (the old budget, available RAM, moved with the ballast and was recorded so)."""
    pipeline = RestorationPipeline(tiny_model)
    params = validate_params({"min_size": 256, "tile_size": 32, "tile_stride": 16, "steps": 2, "seed": 7})
    photo = DATA / "chelsea_degraded.jpg"
    first = pipeline(photo, params)
    assert first.tiling.policy == "auto" and first.tiling.budget_inputs is not None  # planned, not a single tile

    size = min(_meminfo("MemAvailable") // 4, 2 * GB)  # a sizeable share, without crowding the suite's processes
    resident = _resident_bytes()
    ballast = torch.ones(int(size) // 4)
    # held for real (written pages), as seen from this process: the machine's MemAvailable also moves with whatever
    # the suite's other processes free meanwhile
    assert _resident_bytes() > resident + size * 0.9
    second = pipeline(photo, params)
    del ballast

    assert second.tiling == first.tiling
    assert second.tiling.metadata() == first.tiling.metadata()
    assert np.array_equal(np.asarray(second.image), np.asarray(first.image))


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"),
        RuntimeError("Triton Error [CUDA]: out of memory"),
        RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    ],
)
def test_out_of_memory_is_recognised_in_all_its_forms(exc: BaseException) -> None:
    assert is_out_of_memory(exc)


def test_an_out_of_memory_a_wrapper_was_raised_from_is_recognised() -> None:
    try:
        try:
            raise RuntimeError("Triton Error [CUDA]: out of memory")
        except RuntimeError as inner:
            raise ValueError("the compiled kernel failed") from inner  # as a compiler's wrapper would
    except ValueError as wrapper:
        assert is_out_of_memory(wrapper)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
        RuntimeError("Expected all tensors to be on the same device, but found at least two devices"),
        RuntimeError("CUDA error: device-side assert triggered"),
        ValueError("out of memory"),  # not an error torch or a CUDA library raises
        MemoryError(),  # host memory: not the device's
    ],
)
def test_other_errors_are_not_out_of_memory(exc: BaseException) -> None:
    assert not is_out_of_memory(exc)


def test_a_failed_runs_tensors_are_freed_before_the_cache_is_emptied(monkeypatch: pytest.MonkeyPatch) -> None:
    """The traceback holds the failed frames' tensors; they must be gone when empty_cache runs (faked: no GPU)."""
    alive: list[bool] = []

    def run() -> None:
        activations = torch.zeros(1024)
        watch = weakref.ref(activations)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: alive.append(watch() is not None))
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        run()
    except torch.OutOfMemoryError as exc:
        release_after_failure(exc)
    assert alive == [False]
