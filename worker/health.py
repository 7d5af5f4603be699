"""Worker health: ready only while a live pool process holds loaded weights.

Served over HTTP by the worker's main process (`SUPIR_WORKER_HEALTH_PORT`: `/livez`, `/readyz`), and as a
command for exec probes: `python -m worker.health` exits 0 only when `SUPIR_READY_FILE` names a live process
(the file alone proves nothing: it outlives a killed process, and an emptyDir outlives a container restart).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from jobs.store import pid_alive


def ready_file_ok(path: Path) -> bool:
    try:
        text = path.read_text().strip()
    except OSError:
        return False
    return text.isdigit() and pid_alive(int(text))


def serve(port: int, ready: Callable[[], bool]) -> ThreadingHTTPServer:
    """/livez: the main process answers; /readyz: 200 only while `ready()` (a loaded pool process lives)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body: dict[str, object]
            if self.path == "/livez":
                status, body = 200, {"live": True}
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


def main() -> int:
    path = os.environ.get("SUPIR_READY_FILE")
    if not path:
        print("SUPIR_READY_FILE is not set", file=sys.stderr)
        return 2
    return 0 if ready_file_ok(Path(path)) else 1


if __name__ == "__main__":
    sys.exit(main())
