"""The rate model of estimates (jobs.estimates): curves per size class from succeeded jobs, predictions, waits."""

from __future__ import annotations

import random
import uuid
from threading import Thread

import pytest
import redis

from jobs.estimates import (
    DEFAULTS,
    MP,
    Curve,
    RateBook,
    Rates,
    expected_start_s,
    job_seconds,
    observe,
    predict,
    tiling_of,
)
from jobs.record import JobRecord, Tiling
from jobs.store import JobStore
from supir_core.params import validate_params
from supir_core.plan import Budget, StageBytes, plan_sizes
from tests.paths import REDIS_URL


def cost(pixels: float) -> float:
    """A stage's seconds that grow faster than the pixels (attention) on top of a fixed cost, as a network's do."""
    mp = pixels / MP
    return 0.05 + 0.8 * mp + 0.3 * mp * mp


def test_a_curve_through_measured_sizes_predicts_sizes_between_them() -> None:
    curve = Curve()
    rng = random.Random(0)
    sizes = [0.25, 0.5, 1.0, 2.0, 4.0]
    for _ in range(10):
        for mp in sizes:
            curve.add(mp, cost(mp * MP) * rng.uniform(0.9, 1.1))
    for mp in sizes:  # measured: the noise averages out
        assert curve.predict(mp) == pytest.approx(cost(mp * MP), rel=0.05)
    for mp in (0.35, 0.7, 1.4, 2.8):  # between: the chord of a convex curve, a little high
        assert cost(mp * MP) <= curve.predict(mp) <= 1.1 * cost(mp * MP)
    assert curve.predict(8.0) == pytest.approx(curve.predict(4.0) * 2)  # beyond: in proportion
    smallest = curve.predict(0.25)
    assert smallest * 0.1 / 0.25 <= curve.predict(0.1) < smallest  # below: never under the proportion


def test_one_size_scales_in_proportion_and_a_constant_stays_constant() -> None:
    curve = Curve()
    for _ in range(3):
        curve.add(1.0, 2.0)
    assert curve.predict(3.0) == pytest.approx(6.0)
    constant = Curve()
    for value in (1.0, 2.0, 3.0):
        constant.add(0.0, value)
    assert 2.0 < constant.predict(0.0) < 3.0  # the weighted mean leans to the latest
    assert constant.predict(5.0) == constant.predict(0.0)


def test_recent_jobs_weigh_more_and_one_stall_moves_little() -> None:
    curve = Curve()
    for _ in range(30):
        curve.add(1.0, 1.0)
    curve.add(1.0, 50.0)  # one stalled run: counted as 3× the mean at most
    assert curve.predict(1.0) < 1.2
    for _ in range(5 * 20):  # the deployment got faster: the curve follows within a few half-lives
        curve.add(1.0, 0.5)
    assert curve.predict(1.0) == pytest.approx(0.5, rel=0.05)


def record_of(min_size: int, steps: int, seconds: dict[str, float], **params: object) -> JobRecord:
    return JobRecord(
        owner="o",
        status="succeeded",
        params=validate_params({"min_size": min_size, "steps": steps, **params}).model_dump(),
        input_width=150,
        input_height=100,
        seconds=seconds,
        variant="v0Q",
    )


def pipeline_seconds(min_size: int, steps: int, samples: int = 1) -> dict[str, float]:
    w, h = plan_sizes((150, 100), 1.0, min_size).process
    return {
        "stage1": cost(w * h),
        "conditioning": 0.02,
        "encode": cost(w * h) / 3,
        "sampling": steps * cost(w * h * samples),
        "decoding": cost(w * h * samples),
        "upload": 0.5,  # not the GPU's
        "total": 9.0,
    }


def test_jobs_fold_into_rates_that_predict_a_job_s_gpu_seconds() -> None:
    rates = Rates()
    for _ in range(3):
        for min_size in (128, 256, 512):
            assert observe(rates, record_of(min_size, 10, pipeline_seconds(min_size, 10)))
    assert rates.jobs == 9 and "caption" in rates.stages  # asked (the default) and not run: 0 s
    for min_size, steps in ((256, 10), (512, 30), (384, 20)):
        params = validate_params({"min_size": min_size, "steps": steps})
        process = plan_sizes((150, 100), 1.0, min_size).process
        predicted = predict(rates, params, process)
        actual = {k: v for k, v in pipeline_seconds(min_size, steps).items() if k not in ("upload", "total")}
        assert predicted.basis == "measured" and predicted.jobs == 9 and not predicted.default_stages
        assert predicted.gpu_seconds == pytest.approx(sum(actual.values()), rel=0.1)
        assert predicted.stages["caption"] == 0 and "faces" not in predicted.stages
    assert job_seconds(rates) == (pytest.approx(9.0), True)

    # two samples: sampling and decoding at twice the pixels, stage 1 once
    two = validate_params({"min_size": 256, "steps": 10, "num_samples": 2})
    one = validate_params({"min_size": 256, "steps": 10})
    process = plan_sizes((150, 100), 1.0, 256).process
    assert predict(rates, two, process).stages["stage1"] == predict(rates, one, process).stages["stage1"]
    assert predict(rates, two, process).stages["sampling"] > 1.5 * predict(rates, one, process).stages["sampling"]
    # a stage not measured yet (faces): its default rate, said so
    faces = predict(rates, validate_params({"min_size": 256, "faces": "auto"}), process)
    assert faces.basis == "mixed" and faces.default_stages == ["faces"]
    assert faces.stages["faces"] == DEFAULTS["faces"][1]
    # a preview: stage 1 and the caption only
    assert set(predict(rates, one, process, preview=True).stages) == {"stage1", "caption"}


def test_tiled_runs_are_kept_apart_and_cached_jobs_are_not_measured() -> None:
    rates = Rates()
    tiled = Tiling(policy="always", sampling="tiled", vae="untiled", reason="", planned_gb=None, budget_gb=None,
                   budget_inputs=None)  # fmt: skip
    slow = record_of(256, 10, {**pipeline_seconds(256, 10), "sampling": 100.0})
    observe(rates, slow.model_copy(update={"tiling": tiled}))
    observe(rates, record_of(256, 10, pipeline_seconds(256, 10)))
    assert not observe(rates, record_of(256, 10, pipeline_seconds(256, 10)).model_copy(update={"cached": True}))
    params, process = validate_params({"min_size": 256, "steps": 10}), plan_sizes((150, 100), 1.0, 256).process
    untiled = predict(rates, params, process, tiling={"sampling": False, "vae": False}).stages["sampling"]
    assert predict(rates, params, process, tiling={"sampling": True, "vae": False}).stages["sampling"] == 100.0
    assert untiled == pytest.approx(pipeline_seconds(256, 10)["sampling"], abs=1e-3)  # rounded to 0.1 ms
    assert predict(rates, params, process, tiling={"sampling": False, "vae": True}).stages["stage1"] > 0  # untiled


def test_a_cold_start_answers_from_the_default_rates() -> None:
    params = validate_params({"steps": 50, "caption": "none"})
    predicted = predict(None, params, (1024, 1024))
    mp = 1024 * 1024 / MP
    by_hand = sum(a * mp + b for s, (a, b) in DEFAULTS.items() if s not in ("sampling", "caption", "faces"))
    by_hand += 50 * (DEFAULTS["sampling"][0] * mp + DEFAULTS["sampling"][1])
    assert predicted.basis == "default" and predicted.jobs == 0
    assert predicted.gpu_seconds == pytest.approx(by_hand, rel=1e-3)
    assert 4 < predicted.gpu_seconds < 10  # the official pipeline's 6.3–6.7 s at 1024² on an H100


def test_the_expected_start() -> None:
    assert expected_start_s(0, 0, 0, 10.0) is None  # no ready worker: nothing to say
    assert expected_start_s(0, 1, 2, 10.0) == 0  # a worker is free for it
    assert expected_start_s(0, 1, 1, 10.0) == 5  # the running job is half done on average
    assert expected_start_s(3, 2, 2, 10.0) == 20  # 3 whole jobs and 2 halves, on 2 workers


def test_tiling_is_decided_as_the_worker_decides() -> None:
    params = validate_params({"min_size": 2048, "tiling": "auto"})
    process = (2048, 2048)
    assert tiling_of(params, process, None) is None  # auto needs a worker's plan
    never = tiling_of(validate_params({"min_size": 2048, "tiling": "never"}), process, None)
    assert never is not None and not never.sampling and not never.vae
    per_pixel = StageBytes(stage1=1000.0, sampling=100.0, decode=1000.0)
    plan = {"stage_bytes": {"stage1": 1000.0, "sampling": 100.0, "decode": 1000.0, "vae_maps": 0.0},
            "budget_bytes": 2048 * 2048 * 500.0, "budget_source": "test", "budget_inputs": None}  # fmt: skip
    decided = tiling_of(params, process, plan)
    assert decided is not None and decided.vae and not decided.sampling
    from supir_core.plan import decide_tiling

    expected = decide_tiling(
        "auto", sampler_can_tile=True, vae_can_tile=True,
        plan=lambda: (per_pixel.at(2048 * 2048), Budget(2048 * 2048 * 500.0, "test")),
    )  # fmt: skip
    assert (decided.sampling, decided.vae, decided.reason) == (expected.sampling, expected.vae, expected.reason)


def test_workers_share_the_rates_in_redis() -> None:
    store = JobStore(redis.Redis.from_url(REDIS_URL), f"test-estimates-{uuid.uuid4().hex[:8]}")
    book = RateBook(store)
    assert book.rates("v0Q") is None and book.plan("v0Q") is None
    record = record_of(256, 10, pipeline_seconds(256, 10))
    threads = [Thread(target=lambda: [book.record("v0Q", record) for _ in range(10)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rates = book.rates("v0Q")
    assert rates is not None and rates.jobs == 40  # none lost to a concurrent update
    book.publish_plan("v0Q", StageBytes(1.0, 2.0, 3.0, 4.0), Budget(5e9, "total RAM", {"total_gb": 8.0}), "h:1")
    plan = book.plan("v0Q")
    assert plan is not None and plan["stage_bytes"]["sampling"] == 2.0 and plan["budget_bytes"] == 5e9
    store.r.delete(f"{store.p}:rates:v0Q", f"{store.p}:plan:v0Q")
