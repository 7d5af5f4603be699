"""The result cache's key: what a seeded result depends on, the workers' numerics included."""

from __future__ import annotations

import copy

import torch

from jobs.cache import record_key
from jobs.record import JobRecord
from jobs.settings import Settings
from supir_core.pipeline import RestorationPipeline
from supir_core.speed import SpeedSettings


def test_the_key_differs_between_devices_dtypes_and_fp8(tiny_model) -> None:
    """CUDA and the CPU draw different numbers for one seed, and bf16 or fp8 give another image: a result made
    under one never answers a request run under another."""
    fp32_cpu = RestorationPipeline(tiny_model).numerics
    bf16_cpu = RestorationPipeline(copy.deepcopy(tiny_model).to(torch.bfloat16)).numerics
    fp8 = RestorationPipeline(tiny_model, speed=SpeedSettings(fp8="weights")).numerics  # as optimize() left it
    assert (fp32_cpu, bf16_cpu, fp8) == ("cpu/float32/fp8=none", "cpu/bfloat16/fp8=none", "cpu/float32/fp8=weights")
    every = [fp32_cpu, bf16_cpu, fp8, "cuda/bfloat16/fp8=none", "cuda/bfloat16/fp8=compute"]

    settings = Settings(key_prefix="test-cache-key")
    record = JobRecord(owner="o", params={"seed": 3, "steps": 2}, input_key="inputs/x", input_sha256="ab" * 32)
    keys = {record_key(settings, record, "0123456789abcdef", numerics) for numerics in every}
    assert len(keys) == len(every)
