"""The transport half: one bounded byte queue and one writer per websocket.

Nothing else in the project writes to a socket. The hub queues encoded JSON
objects with :meth:`Connection.send`; everything queued since the last write goes
out as one text frame, objects separated by ``\\n``. A connection whose queue
passes ``max_queue_bytes`` is closed 4408 and its queue dropped, so memory per
connection stays bounded.

Two ways to the socket, one order. When the server offers a synchronous send
(``scope["extensions"][DIRECT_SEND]``, see ``gateway.server``), the pool flushes
every connection that got something once per event-loop pass (one callback for
all of them, after the dispatch that filled their queues); when that send cannot
write at once (socket paused, closing) or is absent, the connection's writer task
sends through the ASGI ``send`` as before. Only one of them writes at a time, so
frames never overtake each other.

Shared frames. The hub queues the same bytes object to every member of a profile
group, and a server frame is unmasked, so on every uncompressed socket that frame
is the same bytes. In its flush pass the pool builds the frame of a payload once
(:func:`text_frame`) and hands it to each connection whose queue holds just that
payload, through the server's :data:`FrameWrite` (``scope["extensions"][DIRECT_FRAME]``);
a connection that cannot take it as it is (paused, output pending, closing) goes its
own way above, in order. The frame depends on the socket's *frame kind*
(``scope["extensions"][FRAME_KIND]``, :func:`gateway.deflate.frame_kind`): plain for a
socket without extensions, or compressed once per payload for every socket with
permessage-deflate without server context takeover and the same window
(:func:`gateway.deflate.deflate_frame`; the plain frame when compressing does not
shrink it). A socket with context takeover is offered no frame write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import MethodType
from typing import Any

from gateway.deflate import PLAIN, deflate_frame

log = logging.getLogger("gateway.connection")

AsgiSend = Callable[[dict[str, Any]], Awaitable[None]]
DirectSend = Callable[[bytes], bool]
"""Writes one text frame now and returns True, or returns False when it cannot without waiting."""
FrameWrite = Callable[[bytes], bool]
"""Writes one complete websocket frame (:func:`text_frame`) now and returns True, or returns False when
the socket cannot take those exact bytes now (paused, closing, output of its own pending)."""
CLOSE_TOO_SLOW = 4408
DIRECT_SEND = "gateway.direct_send"
"""ASGI scope extension holding the server's :data:`DirectSend` for the socket."""
DIRECT_FRAME = "gateway.direct_frame"
"""ASGI scope extension holding the server's :data:`FrameWrite` for a socket that can take shared frames."""
FRAME_KIND = "gateway.frame_kind"
"""ASGI scope extension: the frame kind of that socket (:func:`gateway.deflate.frame_kind`; absent: plain)."""

_HEADS = [bytes((0x81, size)) for size in range(126)]


def text_frame(payload: bytes) -> bytes:
    """``payload`` as one final, unmasked websocket text frame (RFC 6455 §5.2): what a server writes,
    the same bytes for every socket without extensions."""
    size = len(payload)
    if size < 126:
        return _HEADS[size] + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


_direct_send_enabled = True


def enable_direct_send(enabled: bool) -> None:
    """Whether :func:`direct_send_of` looks for the server's direct send; set by ``gateway.server`` from the
    start-up check (``gateway.compat``, feature ``direct_send``: Starlette's ``WebSocket.send`` and ``scope``)."""
    global _direct_send_enabled
    _direct_send_enabled = enabled


def direct_send_of(send: AsgiSend) -> DirectSend | None:
    """The synchronous send the server put in the scope of ``send``'s websocket (a Starlette
    ``WebSocket.send``), or None."""
    return _writers_of(send)[0]


def _writers_of(send: AsgiSend) -> tuple[DirectSend | None, FrameWrite | None, int]:
    """The :data:`DirectSend`, :data:`FrameWrite` and frame kind in the scope of ``send``'s websocket; the
    frame write only with the direct send."""
    if not _direct_send_enabled or not isinstance(send, MethodType):
        return None, None, PLAIN
    websocket: Any = send.__self__  # Starlette's WebSocket: its ``scope`` is checked at start-up by gateway.compat
    scope = getattr(websocket, "scope", None)
    extensions = (scope.get("extensions") if isinstance(scope, dict) else None) or {}  # optional in ASGI
    direct = extensions.get(DIRECT_SEND)
    if not callable(direct):
        return None, None, PLAIN
    frame = extensions.get(DIRECT_FRAME)
    kind = extensions.get(FRAME_KIND, PLAIN)
    return direct, frame if callable(frame) else None, kind if isinstance(kind, int) else PLAIN


@dataclass(slots=True)
class PoolStats:
    """Counters of the whole pool (read by the metrics collector, never locked)."""

    connections_opened: int = 0
    frames_written: int = 0
    bytes_written: int = 0
    objects_written: int = 0
    slow_consumer_closes: int = 0
    deflated_built: int = 0
    """Payloads compressed once for every permessage-deflate socket of one window (shared frames)."""
    deflated_written: int = 0
    """Shared frames written to permessage-deflate sockets (compressed, or plain where that was smaller)."""
    queued_bytes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


class Connection:
    """One websocket's outgoing side. ``send`` never blocks; ``close`` is idempotent."""

    __slots__ = (
        "_close",
        "_deflate_write",
        "_direct",
        "_frame_kind",
        "_frame_write",
        "_gone",
        "_queue",
        "_queued",
        "_send",
        "_sending",
        "_waiting_since",
        "_wake",
        "connection_id",
        "convs",
        "info",
        "max_queue_bytes",
        "observe_wait",
        "pool",
        "profile",
        "user",
        "writer",
    )

    def __init__(self, send: AsgiSend, connection_id: str, profile: str, pool: ConnectionPool,
                 max_queue_bytes: int, observe_wait: Callable[[float], None] | None = None) -> None:
        self.connection_id = connection_id
        self.profile = profile
        self.pool = pool
        self.max_queue_bytes = max_queue_bytes
        self.convs: set[str] = set()
        self.user: str | None = None
        """The token's ``sub`` (None with auth off, or a token without one): revocation, presence users."""
        self.info: Any = None
        """The token's ``info`` claim, if any."""
        self.observe_wait = observe_wait
        self._send = send
        self._direct, self._frame_write, self._frame_kind = _writers_of(send)
        self._deflate_write: FrameWrite | None = None
        if self._frame_kind != PLAIN:  # kept apart: the pool's plain path then tests nothing more per socket
            self._deflate_write, self._frame_write = self._frame_write, None
        self._sending = False
        self._gone = False
        self._queue: list[bytes] = []
        self._queued = 0
        self._waiting_since = 0.0
        self._wake: asyncio.Event | None = None  # made with the writer task
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
        queue, pool = self._queue, self.pool
        if not queue:
            if self._direct is not None:
                dirty = pool._dirty  # ConnectionPool.flush_soon, inlined: this runs once per delivery
                if not dirty:
                    pool._dirty_since = time.monotonic()
                    asyncio.get_running_loop().call_soon(pool._flush_dirty)
                dirty.append(self)
                self._waiting_since = pool._dirty_since
            else:
                self._waiting_since = time.monotonic()
                self.wake_writer()
        queue.append(data)
        size = len(data)
        self._queued += size
        pool.stats.queued_bytes += size
        if self._queued > self.max_queue_bytes:
            pool.stats.slow_consumer_closes += 1
            pool.stats.drop("slow_consumer", len(queue))
            self.close(CLOSE_TOO_SLOW, "too slow: queue over max-queue-bytes")

    def close(self, code: int, reason: str = "") -> None:
        """Drop what is queued, send a close frame with ``code`` and stop writing."""
        if self._close is not None:
            return
        self._close = (code, reason[:120])
        self._frame_write = self._deflate_write = None
        self.pool.stats.queued_bytes -= self._queued
        self._queue, self._queued = [], 0
        self.wake_writer()

    def flush(self) -> None:
        """Write what is queued as one frame through the direct send, or leave it to the writer task."""
        if self._close is not None or self._gone or not self._queue:
            return
        direct = self._direct
        if direct is None or self._sending:
            self.wake_writer()
            return
        batch, size = self._queue, self._queued
        frame = b"\n".join(batch) if len(batch) > 1 else batch[0]
        try:
            written = direct(frame)
        except Exception as exc:  # the writer's ASGI send meets the same failure and stops
            log.debug("direct send to %s failed: %s", self.connection_id, exc)
            written = False
        if not written:
            self.wake_writer()
            return
        self._queue, self._queued = [], 0
        stats = self.pool.stats
        stats.queued_bytes -= size
        if self.observe_wait is not None:
            self.observe_wait(time.monotonic() - self._waiting_since)
        stats.frames_written += 1
        stats.objects_written += len(batch)
        stats.bytes_written += len(frame)

    def wake_writer(self) -> None:
        """Have the writer task send what is queued (or the close frame); it is started on first need.

        With a direct send most sockets never need it: no task, no event per idle socket.
        """
        if self._gone:
            return
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self.writer is None:
            self.writer = asyncio.create_task(self.run_writer())

    def discard(self) -> None:
        """The socket is gone and its writer (if any) finished: drop what is queued, write nothing more."""
        self._gone = True
        self._frame_write = self._deflate_write = None
        if self._queued:
            self.pool.stats.queued_bytes -= self._queued
        self._queue, self._queued = [], 0

    async def run_writer(self) -> None:
        """Write queued objects as batched frames until closed or the peer is gone."""
        stats = self.pool.stats
        if self._wake is None:
            self._wake = asyncio.Event()
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
                self._sending = True
                try:
                    await self._send({"type": "websocket.send", "text": frame.decode()})
                finally:
                    self._sending = False
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


def _observe(observe: Callable[[float], None] | None, wait: float, count: int) -> None:
    """``count`` observations of ``wait``: in one call when ``observe`` is a bound method of something with
    ``observe_many`` (gateway.metrics.LoopHistogram), else one by one."""
    if observe is None or count <= 0:
        return
    many = getattr(getattr(observe, "__self__", None), "observe_many", None)
    if many is not None and getattr(observe, "__name__", None) == "observe":
        many(wait, count)
        return
    for _ in range(count):
        observe(wait)


class ConnectionPool:
    """Every open connection of this gateway, and the drain that closes them."""

    def __init__(self) -> None:
        self.connections: dict[str, Connection] = {}
        self.stats = PoolStats()
        self.draining = False
        self._emptied = asyncio.Event()
        self._dirty: list[Connection] = []
        self._dirty_since = 0.0

    def flush_soon(self, conn: Connection) -> float:
        """Have ``conn`` flushed in the next event-loop pass (one callback for every connection); returns
        when the first connection of that pass was queued (its objects' wait is counted from there)."""
        dirty = self._dirty
        if not dirty:
            self._dirty_since = time.monotonic()
            asyncio.get_running_loop().call_soon(self._flush_dirty)
        dirty.append(conn)
        return self._dirty_since

    def _flush_dirty(self) -> None:
        """Write what each dirty connection queued; a lone payload goes out as the frame built once for
        every connection it was queued to (module docstring), anything else through ``flush``."""
        dirty, self._dirty = self._dirty, []
        frames: dict[bytes, bytes] = {}
        deflated: dict[int, dict[bytes, bytes]] = {}  # frame kind -> payload -> frame
        wait = time.monotonic() - self._dirty_since
        written = size = same = squeezed = 0
        observe: Callable[[float], None] | None = None  # the last connection's, seen ``same`` times in a row
        for conn in dirty:
            queue = conn._queue
            if len(queue) != 1 or conn._sending:
                conn.flush()
                continue
            payload = queue[0]
            write = conn._frame_write
            if write is not None:
                frame = frames.get(payload)
                if frame is None:
                    frame = frames[payload] = text_frame(payload)
            else:  # a permessage-deflate socket's lone payload: the frame its kind shares, or its own way
                write = conn._deflate_write
                if write is None:
                    conn.flush()
                    continue
                kind = conn._frame_kind
                by_payload = deflated.get(kind)
                if by_payload is None:
                    by_payload = deflated[kind] = {}
                frame = by_payload.get(payload)
                if frame is None:
                    frame = by_payload[payload] = self._deflated(frames, payload, kind)
            if not write(frame):
                conn.flush()
                continue
            conn._queue = []
            size += conn._queued
            conn._queued = 0
            written += 1
            if conn._frame_write is None:  # written through the deflate write
                squeezed += 1
            if conn.observe_wait == observe:  # the same histogram's bound method: counted, observed once
                same += 1
            else:
                _observe(observe, wait, same)
                observe, same = conn.observe_wait, 1
        _observe(observe, wait, same)
        if written:
            stats = self.stats
            stats.queued_bytes -= size
            stats.frames_written += written
            stats.objects_written += written
            stats.bytes_written += size
            stats.deflated_written += squeezed

    def _deflated(self, plain: dict[bytes, bytes], payload: bytes, kind: int) -> bytes:
        """The shared frame of ``payload`` for sockets of frame kind ``kind`` (deflate, its window bits),
        compressed now; the plain frame (from ``plain``, this pass's) when compressing does not shrink it."""
        self.stats.deflated_built += 1
        frame = deflate_frame(payload, kind)
        if frame is None:
            frame = plain.get(payload)
            if frame is None:
                frame = plain[payload] = text_frame(payload)
        return frame

    def __len__(self) -> int:
        return len(self.connections)

    def add(self, conn: Connection) -> None:
        self.connections[conn.connection_id] = conn
        self._emptied.clear()
        self.stats.connections_opened += 1
        if conn._direct is None:
            conn.wake_writer()

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
        conn.discard()

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
