"""The RateLimit-Policy and RateLimit response headers (IETF draft httpapi-ratelimit-headers, its current syntax):

    RateLimit-Policy: "write";q=120;w=60      the policy the request was counted against: quota q per w seconds
    RateLimit: "write";r=117;t=42             what is left of it (r) and the seconds until it resets (t)

Each key has two policies, `read` (GET and HEAD) and `write` (the rest), counted apart (api.deps.authorize). A
route answers through its own Response objects, so the limiter cannot set headers on them: it leaves them in the
request's scope, and this middleware adds them to whatever response goes out, errors included (a 429 also has
Retry-After, set where it is raised)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.store import RATE_WINDOW_S, RateWindow

SCOPE_KEY = "supir.ratelimit_headers"


def rate_limit_headers(policy: str, window: RateWindow) -> dict[str, str]:
    return {
        "RateLimit-Policy": f'"{policy}";q={window.limit};w={RATE_WINDOW_S}',
        "RateLimit": f'"{policy}";r={window.remaining};t={window.reset_s}',
    }


def announce(request: Request, policy: str, window: RateWindow) -> None:
    """Have the response to this request carry the window's headers."""
    holder = request.scope.get(SCOPE_KEY)
    if isinstance(holder, dict):
        holder.update(rate_limit_headers(policy, window))


class RateLimitHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        scope[SCOPE_KEY] = headers  # the same dict through every copy of the scope further in

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and headers:
                extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
