"""`supir weights list | download | verify`: licences, resumable downloads over real HTTP, hash and structure."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from tests.servers import free_port


def supir(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supir_core.cli", "weights", *args], capture_output=True, text=True, timeout=120
    )


def test_list_names_every_file_with_its_licence() -> None:
    proc = supir("list")
    assert proc.returncode == 0
    assert "SUPIR-v0Q.ckpt" in proc.stdout and "sd_xl_base_1.0_0.9vae.safetensors" in proc.stdout
    assert "NON-COMMERCIAL use only" in proc.stdout and "CreativeML Open RAIL++-M" in proc.stdout


def manifest(tmp_path: Path, fixture_a: Path, sha256: str | None) -> Path:
    path = tmp_path / "manifest.json"
    licence = {"name": "SUPIR Software License Agreement", "commercial": False}
    entry = {"name": "tiny-supir", "slot": "supir", "filename": "supir.ckpt", "hub": None, "size": None}
    entry |= {"sha256": sha256, "licence": licence}
    path.write_text(json.dumps({"files": [entry]}))
    return path


def test_verify_checks_hash_and_structure(tmp_path: Path, fixture_a: Path) -> None:
    ckpt = fixture_a / "supir.ckpt"
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    ok = supir("verify", str(ckpt), "--manifest", str(manifest(tmp_path, fixture_a, digest)), "--name", "tiny-supir")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["hash"] == "match" and json.loads(ok.stdout)["structure"] == "ok"
    wrong = supir("verify", str(ckpt), "--sha256", "0" * 64)
    assert wrong.returncode == 1 and json.loads(wrong.stdout)["hash"] == "mismatch"
    pinless = str(manifest(tmp_path, fixture_a, None))
    unpinned = supir("verify", str(fixture_a / "sdxl.safetensors"), "--manifest", pinless, "--name", "tiny-supir")
    report = json.loads(unpinned.stdout)
    assert (
        unpinned.returncode == 1
        and report["hash"] == "unpinned"
        and report["structure"] == "expected a supir checkpoint"
    )
    official = supir("verify", str(ckpt), "--name", "supir-v0q")  # the real file's size is known: 5,329,810,432 bytes
    assert official.returncode == 1 and json.loads(official.stdout)["expected_size"] == 5_329_810_432


class Ranged(BaseHTTPRequestHandler):
    """Serves one file, honouring Range requests (and counting the bytes it sent)."""

    data = b""
    sent = 0

    def do_GET(self) -> None:
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(self.data) - 1}/{len(self.data)}")
        else:
            self.send_response(200)
        body = self.data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        Ranged.sent += len(body)

    def log_message(self, *args: object) -> None:
        pass


def test_download_resumes_and_verifies(tmp_path: Path, fixture_a: Path) -> None:
    data = (fixture_a / "supir.ckpt").read_bytes()
    Ranged.data, Ranged.sent = data, 0
    server = HTTPServer(("127.0.0.1", free_port()), Ranged)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        target = tmp_path / "models"
        target.mkdir()
        (target / "supir.ckpt.part").write_bytes(data[:1_000_000])  # an interrupted earlier download
        url = f"http://127.0.0.1:{server.server_port}/supir.ckpt"
        digest = hashlib.sha256(data).hexdigest()
        proc = supir("download", "tiny-supir", "--dir", str(target), "--url", url,
                     "--manifest", str(manifest(tmp_path, fixture_a, digest)))  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "NON-COMMERCIAL" in proc.stderr
        assert json.loads(proc.stdout)["hash"] == "match"
        assert (target / "supir.ckpt").read_bytes() == data and Ranged.sent == len(data) - 1_000_000
    finally:
        server.shutdown()
        server.server_close()


def test_hub_downloads_say_when_offline(tmp_path: Path) -> None:
    proc = supir("download", "supir-v0q", "--dir", str(tmp_path))
    assert proc.returncode == 2 and "HF_HUB_OFFLINE is set" in proc.stderr
