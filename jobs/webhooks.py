"""Webhook signing: HMAC-SHA256 over "<timestamp>.<body>", as Stripe and Svix sign theirs."""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Supir-Signature"
TIMESTAMP_HEADER = "X-Supir-Timestamp"
TOLERANCE_S = 300


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def signed_headers(secret: str, body: bytes, now: float | None = None) -> dict[str, str]:
    timestamp = int(now if now is not None else time.time())
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, timestamp, body),
    }


def verify(secret: str, headers: dict[str, str], body: bytes, now: float | None = None) -> bool:
    """What a receiver runs: the signature matches and the timestamp is recent (no replays)."""
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        timestamp = int(lower[TIMESTAMP_HEADER.lower()])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > TOLERANCE_S:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), lower.get(SIGNATURE_HEADER.lower(), ""))
