"""A node-local copy of the weights: `supir weights cache --from /models --to /cache`.

Workers on a shared file system (EFS, Filestore, NFS) each read ~10 GB at start; in bursting mode that is slower
than any startup probe. Run as an init container, this copies the files listed in the source's manifest to local
disk once per node: each file hashed while it is copied and refused unless it matches its manifest record, written
under a temporary name, flushed, then renamed, and recorded in the cache's own manifest. Later pods on the node find
the record and copy nothing. A lock file serialises pods starting together on one node: the first copies, the
others wait for it and then find the files cached. Files no longer in the source's manifest are removed, so an
upgrade does not fill the node's disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import WeightsError
from .weights import CHUNK, _record, manifest_path, read_manifest, sha256_of

LOCK_NAME = ".supir-weights.lock"
MIB = 1024 * 1024


@contextlib.contextmanager
def _node_lock(cache: Path) -> Iterator[None]:
    """An exclusive lock on the cache directory: released by the kernel if the holder dies, so a killed pod never
    leaves the node's other pods waiting for ever."""
    with open(cache / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached(cache: Path, filename: str, record: dict[str, Any], cached: dict[str, Any], rehash: bool) -> bool:
    """The cache holds this very file: its record has the source's sha256 and size, the file that size, and (with
    `rehash`) those bytes: local disk is read at its own speed, and a damaged copy is then replaced, not loaded."""
    mine = cached.get(filename)
    file = cache / filename
    recorded = (
        mine is not None
        and mine.get("sha256") == record.get("sha256")
        and mine.get("size") == record.get("size")
        and file.is_file()
        and file.stat().st_size == record.get("size")
    )
    return recorded and (not rehash or sha256_of(file) == record.get("sha256"))


def _copy_checked(source: Path, target: Path, record: dict[str, Any]) -> float:
    """Copies `source` to `target` through `<target>.part`, hashing on the way; refuses a copy whose sha256 or size
    differs from the record (a file changed or damaged on the shared volume). Returns the seconds it took."""
    part = target.with_name(target.name + ".part")
    digest, size, started = hashlib.sha256(), 0, time.monotonic()
    try:
        with open(source, "rb") as src, open(part, "wb") as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
            dst.flush()
            os.fsync(dst.fileno())  # on disk before it takes its name: a node crash leaves a part, never a bad file
        if digest.hexdigest() != record.get("sha256") or size != record.get("size"):
            raise WeightsError(
                f"{source}: sha256 {digest.hexdigest()} ({size} bytes) is not the {record.get('sha256')} "
                f"({record.get('size')} bytes) its manifest records: not cached; run `supir weights verify --dir "
                f"{source.parent}` and download it again"
            )
        part.replace(target)
    finally:
        part.unlink(missing_ok=True)
    return time.monotonic() - started


def _free_bytes_needed(cache: Path, wanted: dict[str, dict[str, Any]], cached: dict[str, Any]) -> None:
    needed = sum(int(r.get("size") or 0) for name, r in wanted.items() if not _cached(cache, name, r, cached, False))
    free = shutil.disk_usage(cache).free
    if needed > free:
        raise WeightsError(
            f"{cache}: {needed / 1e9:.1f} GB to copy but {free / 1e9:.1f} GB free: give the node-local cache a "
            "larger disk (docs/operations.md#node-local-weights)"
        )


def _drop_stale(cache: Path, wanted: dict[str, Any], say: Callable[[str], None]) -> None:
    """Files cached for an earlier manifest (an upgrade's old weights) go, with their records."""
    mpath = manifest_path(cache)
    manifest = read_manifest(mpath)
    stale = [name for name in manifest["files"] if name not in wanted]
    for name in stale:
        (cache / name).unlink(missing_ok=True)
        del manifest["files"][name]
        say(f"{name}: removed (no longer in the source's manifest)")
    if stale:
        tmp = mpath.with_name(mpath.name + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        tmp.replace(mpath)


def fill_cache(
    source: Path, cache: Path, rehash: bool = True, say: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Makes `cache` hold every file of `source`'s manifest, copying only what it lacks. One report per file:
    {'file', 'action': 'copied' | 'cached', 'size', 'seconds', 'mib_per_s'} (the last two for copies: the
    shared volume's read speed as this node sees it, which sizes the probes)."""
    wanted = read_manifest(manifest_path(source))["files"]
    if not wanted:
        raise WeightsError(f"{manifest_path(source)}: no files listed; fill the weights volume first")
    cache.mkdir(parents=True, exist_ok=True)
    reports = []
    with _node_lock(cache):
        _drop_stale(cache, wanted, say)
        cached = read_manifest(manifest_path(cache))["files"]
        _free_bytes_needed(cache, wanted, cached)
        for filename, record in wanted.items():
            if _cached(cache, filename, record, cached, rehash):
                reports.append({"file": filename, "action": "cached", "size": record.get("size")})
                say(f"{filename}: already cached")
                continue
            seconds = _copy_checked(source / filename, cache / filename, record)
            _record(manifest_path(cache), filename, {**record, "cached_from": str(source / filename)})
            speed = int(record.get("size") or 0) / MIB / max(seconds, 1e-6)
            reports.append(
                {
                    "file": filename,
                    "action": "copied",
                    "size": record.get("size"),
                    "seconds": round(seconds, 3),
                    "mib_per_s": round(speed, 1),
                }
            )
            say(
                f"{filename}: copied {int(record.get('size') or 0) / 1e9:.2f} GB in {seconds:.1f} s ({speed:.0f} MiB/s)"
            )
    return reports
