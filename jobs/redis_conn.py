"""Every Redis client of the service, built from the settings in one place: the store's (sync and asyncio), the
readiness probe's, and Celery's broker URL and transport options. A plain Redis URL, a password from a Secret
(`SUPIR_REDIS_PASSWORD`, used unless a URL carries its own), or Redis Sentinel (`SUPIR_REDIS_SENTINELS`): the
master is looked up through the Sentinels and looked up again after a failover.

Every client has socket and connect timeouts (a failover or a dropped connection can leave a socket that never
answers) and retries a command a few times on connection errors with a short backoff, which rides out the seconds
a Sentinel failover takes; longer outages surface as errors the callers already handle (503 on the API, a wait in
the worker)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from .settings import Settings

RETRY_ERRORS = [redis.ConnectionError, redis.TimeoutError]
RETRIES = 3


def sentinels(settings: Settings) -> list[tuple[str, int]]:
    found = []
    for item in settings.redis_sentinels.split(","):
        host, _, port = item.strip().rpartition(":")
        if item.strip():
            found.append((host or item.strip(), int(port) if host else 26379))
    return found


def _db(url: str) -> int:
    path = urlsplit(url).path.strip("/")
    return int(path) if path.isdigit() else 0


def _password(settings: Settings) -> str | None:
    return settings.redis_password.get_secret_value() if settings.redis_password else None


def _common(settings: Settings, socket_timeout: float | None, connect_timeout: float | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout or settings.redis_socket_timeout_s,
        "socket_connect_timeout": connect_timeout or settings.redis_connect_timeout_s,
        "health_check_interval": 30,
    }
    return options


def _sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
    if settings.redis_sentinel_password:
        kwargs["password"] = settings.redis_sentinel_password.get_secret_value()
    return kwargs


def store_client(
    settings: Settings, socket_timeout: float | None = None, connect_timeout: float | None = None
) -> redis.Redis:
    """The store's client (job records, progress, limits, heartbeats)."""
    options = _common(settings, socket_timeout, connect_timeout)
    options["retry"] = Retry(ExponentialBackoff(cap=1.0, base=0.1), RETRIES, supported_errors=tuple(RETRY_ERRORS))
    options["retry_on_error"] = RETRY_ERRORS
    client: redis.Redis = _connect(settings, options, Sentinel, redis.Redis)
    return client


def async_store_client(settings: Settings, max_connections: int) -> aioredis.Redis:
    """The store's asyncio client (the API's event streams and `Prefer: wait`)."""
    options = _common(settings, None, None)
    # a stream waits on its subscription for as long as a job runs: no read timeout on these sockets (a keep-alive
    # and the health check find dead ones)
    options["socket_timeout"] = None
    options["retry"] = AsyncRetry(ExponentialBackoff(cap=1.0, base=0.1), RETRIES, supported_errors=tuple(RETRY_ERRORS))
    options["max_connections"] = max_connections
    client: aioredis.Redis = _connect(settings, options, AsyncSentinel, aioredis.Redis)
    return client


def _connect(settings: Settings, options: dict[str, Any], sentinel_class: Any, client_class: Any) -> Any:
    """Through the Sentinels when there are any (the master, found again after a failover), else the URL."""
    password = _password(settings)
    if sentinels(settings):
        watcher = sentinel_class(sentinels(settings), sentinel_kwargs=_sentinel_kwargs(settings))
        db = _db(settings.redis_url)
        return watcher.master_for(settings.redis_sentinel_master, db=db, password=password, **options)
    if password and not urlsplit(settings.redis_url).password:
        options["password"] = password
    return client_class.from_url(settings.redis_url, **options)


def broker_url(settings: Settings) -> str:
    """Celery's broker: `SUPIR_BROKER_URL` or the store's URL, with the password from the Secret; with Sentinels,
    kombu's `sentinel://` form (one per Sentinel, separated by `;`)."""
    url = settings.broker_url or settings.redis_url
    password = _password(settings)
    if sentinels(settings):
        auth = f":{quote(password, safe='')}@" if password else ""
        return ";".join(f"sentinel://{auth}{host}:{port}/{_db(url)}" for host, port in sentinels(settings))
    parts = urlsplit(url)
    if password and not parts.password and parts.scheme in ("redis", "rediss"):
        user = quote(parts.username, safe="") if parts.username else ""
        return parts._replace(netloc=f"{user}:{quote(password, safe='')}@{parts.netloc}").geturl()
    return url


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Timeouts for kombu's Redis connections (without a socket timeout a publish to a failed-over master waits
    for ever), and the Sentinel master's name."""
    options: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "retry_on_timeout": True,
        "health_check_interval": 25,
    }
    if sentinels(settings):
        options["master_name"] = settings.redis_sentinel_master
        options["sentinel_kwargs"] = _sentinel_kwargs(settings)
    return options
