"""A bound on how long a connection may take to send a request's headers.

uvicorn times out neither a connection that sends nothing nor headers trickled one byte at a
time: its keep-alive timer runs only between requests and every byte received cancels it, so a
slow client could hold a connection (and its file descriptor) forever, and a few thousand such
clients every descriptor of the process. The clock starts when the connection opens and again
at each request's first byte; it stops once the headers are complete (the body has its own
timeout, `MILLIMETRIC_BODY_TIMEOUT_S`). A client past it is disconnected without an answer.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose headers are late."""

    header_timeout_s = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the clock for the first request's headers."""
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        """A request's first byte: its headers must be complete in time."""
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        """Headers complete: the app (and the body timeout) takes over."""
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        """Nothing left to time."""
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def with_header_timeout(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class to give uvicorn (`http=`), with this header timeout."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": seconds})
