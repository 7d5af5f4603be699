"""The node-local weights cache (`supir weights cache`, components/node-cache): real files, real processes, the
manifest as the weights Job writes it. Copied once per node, checked while copied, never a damaged or partial file
under a weight's name, pods starting together on one node copy each file once, and the rendered component."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest

from supir_core.weights import MANIFEST_FORMAT, MANIFEST_NAME
from tests.deploy.kustomize import rendered
from tests.paths import FIXTURE_A


def supir(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supir_core.cli", "weights", *args], capture_output=True, text=True, timeout=300
    )


def write_manifest(directory: Path, names: list[str]) -> None:
    """The manifest the weights Job leaves beside the files (hashes computed here, independently of the code)."""
    files = {}
    for name in names:
        data = (directory / name).read_bytes()
        files[name] = {
            "name": name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "repo": None,
            "revision": None,
            "url": f"https://example.invalid/{name}",
        }
    (directory / MANIFEST_NAME).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}))


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A filled weights volume: the tiny model's SDXL file and a SUPIR file, with their manifest."""
    volume = tmp_path / "shared"
    volume.mkdir()
    shutil.copy(FIXTURE_A / "sdxl.safetensors", volume / "tiny-sdxl.safetensors")
    shutil.copy(FIXTURE_A / "supir.safetensors", volume / "tiny-supir.safetensors")
    write_manifest(volume, ["tiny-sdxl.safetensors", "tiny-supir.safetensors"])
    return volume


def actions(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert proc.returncode == 0, proc.stderr
    return {report["file"]: report["action"] for report in json.loads(proc.stdout)}


def test_the_first_pod_copies_and_later_pods_find_the_files_cached(shared: Path, tmp_path: Path) -> None:
    cache = tmp_path / "node"
    first = supir("cache", "--from", str(shared), "--to", str(cache))
    assert actions(first) == {"tiny-sdxl.safetensors": "copied", "tiny-supir.safetensors": "copied"}
    assert "MiB/s" in first.stderr  # the shared volume's read speed, for sizing (docs/operations.md)
    for name in ("tiny-sdxl.safetensors", "tiny-supir.safetensors"):
        assert (cache / name).read_bytes() == (shared / name).read_bytes()
    inodes = {p.name: p.stat().st_ino for p in cache.iterdir()}
    second = supir("cache", "--from", str(shared), "--to", str(cache))
    assert set(actions(second).values()) == {"cached"}
    assert {p.name: p.stat().st_ino for p in cache.iterdir()} == inodes  # nothing rewritten
    # the copy's manifest is one the existing checks accept: hashes, records and structure of the local files
    verified = supir("verify", "--dir", str(cache))
    assert verified.returncode == 0, verified.stderr


def test_a_file_changed_on_the_shared_volume_is_never_cached(shared: Path, tmp_path: Path) -> None:
    target = shared / "tiny-supir.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    target.write_bytes(bytes(data))
    cache = tmp_path / "node"
    proc = supir("cache", "--from", str(shared), "--to", str(cache))
    assert proc.returncode != 0
    assert "tiny-supir.safetensors" in proc.stderr and "not cached" in proc.stderr
    assert not (cache / "tiny-supir.safetensors").exists()
    assert not list(cache.glob("*.part"))
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    assert "tiny-supir.safetensors" not in manifest["files"]


def test_a_damaged_local_copy_is_replaced_and_an_old_file_removed(shared: Path, tmp_path: Path) -> None:
    cache = tmp_path / "node"
    actions(supir("cache", "--from", str(shared), "--to", str(cache)))
    local = cache / "tiny-sdxl.safetensors"
    data = bytearray(local.read_bytes())
    data[100] ^= 0x01
    local.write_bytes(bytes(data))
    # an upgrade: the SUPIR file renamed on the shared volume
    (shared / "tiny-supir.safetensors").rename(shared / "tiny-supir-v2.safetensors")
    write_manifest(shared, ["tiny-sdxl.safetensors", "tiny-supir-v2.safetensors"])
    proc = supir("cache", "--from", str(shared), "--to", str(cache))
    assert actions(proc) == {"tiny-sdxl.safetensors": "copied", "tiny-supir-v2.safetensors": "copied"}
    assert local.read_bytes() == (shared / "tiny-sdxl.safetensors").read_bytes()
    assert not (cache / "tiny-supir.safetensors").exists()
    assert set(json.loads((cache / MANIFEST_NAME).read_text())["files"]) == {
        "tiny-sdxl.safetensors",
        "tiny-supir-v2.safetensors",
    }


def test_pods_starting_together_on_one_node_copy_each_file_once(shared: Path, tmp_path: Path) -> None:
    cache = tmp_path / "node"
    command = [sys.executable, "-m", "supir_core.cli", "weights", "cache", "--from", str(shared), "--to", str(cache)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in results]
    copies = [report["file"] for out, _ in results for report in json.loads(out) if report["action"] == "copied"]
    assert sorted(copies) == ["tiny-sdxl.safetensors", "tiny-supir.safetensors"]
    for name in copies:
        assert (cache / name).read_bytes() == (shared / name).read_bytes()


def test_a_cache_too_small_for_the_weights_is_refused_before_copying(
    shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supir_core import weight_cache
    from supir_core.errors import WeightsError

    monkeypatch.setattr(
        weight_cache.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)
    )
    with pytest.raises(WeightsError, match="GB free"):
        weight_cache.fill_cache(shared, tmp_path / "node", say=lambda _: None)
    assert not [p for p in (tmp_path / "node").iterdir() if not p.name.startswith(".")]


def test_the_component_moves_every_pool_onto_the_node_copy(tmp_path: Path) -> None:
    docs = rendered(["components/v0f", "components/node-cache"], tmp_path)
    pools = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("supir-worker")]
    assert {d["metadata"]["name"] for d in pools} == {"supir-worker", "supir-worker-v0f"}
    for pool in pools:
        spec = pool["spec"]["template"]["spec"]
        init = {c["name"]: c for c in spec["initContainers"]}
        assert init["weights-cache"]["command"][:3] == ["supir", "weights", "cache"]
        shared_mounts = {m["mountPath"]: m["name"] for m in init["weights-cache"]["volumeMounts"]}
        assert shared_mounts == {"/shared": "weights", "/cache": "weights-cache"}
        worker = next(c for c in spec["containers"] if c["name"] == "worker")
        models = [m for m in worker["volumeMounts"] if m["mountPath"] == "/models"]
        assert models == [{"mountPath": "/models", "name": "weights-cache", "readOnly": True}]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "hostPath" in volumes["weights-cache"] and "persistentVolumeClaim" in volumes["weights"]
        # only `prepare` runs as root, with CHOWN alone; the rest stays as restricted asks
        assert init["prepare"]["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
        assert init["weights-cache"]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    namespace = next(d for d in docs if d["kind"] == "Namespace")["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/warn"] == "restricted"
    for doc in docs:
        if doc["kind"] in {"Deployment", "Namespace"}:
            kubernetes_validate.validate(doc, "1.31.0", strict=True)
