"""The result cache's key: which earlier job's stored result answers a request without running it again.

A restoration with an explicit seed is deterministic for the same photo bytes, validated parameters, variant,
model files and numerics (device type, dtype, fp8: what the workers publish beside the model id, e.g.
"cuda/bfloat16/fp8=none"), so those (and, unless the cache is shared, the key's owner) name the result. The API
looks the key up before queueing; the worker records it when such a job succeeds. Both compute it here."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .record import JobRecord
from .settings import Settings

KEY_VERSION = 2  # bump when what a result depends on changes (a new parameter's meaning, the encoder, …)


def cache_key(
    owner: str | None, input_sha256: str, params: dict[str, Any], variant: str, model_id: str, numerics: str
) -> str:
    """params: validated and normalised (RestoreParams.model_dump(mode="json"), the seed included); numerics: the
    workers' supir_core.variants.numerics_identity."""
    material = {
        "v": KEY_VERSION,
        "owner": owner,
        "input": input_sha256,
        "params": params,
        "variant": variant,
        "model": model_id,
        "numerics": numerics,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def keyed(settings: Settings, record: JobRecord) -> bool:
    """Whether the cache keys a job like this: only full restorations whose request named the seed; never when the
    cache is off."""
    return settings.result_cache != "off" and record.seed_given and record.kind == "restore" and not record.stage1_job


def cacheable(settings: Settings, record: JobRecord) -> bool:
    """Keyed, and its photo's sha256 known: the API hashes a direct upload's photo only for a keyed job (a
    streamed read of the whole object), so a record without one is never looked up nor remembered."""
    return keyed(settings, record) and bool(record.input_sha256)


def scope(settings: Settings, owner: str) -> str | None:
    """The owner the key is private to; None when keys share results (the same photo bytes are needed)."""
    return None if settings.result_cache == "shared" else owner


def record_key(settings: Settings, record: JobRecord, model_id: str, numerics: str) -> str:
    owner = scope(settings, record.owner)
    return cache_key(owner, record.input_sha256, record.params, record.variant, model_id, numerics)
