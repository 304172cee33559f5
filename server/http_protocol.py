"""uvicorn's httptools protocol with the two bounds it lacks: a time limit on receiving a request's headers
and a size limit on them.

Without them a client can hold a connection forever by sending a header a byte at a time (slowloris), or grow
the server's memory with an endless header. The body's own bounds (size, read time) are the middleware's.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADER_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 64 << 10
LINGER_S = 1.0  # after a refusal, input is read and dropped this long, so the client sees the answer, not a reset


def _response(status: bytes, message: str) -> bytes:
    body = message.encode()
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


class BoundedHttpProtocol(HttpToolsProtocol):
    """Closes a connection (with 408) whose request headers take longer than header_timeout_s from their first
    byte (or from connecting), or (with 431) whose headers pass max_header_bytes: counted as parsed, and as raw
    bytes while headers are still incomplete, so an endless header is cut off too."""

    header_timeout_s = HEADER_TIMEOUT_S
    max_header_bytes = MAX_HEADER_BYTES

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._header_timer: asyncio.TimerHandle | None = None
        self._in_headers = False  # a request's headers have begun and are not complete
        self._header_size = 0  # parsed bytes of the current request's URL and headers
        self._unparsed = 0  # raw bytes received while headers stayed incomplete
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_headers()  # a connection that never sends a full request is a slow one too

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._in_headers and not self._refused:
            self._unparsed += len(data)
            if self._unparsed > self.max_header_bytes:
                self._refuse(b"431 Request Header Fields Too Large", "request headers are too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_headers()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._header_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._header_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self._stop_headers()
        if self._header_size > self.max_header_bytes:
            self._refuse(b"431 Request Header Fields Too Large", "request headers are too large")
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_headers()
        super().connection_lost(exc)

    def _start_headers(self) -> None:
        self._in_headers = True
        self._header_size = self._unparsed = 0
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

    def _stop_headers(self) -> None:
        self._in_headers = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        self._refuse(b"408 Request Timeout", f"request headers did not arrive within {self.header_timeout_s:g} s")

    def _refuse(self, status: bytes, message: str) -> None:
        """Answer and half-close; drop what the client still sends for LINGER_S, then close (closing with
        unread input would reset the connection, and the client might never read the answer)."""
        self._stop_headers()
        self._refused = True
        if self.transport.is_closing():
            return
        self.transport.write(_response(status, message))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


def bounded_protocol(header_timeout_s: float, max_header_bytes: int = MAX_HEADER_BYTES) -> type[BoundedHttpProtocol]:
    """The protocol class with these bounds, for uvicorn.Config(http=...)."""
    return type(
        "BoundedHttpProtocol",
        (BoundedHttpProtocol,),
        {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes},
    )
