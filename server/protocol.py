"""uvicorn's httptools protocol with a header deadline and a header size limit.

uvicorn arms no timer before a connection's first response: a client that connects and sends
nothing, or sends its headers a byte at a time, holds the connection (and a file descriptor)
for as long as it likes; its keep-alive timer is cancelled by any byte. Here the request line
and headers must be complete within HEINFER_HEADER_TIMEOUT_S of the connection being made or
of the request's first byte; otherwise the connection is closed (nothing has reached the
application yet, so there is no one to answer). Bodies have their own timeouts
(server/bodyguard.py).

Nor does httptools bound the size of the request line and headers: 300 MB of headers grew the
API process by 300 MB. Here more than HEINFER_MAX_HEADER_BYTES before the headers end answers
431 `headers_too_large` and closes the connection. Bytes are counted after each chunk is parsed
and only while the headers are still incomplete, so a body arriving in the same chunk as the
end of the headers is never counted.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from heinfer_server.errors import ApiError, problem_body


class HeaderDeadlineProtocol(HttpToolsProtocol):
    header_timeout: float = 10.0
    max_header_bytes: int = 64 * 1024
    _header_timer: asyncio.TimerHandle | None = None
    _in_headers = True
    _header_bytes = 0
    _discarding = False

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers, self._header_bytes = True, 0
        self._arm()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        super().data_received(data)
        if not self._in_headers or self.transport.is_closing():
            return
        self._header_bytes += len(data)
        if self._header_bytes > self.max_header_bytes:
            self._in_headers = False
            self._disarm()
            err = ApiError("headers_too_large", f"the request line and headers exceed "
                           f"{self.max_header_bytes:,} bytes")
            body = json.dumps(problem_body(err, None)).encode()
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-type: application/problem+json\r\nconnection: close\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            # lingering close: the client reads the answer, then our FIN; what it still sends
            # is dropped unread (closing now would reset the connection, answer included)
            self._discarding = True
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(2.0, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def guarded_protocol(header_timeout: float, max_header_bytes: int
                     ) -> type[HeaderDeadlineProtocol]:
    """The protocol class for uvicorn's `http=` option, with these limits."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,),
                {"header_timeout": header_timeout, "max_header_bytes": max_header_bytes})
