"""API keys: Bearer tokens, stored as SHA-256 hashes in the settings; dev mode has one local owner."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fastapi import Request

from jobs.settings import ApiKey, Settings

from .errors import ApiError

DEV_OWNER = "dev"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """(key to hand out, hash to configure)."""
    key = "sk_" + secrets.token_urlsafe(32)
    return key, hash_key(key)


def caller_of(request: Request, settings: Settings) -> ApiKey:
    """The API key behind a request (its id is the owner of the jobs it creates)."""
    if settings.dev_mode:
        client = request.client.host if request.client else ""
        if client not in ("127.0.0.1", "::1", "localhost", "testclient"):
            raise ApiError("unauthorized", "dev mode (no API keys) serves only localhost")
        return ApiKey(id=DEV_OWNER, sha256="0" * 64)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            "unauthorized", "send an API key as 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
        )
    digest = hash_key(token.strip())
    for key in settings.api_keys:
        if hmac.compare_digest(key.sha256, digest):
            return key
    raise ApiError("unauthorized", "unknown API key", headers={"WWW-Authenticate": "Bearer"})
