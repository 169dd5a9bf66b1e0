"""One timer per half second for the websocket pings of every socket, instead of a TimerHandle each.

uvicorn's protocol arms ``loop.call_later(interval, self.send_keepalive_ping)`` per socket
and keeps the handle in ``ping_timer`` (about 550 bytes per idle socket with its bound
method and arguments). :class:`PingWheel` keeps each waiting socket in the set of the
:data:`RESOLUTION` tick it is due in, with one loop timer per tick that has any; a ping
goes out up to :data:`RESOLUTION` later than asked. What ``ping_timer`` holds then is a
:class:`PingEntry`, whose ``cancel`` is all uvicorn calls on it (checked at start-up,
``gateway.compat`` feature ``shared_ping_timer``).

Sockets that connected in the same half second (a ramp, a reconnect storm) are due in the
same tick every ping interval from then on. A tick sends at most :data:`BATCH` pings per
loop callback and the rest in callbacks of their own, so I/O (a Redis PONG, a handshake)
is served between them. A ping costs ~50-150 µs (py-spy, loaded 2-core VM); a tick holds
as many as sockets connected in that half second (hundreds at this VM's accept rate,
every socket of a reconnect storm on a faster host), all in one callback before.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from typing import Protocol

log = logging.getLogger("gateway.keepalive")


class Pinger(Protocol):
    def send_keepalive_ping(self) -> None: ...


RESOLUTION = 0.5
"""Seconds per tick: how much later than due a ping may go out."""

BATCH = 200
"""Pings sent per loop callback (~10-30 ms); a tick due for more sends the rest in later callbacks."""


class PingEntry:
    """One socket waiting for its next ping; ``cancel`` takes it out."""

    __slots__ = ("_bucket", "pinger")

    def __init__(self, bucket: set[PingEntry], pinger: Pinger) -> None:
        self._bucket = bucket
        self.pinger: Pinger | None = pinger

    def cancel(self) -> None:
        self.pinger = None
        self._bucket.discard(self)


class PingWheel:
    """The ping ticks of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ticks: dict[int, set[PingEntry]] = {}

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._ticks.values())

    def call_later(self, delay: float, pinger: Pinger) -> PingEntry:
        """Have ``pinger.send_keepalive_ping()`` called in ``delay`` seconds (rounded up to a tick)."""
        tick = math.ceil((self._loop.time() + delay) / RESOLUTION)
        bucket = self._ticks.get(tick)
        if bucket is None:
            bucket = self._ticks[tick] = set()
            self._loop.call_at(tick * RESOLUTION, self._fire, tick)
        entry = PingEntry(bucket, pinger)
        bucket.add(entry)
        return entry

    def _fire(self, tick: int) -> None:
        bucket = self._ticks.pop(tick, None)
        if bucket:
            self._send(list(bucket), 0)  # a copy: a socket closing between batches takes itself out of the set

    def _send(self, entries: list[PingEntry], start: int) -> None:
        end = start + BATCH
        for entry in entries[start:end]:
            pinger, entry.pinger = entry.pinger, None
            if pinger is not None:  # None: cancelled, perhaps while waiting for its batch
                try:
                    pinger.send_keepalive_ping()
                except Exception:  # one socket's failure must not cost the others their pings
                    log.exception("keepalive ping failed")
        if end < len(entries):
            self._loop.call_soon(self._send, entries, end)


_wheels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PingWheel] = weakref.WeakKeyDictionary()


def wheel_of(loop: asyncio.AbstractEventLoop) -> PingWheel:
    """The :class:`PingWheel` of ``loop`` (made on first use)."""
    wheel = _wheels.get(loop)
    if wheel is None:
        wheel = _wheels[loop] = PingWheel(loop)
    return wheel
