"""The gateway's HTTP server: uvicorn's httptools protocol, with the limits uvicorn lacks.

uvicorn closes an idle keep-alive connection, but a connection that sends nothing, half a
request line, or headers and then no body stays open for ever (its keep-alive timer is reset by
every byte), and httptools puts no bound on the size of a request's headers. So, per request:

* the request line and headers must arrive within ``header_timeout_s`` of its first byte (of
  the connection's opening, for its first request): else 408 and close. The clock is not reset
  by further bytes, so a slowloris client gains nothing by trickling;
* they may hold at most ``max_header_bytes`` and ``max_headers`` headers: else 431 and close;
* the body must be complete within ``body_timeout_s`` of the headers: else the connection is
  closed (the application has started, so the answer would race its own: the handler sees a
  disconnect, as for a client that went away).

uvicorn's ``limit_concurrency`` (``max_connections``) answers 503 beyond that many connections
per process. The limits come from the settings in the environment (``cmd_serve`` exports them),
so that every uvicorn worker process builds the same protocol.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ordergate.settings import Settings

LINGER_S = 2.0  # after a refusal, how long the client's further bytes are read and dropped


@functools.cache
def _limits() -> tuple[float, float, int, int]:
    s = Settings.load()
    return s.header_timeout_s, s.body_timeout_s, s.max_header_bytes, s.max_headers


def _status(code: int, reason: str, why: str) -> bytes:
    body = why.encode()
    return (
        f"HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with receipt deadlines and header limits (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_s, self._body_s, self._max_bytes, self._max_headers = _limits()
        self._deadline: asyncio.TimerHandle | None = None
        self._in_headers = False  # between a request's first byte and its headers' end
        self._header_bytes = 0
        self._header_count = 0
        self._refused = False  # answered 408/431: the parser's remaining callbacks do nothing

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def eof_received(self) -> None:
        if self._refused:
            self.transport.close()  # the client is done too: no need to linger
            return
        super().eof_received()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if not self._in_headers and (self.cycle is None or self.cycle.response_complete):
            self._await_headers()  # a new request on a kept-alive connection
        if self._in_headers:
            self._header_bytes += len(data)
            if self._header_bytes > self._max_bytes + 4:  # the blank line's CRLFCRLF
                # Parse what there is: headers that do end within the limit are fine.
                head, sep, _ = data.partition(b"\r\n\r\n")
                if not sep or self._header_bytes - len(data) + len(head) > self._max_bytes:
                    self._refuse(431, "Request Header Fields Too Large", "headers too large")
                    return
        super().data_received(data)

    def on_message_begin(self) -> None:
        if not self._refused:
            super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self._refused:
            super().on_url(url)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        self._header_count += 1
        if self._header_count > self._max_headers:
            self._refuse(431, "Request Header Fields Too Large", "too many headers")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_headers = False
        self._cancel()
        self._deadline = self.loop.call_later(self._body_s, self._body_late)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel()
        if not self._refused:
            super().on_message_complete()

    # -- the deadlines ----------------------------------------------------------------------------

    def _await_headers(self) -> None:
        self._cancel()
        self._in_headers = True
        self._header_bytes = 0
        self._header_count = 0
        self._deadline = self.loop.call_later(self._header_s, self._headers_late)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if self._in_headers and not self.transport.is_closing():
            self._refuse(408, "Request Timeout", "the request did not arrive in time")

    def _body_late(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()  # the handler sees a disconnect

    def _refuse(self, code: int, reason: str, why: str) -> None:
        """Answer and close, lingering: closing a socket with unread bytes in it makes the
        kernel reset the connection, and the client would lose the answer. So the answer goes
        out with a FIN, what the client still sends is read and dropped, and the connection
        is closed once the client closes or after ``LINGER_S``."""
        self._cancel()
        self._in_headers = False
        self._refused = True
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(_status(code, reason, why))
        if transport.can_write_eof():
            transport.write_eof()
            self._deadline = self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()
