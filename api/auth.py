"""API keys: Bearer tokens, stored as SHA-256 hashes (SUPIR_API_KEYS or the file api.keyring re-reads); dev mode has
one local owner."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

from fastapi import Request

from jobs.settings import ApiKey, Settings
from jobs.store import JobStore

from .errors import ApiError

DEV_OWNER = "dev"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """(key to hand out, hash to configure)."""
    key = "sk_" + secrets.token_urlsafe(32)
    return key, hash_key(key)


def caller_of(request: Request, settings: Settings, keys: Sequence[ApiKey]) -> ApiKey:
    """The API key behind a request, among `keys` (its id is the owner of the jobs it creates: during a rotation
    one id may be listed with the old and the new key)."""
    if settings.dev_mode:
        client = request.client.host if request.client else ""
        if client not in ("127.0.0.1", "::1", "localhost", "testclient"):
            message = "dev mode (SUPIR_DEV_MODE, no API keys) serves only localhost: send a key from SUPIR_API_KEYS"
            raise ApiError("unauthorized", message)
        return ApiKey(id=DEV_OWNER, sha256="0" * 64)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            "unauthorized",
            "send an API key as 'Authorization: Bearer <key>' (keys are the service's SUPIR_API_KEYS or "
            "SUPIR_API_KEYS_FILE)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    digest = hash_key(token.strip())
    for key in keys:
        if hmac.compare_digest(key.sha256, digest):
            return key
    message = "unknown API key (keys are the service's SUPIR_API_KEYS or SUPIR_API_KEYS_FILE)"
    raise ApiError("unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def authenticate(request: Request, settings: Settings, store: JobStore, keys: Sequence[ApiKey]) -> ApiKey:
    """caller_of, with failed attempts counted per client address.

    Only failures are counted. Once an address has failed `auth_failures_per_minute` times in the current
    minute, its failing requests answer 429 (with Retry-After) instead of 401 until the minute ends. A valid
    key is never refused here, even from that address: clients sharing an address (a NAT, a proxy without
    --proxy-headers) are not locked out by one of them guessing. Keys are 256 random bits, so the limit is
    against noise and key-list stuffing rather than against brute force.
    """
    try:
        return caller_of(request, settings, keys)
    except ApiError as exc:
        if exc.code != "unauthorized":
            raise
        address = request.client.host if request.client else "unknown"
        wait = store.hit_rate_limit(f"authfail:{address}", settings.auth_failures_per_minute)
        if wait is None:
            raise
        message = (
            f"over {settings.auth_failures_per_minute} failed authentications a minute from your address "
            "(SUPIR_AUTH_FAILURES_PER_MINUTE)"
        )
        raise ApiError("rate_limited", message, headers={"Retry-After": str(wait)}) from None
