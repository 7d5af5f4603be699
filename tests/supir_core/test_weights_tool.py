"""`supir weights list | download | verify`: pinned revisions, the manifest of where each file came from, hashes and
structure; over real HTTP, with a local server standing in for the Hugging Face hub (its `/<repo>/resolve/<revision>/
<file>` paths, redirects to a CDN, X-Repo-Commit and X-Linked-Etag headers, Range requests, dropped connections).
And the weights Job: pinned revisions, hashes verified, nothing an operator must fill left silently working."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from supir_core.errors import WeightsError
from supir_core.weights import MANIFEST_NAME, OFFICIAL, REVISIONS_ENV, find, pinned_revision
from tests.deploy.kustomize import rendered
from tests.paths import REPO

REVISION = "0123456789abcdef0123456789abcdef01234567"  # the tiny repository's pinned commit
OTHER = "fedcba9876543210fedcba9876543210fedcba98"  # a later commit, with other bytes under the same name


def supir(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supir_core.cli", "weights", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


# --------------------------------------------------------------------------------------------
# A hub on 127.0.0.1


@dataclass
class Hub:
    """Serves files at `/<repo>/resolve/<revision>/<file>` as the hub does: a 302 to `/cdn/<sha256>` carrying
    X-Repo-Commit and X-Linked-Etag (the file's sha256), the CDN honouring Range. Records every request."""

    files: dict[tuple[str, str, str], bytes] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    cut_after: int | None = None  # the next CDN answer stops after this many bytes (a dropped connection)
    state_sha256: str | None = None  # what X-Linked-Etag says, when not the truth
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


def handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hub.requests.append((self.path, dict(self.headers.items())))
            if self.path.startswith("/cdn/"):
                return self.cdn(self.path.removeprefix("/cdn/"))
            match = re.fullmatch(r"/(.+)/resolve/([^/]+)/([^/?]+)(\?.*)?", self.path)
            data = hub.files.get(match.groups()[:3]) if match else None  # type: ignore[arg-type]
            if data is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                return self.end_headers()
            sha = hashlib.sha256(data).hexdigest()
            self.send_response(302)
            self.send_header("Location", f"/cdn/{sha}")
            self.send_header("X-Repo-Commit", match.group(2))  # type: ignore[union-attr]
            self.send_header("X-Linked-Etag", f'"{hub.state_sha256 or sha}"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def cdn(self, sha: str) -> None:
            data = next(d for d in hub.files.values() if hashlib.sha256(d).hexdigest() == sha)
            start = 0
            if rng := self.headers.get("Range"):
                start = int(rng.removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if hub.cut_after is not None:
                body, hub.cut_after = body[: hub.cut_after], None
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture()
def hub() -> Iterator[Hub]:
    state = Hub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(state))
    state.port = server.server_port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def table(tmp_path: Path, sha256: str | None = None, revision: str | None = REVISION) -> Path:
    """A table of one file, the tiny SUPIR checkpoint, in a repository `org/tiny-supir`."""
    path = tmp_path / "table.json"
    licence = {"name": "SUPIR Software License Agreement", "commercial": False}
    entry: dict[str, object] = {
        "name": "tiny-supir",
        "slot": "supir",
        "filename": "supir.ckpt",
        "hub": "org/tiny-supir",
    }
    entry["size"] = None
    entry |= {"sha256": sha256, "licence": licence, "revision": revision}
    path.write_text(json.dumps({"files": [entry]}))
    return path


def online(hub: Hub, **more: str) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", REVISIONS_ENV: "", **more}


@pytest.fixture()
def ckpt(fixture_a: Path) -> bytes:
    return (fixture_a / "supir.ckpt").read_bytes()


# --------------------------------------------------------------------------------------------
# list and verify


def test_list_names_every_file_its_licence_and_its_pins() -> None:
    proc = supir("list")
    assert proc.returncode == 0
    assert "SUPIR-v0Q.ckpt" in proc.stdout and "sd_xl_base_1.0_0.9vae.safetensors" in proc.stdout
    assert "NON-COMMERCIAL use only" in proc.stdout and "CreativeML Open RAIL++-M" in proc.stdout
    sdxl = find(list(OFFICIAL), "sdxl-base")
    assert f"stabilityai/stable-diffusion-xl-base-1.0@{sdxl.revision}" in proc.stdout
    assert "camenduru/SUPIR@UNPINNED" in proc.stdout and "provenance:" in proc.stdout


def test_the_table_pins_commits_or_says_it_does_not() -> None:
    """A pinned revision is a full commit hash and a pinned hash a sha256; unknown values are None, never a
    placeholder, and every entry says where its pins come from."""
    for entry in OFFICIAL:
        assert entry.revision is None or re.fullmatch(r"[0-9a-f]{40}", entry.revision), entry.name
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256), entry.name
        assert entry.provenance, entry.name
    assert find(list(OFFICIAL), "sdxl-base").revision and find(list(OFFICIAL), "sdxl-base").sha256


def test_verify_checks_hash_and_structure(tmp_path: Path, fixture_a: Path) -> None:
    ckpt = fixture_a / "supir.ckpt"
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    ok = supir("verify", str(ckpt), "--table", str(table(tmp_path, digest)), "--name", "tiny-supir")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["hash"] == "match" and json.loads(ok.stdout)["structure"] == "ok"
    wrong = supir("verify", str(ckpt), "--sha256", "0" * 64)
    assert wrong.returncode == 1 and json.loads(wrong.stdout)["hash"] == "mismatch"
    assert "not the official file" in wrong.stderr
    pinless = str(table(tmp_path, None))
    unpinned = supir("verify", str(fixture_a / "sdxl.safetensors"), "--table", pinless, "--name", "tiny-supir")
    report = json.loads(unpinned.stdout)
    assert (
        unpinned.returncode == 1
        and report["hash"] == "unpinned"
        and report["structure"] == "expected a supir checkpoint"
    )
    official = supir("verify", str(ckpt), "--name", "supir-v0q")  # the real file's size is known: 5,329,810,432 bytes
    assert official.returncode == 1 and json.loads(official.stdout)["expected_size"] == 5_329_810_432


# --------------------------------------------------------------------------------------------
# download: pinned revision, manifest, tampering


def test_download_requests_the_pinned_revision_and_records_it(tmp_path: Path, hub: Hub, ckpt: bytes) -> None:
    hub.files[("org/tiny-supir", REVISION, "supir.ckpt")] = ckpt
    hub.files[("org/tiny-supir", "main", "supir.ckpt")] = b"whatever main says today"
    models = tmp_path / "models"
    proc = supir("download", "tiny-supir", "--dir", str(models), "--table", str(table(tmp_path)), env=online(hub))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NON-COMMERCIAL" in proc.stderr
    digest = hashlib.sha256(ckpt).hexdigest()
    assert hub.paths() == [f"/org/tiny-supir/resolve/{REVISION}/supir.ckpt", f"/cdn/{digest}"]  # never `main`
    assert (models / "supir.ckpt").read_bytes() == ckpt and not list(models.glob("*.part*"))
    manifest = json.loads((models / MANIFEST_NAME).read_text())
    record = manifest["files"]["supir.ckpt"]
    assert manifest["format"] == "supir-weights-manifest/1"
    assert record["sha256"] == digest and record["size"] == len(ckpt) and record["name"] == "tiny-supir"
    assert record["repo"] == "org/tiny-supir" and record["revision"] == REVISION
    assert record["url"] == f"{hub.url}/org/tiny-supir/resolve/{REVISION}/supir.ckpt"
    verified = supir("verify", "--dir", str(models), "--table", str(table(tmp_path)))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    (report,) = json.loads(verified.stdout)
    assert report["manifest"] == "match" and report["structure"] == "ok" and report["revision"] == REVISION

    again = supir("download", "tiny-supir", "--dir", str(models), "--table", str(table(tmp_path)), env=online(hub))
    assert again.returncode == 0 and json.loads(again.stdout)["downloaded"] is False  # present and verified
    assert len(hub.requests) == 2


def test_a_tampered_file_fails_verify_with_a_clear_message(tmp_path: Path, hub: Hub, ckpt: bytes) -> None:
    hub.files[("org/tiny-supir", REVISION, "supir.ckpt")] = ckpt
    models = tmp_path / "models"
    tab = str(table(tmp_path))
    assert supir("download", "tiny-supir", "--dir", str(models), "--table", tab, env=online(hub)).returncode == 0
    data = bytearray(ckpt)
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the checkpoint still opens
    (models / "supir.ckpt").write_bytes(bytes(data))
    for args in (["--dir", str(models)], [str(models / "supir.ckpt")]):
        proc = supir("verify", *args, "--table", tab)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "the file changed after the download (tampered with or corrupted)" in proc.stderr
        assert f"downloaded from org/tiny-supir at {REVISION}" in proc.stderr
    # a re-download replaces it: the record no longer matches, so the file is fetched again
    again = supir("download", "tiny-supir", "--dir", str(models), "--table", tab, env=online(hub))
    assert again.returncode == 0 and json.loads(again.stdout)["downloaded"] is True
    assert (models / "supir.ckpt").read_bytes() == ckpt


def test_operator_pinned_revisions_and_no_branches(tmp_path: Path, hub: Hub, ckpt: bytes) -> None:
    hub.files[("org/tiny-supir", OTHER, "supir.ckpt")] = ckpt
    unpinned = str(table(tmp_path, revision=None))
    models = str(tmp_path / "models")
    refused = supir("download", "tiny-supir", "--dir", models, "--table", unpinned, env=online(hub))
    assert refused.returncode == 2 and "no revision of org/tiny-supir is pinned" in refused.stderr
    assert hub.requests == []  # nothing fetched from an unpinned repository
    branch = supir(
        "download", "tiny-supir", "--dir", models, "--table", unpinned, "--revision", "main", env=online(hub)
    )
    assert branch.returncode == 2 and "is not a commit hash" in branch.stderr and hub.requests == []
    absent = supir(
        "download", "tiny-supir", "--dir", models, "--table", unpinned, "--revision", "9" * 40, env=online(hub)
    )
    assert absent.returncode == 2 and "HTTP 404, no such file there" in absent.stderr
    hub.requests.clear()
    pinned = online(hub, **{REVISIONS_ENV: json.dumps({"org/tiny-supir": OTHER})})
    proc = supir("download", "tiny-supir", "--dir", models, "--table", unpinned, env=pinned)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert hub.paths()[0] == f"/org/tiny-supir/resolve/{OTHER}/supir.ckpt"
    assert json.loads((tmp_path / "models" / MANIFEST_NAME).read_text())["files"]["supir.ckpt"]["revision"] == OTHER
    assert supir("verify", "--dir", models, "--table", unpinned, env=pinned).returncode == 0
    repinned = online(hub, **{REVISIONS_ENV: json.dumps({"org/tiny-supir": REVISION})})  # the pin moved on
    stale = supir("verify", "--dir", models, "--table", unpinned, env=repinned)
    assert stale.returncode == 1 and f"org/tiny-supir is pinned at {REVISION}; download it again" in stale.stderr


def test_the_official_table_fetches_its_pinned_commit_and_rejects_a_wrong_file(tmp_path: Path, hub: Hub) -> None:
    """sdxl-base at the table's commit; a file whose hash is not the pinned one is moved aside, never recorded."""
    sdxl = find(list(OFFICIAL), "sdxl-base")
    hub.files[(str(sdxl.hub), str(sdxl.revision), sdxl.filename)] = b"not the SDXL checkpoint"
    models = tmp_path / "models"
    proc = supir("download", "sdxl-base", "--dir", str(models), env=online(hub))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert hub.paths()[0] == f"/stabilityai/stable-diffusion-xl-base-1.0/resolve/{sdxl.revision}/{sdxl.filename}"
    assert "not the official file" in proc.stderr
    assert not (models / sdxl.filename).exists() and (models / f"{sdxl.filename}.rejected").exists()
    assert not (models / MANIFEST_NAME).exists()
    official = supir("download", "supir-v0q", "--dir", str(models), env=online(hub))
    assert official.returncode == 2 and "no revision of camenduru/SUPIR is pinned" in official.stderr


def test_a_corrupted_transfer_is_rejected_by_the_hubs_own_hash(tmp_path: Path, hub: Hub, ckpt: bytes) -> None:
    hub.files[("org/tiny-supir", REVISION, "supir.ckpt")] = ckpt
    hub.state_sha256 = "1" * 64
    models = tmp_path / "models"
    proc = supir("download", "tiny-supir", "--dir", str(models), "--table", str(table(tmp_path)), env=online(hub))
    assert proc.returncode == 1 and "the server stated sha256 1111" in proc.stderr
    assert not (models / "supir.ckpt").exists()


def test_download_resumes_after_a_dropped_connection(tmp_path: Path, hub: Hub, ckpt: bytes) -> None:
    hub.files[("org/tiny-supir", REVISION, "supir.ckpt")] = ckpt
    hub.cut_after = 1_000_000
    models, tab = tmp_path / "models", str(table(tmp_path, hashlib.sha256(ckpt).hexdigest()))
    first = supir("download", "tiny-supir", "--dir", str(models), "--table", tab, env=online(hub))
    assert first.returncode == 2 and "run it again to resume" in first.stderr
    assert (models / "supir.ckpt.part").stat().st_size == 1_000_000 and not (models / "supir.ckpt").exists()
    second = supir("download", "tiny-supir", "--dir", str(models), "--table", tab, env=online(hub, HF_TOKEN="tok"))
    assert second.returncode == 0, second.stdout + second.stderr
    assert json.loads(second.stdout)["hash"] == "match"
    (_, resolve_headers), (_, cdn_headers) = hub.requests[2:]
    assert resolve_headers["Range"] == cdn_headers["Range"] == "bytes=1000000-"
    assert resolve_headers["Authorization"] == "Bearer tok" and "Authorization" not in cdn_headers  # hub only
    assert (models / "supir.ckpt").read_bytes() == ckpt


def test_a_plain_url_download_is_recorded_without_a_revision(tmp_path: Path, hub: Hub, ckpt: bytes) -> None:
    hub.files[("org/tiny-supir", REVISION, "supir.ckpt")] = ckpt
    models = tmp_path / "models"
    url = f"http://user:secret@127.0.0.1:{hub.port}/org/tiny-supir/resolve/{REVISION}/supir.ckpt?x=1"
    proc = supir("download", "tiny-supir", "--dir", str(models), "--url", url, "--table", str(table(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((models / MANIFEST_NAME).read_text())["files"]["supir.ckpt"]
    assert record["repo"] is None and record["revision"] is None and "secret" not in json.dumps(record)
    (_, first), (_, second) = hub.requests
    assert first["Authorization"] == "Basic dXNlcjpzZWNyZXQ=" and "Authorization" not in second  # that host only


def test_hub_downloads_say_when_offline(tmp_path: Path) -> None:
    proc = supir("download", "sdxl-base", "--dir", str(tmp_path), env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "HF_HUB_OFFLINE is set" in proc.stderr


# --------------------------------------------------------------------------------------------
# The weights Job and its volume


def test_the_weights_job_fetches_pinned_revisions_and_verifies_them() -> None:
    docs = rendered()
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "supir-weights")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    script = " ".join(container["args"])
    env = {e["name"]: e["value"] for e in container["env"]}
    assert "--url" not in script and "main" not in script and "--revision" not in script  # the table's pins
    assert script.rstrip().endswith("supir weights verify --dir /models")
    assert env["HF_ENDPOINT"] == "https://huggingface.co" and env["HF_HUB_OFFLINE"] == "0"  # no third-party mirror
    downloads = re.findall(r"supir weights download (\S+)", script)
    assert downloads and all(find(list(OFFICIAL), name) for name in downloads)
    os.environ[REVISIONS_ENV], saved = env[REVISIONS_ENV], os.environ.get(REVISIONS_ENV)
    try:  # as shipped, every unpinned file's revision is the operator's placeholder: the Job fails until it is set
        for name in downloads:
            entry = find(list(OFFICIAL), name)
            if entry.revision is None:
                with pytest.raises(WeightsError, match="is not a commit hash"):
                    pinned_revision(entry)
            else:
                assert pinned_revision(entry) == entry.revision
    finally:
        os.environ.pop(REVISIONS_ENV)
        if saved is not None:
            os.environ[REVISIONS_ENV] = saved


def test_the_storage_class_must_be_chosen_by_the_operator() -> None:
    """The shipped class name is no valid name (RFC 1123: lower case), so the API server refuses the claim until an
    operator sets one; docs/operations.md says how."""
    claim = next(d for d in rendered() if d["kind"] == "PersistentVolumeClaim")
    name = claim["spec"]["storageClassName"]
    assert not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", name), name
    assert name in (REPO / "docs/operations.md").read_text()
