"""First contact: what a new user meets on `make serve` (scripts/serve.sh) and in the README's service section.

The tiny test model served without weights (and said so, on stderr, on the page and in /status), both variants,
defaults that keep the README's examples to seconds on a CPU (run here literally, with curl), result links signed
for PORT and served with their media type, Redis found where SUPIR_REDIS_URL points, refusals that name the
setting that would allow them, and everything written under the service's own data folder."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from jobs.settings import Settings
from tests.servers import BIN, REPO, Service, free_port, running, wait_for_status, wait_until

TINY = REPO / "tests" / "data" / "conformance" / "A"
PHOTO = REPO / "tests" / "data" / "chelsea_degraded.jpg"  # 150×113
SERVE_START_S = 300  # a cold 2-core machine shared with other tests: imports, the v0F file, two variants' weights
JOB_S = 300


def clean_env(**extra: str) -> dict[str, str]:
    """The user's environment without any of the service's own settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPIR_") and k not in ("PORT", "REDIS_PORT")}
    return {**env, "VENV": str(BIN.parent), "PYTHONUNBUFFERED": "1", **extra}


# --- weights: both or neither ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given",
    [
        {"SUPIR_SDXL_CHECKPOINT": str(TINY / "sdxl.safetensors")},
        {"SUPIR_CHECKPOINT": str(TINY / "supir.safetensors")},
    ],
)
def test_serve_with_only_one_weight_file_fails_naming_both(given: dict[str, str], tmp_path: Path) -> None:
    env = clean_env(SERVE_DATA_DIR=str(tmp_path / "data"), **given)
    proc = subprocess.run(["bash", "scripts/serve.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "SUPIR_SDXL_CHECKPOINT" in proc.stderr and "SUPIR_CHECKPOINT" in proc.stderr, proc.stderr
    assert not (tmp_path / "data").exists()  # nothing started, nothing written


# --- Redis: where SUPIR_REDIS_URL points ----------------------------------------------------------------------


def ensure_redis(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/ensure-redis.sh"], cwd=REPO, env=clean_env(**env), capture_output=True, text=True, timeout=60
    )


def test_ensure_redis_starts_a_server_where_the_url_points_on_this_machine() -> None:
    port = free_port()
    proc = ensure_redis(SUPIR_REDIS_URL=f"redis://localhost:{port}/3")
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f":{port}" in proc.stdout and "started" in proc.stdout
        assert redis.Redis(port=port, db=3).ping()
        again = ensure_redis(SUPIR_REDIS_URL=f"redis://127.0.0.1:{port}/0")
        assert again.returncode == 0 and "answering" in again.stdout, again.stdout + again.stderr
    finally:
        with contextlib.suppress(redis.RedisError):
            redis.Redis(port=port).shutdown(nosave=True)


def test_a_url_with_a_password_gets_a_server_that_asks_for_it() -> None:
    port = free_port()
    proc = ensure_redis(SUPIR_REDIS_URL=f"redis://:s3cret-pw@127.0.0.1:{port}/0")
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "s3cret-pw" not in proc.stdout + proc.stderr
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert redis.Redis(port=port, password="s3cret-pw").ping()
    finally:
        with contextlib.suppress(redis.RedisError):
            redis.Redis(port=port, password="s3cret-pw").shutdown(nosave=True)


def test_ensure_redis_starts_nothing_for_another_machine_and_says_so() -> None:
    started = time.monotonic()
    proc = ensure_redis(SUPIR_REDIS_URL="redis://:secret@192.0.2.1:6390/0")  # TEST-NET-1: never answers
    assert proc.returncode == 1
    assert "192.0.2.1:6390" in proc.stderr and "not this machine" in proc.stderr, proc.stderr
    assert "secret" not in proc.stderr + proc.stdout
    assert time.monotonic() - started < 30  # bounded, not a TCP connect timeout


def test_ensure_redis_without_a_url_uses_redis_port() -> None:
    port = os.environ.get("REDIS_PORT") or "6379"  # where `make test` made sure one answers
    proc = ensure_redis(REDIS_PORT=port)
    assert proc.returncode == 0 and f"127.0.0.1:{port}" in proc.stdout, proc.stdout + proc.stderr


# --- make serve with the tiny model, and the README's examples --------------------------------------------------


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, data: Path, log: Path) -> None:
        self.proc, self.port, self.data, self.log = proc, port, data, log
        self.url = f"http://127.0.0.1:{port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`make serve`'s script as a user runs it: no weights, only PORT (and a key prefix and queue of its own, so it
    shares Redis with other tests' services without taking their jobs)."""
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    prefix = f"test-serve-{uuid.uuid4().hex[:8]}"
    env = clean_env(PORT=str(port), SERVE_DATA_DIR=str(tmp / "data"), SUPIR_KEY_PREFIX=prefix, SUPIR_QUEUE=prefix)
    env["SUPIR_API_ADMIN_PORT"] = str(free_port())  # beside other tests' servers
    log = tmp / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", "scripts/serve.sh"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    service = Served(proc, port, tmp / "data", log)
    try:

        def loaded() -> bool:
            assert proc.poll() is None, service.output()[-5000:]
            try:
                status = httpx.get(f"{service.url}/v1/service", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return False
            return bool(status.get("variants")) and all(v["workers"] >= 1 for v in status["variants"])

        wait_until(loaded, SERVE_START_S, 0.5, "make serve's worker to load both variants")
        yield service
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the script stops everything it started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_serve_says_it_runs_the_tiny_test_model_and_how_to_get_real_weights(served: Served) -> None:
    said = served.output()
    for words in ("TINY TEST MODEL", "NOISE", "supir weights download sdxl-base", "supir weights download supir-v0q",
                  "supir weights list", "GPU", "SUPIR_SDXL_CHECKPOINT=", "SUPIR_CHECKPOINT=", "12.3 GB"):  # fmt: skip
        assert words in said, words
    status = httpx.get(f"{served.url}/v1/service", timeout=30).json()
    assert status["test_model"] is True and "noise" in status["notice"]
    assert {v["name"]: v["test_model"] for v in status["variants"]} == {"v0Q": True, "v0F": True}
    assert all(0 < v["unet_parameters"] < 1_000_000_000 for v in status["variants"])
    assert status["default_params"] == {"min_size": 256, "steps": 8}
    steps = httpx.get(f"{served.url}/openapi.json", timeout=30).json()["components"]["schemas"]["RestoreParams"]
    assert steps["properties"]["steps"]["default"] == 8 and steps["properties"]["steps"]["x-official-default"] == 50


def readme_examples() -> list[str]:
    """The curl commands of README.md's service section, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## The service\n") :]
    section = section[: section.index("\n## ", 1)]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    joined = block.group(1).replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "curl":
            commands.append(shlex.join(words))
    return commands


def test_every_readme_service_example_works_literally_and_within_a_minute_or_so(served: Served, tmp_path: Path) -> None:
    """Each curl line of the README, run by bash as written: the port made the served one, old_photo.jpg a real
    photo, <id> the last job made. Each job finishes within JOB_S here (about 20 s and 40 s on an idle 2-core
    machine; the bound allows for a machine shared with other tests)."""
    (tmp_path / "old_photo.jpg").write_bytes(PHOTO.read_bytes())
    commands = readme_examples()
    assert len(commands) == 6, commands
    job_id = None
    made: list[str] = []
    client = httpx.Client(base_url=served.url, timeout=30)
    for command in commands:
        command = command.replace("127.0.0.1:8000", f"127.0.0.1:{served.port}")
        if job_id:
            command = command.replace("<id>", job_id)
        assert "<id>" not in command, command
        if "/result" in command:  # as a person would: once the job has ended (the events command waits itself)
            wait_for_status(client, job_id, {"succeeded"}, JOB_S)
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, timeout=JOB_S)
        assert proc.returncode == 0, (command, proc.stderr)
        if command.split()[-1].endswith("/v1/jobs"):  # a create
            job = json.loads(proc.stdout)
            assert "id" in job, job
            job_id = job["id"]
            made.append(job_id)
            assert job["params"]["min_size"] == 256 and job["params"]["steps"] == 8  # the tiny model's defaults
        elif "/events" in command:
            last = [line for line in proc.stdout.decode().splitlines() if line.startswith("data: ")][-1]
            assert json.loads(last[6:])["status"] == "succeeded"
        elif "/v1/usage" in command:
            assert json.loads(proc.stdout)["total"]["jobs"] >= 2
    with Image.open(tmp_path / "restored.png") as restored:
        assert restored.format == "PNG" and restored.size == (300, 226)  # upscale 2
    with Image.open(tmp_path / "sample2.jpg") as sample:
        assert sample.format == "JPEG"
    jobs = [client.get(f"/v1/jobs/{made_id}").json() for made_id in made]
    client.close()
    assert jobs[1]["variant"] == "v0F" and [r["seed"] for r in jobs[1]["results"]] == [7, 8, 9]
    seconds = [round(job["finished_at"] - job["created_at"], 1) for job in jobs]
    print(f"README example jobs, created to succeeded: {seconds} s")  # about [20, 40] on an idle 2-core machine


def test_result_links_are_signed_for_port_and_carry_their_media_type(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as client:
        made = {
            fmt: client.post(
                "/v1/jobs",
                files={"image": ("photo.jpg", PHOTO.read_bytes(), "image/jpeg")},
                data={"params": json.dumps({"output_format": fmt, "steps": 2, "seed": 1})},
            )
            for fmt in ("jpeg", "webp", "png")
        }
        for fmt, response in made.items():
            assert response.status_code == 202, response.text
            job = wait_for_status(client, response.json()["id"], {"succeeded", "failed"}, JOB_S)
            assert job["status"] == "succeeded", job
            url = job["result"]["url"]
            assert url.startswith(f"http://127.0.0.1:{served.port}/v1/files/results/"), url
            linked = httpx.get(url, timeout=30)
            assert linked.status_code == 200
            assert linked.headers["content-type"] == f"image/{fmt}" == job["result"]["content_type"]
            assert Image.open(io.BytesIO(linked.content)).format == fmt.upper()


def test_a_local_webhook_in_dev_mode_is_refused_naming_the_setting(served: Served) -> None:
    response = httpx.post(
        f"{served.url}/v1/jobs",
        files={"image": ("photo.jpg", PHOTO.read_bytes(), "image/jpeg")},
        data={"webhook_url": "http://127.0.0.1:9/hook"},
        timeout=30,
    )
    assert response.status_code == 403
    assert "SUPIR_ALLOW_PRIVATE_WEBHOOKS" in response.json()["error"]["message"]


def group_commands(pgid: int) -> list[list[str]]:
    """The command lines of the processes in a process group (make serve's children)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, ProcessLookupError):
                if os.getpgid(int(proc.name)) == pgid:
                    found.append((proc / "cmdline").read_bytes().decode().split("\0"))
    return found


def test_serve_writes_under_its_own_data_folder(served: Served) -> None:
    data = served.data
    schedules = [args[args.index("--schedule") + 1] for args in group_commands(served.proc.pid) if "--schedule" in args]
    assert schedules and all(Path(s).parent == data / "celery" for s in schedules), schedules
    wait_until(lambda: list((data / "celery").glob("beat-schedule*")), 60, 0.5, "the beat schedule in data/celery")
    assert (data / "tiny-model" / "supir-v0F.safetensors").is_file()
    response = httpx.post(
        f"{served.url}/v1/jobs", files={"image": ("p.jpg", PHOTO.read_bytes(), "image/jpeg")},
        data={"params": '{"steps": 1}'}, timeout=30,
    )  # fmt: skip
    assert response.status_code == 202
    assert (data / "objects" / "inputs" / response.json()["id"]).is_file()
    ignored = subprocess.run(["git", "check-ignore", "-q", "data/objects/inputs/x"], cwd=REPO)
    assert ignored.returncode == 0, "data/ must be in .gitignore"


def test_the_page_says_it_is_the_test_model(served: Served) -> None:
    import shutil

    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(f"{served.url}/")
            notice = page.locator("#test-model")
            expect(notice).to_be_visible(timeout=30_000)
            expect(notice).to_contain_text("tiny test model")
            expect(notice).to_contain_text("noise")
            expect(notice).to_contain_text("SUPIR_DEFAULT_PARAMS")
            expect(page.locator("#p-steps")).to_have_attribute("placeholder", "8")
            expect(page.locator("#preset option").first).to_have_text("this service's defaults")
        finally:
            browser.close()


# --- deployment defaults and refusals, against the API alone ----------------------------------------------------


@pytest.fixture(scope="module")
def api_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    keys = {"alice": {}, "onejob": {"max_active_jobs": 1}, "slow": {"rate_limit_per_minute": 1}}
    settings = {
        "default_params": json.dumps({"steps": 5, "min_size": 256}),
        "max_upload_bytes": 1_500,  # the photo is 2,127 bytes
        "max_input_pixels": 20_000,  # the photo is 16,950 pixels
        "max_output_pixels": 100_000,
        "max_json_bytes": 2_000,
    }
    with running(tmp_path_factory.mktemp("api"), TINY, keys, with_workers=False, **settings) as service:
        yield service


def small_png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (120, 80, 40)).save(out, format="PNG")
    return out.getvalue()


def test_deployment_defaults_sit_below_the_preset_and_the_request(api_only: Service) -> None:
    with api_only.client("alice") as client:

        def params(**fields: str) -> dict:
            response = client.post("/v1/jobs", files={"image": ("p.png", small_png(32), "image/png")}, data=fields)
            assert response.status_code == 202, response.text
            return response.json()["params"]

        plain = params()
        assert plain["steps"] == 5 and plain["min_size"] == 256 and plain["cfg_scale"] == 4.0
        assert params(preset="lightning")["steps"] == 8  # the preset's own value wins
        assert params(preset="quality")["steps"] == 5  # quality leaves steps alone
        asked = params(params=json.dumps({"steps": 20, "min_size": 512}))
        assert asked["steps"] == 20 and asked["min_size"] == 512  # what a request says is never changed
    assert httpx.get(f"{api_only.admin_url}/status", timeout=30).json()["default_params"] == {
        "steps": 5,
        "min_size": 256,
    }


def test_invalid_deployment_defaults_fail_at_start() -> None:
    with pytest.raises(ValueError, match="SUPIR_DEFAULT_PARAMS: steps=0"):
        Settings(default_params={"steps": 0})
    with pytest.raises(ValueError, match="SUPIR_DEFAULT_PARAMS: nonsense: unknown parameter"):
        Settings(default_params='{"nonsense": 1}')


def test_every_refusal_names_the_setting_that_would_allow_it(api_only: Service) -> None:
    def refused(response: httpx.Response, status: int, setting: str) -> None:
        assert response.status_code == status, response.text
        assert setting in response.json()["error"]["message"], response.text

    photo = {"image": ("photo.jpg", PHOTO.read_bytes(), "image/jpeg")}
    with api_only.client("alice") as client:
        refused(client.post("/v1/jobs", files=photo), 413, "SUPIR_MAX_UPLOAD_BYTES")
        tall = {"image": ("tall.png", small_png(150), "image/png")}  # 22,500 pixels
        refused(client.post("/v1/jobs", files=tall), 422, "SUPIR_MAX_INPUT_PIXELS")
        small = {"image": ("small.png", small_png(64), "image/png")}
        refused(client.post("/v1/jobs", files=small, data={"params": '{"upscale": 8}'}), 422, "SUPIR_MAX_OUTPUT_PIXELS")
        refused(client.post("/v1/jobs", files=small, data={"variant": "v0F"}), 422, "SUPIR_VARIANTS")
        hook = {"webhook_url": "http://127.0.0.1:9/hook"}
        refused(client.post("/v1/jobs", files=small, data=hook), 403, "SUPIR_ALLOW_PRIVATE_WEBHOOKS")
        refused(client.post("/v1/jobs", json={"image_url": "http://10.0.0.1/a.png"}), 403, "SUPIR_ALLOW_PRIVATE_URLS")
        refused(client.post("/v1/jobs", json={"image_url": "x" * 3000}), 413, "SUPIR_MAX_JSON_BYTES")
    with api_only.client("onejob") as client:
        assert client.post("/v1/jobs", files=small).status_code == 202  # stays queued: no workers here
        refused(client.post("/v1/jobs", files=small), 429, "SUPIR_MAX_ACTIVE_JOBS")
    with api_only.client("slow") as client:  # one create a minute: of three in a row, one is refused
        limited = [r for r in (client.post("/v1/jobs", files=small) for _ in range(3)) if r.status_code == 429]
        refused(limited[0], 429, "SUPIR_RATE_LIMIT_PER_MINUTE")
    refused(httpx.post(f"{api_only.url}/v1/jobs", files=small, timeout=30), 401, "SUPIR_API_KEYS")


# --- what the workers publish: the real model's size is no test model -------------------------------------------


@pytest.mark.parametrize(("unet_parameters", "test_model"), [(2_567_463_684, False), (10_861_124, True)])
def test_workers_publish_whether_they_loaded_a_test_model(
    tmp_path: Path, unet_parameters: int, test_model: bool
) -> None:
    """By the size of the UNet loaded (an SDXL UNet's 2.57 B parameters, on the meta device here), whatever the
    files are called or however they are mounted (the docker stack mounts the same tiny model)."""
    import torch
    from torch import nn

    from jobs.storage import LocalStore
    from jobs.store import JobStore
    from worker.runtime import Runtime

    settings = Settings(key_prefix=f"test-{uuid.uuid4().hex[:8]}", local_dir=tmp_path)
    store = JobStore(redis.Redis.from_url(settings.redis_url), settings.key_prefix)
    runtime = Runtime(settings, store=store, objects=LocalStore(tmp_path, "http://test", "secret"))
    unet = nn.Module()
    unet.weight = nn.Parameter(torch.empty(unet_parameters, device="meta"))
    model = type("Model", (), {"unet": unet})()
    runtime.pipeline = type("Pipeline", (), {"model": model, "numerics": "cuda/bfloat16/fp8=none"})()
    files = {name: tmp_path / name for name in ("sdxl.safetensors", "supir.safetensors")}
    for path in files.values():
        path.write_bytes(b"weights")
    try:
        runtime._identify(files["sdxl.safetensors"], {"v0Q": files["supir.safetensors"]})
        published = store.variant_info("v0Q")
        assert published is not None
        assert published["unet_parameters"] == unet_parameters and published["test_model"] is test_model
        assert published["numerics"] == "cuda/bfloat16/fp8=none"  # the result cache keys on it
    finally:
        for key in store.r.scan_iter(f"{settings.key_prefix}:*"):
            store.r.delete(key)
