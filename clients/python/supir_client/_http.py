"""Requests with bounded retries. Every call this client makes is safe to send again: reads and DELETE are
idempotent, creates carry an `Idempotency-Key` made once per logical call (so a retry finds the job the first try
made), an upload that no job uses is erased by the service. So connection errors, 408, 429, 5xx and
`idempotency_in_progress` are tried again, waiting what the service asks (`Retry-After`, else the `RateLimit`
header's reset) or an exponential back-off with jitter; other answers are returned or raised at once."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx

from .errors import ApiError, TransportError, error_from_response, retry_after_s

RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
RETRIED_CODES = frozenset({"idempotency_in_progress"})  # the first try is still being created: its replay follows


class Http:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float,
        max_retries: int,
        max_retry_wait_s: float,
        backoff_s: float = 0.5,
        transport: httpx.BaseTransport | None = None,
        user_agent: str = "supir-client",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # no default Authorization: the key goes to the API only, never to an upload or presigned S3 URL
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.max_retries, self.max_retry_wait_s, self.backoff_s = max_retries, max_retry_wait_s, backoff_s
        self.sleep = sleep
        self.client = httpx.Client(
            base_url=self.base_url, timeout=timeout, transport=transport, headers={"User-Agent": user_agent}
        )
        self.retries = 0  # tries beyond the first, over the client's life (tests and logs read it)

    def close(self) -> None:
        self.client.close()

    def request(
        self,
        method: str,
        url: str,
        *,
        api: bool = True,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """The successful (<400, redirects not followed) response, after retries; otherwise its ApiError."""
        with self.stream(method, url, api=api, timeout=timeout, **kwargs) as response:
            response.read()
            return response

    @contextlib.contextmanager
    def stream(
        self,
        method: str,
        url: str,
        *,
        api: bool = True,
        timeout: float | httpx.Timeout | None = None,
        headers: Mapping[str, str] | None = None,
        retries: int | None = None,
        **kwargs: Any,
    ) -> Iterator[httpx.Response]:
        """As request(), the body left unread: a retry can only happen before the caller reads it. `retries`
        overrides the client's max_retries (0: the caller has a fallback of its own)."""
        sent_headers = {**(self.auth if api else {}), **(headers or {})}
        max_retries = self.max_retries if retries is None else retries
        attempt = 0
        while True:
            try:
                chosen = timeout if timeout is not None else self.timeout
                request = self.client.build_request(method, url, headers=sent_headers, timeout=chosen, **kwargs)
                response = self.client.send(request, stream=True)
            except httpx.TransportError as exc:  # refused, reset, timed out: nothing came back
                delay = self._backoff(attempt)
                if attempt >= max_retries:
                    raise TransportError(f"{method} {_shown(url)}: {type(exc).__name__}: {exc}") from exc
            else:
                if response.status_code < 400:
                    try:
                        yield response
                    finally:
                        response.close()
                    return
                response.read()
                response.close()
                error = self._error(response)
                wait = self._delay(error, attempt)
                if wait is None or attempt >= max_retries:
                    raise error
                delay = wait
            attempt += 1
            self.retries += 1
            self.sleep(delay)

    def _error(self, response: httpx.Response) -> ApiError:
        try:
            body = response.json()
        except ValueError:
            body = None
        return error_from_response(response.status_code, body, response.headers)

    def _delay(self, error: ApiError, attempt: int) -> float | None:
        """Seconds before the next try, or None when this error is final."""
        if error.status not in RETRIED_STATUSES and error.code not in RETRIED_CODES:
            return None
        asked = retry_after_s(error.headers)
        if asked is None:
            return self._backoff(attempt)
        if asked > self.max_retry_wait_s:
            return None  # longer than the caller allows: theirs to decide (RateLimited.retry_after says how long)
        return asked

    def _backoff(self, attempt: int) -> float:
        return min(30.0, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)


def _shown(url: str) -> str:
    """A URL for an error message, without its query (signatures)."""
    return url.split("?", 1)[0]
