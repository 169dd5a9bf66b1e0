"""One pub/sub connection to one node: its socket, its tasks and its readiness flags.

The link does the I/O; what the replies mean is its :class:`PubSubProtocol`'s to say.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from broadcaster.backends.redis.protocol import Command, PubSubProtocol

log = logging.getLogger("broadcaster.backend.redis")


class Link:
    """The pub/sub connection to one node: its channels, its reader and idle-probe tasks, its state.

    ``channels`` are the wanted channels placed on this node: subscribed, or to be
    subscribed as soon as the connection is ready. ``protocol`` holds what was sent
    and not answered yet, and the channels a (re)connection still waits the
    confirmation of.
    """

    def __init__(self, name: str, *, sharded: bool) -> None:
        self.name = name
        self.conn: AbstractConnection | None = None
        self.channels: dict[bytes, None] = {}
        self.protocol = PubSubProtocol(sharded=sharded)
        self.ready = False
        """Connected and read: a new subscription is sent right away."""
        self.up = False
        """Ready, and every channel placed here before the connection was resubscribed."""
        self.ever_up = False
        self.tried = False
        self.lost = asyncio.Event()
        self.wake = asyncio.Event()
        self.pong: asyncio.Future[None] | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.supervisor: asyncio.Task[None] | None = None

    @property
    def received(self) -> int:
        """Replies read on this link so far (any kind)."""
        return self.protocol.received

    async def send(self, command: Command) -> None:
        """Write ``command``; ConnectionError if the link is not connected (never reconnected silently)."""
        conn = self.conn
        if conn is None or not conn.is_connected:  # never let redis-py reconnect it silently
            raise ConnectionError(f"no pub/sub connection to {self.name}")
        await conn.send_command(*command, check_health=False)

    def begin_round(self, channels: Sequence[bytes]) -> None:
        """Wait for the confirmation of ``channels``, which a fresh connection subscribes again."""
        self.protocol.begin_round(channels)
        self.wake.clear()

    def settle(self, channel: bytes) -> None:
        """``channel`` no longer holds up the current (re)subscription round."""
        if self.protocol.settle(channel):
            self.wake.set()

    async def teardown(self) -> None:
        self.ready = self.up = False
        self.protocol.reset()
        tasks, self.tasks = self.tasks, []
        await cancel_tasks(tasks)
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            await conn.disconnect(nowait=True)
        except (RedisError, OSError) as exc:
            log.debug("closing the pub/sub connection to %s: %r", self.name, exc)
        except Exception:
            log.exception("closing the pub/sub connection to %s failed", self.name)


async def cancel_tasks(tasks: Sequence[asyncio.Task[Any] | None]) -> None:
    """Cancel ``tasks`` and wait until they ended; their outcome is consumed (nothing logged later)."""
    pending = [task for task in tasks if task is not None]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    for task in pending:
        if not task.cancelled() and task.exception() is not None:
            log.debug("task %r ended with %r", task.get_name(), task.exception())
