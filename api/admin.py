"""The admin port (SUPIR_API_ADMIN_PORT): `/metrics` and `/status` are served there and only there.

api.server listens on both ports with the same app in the same process (each of its worker processes); this
middleware tells them apart by the local port a request arrived on (the ASGI scope's `server`). The clients'
Service and ingress expose the public port only, so the operator routes never reach the internet; Prometheus
and people with cluster access use the admin port. Probes answer on both.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

ADMIN_PATHS = ("/metrics", "/status")
PROBE_PATHS = ("/healthz", "/readyz")


class AdminPort:
    def __init__(self, app: ASGIApp, admin_port: int) -> None:
        self.app, self.admin_port = app, admin_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.allowed(scope):
            await error_response("not_found", "no such route")(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def allowed(self, scope: Scope) -> bool:
        server = scope.get("server") or (None, None)
        on_admin_port = server[1] == self.admin_port
        path = scope["path"]
        if on_admin_port:
            return path in ADMIN_PATHS or path in PROBE_PATHS
        return path not in ADMIN_PATHS
