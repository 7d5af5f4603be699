"""The official weight files: where they live, their licences, downloading them at a pinned revision (resumable),
recording where each came from, and verifying them.

Three things make a weights directory trustworthy:

- the **table** below (`OFFICIAL`): per file, the hub repository, the pinned **revision** (a commit hash: a branch
  such as `main` can move) and, where known, the pinned size and sha256. Each entry's `provenance` says where its
  pinned values come from and how far they were checked; `None` means "not known to this project" and is never
  filled with a guess. A file whose revision is `None` cannot be downloaded until an operator pins one
  (`--revision` or `SUPIR_WEIGHTS_REVISIONS`, docs/operations.md#weights).
- the **manifest** `supir-weights.json` that `supir weights download` writes beside the files: per file, its sha256
  and size, the repository and revision (or URL) it came from and when (format in `MANIFEST_FORMAT` below).
- **verification**: `supir weights verify` hashes each file and compares it with the manifest and with the table's
  pins, checks the recorded revision is the pinned one, and checks the file's structure (`checkpoints`).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import WeightsError

CHUNK = 8 * 1024 * 1024
DEFAULT_ENDPOINT = "https://huggingface.co"  # the hub itself; a mirror only when the operator names one
MANIFEST_NAME = "supir-weights.json"
MANIFEST_FORMAT = "supir-weights-manifest/1"
REVISIONS_ENV = "SUPIR_WEIGHTS_REVISIONS"  # JSON {"<hub repo>": "<40-hex commit>"}: operator-pinned revisions
COMMIT = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")

SUPIR_LICENCE = {
    "name": "SUPIR Software License Agreement (SupPixel Pty Ltd)",
    "commercial": False,
    "url": "https://github.com/Fanghua-Yu/SUPIR/blob/master/LICENSE",
}
SUPIR_UNPINNED = (
    "revision, sha256: not known to this project (no public record found that could be cross-checked); the operator "
    "pins the revision after checking the repository's history (docs/operations.md#weights)."
)


@dataclass(frozen=True)
class WeightFile:
    name: str
    slot: str  # "sdxl" | "supir"
    filename: str
    hub: str | None
    size: int | None
    sha256: str | None
    licence: dict[str, Any]
    revision: str | None = None  # the hub commit to download; None: the operator must pin one
    provenance: str = ""  # where the pinned values come from, and how far they were checked

    @property
    def commercial(self) -> bool:
        return bool(self.licence.get("commercial"))


# The official files. Pinned values are facts only as far as `provenance` says; None means unknown, never a guess.
OFFICIAL: tuple[WeightFile, ...] = (
    WeightFile(
        name="sdxl-base",
        slot="sdxl",
        filename="sd_xl_base_1.0_0.9vae.safetensors",
        hub="stabilityai/stable-diffusion-xl-base-1.0",
        revision="462165984030d82259a11f4367a4eed129e94a7b",
        size=6_938_078_334,
        sha256="e6bb9ea85bbf7bf6478a7c6d18b71246f22e95d41bcdd80ed40aa212c33cfeff",
        licence={
            "name": "CreativeML Open RAIL++-M",
            "commercial": True,
            "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md",
        },
        provenance=(
            "revision: the commit that many independent public projects pin or cache for this repository; sha256 and "
            "size: the same values in several independent public records of this file. Cross-checked in public "
            "records, not fetched from the hub by this project: a wrong value fails the download, it never passes a "
            "wrong file."
        ),
    ),
    WeightFile(
        name="supir-v0q",
        slot="supir",
        filename="SUPIR-v0Q.ckpt",
        hub="camenduru/SUPIR",
        revision=None,
        size=5_329_810_432,
        sha256=None,
        licence=SUPIR_LICENCE,
        provenance=SUPIR_UNPINNED + " size: carried over from this project's earlier table (source not recorded).",
    ),
    WeightFile(
        name="supir-v0f",
        slot="supir",
        filename="SUPIR-v0F.ckpt",
        hub="camenduru/SUPIR",
        revision=None,
        size=None,
        sha256=None,
        licence=SUPIR_LICENCE,
        provenance=SUPIR_UNPINNED,
    ),
    WeightFile(
        name="supir-v0q-fp16",
        slot="supir",
        filename="SUPIR-v0Q_fp16.safetensors",
        hub="Kijai/SUPIR_pruned",
        revision=None,
        size=None,
        sha256=None,
        licence=SUPIR_LICENCE,
        provenance=SUPIR_UNPINNED,
    ),
)


def load_table(path: str | Path | None = None) -> list[WeightFile]:
    """The official table, or an operator's own JSON table `{"files": [{name, slot, filename, hub, revision, size,
    sha256, licence}, ...]}` (revision and provenance optional)."""
    if path is None:
        return list(OFFICIAL)
    try:
        return [WeightFile(**entry) for entry in json.loads(Path(path).read_text())["files"]]
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read the table ({exc})") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{path}: not a weights table ({exc})") from exc


load_manifest = load_table  # the name before the download manifest existed


def find(table: list[WeightFile], name: str) -> WeightFile:
    for entry in table:
        if name in (entry.name, entry.filename):
            return entry
    raise WeightsError(f"no weight file named {name!r}: choose one of {', '.join(e.name for e in table)}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Revisions and endpoints


def operator_revisions() -> dict[str, str]:
    """`SUPIR_WEIGHTS_REVISIONS`: {"<hub repo>": "<commit>"}, the revisions an operator pinned."""
    raw = os.environ.get(REVISIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError("not an object of strings")
    except ValueError as exc:
        raise WeightsError(f'{REVISIONS_ENV}: expected JSON {{"<hub repo>": "<commit>"}} ({exc})') from None
    return value


def pinned_revision(entry: WeightFile, override: str | None = None) -> str:
    """The commit to download: --revision, else SUPIR_WEIGHTS_REVISIONS[hub], else the table's. Never a branch."""
    if not entry.hub:
        raise WeightsError(f"{entry.name}: no hub repository known; pass --url")
    revision = (override or operator_revisions().get(entry.hub) or entry.revision or "").strip()
    if not revision:
        raise WeightsError(
            f"{entry.name}: no revision of {entry.hub} is pinned. Check the repository's history "
            f"(https://huggingface.co/{entry.hub}/commits/main), then pass --revision <40-hex commit> or set "
            f'{REVISIONS_ENV}=\'{{"{entry.hub}": "<commit>"}}\' (docs/operations.md#weights)'
        )
    if not COMMIT.fullmatch(revision):
        raise WeightsError(
            f"{entry.name}: revision {revision!r} of {entry.hub} is not a commit hash (40 lower-case hex digits); "
            "a branch or tag such as 'main' can move, so only a commit pins the file"
        )
    return revision


def hub_endpoint(override: str | None = None) -> str:
    """--endpoint, else HF_ENDPOINT (your own mirror), else the hub itself."""
    endpoint = (override or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")
    if urllib.parse.urlsplit(endpoint).scheme not in ("http", "https"):
        raise WeightsError(f"hub endpoint {endpoint!r}: expected an http(s) URL")
    return endpoint


def hub_url(endpoint: str, hub: str, revision: str, filename: str) -> str:
    """The hub's file URL at one commit: `<endpoint>/<repo>/resolve/<commit>/<file>` (mirrors serve the same path)."""
    return f"{endpoint}/{hub}/resolve/{revision}/{urllib.parse.quote(filename)}"


def _public(url: str) -> str:
    """The URL without user:password@ and query, for records and messages."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# --------------------------------------------------------------------------------------------
# Fetching (stdlib only, resumable)


class _FirstHop(urllib.request.HTTPRedirectHandler):
    """Keeps the headers of the first response when it is a redirect: the hub's own headers (X-Repo-Commit,
    X-Linked-Etag) are on its answer, not on the CDN's it redirects to."""

    def __init__(self) -> None:
        self.headers: Any = None

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if self.headers is None:
            self.headers = headers
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, part: Path, token: str | None = None, timeout_s: float = 60.0) -> dict[str, str | None]:
    """GET url into `part`, resuming it with an HTTP Range request when `part` was started from the same URL (a
    `<part>.json` beside it says which). Returns what the server stated: {'commit', 'sha256'} (None when unstated).
    A token goes to the first host only, never to the host it redirects to."""
    origin = part.with_name(part.name + ".json")
    part.parent.mkdir(parents=True, exist_ok=True)
    try:
        started_from = json.loads(origin.read_text()).get("url") if origin.exists() else None
    except ValueError:
        started_from = None
    if part.exists() and started_from != url:  # a part of another file, revision or unknown origin: start over
        part.unlink()
    origin.write_text(json.dumps({"url": url}))
    have = part.stat().st_size if part.exists() else 0
    parts = urllib.parse.urlsplit(url)
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    request = urllib.request.Request(bare, headers={"Range": f"bytes={have}-"} if have else {})
    if parts.username is not None:  # user:password@ in the URL: HTTP basic auth, to that host only
        basic = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_unredirected_header("Authorization", "Basic " + base64.b64encode(basic.encode()).decode())
    elif token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    first_hop = _FirstHop()
    opener = urllib.request.build_opener(first_hop)
    shown = _public(url)
    stated: dict[str, str | None] = {"commit": None, "sha256": None}
    try:
        with opener.open(request, timeout=timeout_s) as response:
            headers = first_hop.headers or response.headers
            stated["commit"] = headers.get("X-Repo-Commit")
            etag = (headers.get("X-Linked-Etag") or "").removeprefix("W/").strip('"').lower()
            stated["sha256"] = etag if SHA256.fullmatch(etag) else None
            resumed = response.status == 206
            if resumed:  # "bytes START-END/TOTAL": the server must resume where the part ends
                content_range = response.headers.get("Content-Range", "")
                match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", content_range.strip())
                if not match or int(match.group(1)) != have:
                    raise WeightsError(f"{shown}: the server resumed at the wrong place ({content_range!r})")
            length = response.headers.get("Content-Length")
            expected = (have if resumed else 0) + int(length) if length and length.isdigit() else None
            with part.open("ab" if resumed else "wb") as f:  # a server without ranges restarts from zero
                while chunk := response.read(CHUNK):
                    f.write(chunk)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise WeightsError(
                f"{shown}: HTTP 404, no such file there (check the repository, file and commit)"
            ) from None
        if exc.code != 416:  # 416: nothing left to fetch, the part is complete
            raise WeightsError(f"{shown}: HTTP {exc.code}") from None
        return stated
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise WeightsError(f"{shown}: download interrupted ({exc}); run it again to resume") from exc
    if expected is not None and part.stat().st_size < expected:
        raise WeightsError(
            f"{shown}: download interrupted at {part.stat().st_size} of {expected} bytes; run it again to resume"
        )
    return stated


def download_url(url: str, target: Path, timeout_s: float = 60.0) -> Path:
    """GET url into target (resumable through `target.part`)."""
    part = target.with_name(target.name + ".part")
    fetch(url, part, timeout_s=timeout_s)
    part.replace(target)
    part.with_name(part.name + ".json").unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------------------------
# The manifest beside the weights


def manifest_path(directory: Path) -> Path:
    return directory / MANIFEST_NAME


def read_manifest(path: Path) -> dict[str, Any]:
    """`{"format": MANIFEST_FORMAT, "files": {"<file name>": record}}`; an absent file is an empty manifest.

    A record: {"name", "sha256", "size", "repo", "revision", "url", "endpoint", "downloaded_at"}; `repo` and
    `revision` are null for a file downloaded from a plain URL (`--url`), `url` has no credentials or query."""
    if not path.exists():
        return {"format": MANIFEST_FORMAT, "files": {}}
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError(f"format is not {MANIFEST_FORMAT}")
    except (ValueError, AttributeError) as exc:
        raise WeightsError(f"{path}: not a weights manifest ({exc})") from None
    return manifest


def _record(path: Path, filename: str, record: dict[str, Any]) -> None:
    manifest = read_manifest(path)
    manifest["files"][filename] = record
    manifest["files"] = dict(sorted(manifest["files"].items()))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path)  # atomic: a reader sees the old manifest or the new one


# --------------------------------------------------------------------------------------------
# Verifying


def verify(
    path: Path,
    entry: WeightFile | None,
    sha256: str | None = None,
    record: dict[str, Any] | None = None,
    structure: bool = True,
) -> dict[str, Any]:
    """Checks a file against a pin (`sha256`, else the table's), the table's size and revision, and the manifest
    `record` of its download. Report: {'file', 'size', 'sha256', 'hash': 'match' | 'mismatch' | 'unpinned',
    'manifest': 'match' | 'mismatch' | 'absent', 'kind', 'structure': 'ok' | problem, 'problems': [sentences],
    'ok': bool}."""
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    want = (sha256 or (entry.sha256 if entry else None) or "").lower() or None
    got = sha256_of(path)
    size = path.stat().st_size
    problems: list[str] = []
    report: dict[str, Any] = {"file": str(path), "size": size, "sha256": got}
    report["hash"] = "unpinned" if not want else "match" if want == got else "mismatch"
    if report["hash"] == "mismatch":
        problems.append(f"sha256 is {got}, the pinned one is {want}: not the official file")
    if entry and entry.size is not None and entry.size != size:
        report["hash"] = "mismatch"
        report["expected_size"] = entry.size
        problems.append(f"size is {size} bytes, the official file has {entry.size}")
    report["manifest"] = "absent"
    if record is not None:
        report["manifest"] = "match" if record.get("sha256") == got and record.get("size") == size else "mismatch"
        report["revision"] = record.get("revision")
        origin = f"{record['repo']} at {record['revision']}" if record.get("repo") else record.get("url", "?")
        if report["manifest"] == "mismatch":
            problems.append(
                f"sha256 is {got} ({size} bytes), but {MANIFEST_NAME} recorded {record.get('sha256')} "
                f"({record.get('size')} bytes) when it was downloaded from {origin}: the file changed after the "
                "download (tampered with or corrupted); delete it and download it again"
            )
        hub = entry.hub if entry else None  # the revision pinned now: the operator's, else the table's
        pinned = (operator_revisions().get(hub) if hub else None) or (entry.revision if entry else None)
        if pinned and record.get("repo") and record.get("revision") != pinned:
            problems.append(f"downloaded from {origin}, but {hub} is pinned at {pinned}; download it again")
    if structure:
        from .checkpoint_files import identify, open_checkpoint

        try:
            report["kind"] = identify(open_checkpoint(path).keys())
            expected = entry.slot if entry else report["kind"]
            report["structure"] = "ok" if report["kind"] == expected else f"expected a {expected} checkpoint"
        except WeightsError as exc:
            report["kind"], report["structure"] = "unreadable", exc.message
        if report["structure"] != "ok":
            problems.append(f"structure: {report['structure']} (found {report['kind']})")
    report["problems"] = problems
    report["ok"] = not problems
    return report


def verify_directory(directory: Path, table: list[WeightFile]) -> list[dict[str, Any]]:
    """Every file the directory's manifest lists, checked as `verify` does; a listed file that is gone fails."""
    path = manifest_path(directory)
    if not path.exists():
        raise WeightsError(f"{path}: no manifest; download the files with `supir weights download` first")
    reports = []
    for filename, record in read_manifest(path)["files"].items():
        entry = next((e for e in table if e.name == record.get("name") or e.filename == filename), None)
        file = directory / filename
        if not file.is_file():
            reports.append({"file": str(file), "ok": False, "problems": [f"listed in {MANIFEST_NAME} but missing"]})
            continue
        reports.append(verify(file, entry, record=record))
    return reports


# --------------------------------------------------------------------------------------------
# Downloading


def download(
    entry: WeightFile,
    directory: Path,
    url: str | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
    structure: bool = True,
) -> dict[str, Any]:
    """Fetches `entry` into `directory` from the hub at its pinned revision (or from `url`), checks it, and records
    it in the directory's manifest. A file already there whose manifest record matches is kept (hashed, not
    fetched). Returns verify's report plus where it came from; report['ok'] False means nothing was recorded and a
    fetched file that failed was moved aside to `<file>.rejected`."""
    target = directory / entry.filename
    mpath = manifest_path(directory)
    if url:
        repo, pinned, source = None, None, url
    else:
        pinned = pinned_revision(entry, revision)  # before anything else: an unpinned file is never fetched
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
            raise WeightsError(f"{entry.name}: HF_HUB_OFFLINE is set; unset it (or pass --url) to download")
        repo, source = entry.hub, hub_url(hub_endpoint(endpoint), str(entry.hub), pinned, entry.filename)
    where = {"repo": repo, "revision": pinned, "url": _public(source)}
    if not url:
        where["endpoint"] = _public(hub_endpoint(endpoint))
    old = read_manifest(mpath)["files"].get(entry.filename)
    same_source = (
        old and old.get("repo") == repo and old.get("revision") == pinned and (repo or old.get("url") == where["url"])
    )
    if target.is_file() and old and same_source:
        report = verify(target, entry, record=old, structure=structure)
        if report["ok"]:
            return report | where | {"downloaded": False}
    part = target.with_name(target.name + ".part")
    token = os.environ.get("HF_TOKEN") if not url else None
    stated = fetch(source, part, token=token)
    part.with_name(part.name + ".json").unlink(missing_ok=True)
    report = verify(part, entry, structure=structure)
    report["file"] = str(target)
    if pinned and stated["commit"] and stated["commit"] != pinned:
        report["problems"].append(f"the server answered with commit {stated['commit']}, not the pinned {pinned}")
    if stated["sha256"] and stated["sha256"] != report["sha256"]:
        report["problems"].append(
            f"the server stated sha256 {stated['sha256']}, the download hashes to {report['sha256']}: corrupted"
        )
    report["ok"] = not report["problems"]
    if not report["ok"]:
        rejected = target.with_name(target.name + ".rejected")
        part.replace(rejected)
        report["rejected"] = str(rejected)
        return report | where | {"downloaded": True}
    part.replace(target)
    record = {"name": entry.name, "sha256": report["sha256"], "size": report["size"], **where}
    record["downloaded_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _record(mpath, entry.filename, record)
    report["manifest"] = "match"
    return report | where | {"downloaded": True, "recorded_in": str(mpath)}
