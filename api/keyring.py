"""The API keys a process accepts: SUPIR_API_KEYS (fixed for the process's life), or SUPIR_API_KEYS_FILE, re-read
when it changes, so keys are rotated without a restart.

Kubernetes updates a mounted Secret by writing a new timestamped folder and swapping the `..data` symlink to it:
the file's path stays and its target changes. So the file is not watched by inode or mtime: at most every
CHECK_EVERY_S its bytes are read again (a few hundred bytes) and parsed only when their hash differs. A file that
cannot be read, is empty, or is not a valid non-empty key list keeps the keys in use (and says so in the log and
the metrics): a half-written or broken Secret must never lock every client out.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from jobs.settings import ApiKey, Settings
from supir_core.errors import SupirError

from . import metrics

CHECK_EVERY_S = 1.0
log = logging.getLogger("api.keyring")
_KEY_LIST = TypeAdapter(list[ApiKey])


class ApiKeysFileError(SupirError):
    code = "api_keys_file_invalid"


def parse_keys_file(data: bytes, path: Path) -> tuple[ApiKey, ...]:
    """The keys in a keys file: a JSON list shaped like SUPIR_API_KEYS, with at least one key."""
    if not data.strip():
        raise ApiKeysFileError(f"{path} is empty")
    try:
        keys = _KEY_LIST.validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiKeysFileError(f"{path} is not a JSON list of API keys ({where}: {first['msg']})") from None
    if not keys:
        raise ApiKeysFileError(f"{path} lists no keys (that would refuse every client)")
    return tuple(keys)


def read_keys_file(path: Path) -> tuple[bytes, tuple[ApiKey, ...]]:
    """(the file's bytes, its keys); ApiKeysFileError when it cannot be read or is not a valid key list."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ApiKeysFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    return data, parse_keys_file(data, path)


class KeyRing:
    """The current keys; `keys()` is called on every authenticated request and costs one clock read, plus one
    small file read a second when a keys file is configured (and a parse only when the file changed)."""

    def __init__(self, settings: Settings) -> None:
        self.path = settings.api_keys_file
        self._keys: tuple[ApiKey, ...] = tuple(settings.api_keys)
        self._digest = ""  # of the bytes last read, loaded or refused: each change is logged once
        self._checked_at = time.monotonic()
        self._lock = threading.Lock()
        if self.path is not None:
            data, self._keys = read_keys_file(self.path)  # a broken file at start is a configuration error
            self._digest = hashlib.sha256(data).hexdigest()
            log.warning("API keys loaded from %s: %d keys", self.path, len(self._keys))
            metrics.API_KEY_RELOADS.labels("loaded").inc()
        metrics.API_KEYS_LOADED.set(len(self._keys))

    def keys(self) -> tuple[ApiKey, ...]:
        due = self.path is not None and time.monotonic() - self._checked_at >= CHECK_EVERY_S
        # one request thread re-reads; the others go on with the keys in use rather than wait for it
        if due and self._lock.acquire(blocking=False):
            try:
                self._checked_at = time.monotonic()
                self._reload()
            finally:
                self._lock.release()
        return self._keys

    def _reload(self) -> None:
        assert self.path is not None
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            self._refuse(f"cannot read {self.path}: {exc.strerror or exc}", digest="unreadable")
            return
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            return
        try:
            keys = parse_keys_file(data, self.path)
        except ApiKeysFileError as exc:
            self._refuse(exc.message, digest)
            return
        self._keys, self._digest = keys, digest
        metrics.API_KEYS_LOADED.set(len(keys))
        metrics.API_KEY_RELOADS.labels("loaded").inc()
        log.warning("API keys reloaded from %s: %d keys", self.path, len(keys))

    def _refuse(self, reason: str, digest: str) -> None:
        if digest == self._digest:
            return  # this broken state was reported already
        self._digest = digest
        metrics.API_KEY_RELOADS.labels("refused").inc()
        log.error("API keys NOT reloaded, still using the %d keys in use: %s", len(self._keys), reason)
