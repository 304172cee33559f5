"""The server's front door, as plain ASGI (no per-request overhead beyond what it checks): the Host header
against the allowed hosts, the API key on /v1 routes, a bound on body size and on the time the body may take
to arrive, a count of every HTTP response by route and status, and an access log line per request (method,
route, status, latency, and the tokens of a generation request, which the app leaves in its scope's state)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, error_body

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
access_logger = logging.getLogger("moe_serve.access")


def _too_large_message(limit: int) -> str:
    return f"request body exceeds {limit} bytes"


class BodyTooLarge(HTTPException):
    """Raised while the app reads a body without Content-Length that grows past the limit (answered as 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large_message(limit))


class BodyTimeout(HTTPException):
    """Raised while the app reads a body that has not arrived within the limit (answered as 408)."""

    def __init__(self, limit: float) -> None:
        super().__init__(408, f"the request body did not arrive within {limit:g} s")


def host_of(header: str) -> str:
    """The host part of a Host header: 'example.com:80' -> 'example.com', '[::1]:8000' -> '::1'."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class ServerMiddleware:
    """Checks the Host header (when hosts are restricted), the API key (when one is set) and the body size
    before the app runs, bounds the time the body takes to arrive, counts responses and logs each one."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        max_body_bytes: int,
        count: Callable[[str, str, int], None],
        body_timeout_s: float = 30.0,
        allowed_hosts: frozenset[str] | None = None,
        access_log: bool = True,
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.allowed_hosts = allowed_hosts
        self.count = count
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()
        state = scope.setdefault("state", {})  # Starlette's request.state: the app leaves "tokens" here

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
            route = _route_of(scope)
            self.count(scope["method"], route, status)
            if self.access_log:
                tokens = state.get("tokens")
                access_logger.info(
                    '%s "%s %s" %d %.0f ms%s', _client_of(scope), scope["method"], scope["path"][:200], status,
                    (time.perf_counter() - started) * 1e3,
                    "" if tokens is None else f" {tokens[0]} prompt + {tokens[1]} completion tokens",
                )  # fmt: skip

    def _refuse(self, scope: Scope) -> APIError | None:
        headers = dict(scope["headers"])
        if self.allowed_hosts is not None:
            host = host_of(headers.get(b"host", b"").decode("latin-1")).lower()
            if host not in self.allowed_hosts:
                return APIError(
                    400,
                    f"Host header {host!r} is not allowed; this server answers to {sorted(self.allowed_hosts)} "
                    "(--allowed-hosts)",
                    code="host_not_allowed",
                )
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                message = "missing API key" if not given else "incorrect API key provided"
                return APIError(401, f"{message}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return APIError(413, _too_large_message(self.max_body_bytes), code="request_too_large")
        return None

    def _bounded(self, receive: Receive) -> Receive:
        """receive, refusing a body that grows past the size limit or is still arriving past the time limit
        (which counts from the first read; once the body is complete, receive passes through untimed)."""
        seen = 0
        deadline: float | None = None
        complete = False

        async def bounded() -> Message:
            nonlocal seen, deadline, complete
            if complete:
                return await receive()
            if deadline is None:
                deadline = time.monotonic() + self.body_timeout_s
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.body_timeout_s) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
                complete = not message.get("more_body", False)
            return message

        return bounded


def _client_of(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


def _route_of(scope: Scope) -> str:
    """The route template that served the request, or the path when it names a route that refused it early
    (400, 401, 413); anything else is "unmatched", so labels stay bounded."""
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
