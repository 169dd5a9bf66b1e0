"""Making redis-py clients: the options every client of ours shares, and the asyncio client.

The sync client of the producer SDK (``producers.redis_transport``) takes its
options from :func:`client_options` too, so TLS, credentials and timeouts are
decided in one place.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from broadcaster.backends import scripts

AsyncClient = Redis | RedisCluster

CONNECT_TIMEOUT = 2.0
"""Seconds to open a TCP connection to Redis before the attempt counts as failed."""
COMMAND_TIMEOUT = 5.0
"""Seconds to wait for a command's reply before the attempt counts as failed."""
MAX_CONNECTIONS = 50
"""Command connections an asyncio client opens at most (per node of a cluster)."""
POOL_TIMEOUT = 10.0
"""Seconds a command waits for a free pooled connection before it counts as a (transient) failure."""


def client_options(target: scripts.RedisTarget) -> dict[str, Any]:
    """Keyword arguments every redis-py client of ours gets, sync or asyncio.

    RESP2 and bytes, our timeouts, no health checks (we probe ourselves); for a cluster
    also its credentials and TLS settings, and partial coverage: a shard down (its
    slots uncovered) must not stop the client from serving the others.
    """
    options: dict[str, Any] = {
        "protocol": 2,
        "decode_responses": False,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": COMMAND_TIMEOUT,
        "health_check_interval": 0,
    }
    if target.is_cluster:
        options.update(target.cluster_options(), require_full_coverage=False)
    return options


def sentinel_kwargs(target: scripts.RedisTarget) -> dict[str, Any]:
    """How our clients talk to the sentinels of a ``redis+sentinel://`` target (sync or asyncio)."""
    return {"socket_connect_timeout": CONNECT_TIMEOUT, "socket_timeout": CONNECT_TIMEOUT, "protocol": 2,
            **target.sentinel_options()}


def make_async_client(target: scripts.RedisTarget, *, max_connections: int = MAX_CONNECTIONS) -> AsyncClient:
    """A redis-py asyncio client for ``target``; its own retries are off (our policy retries).

    For a sentinel target, a client of the service's current master (redis-py's
    ``SentinelConnectionPool``: not a blocking one, a command finding every
    connection busy fails as transient and is retried).

    At most ``max_connections`` command connections (per node of a cluster). On a
    single server a command finding them all busy waits for one (a blocking pool)
    instead of failing; a cluster node's pool cannot wait, so :class:`RedisCommands`
    keeps the number of commands in flight within the same bound.
    """
    if target.is_sentinel:
        # The pool asks the sentinels for the master's address whenever it opens a connection,
        # and a READONLY reply (a demoted master) drops the connection as a (retried) ConnectionError.
        sentinels = list(target.sentinel_nodes)
        sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs(target))  # type: ignore[no-untyped-call]
        client: Redis = sentinel.master_for(target.service_name, redis_class=Redis,
                                            connection_pool_class=SentinelConnectionPool,
                                            retry=Retry(NoBackoff(), 0), max_connections=max_connections,
                                            **client_options(target), **target.master_options())
        return client
    if target.is_cluster:
        nodes = [ClusterNode(host, port) for host, port in target.cluster_nodes]
        # One immediate in-client retry lets redis-py refresh its slot map after a MOVED/failover.
        return RedisCluster(startup_nodes=nodes, retry=Retry(NoBackoff(), 1), max_connections=max_connections,
                            **client_options(target))
    pool = BlockingConnectionPool.from_url(target.url, retry=Retry(NoBackoff(), 0), max_connections=max_connections,
                                           timeout=POOL_TIMEOUT, **client_options(target))
    return Redis.from_pool(pool)
