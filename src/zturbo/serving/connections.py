"""uvicorn with bounds: how many connections, how long one may idle or take to send its request, and a
shutdown that stops the application's work before it waits for connections.

uvicorn closes an idle connection only after a response (never one that has sent nothing), never
times out a request that arrives slowly, and accepts connections until the process runs out of file
descriptors, after which every client, /health included, hangs. The protocol here closes those.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("zturbo.server")

_REFUSED_MESSAGE = "the server has too many open connections; retry"
_REFUSED_ERROR = {"type": "too_many_connections", "message": _REFUSED_MESSAGE, "field": None}
_REFUSED_BODY = json.dumps({"error": _REFUSED_ERROR}).encode()
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: " + str(len(_REFUSED_BODY)).encode() + b"\r\n\r\n" + _REFUSED_BODY
)


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1000
    keep_alive_s: float = 5.0  # a connection with no request in progress is closed after this long
    read_timeout_s: float = 30.0  # a request's headers and body must arrive within this of its first byte
    max_header_bytes: int = 16 << 10  # an incomplete header block larger than this is refused (400)


class BoundedConfig(uvicorn.Config):
    """uvicorn's Config carrying the limits to each connection's protocol."""

    def __init__(self, app: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(
            app,
            http=BoundedH11Protocol,
            timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]  # a float works: call_later
            h11_max_incomplete_event_size=limits.max_header_bytes,
            **kwargs,
        )
        self.connection_limits = limits


class BoundedH11Protocol(H11Protocol):
    """One HTTP/1.1 connection: idle from its first moment, a deadline on each request's arrival, and,
    past the connection limit, the longest-idle connection closed to make room (or this one refused)."""

    def __init__(self, config: BoundedConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.limits = config.connection_limits
        self.last_active = time.monotonic()  # opened, or last finished a response
        self._read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if _open_count(self) > self.limits.max_connections and not _evict_idle(self):
            log.warning("refused a connection: %d open, the limit", self.limits.max_connections)
            transport.write(REFUSED)
            transport.close()
            return
        # uvicorn arms this only after a response; a connection that never sends a request needs it too
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self._read_deadline is None and self.conn.their_state is h11.IDLE:
            self._read_deadline = self.loop.call_later(self.limits.read_timeout_s, self._read_timed_out)
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._cancel_read_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_deadline()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._cancel_read_deadline()
        self.last_active = time.monotonic()
        super().on_response_complete()

    def idle(self) -> bool:
        """No request is being handled: nothing is lost by closing it."""
        return self.cycle is None or self.cycle.response_complete

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if not self.transport.is_closing():
            log.info("closed a connection whose request took over %g s to arrive", self.limits.read_timeout_s)
            self.transport.close()

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None


def _open_count(newcomer: BoundedH11Protocol) -> int:
    """Connections not already closing (a closed one leaves the set only at its next loop turn)."""
    return sum(1 for c in newcomer.connections if not c.transport.is_closing())


def _evict_idle(newcomer: BoundedH11Protocol) -> bool:
    """Close the longest-idle other connection; False if every one is handling a request."""
    idle = [
        c
        for c in newcomer.connections
        if c is not newcomer and isinstance(c, BoundedH11Protocol) and c.idle() and not c.transport.is_closing()
    ]
    if not idle:
        return False
    oldest = min(idle, key=lambda c: c.last_active)
    oldest.transport.close()
    return True


class StoppingServer(uvicorn.Server):
    """uvicorn's server; on shutdown it first calls `on_stop` (no new jobs, event streams end), then
    waits for connections at most the configured grace, however many are open."""

    def __init__(self, config: BoundedConfig, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_stop = on_stop

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.on_stop()
        await super().shutdown(sockets)
