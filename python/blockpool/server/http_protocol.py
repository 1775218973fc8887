"""uvicorn's HTTP/1.1 protocol with a deadline for request headers.

uvicorn closes idle keep-alive connections, but a connection that sends
part of its headers and stalls (or sends nothing at all after connecting)
is held open for as long as the client likes: enough of them exhaust the
server's file descriptors. Here every connection that is waiting for a
request's headers has ``header_timeout`` seconds to finish them; past it the
connection is closed. ``--max-connections`` (uvicorn's
``limit_concurrency``) bounds how many are open at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def with_header_deadline(header_timeout: float) -> type[H11Protocol]:
    """An :class:`H11Protocol` subclass closing connections whose headers take over ``header_timeout`` s."""

    class HeaderDeadlineProtocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_deadline: Any = None
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                # Bytes of a request, its headers not complete (between requests, uvicorn's keep-alive timer runs).
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_deadline is None and not self.transport.is_closing():
                self._header_deadline = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _headers_late(self) -> None:
            self._header_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol
