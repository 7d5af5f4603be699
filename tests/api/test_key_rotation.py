"""API keys rotated by rewriting the mounted Secret file, without a restart: a real API (`python -m api.server`, two
uvicorn processes) reading SUPIR_API_KEYS_FILE from a folder laid out as the kubelet mounts a Secret, updated
the way the kubelet updates it (a new timestamped folder, then the `..data` symlink swapped in one rename)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from api.auth import hash_key
from tests.paths import REPO
from tests.servers import Service, process_tree, wait_until

FILE = "keys.json"  # the Secret's key: deploy/k8s/secret.example.yaml


class MountedSecret:
    """`root/keys.json` → `..data/keys.json`, `..data` → `..<timestamp>`: what a Secret volume holds."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        (root / FILE).symlink_to(f"..data/{FILE}")
        self.path = root / FILE

    def publish(self, files: dict[str, bytes]) -> None:
        """A new version: written in full into a fresh folder, made current by one atomic rename of a symlink over
        `..data`, the old folder removed afterwards (readers of the old path see old or new, never a mix)."""
        version = self.root / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{uuid.uuid4().hex[:8]}"
        version.mkdir()
        for name, data in files.items():
            (version / name).write_bytes(data)
        old = (self.root / "..data").resolve() if (self.root / "..data").exists() else None
        (self.root / "..data_tmp").symlink_to(version.name)
        os.rename(self.root / "..data_tmp", self.root / "..data")
        if old is not None:
            shutil.rmtree(old)

    def keys(self, *keys: tuple[str, str]) -> None:
        self.publish({FILE: json.dumps([{"id": owner, "sha256": hash_key(key)} for owner, key in keys]).encode()})


def new_key(name: str) -> str:
    return f"sk_test_{name}_{uuid.uuid4().hex}"


def status_with(url: str, key: str) -> int:
    """A fresh connection each time, so any of the API's processes may answer."""
    return httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code


def settled(url: str, works: list[str], refused: list[str]) -> None:
    """Within a generous deadline, `works` answer 200 and `refused` 401 JSON; then, once every process has had
    its check interval to see the change, that holds for every request."""
    wait_until(lambda: all(status_with(url, k) == 200 for k in works), 60, 0.2, "the new keys to work")
    wait_until(lambda: all(status_with(url, k) == 401 for k in refused), 60, 0.2, "the removed keys to be refused")
    time.sleep(1.5)  # > api.keyring.CHECK_EVERY_S: a process that checked just before the swap has looked again
    for _ in range(10):
        for key in works:
            assert status_with(url, key) == 200
        for key in refused:
            answer = httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=30)
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "unauthorized", answer.text


def small_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def api_on_keys_file(tmp_path: Path, fixture_a: Path) -> Iterator[tuple[Service, MountedSecret]]:
    secret = MountedSecret(tmp_path / "api-keys")
    service = Service(
        tmp_path,
        fixture_a,
        keys={},  # SUPIR_API_KEYS=[]: the file is the only source
        api_workers=2,
        extra_env={"SUPIR_API_KEYS_FILE": str(secret.path), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")},
        auth_failures_per_minute=1_000_000,  # the test polls removed keys on purpose
    )
    yield service, secret
    service.stop()


def test_a_rotated_key_works_and_the_removed_one_is_refused_without_a_restart(
    api_on_keys_file: tuple[Service, MountedSecret],
) -> None:
    service, secret = api_on_keys_file
    old, new, steady = new_key("old"), new_key("new"), new_key("steady")
    secret.keys(("app", old), ("ops", steady))
    service.start(with_workers=False)
    assert service.api is not None
    processes = set(process_tree(service.api.pid))
    assert len(processes) >= 3  # the supervisor and its two uvicorn processes (and a resource tracker)
    settled(service.url, works=[old, steady], refused=[new])
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {old}"}, timeout=30) as client:
        created = client.post("/v1/jobs", files={"image": ("photo.png", small_png(), "image/png")})
    assert created.status_code == 202, created.text

    # a client whose key is in every version hammers the API through the whole rotation
    answers: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            answers.append(status_with(service.url, steady))

    hammering = threading.Thread(target=hammer)
    hammering.start()
    try:
        secret.keys(("app", old), ("app", new), ("ops", steady))  # 1. the new key beside the old one
        settled(service.url, works=[old, new, steady], refused=[])
        secret.keys(("app", new), ("ops", steady))  # 2. clients moved: the old key goes
        settled(service.url, works=[new, steady], refused=[old])
    finally:
        stop.set()
        hammering.join(60)
    assert len(answers) > 20 and set(answers) == {200}, [a for a in answers if a != 200][:5]
    assert set(process_tree(service.api.pid)) == processes and service.api.poll() is None  # no restart

    # the new key owns what the old one created: one owner id, listed with both keys during the rotation
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {new}"}, timeout=30) as client:
        assert client.get(f"/v1/jobs/{created.json()['id']}").status_code == 200
    metrics = httpx.get(f"{service.admin_url}/metrics", timeout=30).text
    assert 'supir_api_key_reloads_total{result="loaded"}' in metrics
    assert "\nsupir_api_keys_loaded 2.0\n" in metrics  # the last version loaded: app's new key, ops's


def test_a_broken_keys_file_keeps_the_last_good_keys(tmp_path: Path, fixture_a: Path) -> None:
    secret = MountedSecret(tmp_path / "api-keys")
    first, second = new_key("first"), new_key("second")
    secret.keys(("app", first))
    service = Service(tmp_path, fixture_a, keys={}, extra_env={"SUPIR_API_KEYS_FILE": str(secret.path)})
    service.start(with_workers=False)
    try:

        def refused_reloads() -> int:
            text = httpx.get(f"{service.admin_url}/metrics", timeout=30).text
            line = next(
                (x for x in text.splitlines() if x.startswith('supir_api_key_reloads_total{result="refused"')), ""
            )
            return int(float(line.rsplit(" ", 1)[1])) if line else 0

        broken = [
            {FILE: b""},  # empty
            {"other.json": b"[]"},  # the Secret lost its key: keys.json dangles (unreadable)
            {FILE: b'[{"id": "app", "sha256": '},  # cut short
            {FILE: b"[]"},  # no keys: would refuse everyone
            {FILE: json.dumps([{"id": "app", "sha256": "not-a-hash"}]).encode()},
        ]
        for count, files in enumerate(broken, start=1):
            secret.publish(files)

            def noticed(expected: int = count) -> bool:
                assert status_with(service.url, first) == 200  # the last good keys, all along
                return refused_reloads() >= expected

            wait_until(noticed, 60, 0.2, f"the broken file {files} to be noticed")
            assert status_with(service.url, first) == 200
        assert "NOT reloaded" in service.logs()
        # still watching: a good version is taken
        secret.keys(("app", second))
        settled(service.url, works=[second], refused=[first])
    finally:
        service.stop()


def test_the_server_does_not_start_on_a_broken_keys_file(tmp_path: Path) -> None:
    empty = tmp_path / FILE
    empty.write_bytes(b"")
    env = {**os.environ, "SUPIR_API_KEYS_FILE": str(empty)}
    env.pop("SUPIR_API_KEYS", None)
    run = subprocess.run(
        [sys.executable, "-m", "api.server", "--port", "9"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and f"SUPIR_API_KEYS_FILE: {empty} is empty" in run.stderr, run.stderr
    env["SUPIR_API_KEYS"] = json.dumps([{"id": "app", "sha256": hash_key("k")}])
    empty.write_text(env["SUPIR_API_KEYS"])
    run = subprocess.run([sys.executable, "-m", "api.server", "--port", "9"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode != 0 and "SUPIR_API_KEYS or SUPIR_API_KEYS_FILE, not both" in run.stderr, run.stderr
