"""The transport half: one bounded byte queue and one writer per websocket.

Nothing else in the project writes to a socket. The hub queues encoded JSON
objects with :meth:`Connection.send`; the connection's writer task sends
everything queued since its last write as one text frame, objects separated by
``\\n``. A connection whose queue passes ``max_queue_bytes`` is closed 4408 and
its queue dropped, so memory per connection stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("gateway.connection")

AsgiSend = Callable[[dict[str, Any]], Awaitable[None]]
CLOSE_TOO_SLOW = 4408


@dataclass(slots=True)
class PoolStats:
    """Counters of the whole pool (read by the metrics collector, never locked)."""

    connections_opened: int = 0
    frames_written: int = 0
    bytes_written: int = 0
    objects_written: int = 0
    slow_consumer_closes: int = 0
    queued_bytes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


class Connection:
    """One websocket's outgoing side. ``send`` never blocks; ``close`` is idempotent."""

    __slots__ = (
        "_close",
        "_queue",
        "_queued",
        "_send",
        "_waiting_since",
        "_wake",
        "connection_id",
        "convs",
        "max_queue_bytes",
        "observe_wait",
        "pool",
        "profile",
        "writer",
    )

    def __init__(self, send: AsgiSend, connection_id: str, profile: str, pool: ConnectionPool,
                 max_queue_bytes: int, observe_wait: Callable[[float], None] | None = None) -> None:
        self.connection_id = connection_id
        self.profile = profile
        self.pool = pool
        self.max_queue_bytes = max_queue_bytes
        self.convs: set[str] = set()
        self.observe_wait = observe_wait
        self._send = send
        self._queue: list[bytes] = []
        self._queued = 0
        self._waiting_since = 0.0
        self._wake = asyncio.Event()
        self._close: tuple[int, str] | None = None
        self.writer: asyncio.Task[None] | None = None

    @property
    def closing(self) -> bool:
        return self._close is not None

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def send(self, data: bytes) -> None:
        """Queue one encoded JSON object; over the limit the connection is closed 4408."""
        if self._close is not None:
            self.pool.stats.drop("closing")
            return
        if not self._queue:
            self._waiting_since = time.monotonic()
            self._wake.set()
        self._queue.append(data)
        self._queued += len(data)
        self.pool.stats.queued_bytes += len(data)
        if self._queued > self.max_queue_bytes:
            self.pool.stats.slow_consumer_closes += 1
            self.pool.stats.drop("slow_consumer", len(self._queue))
            self.close(CLOSE_TOO_SLOW, "too slow: queue over max-queue-bytes")

    def close(self, code: int, reason: str = "") -> None:
        """Drop what is queued, send a close frame with ``code`` and stop writing."""
        if self._close is not None:
            return
        self._close = (code, reason[:120])
        self.pool.stats.queued_bytes -= self._queued
        self._queue, self._queued = [], 0
        self._wake.set()

    async def run_writer(self) -> None:
        """Write queued objects as batched frames until closed or the peer is gone."""
        stats = self.pool.stats
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._close is not None:
                    break
                if not self._queue:
                    continue
                batch, size = self._queue, self._queued
                self._queue, self._queued = [], 0
                stats.queued_bytes -= size
                if self.observe_wait is not None:
                    self.observe_wait(time.monotonic() - self._waiting_since)
                frame = b"\n".join(batch) if len(batch) > 1 else batch[0]
                await self._send({"type": "websocket.send", "text": frame.decode()})
                stats.frames_written += 1
                stats.objects_written += len(batch)
                stats.bytes_written += len(frame)
            code, reason = self._close
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the peer went away mid-write: the reader sees the disconnect
            log.debug("writer of %s stopped: %s", self.connection_id, exc)
        finally:
            if self._queued:
                stats.queued_bytes -= self._queued
                self._queue, self._queued = [], 0


class ConnectionPool:
    """Every open connection of this gateway, and the drain that closes them."""

    def __init__(self) -> None:
        self.connections: dict[str, Connection] = {}
        self.stats = PoolStats()
        self.draining = False
        self._emptied = asyncio.Event()

    def __len__(self) -> int:
        return len(self.connections)

    def add(self, conn: Connection) -> None:
        self.connections[conn.connection_id] = conn
        self._emptied.clear()
        self.stats.connections_opened += 1
        conn.writer = asyncio.create_task(conn.run_writer())

    async def remove(self, conn: Connection) -> None:
        """Forget ``conn`` once its writer finished (or cancel it if the peer is gone)."""
        self.connections.pop(conn.connection_id, None)
        if not self.connections:
            self._emptied.set()
        writer = conn.writer
        if writer is not None and not writer.done():
            if not conn.closing:
                writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(writer, timeout=1.0)

    async def drain(self, seconds: float, code: int, reason: str) -> None:
        """After a short readiness grace, close every connection with ``code`` spread over half of
        ``seconds``, then wait (until ``seconds`` have passed) for them to go."""
        self.draining = True
        deadline = time.monotonic() + seconds
        # let load balancers see /readyz fail before sockets start closing
        await asyncio.sleep(min(1.0, seconds / 4))
        victims = list(self.connections.values())
        spread = seconds / 2
        batch = max(1, len(victims) // 20)
        for index in range(0, len(victims), batch):
            for conn in victims[index:index + batch]:
                conn.close(code, reason)
            if spread > 0 and len(victims) > batch:
                await asyncio.sleep(spread / 20)
        if self.connections:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), max(0.0, deadline - time.monotonic()))
