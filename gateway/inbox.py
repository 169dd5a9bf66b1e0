"""Per-socket waits of uvicorn's websocket protocol, without asyncio's per-object deques.

uvicorn's sans-I/O protocol keeps an ``asyncio.Queue`` of received ASGI messages and an
``asyncio.Event`` telling whether the transport takes writes. An idle socket pays for
them about 3.8 KB: the Queue holds three ``collections.deque`` and an Event of its own,
and every Event a deque of waiters (~760 B each with its first block). :class:`Inbox`
and :class:`WriteGate` do the same for what the protocol calls (checked at start-up,
``gateway.compat`` feature ``light_waits``) with a list and at most one future.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Inbox:
    """An unbounded FIFO with ``put_nowait``, ``get`` and ``empty``, for one reader (the ASGI app's
    ``receive``); a cancelled ``get`` leaves the items where they were."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    async def get(self) -> Any:
        while not self._items:
            waiter = self._waiter
            if waiter is None or waiter.done():
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter
        return self._items.pop(0)


class WriteGate:
    """``asyncio.Event``'s ``set`` / ``clear`` / ``is_set`` / ``wait``, with no waiter list until one waits."""

    __slots__ = ("_open", "_waiters")

    def __init__(self, is_open: bool = True) -> None:
        self._open = is_open
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        if self._open:
            return
        self._open = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._open = False

    async def wait(self) -> bool:
        """Return at once while set; else when :meth:`set` is next called (even if cleared again since)."""
        if self._open:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True
