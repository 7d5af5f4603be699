"""Estimates before a job runs: its GPU-seconds from rates the workers measure, its wait from the queue.

The model (docs/service.md, "Estimates"). A job's GPU-seconds are its pipeline stages' seconds (what usage bills,
`gpu_seconds`). Per variant, each stage's seconds are a curve in one size feature (MP: processing megapixels):

    sampling    seconds / steps  against  num_samples · MP
    stage1      seconds          against  MP          (once per photo: the samples share it)
    encode      seconds          against  MP
    decoding    seconds          against  num_samples · MP
    caption, faces, conditioning and any other stage: a constant (caption and faces counted only when asked)

A curve keeps, per size class (half an octave of its feature), exponentially weighted means of the feature and the
seconds of that class's jobs (a job's weight halves after HALF_LIFE_JOBS later jobs of its class); it answers by
joining the classes' mean points with straight lines (Curve.predict). No shape is assumed: attention makes the
networks' cost grow faster than the pixels, fixed costs make small images dearer per pixel, and both show in the
measured points. After each succeeded job its worker folds the job's stage seconds in, so the rates follow a
deployment as it runs and need no history. Tiled runs (sampling, VAE) do more work per pixel (overlapping tiles):
their stages are kept apart ("sampling_tiled", …), and until one is seen the untiled curve stands in. Until a stage
of a variant has been measured, DEFAULTS stand in ("basis": "default").

Keys (under the store's prefix `p`):
    p:rates:<variant>   the variant's fits as JSON {jobs, stages: {name: sums}, job_seconds: sums}
    p:plan:<variant>    a worker's memory plan: traced bytes per pixel of each stage and its budget (tiling)
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Callable
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

from supir_core.params import RestoreParams
from supir_core.plan import Budget, StageBytes, TilingDecision, plan_sizes, plan_tiling

from .record import JobRecord
from .store import WATCH_RETRIES, JobStore

HALF_LIFE_JOBS = 20  # a job's weight halves after this many later jobs of its size class
DECAY = 0.5 ** (1 / HALF_LIFE_JOBS)
OUTLIER = 3.0  # once a size class has MIN_JOBS jobs, a job's seconds count as at most this many times its mean
MIN_JOBS = 3
MP = 1e6
NOT_GPU = ("upload", "total")  # in a job's `seconds` but not its GPU-seconds
# stage → its size feature (None: a constant); sampling's seconds are per step
FEATURES: dict[str, Literal["pixels", "sample_pixels"] | None] = {
    "stage1": "pixels",
    "encode": "pixels",
    "sampling": "sample_pixels",
    "decoding": "sample_pixels",
}
TILED_STAGES = {"sampling": "sampling", "stage1": "vae", "encode": "vae", "decoding": "vae"}  # which part tiles each
# stages run only when asked (and, faces, only by a restoration)
ASKED: dict[str, Callable[[RestoreParams], bool]] = {
    "caption": lambda p: p.caption == "auto",
    "faces": lambda p: p.faces == "auto",
}
# (a, b) per stage before any job of a variant is measured: the official pipeline's 6.3–6.7 s for 1024², 50 steps on
# an H100 (docs/performance.md) split over its stages by their share of the work; the caption (LLaVA 13B) and the
# face pass are guesses. Seconds, per megapixel (a) and fixed (b).
DEFAULTS: dict[str, tuple[float, float]] = {
    "stage1": (0.3, 0.0),
    "encode": (0.1, 0.0),
    "sampling": (0.11, 0.005),
    "decoding": (0.35, 0.0),
    "conditioning": (0.0, 0.05),
    "caption": (0.0, 4.0),
    "faces": (0.0, 2.0),
}
DEFAULT_JOB_SECONDS = 15.0  # a job's wall time on a worker before one of the variant is measured (queue waits)


class Point(BaseModel):
    """One size class's exponentially weighted sums: weight, size feature, seconds."""

    w: float = 0.0
    x: float = 0.0
    y: float = 0.0
    jobs: int = 0

    def add(self, x: float, y: float) -> None:
        if self.jobs >= MIN_JOBS and self.y > 0:  # one stalled run (a busy machine) cannot move the class far
            expected = self.y / self.w
            y = min(max(y, expected / OUTLIER), expected * OUTLIER)
        self.w, self.x, self.y = self.w * DECAY + 1, self.x * DECAY + x, self.y * DECAY + y
        self.jobs += 1


def size_class(x: float) -> str:
    """Half an octave of the size feature (classes √2 apart); "0" for a constant stage."""
    return "0" if x <= 0 else str(round(2 * math.log2(x)))


class Curve(BaseModel):
    """A stage's seconds against its size feature: a point per size class at its jobs' weighted means, joined by
    straight lines; beyond the largest class in proportion to the size (fixed costs fade as sizes grow), below the
    smallest along the first line but never under the proportion (the fixed costs stay)."""

    classes: dict[str, Point] = Field(default_factory=dict)

    @property
    def jobs(self) -> int:
        return sum(point.jobs for point in self.classes.values())

    def add(self, x: float, y: float) -> None:
        self.classes.setdefault(size_class(x), Point()).add(x, y)

    def predict(self, x: float) -> float:
        points = sorted((p.x / p.w, p.y / p.w) for p in self.classes.values() if p.jobs)
        if len(points) == 1 or x <= 0:
            x0, y0 = points[0]
            return y0 * x / x0 if x0 > 0 else y0
        for (x0, y0), (x1, y1) in itertools.pairwise(points):
            if x <= x1:
                along = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
                return along if x >= x0 else max(along, y0 * x / x0)
        x_last, y_last = points[-1]
        return y_last * x / x_last


class Rates(BaseModel):
    """A variant's measured rates."""

    jobs: int = 0  # succeeded jobs folded in
    stages: dict[str, Curve] = Field(default_factory=dict)
    job_seconds: Curve = Field(default_factory=Curve)  # a job's wall seconds on a worker (`seconds.total`): waits


class Prediction(BaseModel):
    gpu_seconds: float
    stages: dict[str, float]
    basis: Literal["default", "measured", "mixed"]
    jobs: int  # succeeded jobs of the variant the measured rates rest on
    default_stages: list[str]


def _feature(kind: str | None, pixels: float, samples: int) -> float:
    return 0.0 if kind is None else pixels / MP * (samples if kind == "sample_pixels" else 1)


def _fit_name(stage: str, tiling: dict[str, bool]) -> str:
    part = TILED_STAGES.get(stage)
    return f"{stage}_tiled" if part is not None and tiling.get(part) else stage


def observe(rates: Rates, record: JobRecord) -> bool:
    """Fold a succeeded job's stage seconds into its variant's rates; False when it cannot be (a cached job, or a
    record without the sizes or parameters)."""
    if record.cached or not record.seconds or not record.input_width or not record.input_height:
        return False
    try:
        params = RestoreParams.model_validate(record.params)
    except ValueError:
        return False
    sizes = plan_sizes((record.input_width, record.input_height), params.upscale, params.min_size)
    pixels = sizes.process[0] * sizes.process[1]
    tiling = {
        "sampling": record.tiling is not None and record.tiling.sampling == "tiled",
        "vae": record.tiling is not None and record.tiling.vae == "tiled",
    }
    seen = {k: v for k, v in record.seconds.items() if k not in NOT_GPU}
    for stage, asked in ASKED.items():
        if asked(params) and (stage == "caption" or record.kind == "restore"):
            seen.setdefault(stage, 0.0)  # asked but nothing ran (no captioner loaded, no face found): 0 s is right
    for stage, seconds in seen.items():
        kind = FEATURES.get(stage)
        y = seconds / params.steps if stage == "sampling" else seconds
        rates.stages.setdefault(_fit_name(stage, tiling), Curve()).add(_feature(kind, pixels, params.num_samples), y)
    if "total" in record.seconds:
        rates.job_seconds.add(0.0, record.seconds["total"])
    rates.jobs += 1
    return True


def predict(
    rates: Rates | None,
    params: RestoreParams,
    process_size: tuple[int, int],
    *,
    preview: bool = False,
    tiling: dict[str, bool] | None = None,
) -> Prediction:
    """The GPU-seconds of a job with these params at this processing size (width, height), stage by stage."""
    rates = rates or Rates()
    pixels = process_size[0] * process_size[1]
    stages = ["stage1", *(["caption"] if ASKED["caption"](params) else [])]
    if not preview:
        stages += ["conditioning", "encode", "sampling", "decoding", *(["faces"] if ASKED["faces"](params) else [])]
        known = {s for s in rates.stages if not s.endswith("_tiled") and s not in ASKED}
        stages += sorted(known - set(stages) - set(FEATURES))  # a stage the pipeline added since: as measured
    seconds, defaults = {}, []
    for stage in stages:
        x = _feature(FEATURES.get(stage), pixels, params.num_samples)
        tiled, plain = rates.stages.get(_fit_name(stage, tiling or {})), rates.stages.get(stage)
        curve = tiled if tiled is not None and tiled.jobs else plain
        if curve is not None and curve.jobs:
            value = curve.predict(x)
        else:
            a, b = DEFAULTS.get(stage, (0.0, 0.0))
            value = a * x + b
            defaults.append(stage)
        seconds[stage] = value * params.steps if stage == "sampling" else value
    basis: Literal["default", "measured", "mixed"] = (
        "default" if len(defaults) == len(stages) else "measured" if not defaults else "mixed"
    )
    rounded = {k: round(v, 4) for k, v in seconds.items()}
    return Prediction(
        gpu_seconds=round(sum(seconds.values()), 4),
        stages=rounded,
        basis=basis,
        jobs=rates.jobs,
        default_stages=defaults,
    )


def job_seconds(rates: Rates | None) -> tuple[float, bool]:
    """A job's mean wall seconds on a worker of the variant, and whether it was measured."""
    if rates is None or not rates.job_seconds.jobs:
        return DEFAULT_JOB_SECONDS, False
    return rates.job_seconds.predict(0.0), True


def expected_start_s(ahead: int, running: int, workers: int, seconds_per_job: float) -> float | None:
    """Seconds until a job with `ahead` jobs before it in its queue starts: 0 when a ready worker is free for it;
    else the work before it (queued jobs whole, running ones half done on average) shared by the ready workers.
    None without a ready worker (nothing to say how long until one is)."""
    if workers <= 0:
        return None
    if ahead + running < workers:
        return 0.0
    return round((ahead + running / 2) * seconds_per_job / workers, 3)


def ready_workers(store: JobStore, variant: str) -> int:
    """Live worker processes that have loaded `variant` and are ready (running a job or not)."""
    beats = store.worker_beats().values()
    return sum(1 for b in beats if b.get("state") == "ready" and variant in b.get("variants", []))


def tiling_of(
    params: RestoreParams, process_size: tuple[int, int], plan: dict[str, Any] | None
) -> TilingDecision | None:
    """Which parts of the run would tile, from a worker's published memory plan; None when the decision needs the
    plan and no worker of the variant has published one."""
    height_width = (process_size[1], process_size[0])

    def memory() -> tuple[dict[str, float], Budget]:
        if plan is None:
            raise LookupError("no memory plan")
        per_pixel = StageBytes(**plan["stage_bytes"])
        budget = Budget(plan["budget_bytes"], plan["budget_source"], plan.get("budget_inputs"))
        return per_pixel.at(process_size[0] * process_size[1], params.num_samples), budget

    try:
        return plan_tiling(params, height_width, memory)
    except LookupError:
        return None


class RateBook:
    """The rates and memory plans in Redis, per variant: workers write them, the API reads them."""

    def __init__(self, store: JobStore) -> None:
        self.r, self.p = store.r, store.p

    def _rates(self, variant: str) -> str:
        return f"{self.p}:rates:{variant}"

    def rates(self, variant: str) -> Rates | None:
        raw = self.r.get(self._rates(variant))
        return None if raw is None else Rates.model_validate_json(raw)

    def record(self, variant: str, record: JobRecord) -> bool:
        """Fold a succeeded job into its variant's rates (optimistic WATCH: workers of a variant share them)."""
        key = self._rates(variant)
        for attempt in range(WATCH_RETRIES):
            if attempt:  # workers that collided retry at spread times, or they may collide again and again
                time.sleep(random.uniform(0, 0.002 * attempt))
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    rates = Rates() if raw is None else Rates.model_validate_json(raw)
                    if not observe(rates, record):
                        return False
                    pipe.multi()
                    pipe.set(key, rates.model_dump_json())
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue
        return False  # too busy to fold this one in: the next job's will be

    def publish_plan(self, variant: str, stage_bytes: StageBytes, budget: Budget, worker: str) -> None:
        """A worker's memory plan (the last worker to publish speaks for its variant's workers)."""
        plan = {
            "stage_bytes": {k: getattr(stage_bytes, k) for k in ("stage1", "sampling", "decode", "vae_maps")},
            "budget_bytes": budget.bytes,
            "budget_source": budget.source,
            "budget_inputs": budget.inputs,
            "worker": worker,
            "at": time.time(),
        }
        self.r.set(f"{self.p}:plan:{variant}", json.dumps(plan))

    def plan(self, variant: str) -> dict[str, Any] | None:
        raw = self.r.get(f"{self.p}:plan:{variant}")
        return None if raw is None else dict(json.loads(raw))
