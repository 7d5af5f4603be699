"""Storage outages lose nothing and answer clearly.

Faults injected: moto's S3 server killed (connection refused) and restarted on the same port, kept down, or
replaced by a TCP listener that never answers (a stalled S3); a local directory that refuses writes (EPERM /
EACCES, ENOTDIR), a full file system (ENOSPC) and a missing object. The service tests run the real API and
worker processes of tests/servers.py against one module-wide service; moto runs as a subprocess so that it
can be stopped and started under it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config
from PIL import Image

from jobs.settings import Settings
from jobs.storage import LocalStore, S3Store, StorageError
from tests.paths import DATA
from tests.servers import BIN, Service, free_port, running, wait_for_status, wait_until

PHOTO = (DATA / "chelsea_degraded.jpg").read_bytes()
BUCKET = "supir-faults"
# long enough to stop S3 while it samples: ≥ 0.4 s a step on the 2-core VM, minutes when it is loaded
SLOW = {"min_size": 256, "steps": 20, "seed": 1}
# the worker's storage retries wait 2 + 4 + 8 + 16 + 32 = 62 s by default; this module's service starts at 0.5 s
BACKOFF_S = 0.5
RETRY_WINDOW_S = BACKOFF_S * (2**5 - 1)


class MotoS3:
    """moto's S3 server as a subprocess on a fixed port: killed, restarted (empty: moto keeps state in
    memory), or replaced by a listener that accepts connections and never answers."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.stall: socket.socket | None = None
        self._held: list[socket.socket] = []
        self._acceptor = threading.Thread()
        # short timeouts and one try: the test's own calls must not hang on the faults it injects
        self.s3 = boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="test",
            aws_secret_access_key="test",
            config=Config(connect_timeout=2, read_timeout=5, retries={"total_max_attempts": 1}),
        )  # fmt: skip

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.unstall()
        if self.up:
            return
        wait_until(self._launched, 120, 0.2, "moto's S3 server")
        with contextlib.suppress(self.s3.exceptions.BucketAlreadyOwnedByYou):
            self.s3.create_bucket(Bucket=BUCKET)

    def _launched(self) -> bool:
        """(Re)start moto if it is not running (it exits when its port is not free yet) and report if it answers."""
        if not self.up:
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=log
                )
        return self._answers()

    def _answers(self) -> bool:
        try:
            self.s3.list_buckets()
            return True
        except Exception:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stalled(self) -> None:
        """Kill moto and hold its port: connections are accepted and never answered."""
        self.kill()
        self.stall = socket.socket()
        self.stall.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.stall.bind(("127.0.0.1", self.port))
        self.stall.listen(64)
        self.stall.settimeout(0.5)
        self._acceptor = threading.Thread(target=self._accept, args=(self.stall,), daemon=True)
        self._acceptor.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by unstall
            self._held.append(conn)

    def unstall(self) -> None:
        if self.stall is not None:
            self.stall.close()
            self.stall = None
            # the port is free only once the blocked accept() returns and drops the kernel's listener
            self._acceptor.join(10)
        for conn in self._held:
            conn.close()
        self._held.clear()

    def close(self) -> None:
        self.unstall()
        self.kill()
        self.s3.close()


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    server = MotoS3(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, fixture_a: Path, moto: MotoS3) -> Iterator[Service]:
    # the S3 timeouts and tries are the defaults: 3 s connect, 10 s read, 3 tries
    with running(
        tmp_path_factory.mktemp("service"), fixture_a, {"alice": {}}, storage="s3", s3_bucket=BUCKET,
        s3_endpoint_url=moto.endpoint, s3_path_style="true", s3_access_key_id="test", s3_secret_access_key="test",
        rate_limit_per_minute=100_000,  # the tests poll
        storage_backoff_s=BACKOFF_S,
    ) as svc:  # fmt: skip
        yield svc


@pytest.fixture
def s3(moto: MotoS3) -> MotoS3:
    moto.start()  # whatever the previous test left: S3 up, with its bucket
    return moto


@pytest.fixture
def client(service: Service) -> Iterator[httpx.Client]:
    with service.client("alice") as c:
        c.timeout = httpx.Timeout(120)  # a stalled S3 holds a request for ~35 s
        yield c


def submit(client: httpx.Client, params: dict, **kwargs: object) -> httpx.Response:
    files = {"image": ("cat.jpg", PHOTO, "image/jpeg")}
    return client.post("/v1/jobs", files=files, data={"params": json.dumps(params)}, **kwargs)  # type: ignore[arg-type]


def job_ids(client: httpx.Client) -> set[str]:
    response = client.get("/v1/jobs", params={"limit": 100})
    assert response.status_code == 200, response.text
    return {job["id"] for job in response.json()["jobs"]}


def wait_for_sampling(client: httpx.Client, job_id: str) -> dict:
    def sampling() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running"), job
        return job if job["progress"]["stage"] == "sampling" else None

    return wait_until(sampling, 180, 0.1, f"job {job_id} to sample")


def worker_log(service: Service) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(service.tmp.glob("worker-*.log")))


def assert_clean(message: str, *secrets: str) -> None:
    """No endpoint, bucket, object key or server path in a message a client sees."""
    for secret in ("127.0.0.1", "http://", BUCKET, "inputs/", "results/", "/tmp", str(Path.cwd()), *secrets):
        assert secret not in message, f"{secret!r} leaks in {message!r}"


# ---------------------------------------------------------------------------------------------------------
# S3 under the running service


def test_s3_down_mid_job_and_back_in_the_retry_window_the_job_succeeds(
    service: Service, s3: MotoS3, client: httpx.Client
) -> None:
    """Fault: moto killed while the job samples (the input is read by then), so the result upload is refused;
    restarted on the same port a little later. moto loses everything on a restart, where a real S3 keeps its
    objects: the test puts back the bucket and the input before letting the worker go on."""
    created = submit(client, SLOW)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    wait_for_sampling(client, job_id)
    seen = worker_log(service).count("S3 put of")
    s3.kill()
    down_at = time.monotonic()
    # the outage has hit the upload once the worker logs a refused put
    wait_until(lambda: worker_log(service).count("S3 put of") > seen, 300, 0.5, "the result upload to fail")
    failed_upload_after = time.monotonic() - down_at
    s3.start()
    s3.s3.put_object(Bucket=BUCKET, Key=f"inputs/{job_id}", Body=PHOTO, ContentType="image/jpeg")
    outage_s = time.monotonic() - down_at

    final = wait_for_status(client, job_id, {"succeeded", "failed", "canceled"}, timeout=300)
    print(f"upload refused {failed_upload_after:.1f} s after the kill; S3 back after {outage_s:.1f} s; "
          f"attempts={final.get('attempts')}")  # fmt: skip
    assert final["status"] == "succeeded", final
    assert final["error"] is None
    download = httpx.get(final["result"]["url"], timeout=30)
    assert download.status_code == 200
    with Image.open(io.BytesIO(download.content)) as img:
        assert img.size == (final["result"]["width"], final["result"]["height"])
    redirect = client.get(f"/v1/jobs/{job_id}/result", follow_redirects=False)
    assert redirect.status_code == 307


def test_s3_kept_down_the_job_fails_with_storage_error_after_the_retries(
    service: Service, s3: MotoS3, client: httpx.Client
) -> None:
    """Fault: moto killed while the job samples and left down: every upload try is refused."""
    created = submit(client, SLOW)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    wait_for_sampling(client, job_id)
    s3.kill()
    down_at = time.monotonic()
    final = wait_for_status(client, job_id, {"succeeded", "failed", "canceled"}, timeout=RETRY_WINDOW_S + 240)
    failed_after = time.monotonic() - down_at
    print(f"failed {failed_after:.1f} s after the kill; attempts={final.get('attempts')}; error={final['error']}")
    assert final["status"] == "failed", final
    assert final["error"]["code"] == "storage_error"
    assert_clean(final["error"]["message"], job_id, str(s3.port))
    # it gave up only after the backoff, not at the first refusal (which comes within a second)
    assert failed_after > RETRY_WINDOW_S / 2, failed_after


def test_s3_down_before_the_upload_answers_503_and_creates_nothing(
    service: Service, s3: MotoS3, client: httpx.Client
) -> None:
    """Fault: moto killed before POST /v1/jobs: the input upload is refused."""
    before = job_ids(client)
    s3.kill()
    started = time.monotonic()
    response = submit(client, SLOW)
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "storage_error"
    assert int(response.headers["Retry-After"]) > 0
    assert_clean(response.json()["error"]["message"], str(s3.port))
    print(f"503 after {elapsed:.2f} s")
    assert elapsed < 30, elapsed  # refused at once: 3 tries and botocore's backoff (≤ 1 s, ≤ 2 s)
    assert httpx.get(f"{service.url}/readyz", timeout=60).status_code == 200  # S3 is not this process's health
    status = httpx.get(f"{service.admin_url}/status", timeout=60)
    assert status.status_code == 200 and status.json()["storage"] != "ok"
    assert_clean(json.dumps(status.json()), str(s3.port))
    assert job_ids(client) == before  # no record, nothing queued
    s3.start()
    assert job_ids(client) == before


def test_s3_down_before_the_upload_the_idempotency_key_can_be_used_again(
    service: Service, s3: MotoS3, client: httpx.Client
) -> None:
    """Fault: moto killed before a POST /v1/jobs with an Idempotency-Key; the client retries once S3 is back
    and must get one job, then its replay."""
    before = job_ids(client)
    headers = {"Idempotency-Key": f"storage-{time.time_ns()}"}
    s3.kill()
    assert submit(client, SLOW, headers=headers).status_code == 503
    s3.start()
    first = submit(client, SLOW, headers=headers)
    assert first.status_code == 202, first.text
    again = submit(client, SLOW, headers=headers)
    assert again.status_code == 200 and again.headers.get("Idempotent-Replayed") == "true", again.text
    assert again.json()["id"] == first.json()["id"]
    assert job_ids(client) - before == {first.json()["id"]}
    client.post(f"/v1/jobs/{first.json()['id']}/cancel")


def test_stalled_s3_answers_503_in_bounded_time(service: Service, s3: MotoS3, client: httpx.Client) -> None:
    """Fault: S3's port accepts connections and never answers (a stalled S3, not a down one). Expected:
    3 tries × (10 s read timeout + botocore's 1 s wait for `100 Continue`) + backoff ≤ 3 s ≈ 33–36 s for
    the upload; 3 × 10 s + backoff for /status's head_bucket."""
    before = job_ids(client)
    s3.stalled()
    timings: dict[str, float] = {}
    responses: dict[str, httpx.Response] = {}

    def timed(name: str, call: Callable[[], httpx.Response]) -> None:
        started = time.monotonic()
        responses[name] = call()
        timings[name] = time.monotonic() - started

    calls = {
        "create": lambda: submit(client, SLOW),
        "status": lambda: httpx.get(f"{service.admin_url}/status", timeout=120),
    }
    threads = [threading.Thread(target=timed, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    time.sleep(3)
    assert all(thread.is_alive() for thread in threads)  # both hang on S3 by now
    timed("healthz", lambda: httpx.get(f"{service.url}/healthz", timeout=10))  # the API answers meanwhile
    for thread in threads:
        thread.join(120)
    print("stalled S3, seconds:", {k: round(v, 1) for k, v in timings.items()})
    created, status = responses["create"], responses["status"]
    assert responses["healthz"].status_code == 200 and timings["healthz"] < 5, timings
    assert created.status_code == 503, created.text
    assert created.json()["error"]["code"] == "storage_error" and "Retry-After" in created.headers
    assert timings["create"] < 90, timings  # ~35 s expected; a busy 2-core machine has taken 63
    assert status.status_code == 200, status.text
    assert status.json()["storage"] != "ok"
    assert_clean(json.dumps(status.json()), str(s3.port))
    assert timings["status"] < 90, timings
    s3.start()
    assert job_ids(client) == before


# ---------------------------------------------------------------------------------------------------------
# S3Store alone


def test_s3_store_errors_name_the_operation_and_a_reason_only(s3: MotoS3) -> None:
    """Faults: a missing key, a missing bucket, a refused connection, a stall (short timeouts: 1 s connect,
    1 s read, 2 tries)."""
    settings = Settings(
        storage="s3", s3_bucket=BUCKET, s3_endpoint_url=s3.endpoint, s3_path_style=True, s3_access_key_id="test",
        s3_secret_access_key="test", s3_connect_timeout_s=1, s3_read_timeout_s=1, s3_max_attempts=2,
    )  # fmt: skip
    store = S3Store.from_settings(settings)
    store.put("inputs/present", b"x", "image/png")
    assert store.get("inputs/present") == b"x"
    cases = [
        (lambda: store.get("inputs/absent"), "S3 get failed: object missing"),
        (lambda: S3Store(store.client, "no-such-bucket").put("inputs/k", b"x", "image/png"),
         "S3 put failed: bucket missing"),
        (lambda: S3Store(store.client, "no-such-bucket").ping(), "S3 ping failed: bucket missing"),
    ]  # fmt: skip
    s3_down = [
        (lambda: store.put("inputs/k", b"x", "image/png"), "S3 put failed: unreachable"),
        (lambda: store.delete("inputs/present"), "S3 delete failed: unreachable"),
    ]
    stalled = [(lambda: store.get("inputs/present"), "S3 get failed: timeout")]
    for phase, calls in (("up", cases), ("down", s3_down), ("stalled", stalled)):
        if phase == "down":
            s3.kill()
        if phase == "stalled":
            s3.stalled()
        for call, expected in calls:
            started = time.monotonic()
            with pytest.raises(StorageError) as caught:
                call()
            assert caught.value.message == expected
            assert_clean(caught.value.message, str(s3.port), "present", "no-such-bucket")
            assert time.monotonic() - started < 20  # 2 × (1 + 1 s) + backoff ≤ 1 s, with room
    store.client.close()


# ---------------------------------------------------------------------------------------------------------
# LocalStore: real failures of a local file system


@pytest.fixture
def local(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "objects", "http://test", "secret")


def litter(store: LocalStore) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*.part"))


def test_local_missing_object(local: LocalStore) -> None:
    """Fault: the object does not exist (or is a directory)."""
    with pytest.raises(StorageError) as caught:
        local.get("inputs/absent")
    assert caught.value.message == "local storage read failed: object missing"
    (local.root / "inputs" / "dir").mkdir(parents=True)
    with pytest.raises(StorageError) as caught:
        local.get("inputs/dir")
    assert caught.value.message == "local storage read failed: is a directory"
    local.delete("inputs/absent")  # deleting what is gone is no error
    with pytest.raises(StorageError) as caught:
        local.get("../outside")
    assert_clean(caught.value.message, str(local.root))


@contextlib.contextmanager
def refusing_writes(directory: Path) -> Iterator[str]:
    """Make `directory` refuse new and removed entries: chmod for a normal user; root passes permission
    bits, so the immutable attribute (EPERM even for root) there. Yields the expected reason."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield "permission denied"
        finally:
            directory.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("running as root where the immutable attribute cannot be set: nothing refuses root")
    try:
        yield "operation not permitted"
    finally:
        subprocess.run([chattr, "-i", str(directory)], check=True)


def test_local_permission_denied(local: LocalStore) -> None:
    """Fault: the results directory refuses writes (EPERM as root via chattr +i; EACCES as a user)."""
    local.put("results/old.png", b"old", "image/png")
    with refusing_writes(local.root / "results") as reason:
        with pytest.raises(StorageError) as caught:
            local.put("results/new.png", b"new", "image/png")
        assert caught.value.message == f"local storage write failed: {reason}"
        with pytest.raises(StorageError) as caught:
            local.delete("results/old.png")
        assert caught.value.message == f"local storage delete failed: {reason}"
        assert_clean(caught.value.message, str(local.root))
    assert local.get("results/old.png") == b"old"
    assert not (local.root / "results" / "new.png").exists() and litter(local) == []


def test_local_parent_is_a_file(local: LocalStore) -> None:
    """Fault: a file stands where the key's directory should be (ENOTDIR: refuses root too)."""
    (local.root / "results").write_bytes(b"")
    with pytest.raises(StorageError) as caught:
        local.put("results/2026/x.png", b"x", "image/png")
    assert caught.value.message == "local storage write failed: not a directory"
    assert litter(local) == []


@contextlib.contextmanager
def full_tmpfs(mountpoint: Path) -> Iterator[None]:
    mountpoint.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mountpoint)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mount.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_local_no_space_on_a_full_file_system(tmp_path: Path) -> None:
    """Fault: ENOSPC from a real 64 KiB tmpfs (mounting one needs root; skipped otherwise, and the next test
    gets ENOSPC from /dev/full as any user). The half-written .part goes, the previous version stays."""
    with full_tmpfs(tmp_path / "small"):
        store = LocalStore(tmp_path / "small", "http://test", "secret")
        store.put("results/a.png", b"old", "image/png")
        with pytest.raises(StorageError) as caught:
            store.put("results/a.png", os.urandom(256 * 1024), "image/png")
        assert caught.value.message == "local storage write failed: no space left on device"
        assert store.get("results/a.png") == b"old"  # readers never see half a file
        assert litter(store) == []
        store.put("results/b.png", b"fits", "image/png")  # the space the .part took is free again


def test_local_no_space_from_dev_full(local: LocalStore) -> None:
    """Fault: ENOSPC from the kernel's /dev/full, which the upload's .part file is made to point at (no root
    needed). The failed .part goes."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    (local.root / "results").mkdir()
    (local.root / "results" / "a.png.part").symlink_to("/dev/full")
    with pytest.raises(StorageError) as caught:
        local.put("results/a.png", b"x" * 100_000, "image/png")
    assert caught.value.message == "local storage write failed: no space left on device"
    assert not (local.root / "results" / "a.png").exists() and litter(local) == []


def test_local_missing_root_fails_ping_without_the_path(tmp_path: Path) -> None:
    """Fault: the storage directory disappears."""
    store = LocalStore(tmp_path / "gone", "http://test", "secret")
    store.root.rmdir()
    with pytest.raises(StorageError) as caught:
        store.ping()
    assert caught.value.message == "local storage unavailable: directory missing"
