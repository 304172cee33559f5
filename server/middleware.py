"""The server's front door, as plain ASGI (no per-request overhead beyond what it checks): the API key on
/v1 routes, a bound on body size, and a count of every HTTP response by route and status."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, error_body


def _too_large_message(limit: int) -> str:
    return f"request body exceeds {limit} bytes"


class BodyTooLarge(HTTPException):
    """Raised while the app reads a body without Content-Length that grows past the limit (answered as 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large_message(limit))


class ServerMiddleware:
    """Checks the API key (when one is set) and the body size before the app runs, and counts responses."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        max_body_bytes: int,
        count: Callable[[str, str, int], None],
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        error = self._refuse(scope)
        try:
            if error is not None:
                await _send_error(send_counted, error)
            else:
                await self.app(scope, self._bounded(receive), send_counted)
        finally:
            self.count(scope["method"], _route_of(scope), status)

    def _refuse(self, scope: Scope) -> APIError | None:
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            token = given.removeprefix("Bearer ").strip()
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                message = "missing API key" if not given else "incorrect API key provided"
                return APIError(401, f"{message}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return APIError(413, _too_large_message(self.max_body_bytes), code="request_too_large")
        return None

    def _bounded(self, receive: Receive) -> Receive:
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        return bounded


def _route_of(scope: Scope) -> str:
    """The route template that served the request, or the path when it names a route that refused it early
    (401, 413); anything else is "unmatched", so labels stay bounded."""
    route = scope.get("route")
    if route is not None:
        return route.path
    paths = {getattr(r, "path", None) for r in scope["app"].routes} if "app" in scope else set()
    return scope["path"] if scope["path"] in paths else "unmatched"


async def _send_error(send: Send, error: APIError) -> None:
    body = error_body(error)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
