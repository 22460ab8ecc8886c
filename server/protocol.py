"""uvicorn's httptools HTTP protocol with a header timeout: a client that does not finish sending a request's
headers within `header_timeout_s` (from connecting, or from its first byte after a response) is
disconnected, so slow or stalled clients cannot hold connections forever. (uvicorn's keep-alive timeout
only covers a connection with no bytes at all; the body has its own timeout in the app's guard.) A request
line and headers over MAX_HEADER_BYTES get a 431 and the connection is closed: httptools itself sets no
limit, and h11's was 16 KiB.

httptools (C) rather than h11 (pure Python): under a storm of requests the event loop spent most of its
time in h11's header parsing and validation (py-spy), and every 429 waited behind it."""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("moebert.server")

MAX_HEADER_BYTES = 64 * 1024  # the request line and all header lines together
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 34\r\nconnection: close\r\n\r\nrequest headers over 64 KiB in all"
)


def protocol_with_header_timeout(header_timeout_s: float) -> type[HttpToolsProtocol]:
    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _awaiting_headers = True  # between requests, or inside a request's headers
        _header_bytes = 0

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._awaiting_headers = True
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self._awaiting_headers:
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._awaiting_headers, self._header_bytes = True, 0
            if self._header_timer is None:  # a request that began in the same packet as the last one ended
                self._arm()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def _count(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > MAX_HEADER_BYTES:  # the parser stops, uvicorn answers: send_400_response
                raise ValueError("request headers too large")

        def send_400_response(self, msg: str) -> None:
            if self._header_bytes <= MAX_HEADER_BYTES:
                return super().send_400_response(msg)
            self.transport.write(_TOO_LARGE)
            self.transport.close()

        def on_headers_complete(self) -> None:
            self._awaiting_headers = False
            self._disarm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._awaiting_headers = True  # armed again by the next request's first bytes

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self._awaiting_headers and not self.transport.is_closing():
                log.info("closing a connection that sent no complete headers within %g s", header_timeout_s)
                self.transport.close()

    return HeaderTimeoutProtocol
