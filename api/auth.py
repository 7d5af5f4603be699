"""API keys: Bearer tokens, stored as SHA-256 hashes in the settings; dev mode has one local owner."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fastapi import Request

from jobs.settings import Settings

from .errors import ApiError

DEV_OWNER = "dev"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """(key to hand out, hash to configure)."""
    key = "sk_" + secrets.token_urlsafe(32)
    return key, hash_key(key)


def owner_of(request: Request, settings: Settings) -> str:
    if settings.dev_mode:
        return DEV_OWNER
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            "unauthorized", "send an API key as 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
        )
    digest = hash_key(token.strip())
    for key in settings.api_keys:
        if hmac.compare_digest(key.sha256, digest):
            return key.id
    raise ApiError("unauthorized", "unknown API key", headers={"WWW-Authenticate": "Bearer"})
