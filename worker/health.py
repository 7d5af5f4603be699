"""Worker health, answered by the worker's main process (`SUPIR_WORKER_HEALTH_PORT`), which forks the pool
process that loads the weights and runs jobs:

  /readyz  200 only while a live pool process of this container's life holds loaded weights;
  /livez   200 while the pool process is making progress: its heartbeat thread (which beats through loading
           and through a job in flight) has beaten within `SUPIR_WORKER_LOST_AFTER_S` × 3, or no pool process
           has started yet (the startup probe covers that time).

Both read values shared in memory with the pool process (made before the fork, so nothing survives a container
restart). For exec health checks (compose, Docker) `python -m worker.health [--live]` asks the local port, or,
without one, reads `SUPIR_READY_FILE`, which names the loaded process by pid and start time (a pid alone can be
reused: pids start low again in a restarted container)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from jobs.store import pid_alive


def process_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22): with the pid, its identity."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def ready_file_text(pid: int) -> str:
    return f"{pid} {process_start(pid)}"


def ready_file_ok(path: Path) -> bool:
    """The file names a live process by pid and start time (written by that process once loaded)."""
    try:
        pid_text, _, started = path.read_text().strip().partition(" ")
    except OSError:
        return False
    if not pid_text.isdigit() or not started:
        return False  # an earlier release's file (pid only) or garbage: proves nothing
    pid = int(pid_text)
    return pid_alive(pid) and process_start(pid) == started


def serve(port: int, ready: Callable[[], bool], live: Callable[[], bool]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body: dict[str, object]
            if self.path == "/livez":
                ok = live()
                status, body = (200 if ok else 503), {"live": ok}
            elif self.path == "/readyz":
                ok = ready()
                status, body = (200 if ok else 503), {"ready": ok}
            else:
                status, body = 404, {"error": {"code": "not_found", "message": "no such route", "field": None}}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)  # probes come from outside the pod
    threading.Thread(target=server.serve_forever, name="supir-health", daemon=True).start()
    return server


def beating(last_beat: float, lost_after_s: float, now: float | None = None) -> bool:
    """Live unless a pool process has beaten before and then fallen silent for three beat lifetimes."""
    return last_beat <= 0 or (now if now is not None else time.time()) - last_beat < 3 * lost_after_s


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = "/livez" if "--live" in args else "/readyz"
    port = os.environ.get("SUPIR_WORKER_HEALTH_PORT", "0")
    if port not in ("", "0"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as response:
                return 0 if response.status == 200 else 1
        except OSError:  # HTTPError (503) included
            return 1
    ready_file = os.environ.get("SUPIR_READY_FILE")
    if path == "/readyz" and ready_file:
        return 0 if ready_file_ok(Path(ready_file)) else 1
    print("set SUPIR_WORKER_HEALTH_PORT (or SUPIR_READY_FILE for readiness)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
