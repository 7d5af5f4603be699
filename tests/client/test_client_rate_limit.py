"""supir_client and the live service's per-key rate limit (SUPIR_RATE_LIMIT_PER_MINUTE=2): a 429 is waited out as
its Retry-After says, then the call succeeds; a caller unwilling to wait that long gets RateLimited at once.
The limit is a fixed window of a minute, so this test waits up to a minute."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from supir_client import Client, RateLimited
from supir_client.errors import retry_after_s

from tests.servers import running

UPLOAD = {"content_type": "image/png", "size": 10}


def test_a_429_is_waited_out_as_retry_after_says_then_the_call_succeeds(tmp_path: Path, fixture_a: Path) -> None:
    with (
        running(tmp_path, fixture_a, {"alice": {}}, with_workers=False, rate_limit_per_minute=2) as svc,
        svc.client("alice") as raw,
    ):
        # the limit spent, then the clients' first tries, all in one window: not in its last seconds
        left = 60 - time.time() % 60
        if left < 10:
            time.sleep(left + 0.5)
        assert [raw.post("/v1/uploads", json=UPLOAD).status_code for _ in range(2)] == [201, 201]
        over = raw.post("/v1/uploads", json=UPLOAD)
        assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limited"
        # the client reads the service's RateLimit header as the same wait as its Retry-After
        assert retry_after_s({"RateLimit": over.headers["ratelimit"]}) == int(over.headers["retry-after"])

        with (
            Client(svc.url, svc.keys["alice"], max_retry_wait_s=0.5) as impatient,
            pytest.raises(RateLimited) as limited,
        ):
            impatient.create_upload("image/png", 10)
        assert limited.value.status == 429 and limited.value.code == "rate_limited"
        assert limited.value.retry_after is not None and limited.value.retry_after >= 1 and impatient.retries == 0

        started = time.monotonic()
        with Client(svc.url, svc.keys["alice"]) as client:
            target = client.create_upload("image/png", 10)
            assert client.retries == 1  # one 429, then the answer
        waited = time.monotonic() - started
        assert target.id.startswith("upl_") and target.method == "PUT"
        assert waited >= limited.value.retry_after - 2, (waited, limited.value.retry_after)
