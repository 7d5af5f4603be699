"""The official weight files: where they live, their licences, downloading them (resumable) and verifying them.

Verification is two checks: the file's sha256 against the manifest (or a hash you pin), and the file's
structure — what kind of checkpoint it is and whether every tensor maps onto the model (`checkpoints`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import WeightsError

CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class WeightFile:
    name: str
    slot: str  # "sdxl" | "supir"
    filename: str
    hub: str | None
    size: int | None
    sha256: str | None
    licence: dict[str, Any]

    @property
    def commercial(self) -> bool:
        return bool(self.licence.get("commercial"))


def load_manifest(path: str | Path | None = None) -> list[WeightFile]:
    raw = Path(path).read_text() if path else resources.files("supir_core.assets").joinpath("weights.json").read_text()
    try:
        return [WeightFile(**entry) for entry in json.loads(raw)["files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{path or 'weights.json'}: not a weights manifest ({exc})") from exc


def find(manifest: list[WeightFile], name: str) -> WeightFile:
    for entry in manifest:
        if name in (entry.name, entry.filename):
            return entry
    raise WeightsError(f"no weight file named {name!r}: choose one of {', '.join(e.name for e in manifest)}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_url(url: str, target: Path, timeout_s: float = 60.0) -> Path:
    """GET url into target, resuming a partial `target.part` with an HTTP Range request (stdlib only)."""
    import urllib.error
    import urllib.request

    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            mode = "ab" if response.status == 206 else "wb"  # a server without ranges restarts from zero
            with part.open(mode) as f:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
    except urllib.error.HTTPError as exc:
        if exc.code != 416:  # 416: nothing left to fetch, the part is complete
            raise WeightsError(f"{url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise WeightsError(f"{url}: download interrupted ({exc}); run it again to resume") from exc
    part.replace(target)
    return target


def download(entry: WeightFile, directory: Path, url: str | None = None) -> Path:
    """From a URL (resumable), else from the Hugging Face hub (resumable by the hub client)."""
    target = directory / entry.filename
    if url:
        return download_url(url, target)
    if not entry.hub:
        raise WeightsError(f"{entry.name}: no hub repository known; pass --url")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise WeightsError(f"{entry.name}: HF_HUB_OFFLINE is set; unset it (or pass --url) to download")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(entry.hub, entry.filename, local_dir=directory))
    except Exception as exc:  # the hub client raises many network and HTTP error types
        raise WeightsError(f"{entry.hub}/{entry.filename}: download failed ({type(exc).__name__}: {exc})") from exc


def verify(path: Path, entry: WeightFile | None, sha256: str | None = None) -> dict[str, Any]:
    """{'file', 'size', 'sha256', 'hash': 'match' | 'mismatch' | 'unpinned', 'kind', 'structure': 'ok' | problem}."""
    from .checkpoints import identify, open_checkpoint

    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    want = sha256 or (entry.sha256 if entry else None)
    got = sha256_of(path)
    report: dict[str, Any] = {"file": str(path), "size": path.stat().st_size, "sha256": got}
    report["hash"] = "unpinned" if not want else "match" if want.lower() == got else "mismatch"
    if entry and entry.size is not None and entry.size != report["size"]:
        report["hash"] = "mismatch"
        report["expected_size"] = entry.size
    try:
        report["kind"] = identify(open_checkpoint(path).keys())
        expected = entry.slot if entry else report["kind"]
        report["structure"] = "ok" if report["kind"] == expected else f"expected a {expected} checkpoint"
    except WeightsError as exc:
        report["kind"], report["structure"] = "unreadable", exc.message
    return report
