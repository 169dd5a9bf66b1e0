"""Which node a pub/sub channel lives on, fresh pub/sub connections to a node, and a sentinel
master's switches as the sentinels announce them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from broadcaster.backends.redis.clients import AsyncClient

log = logging.getLogger("broadcaster.backend.redis")

MAIN = "main"
"""The one node of a standalone server."""
SWITCH_CHANNEL = "+switch-master"
"""The sentinels' pub/sub channel announcing a new master: ``<service> <old ip> <old port> <new ip> <new port>``."""
SWITCH_RETRY = 1.0
"""Seconds before listening again to a sentinel that could not be reached or dropped the connection."""
_SENTINEL_ERRORS = (RedisError, OSError, TimeoutError)


class MasterSwitches:
    """While open (``async with``): the ``+switch-master`` announcements of one service's sentinels.

    One pub/sub connection per sentinel, since each announces a switch once it knows of
    it (the failover's leader first, the others when its hello reaches them, up to about
    2 s later); one that cannot be reached is tried again every :data:`SWITCH_RETRY`
    seconds. Missing announcements (every sentinel unreachable) only make :meth:`wait` wait
    its full timeout, so a caller still polls the sentinels then.

    ``sentinels`` is the very list redis-py's ``Sentinel`` asks in order (``discover_master``
    takes the first sentinel naming a master in good state): the sentinel that announced a
    switch is moved to its front, so the next connection, of the pub/sub link or of the
    command pool, asks it first instead of one still naming the old master.
    """

    def __init__(self, sentinels: list[Redis], service: str, retry: float = SWITCH_RETRY) -> None:
        self._order, self._sentinels, self._service, self._retry = sentinels, list(sentinels), service, retry
        self._announced: tuple[str, int] | None = None
        self._event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> MasterSwitches:
        self._tasks = [asyncio.create_task(self._listen(sentinel)) for sentinel in self._sentinels]
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def wait(self, timeout: float) -> tuple[str, int] | None:
        """The master announced since the last call (at once if one was), or None after ``timeout`` seconds."""
        if not self._event.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._event.wait()
        if not self._event.is_set():
            return None
        self._event.clear()
        announced, self._announced = self._announced, None
        return announced

    def announce(self, data: bytes | str, source: Redis | None = None) -> None:
        """One message of :data:`SWITCH_CHANNEL` from sentinel ``source``: remember its new master if it is
        this service's, and ask ``source`` first from now on."""
        parts = (data.decode() if isinstance(data, bytes) else data).split()
        if len(parts) != 5 or parts[0] != self._service or not parts[4].isdigit():
            return
        self._announced = (parts[3], int(parts[4]))
        self._event.set()
        if source is not None and source in self._order:
            at = self._order.index(source)
            self._order[0], self._order[at] = self._order[at], self._order[0]  # as discover_master reorders it

    async def _listen(self, sentinel: Redis) -> None:
        while True:
            pubsub = sentinel.pubsub()
            try:
                await pubsub.subscribe(SWITCH_CHANNEL)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self._retry)
                    if message is not None and message.get("type") == "message":
                        self.announce(message["data"], sentinel)
            except _SENTINEL_ERRORS as exc:
                log.debug("listening to %s on a sentinel failed: %r", SWITCH_CHANNEL, exc)
            finally:
                with contextlib.suppress(*_SENTINEL_ERRORS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(self._retry)


class Topology:
    """Which node a channel lives on, and fresh pub/sub connections to a node (by name).

    On a single server there is one node, ``"main"``. On a cluster the slot map is
    redis-py's (shared with the command client); a ``MOVED`` reply to a subscription
    overrides the owner of its slot until the next full refresh.
    """

    def __init__(self, client: AsyncClient) -> None:
        self._cluster = client if isinstance(client, RedisCluster) else None
        self._single = client if isinstance(client, Redis) else None
        self._initialised = False
        self._moved: dict[int, str] = {}

    async def refresh(self) -> None:
        """Load the slot map again (``CLUSTER SLOTS``); nothing to do on a single server."""
        if self._cluster is None:
            return
        if self._initialised:
            await self._cluster.nodes_manager.initialize()
        else:
            await self._cluster.initialize()
            self._initialised = True
        self._moved.clear()

    @property
    def sentinel(self) -> bool:
        """True for a master found through Redis Sentinel (``redis+sentinel://``): its address can change."""
        return self._single is not None and isinstance(self._single.connection_pool, SentinelConnectionPool)

    async def master_address(self) -> tuple[str, int] | None:
        """The master's address as the sentinels say now (None unless :attr:`sentinel`).

        Asking also moves the command pool to a new master: redis-py's pool drops its idle
        connections to the old one when the address changed.
        """
        if self._single is None:
            return None
        pool = self._single.connection_pool
        if not isinstance(pool, SentinelConnectionPool):
            return None
        host, port = await pool.get_master_address()  # type: ignore[no-untyped-call]
        return str(host), int(port)

    def master_switches(self) -> MasterSwitches | None:
        """The sentinels' announcements of a new master (None unless :attr:`sentinel`); open it with ``async with``."""
        if self._single is None:
            return None
        pool = self._single.connection_pool
        if not isinstance(pool, SentinelConnectionPool):
            return None
        return MasterSwitches(pool.sentinel_manager.sentinels, str(pool.service_name))

    def primaries(self) -> list[str]:
        if self._cluster is None:
            return [MAIN]
        return [node.name for node in self._cluster.get_primaries()]

    def node_of(self, channel: bytes) -> str | None:
        """The node owning ``channel``'s slot, or None while no node is known to own it."""
        if self._cluster is None:
            return MAIN
        moved = self._moved.get(key_slot(channel))
        if moved is not None:
            return moved
        try:
            node = self._cluster.get_node_from_key(channel.decode())
        except (RedisClusterException, RedisError):  # SlotNotCoveredError: a shard down, a map being refreshed
            return None
        return node.name if node is not None else None

    def moved(self, slot: int, name: str) -> None:
        """Record a ``MOVED`` reply: ``slot`` is served by node ``name`` now."""
        self._moved[slot] = name

    def connection(self, name: str) -> AbstractConnection:
        """A new, unconnected pub/sub connection to node ``name`` (TLS and credentials as the client's)."""
        overrides = {"protocol": 2, "socket_timeout": None, "health_check_interval": 0}
        if self._cluster is None:
            assert self._single is not None
            pool = self._single.connection_pool
            return pool.connection_class(**{**pool.connection_kwargs, **overrides})
        node = self._cluster.get_node(node_name=name)
        if node is None:  # named by a MOVED reply before the slot map knew it
            host, _, port = name.rpartition(":")
            node = ClusterNode(host, int(port), **self._cluster.nodes_manager.connection_kwargs)
        connection: AbstractConnection = node.connection_class(**{**node.connection_kwargs, **overrides})
        return connection
