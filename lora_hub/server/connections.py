"""Connections that cannot be held open for free: uvicorn's HTTP/1.1 protocol, with a deadline for each request
head. uvicorn times out idle keep-alive connections only after a first response; a client that connects and sends
nothing, or trickles a request head a byte at a time, would otherwise keep its connection (and a file descriptor)
forever. Here every connection must deliver a complete request head within `head_timeout` seconds of connecting or
of its previous response, or it is closed.
"""

from __future__ import annotations

import asyncio
import functools

HEAD_TIMEOUT = 30.0
"""Seconds a connection may take to deliver a request head."""


@functools.cache
def bounded_protocol(head_timeout: float = HEAD_TIMEOUT) -> type:
    """uvicorn's H11Protocol with a deadline of `head_timeout` seconds for every request head (see the module docs).
    uvicorn is imported here, when a server is made: it imports click, which lora_hub itself never does."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_deadline: asyncio.TimerHandle | None = None
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is in: the request is being served
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_deadline = self.loop.call_later(head_timeout, self._expire)

        def _disarm(self) -> None:
            deadline = getattr(self, "_head_deadline", None)
            if deadline is not None:
                deadline.cancel()
                self._head_deadline = None

        def _expire(self) -> None:
            self._head_deadline = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.close()

    return BoundedH11Protocol
