"""Checking a webhook the service sent: `X-Supir-Signature: sha256=<hex>` is HMAC-SHA256 with the service's
SUPIR_WEBHOOK_SECRET over `"<X-Supir-Timestamp>.<raw body>"`. Verify the raw bytes as received (before any JSON
parsing), and refuse timestamps far from now, so a captured delivery cannot be replayed later.

    event = verify(request_body, request_headers, secret)
    if event.name == "job.succeeded": ...
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidSignature, StaleWebhook
from .models import Batch, Job

SIGNATURE_HEADER = "X-Supir-Signature"
TIMESTAMP_HEADER = "X-Supir-Timestamp"
TOLERANCE_S = 300


@dataclass(frozen=True)
class WebhookEvent:
    """A verified delivery: `name` is `job.<status>`, `job.started`, `job.progress` or `batch.completed`."""

    name: str
    job: Job | None
    batch: Batch | None
    timestamp: int
    data: dict[str, Any] = field(repr=False)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The header's value for this body at this time."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    body: bytes,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    secret: str | Iterable[str],
    tolerance_s: float = TOLERANCE_S,
    *,
    now: float | None = None,
) -> WebhookEvent:
    """The delivery, once its signature matches and its timestamp is within `tolerance_s` of now; otherwise
    InvalidSignature or StaleWebhook. Several secrets (a rotation) are each tried."""
    lower = {k.lower(): v for k, v in (headers.items() if isinstance(headers, Mapping) else headers)}
    sent_signature = lower.get(SIGNATURE_HEADER.lower())
    raw_timestamp = lower.get(TIMESTAMP_HEADER.lower())
    if not sent_signature or raw_timestamp is None:
        raise InvalidSignature(f"the webhook has no {SIGNATURE_HEADER} or {TIMESTAMP_HEADER} header")
    try:
        timestamp = int(raw_timestamp)
    except ValueError:
        raise InvalidSignature(f"{TIMESTAMP_HEADER} is not a Unix time: {raw_timestamp[:40]!r}") from None
    secrets = [secret] if isinstance(secret, str) else list(secret)
    if not secrets or not all(secrets):
        raise ValueError("verify() needs the webhook secret (the service's SUPIR_WEBHOOK_SECRET)")
    sent = [s.strip() for s in sent_signature.split(",")]
    # checked before the time: a forged request learns nothing from which check failed
    if not any(hmac.compare_digest(signature(s, timestamp, body), candidate) for s in secrets for candidate in sent):
        raise InvalidSignature("the webhook's signature does not match its body (wrong secret, or changed body)")
    age = (time.time() if now is None else now) - timestamp
    if abs(age) > tolerance_s:
        raise StaleWebhook(f"the webhook was signed {age:.0f} s from now; at most {tolerance_s:.0f} s is accepted")
    data = json.loads(body)
    name, job = str(data.get("event", "")), data.get("job")
    if not name and str(data.get("id", "")).startswith("bat_"):
        name = "batch.completed"  # a bare batch view
    batch = None
    if name.startswith("batch."):  # {"event", "batch": view}, or the view's fields beside "event"
        batch = Batch.from_json(data.get("batch") or {k: v for k, v in data.items() if k != "event"})
    return WebhookEvent(name, Job.from_json(job) if isinstance(job, dict) else None, batch, timestamp, data)
