"""Run the API: `python -m api.server [--host H] [--port P] [--workers N] [--proxy-headers]`.

uvicorn, started here rather than by its CLI because the CLI cannot set two things the API needs:
  * a header timeout: a connection whose request headers are not complete `header_timeout_s` after it opened
    (or after the previous response on a kept-alive connection) is closed, so slow-header clients (slowloris)
    cannot hold connections; uvicorn itself only times out idle keep-alive connections;
  * a graceful-shutdown bound (`graceful_shutdown_s`), and an early shutdown notice to the app so event streams
    end at once instead of holding SIGTERM until their job ends, and requests it cannot finish are answered
    503 `shutting_down` with Retry-After instead of uvicorn's plain-text 500 (api.shutdown);
  * a second listening socket, the admin port (SUPIR_API_ADMIN_PORT, api.admin), served by the same app in the
    same process(es), for /metrics and /status.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from jobs.redis_memory import exit_if_evicting
from jobs.settings import get_settings

from .shutdown import DRAIN, FINISH_S

# at shutdown, an idle kept-alive connection stays open this long, so a request already on its way there is
# answered (503 shutting_down, Connection: close) instead of meeting a closed connection
IDLE_LINGER_S = 2.0


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for complete request headers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = get_settings().header_timeout_s
        self.header_timer: asyncio.TimerHandle | None = None

    def arm_header_timer(self) -> None:
        self.cancel_header_timer()
        self.header_timer = self.loop.call_later(self.header_timeout_s, self.headers_too_slow)

    def cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def headers_too_slow(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_header_timer()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self.cancel_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # the next request's headers are timed from here, unless a pipelined request is already running
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self.arm_header_timer()

    def shutdown(self) -> None:
        # uvicorn calls this on every open connection when shutdown starts: tell the app, so its event streams
        # end now and its requests get their deadline (api.shutdown) rather than being cancelled into a 500
        DRAIN.begin(get_settings().graceful_shutdown_s)
        if self.cycle is None or self.cycle.response_complete:
            # idle: closed shortly, not at once (uvicorn's way), so a request crossing the close is answered
            self.cancel_header_timer()
            self.header_timer = self.loop.call_later(IDLE_LINGER_S, self.headers_too_slow)
        else:
            self.cycle.keep_alive = False


class Supervisor(Multiprocess):
    """uvicorn's supervisor of worker processes, closing its own copies of the listening sockets before it stops
    the workers: while any process holds them open, the kernel keeps queueing new connections that no process
    will accept, and exit resets them. Closed in every process, a new connection is refused at once (a proxy
    retries it elsewhere)."""

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().terminate_all()


def _fresh_metrics_dir(path: str | None) -> None:
    """The multiprocess metrics folder, made if missing and emptied of an earlier life's files (a restarted
    container keeps its emptyDir: its dead processes' counters would be counted again), before any worker
    process starts writing there."""
    if not path:
        return
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)


def _check_keys_file(path: Path | None) -> None:
    """A keys file that is missing or broken at start stops the server with one clear line, before uvicorn starts
    processes that would each fail on it (later, a broken file only keeps the keys in use: api.keyring)."""
    if path is None:
        return
    from .keyring import ApiKeysFileError, read_keys_file

    try:
        read_keys_file(path)
    except ApiKeysFileError as exc:
        raise SystemExit(f"SUPIR_API_KEYS_FILE: {exc.message}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m api.server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--proxy-headers",
        action="store_true",
        help="trust X-Forwarded-For/-Proto from the addresses in FORWARDED_ALLOW_IPS (behind a reverse proxy)",
    )
    args = parser.parse_args(argv)
    settings = get_settings()
    _check_keys_file(settings.api_keys_file)
    if settings.api_admin_port == args.port:
        parser.error(f"SUPIR_API_ADMIN_PORT ({settings.api_admin_port}) must differ from --port")
    # here, not only in the app's lifespan: with --workers N uvicorn exits 0 when its workers fail to start
    exit_if_evicting(settings, "the API")
    _fresh_metrics_dir(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    config = uvicorn.Config(
        "api.main:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        proxy_headers=args.proxy_headers,
        http="api.server:GuardedHttpProtocol",  # by name: every worker process imports it
        # the hard bound: past the grace, committed requests finish and refused bodies drain (api.shutdown)
        timeout_graceful_shutdown=math.ceil(settings.graceful_shutdown_s + FINISH_S),
    )
    admin = uvicorn.Config("api.main:app", host=args.host, port=settings.api_admin_port)
    sockets = [config.bind_socket(), admin.bind_socket()]
    # uvicorn raises the SIGTERM it handled again once it has shut down, and the process would die of it
    # (status -15); here a handled SIGTERM is a clean exit, status 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    if config.workers > 1:
        Supervisor(config, sockets=sockets).run()
    else:
        uvicorn.Server(config).run(sockets=sockets)


if __name__ == "__main__":
    main()
