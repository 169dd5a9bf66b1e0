"""Which node a pub/sub channel lives on, and fresh pub/sub connections to a node."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from broadcaster.backends.redis.clients import AsyncClient

MAIN = "main"
"""The one node of a standalone server."""


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
