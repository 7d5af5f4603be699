"""Shared test fixtures. Tests run offline on the CPU; the conformance fixtures live in tests/data/conformance/."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.paths import FIXTURE_A
from tests.servers import WEBHOOK_SECRET, free_port, running

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def fixture_a() -> Path:
    """Fixture set A, with its supir.ckpt written from the safetensors twin the repository ships."""
    from supir_core.conformance import write_ckpt_twin

    write_ckpt_twin(FIXTURE_A)
    return FIXTURE_A


@pytest.fixture(scope="session")
def tiny_model(fixture_a: Path):
    """The SUPIR model of fixture set A, loaded once through the production loader."""
    from supir_core.conformance import Fixture
    from supir_core.memory import trace_stage_bytes

    model = Fixture.open(fixture_a).load_model()
    # its memory plan from the workers' default plan cache: the suite's processes trace the tiny model once between
    # them (10 s of CPU each), not once each; test_memory traces for real
    trace_stage_bytes(model, cache_dir=Path(tempfile.gettempdir()) / "supir-memory-plans")
    return model


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory, fixture_a: Path):
    keys = {
        "alice": {},
        "bob": {},
        "carol": {},
        "limited": {"rate_limit_per_minute": 3, "read_rate_limit_per_minute": 3},
        "onejob": {"max_active_jobs": 1},
        "mallory": {},
    }
    settings = {
        "rate_limit_per_minute": 100_000,
        "webhook_secret": WEBHOOK_SECRET,
        "allow_private_webhooks": "true",
        "webhook_progress_interval_s": 0.3,  # progress webhooks within a job of seconds
        "max_upload_bytes": 2_000_000,
        "max_input_pixels": 4_000_000,
        "max_output_pixels": 16_000_000,
        "worker_metrics_port": free_port(),
    }
    with running(tmp_path_factory.mktemp("service"), fixture_a, keys, **settings) as svc:
        yield svc


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_llava import build

    return build(tmp_path_factory.mktemp("llava") / "tiny-llava-1.5")


# --- scheduling over pytest-xdist workers (make test: -n N --dist load) ---------------------------------------
# A file's tests run together on one worker, so its module fixtures (a service, a Docker stack, a Redis of its own)
# start once; the tests of SPREAD files are independent and heavy, so each may go to any worker. Work is handed out
# in collection order, which puts the heaviest files first (seconds measured on the 2-core CI machine), so that no
# worker is left with a long file at the end. (A scheduler of our own: xdist's loadgroup marks do not reach the
# node ids under pytest 9.)
SPREAD = {
    "tests/supir_core/test_pipeline.py",
    "tests/supir_core/test_samples.py",
    "tests/supir_core/test_vae_tiling.py",
}
HEAVIEST_FIRST = [
    "tests/supir_core/test_pipeline.py",
    "tests/deploy/test_stack.py",
    "tests/faults/test_worker_faults.py",
    "tests/supir_core/test_faces.py",
    "tests/deploy/test_manifests_run.py",
    "tests/service/test_schemathesis.py",
    "tests/worker/test_weights_failure.py",
    "tests/worker/test_podmarks.py",
    "tests/faults/test_api_shutdown.py",
    "tests/api/test_key_rotation.py",
    "tests/supir_core/test_weights_tool.py",
    "tests/supir_core/test_cli_restore.py",
    "tests/faults/test_pillow_corpus.py",
    # mostly waiting (a Retry-After of up to a minute, a stalled S3's timeouts): started early, they overlap the
    # CPU-heavy files instead of ending the run on a worker that waits
    "tests/client/test_client_rate_limit.py",
    "tests/faults/test_storage.py",
]


def _file_of(nodeid: str) -> str:
    return nodeid.split("::")[0]


@pytest.hookimpl(optionalhook=True)  # `-p no:xdist` runs the suite in one process without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid if _file_of(nodeid) in SPREAD else _file_of(nodeid)

    config.option.loadscopereorder = False  # keep the order below
    return ByFile(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: the order written in the files
    rank = {path: i for i, path in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(_file_of(item.nodeid), len(rank)))  # stable: file order otherwise
