"""The Redis backend: standalone Redis (``redis://``, ``rediss://``), Redis Cluster
(``redis+cluster://``, ``rediss+cluster://`` for TLS) or a master found through Redis
Sentinel (``redis+sentinel://``, ``rediss+sentinel://``).

One job per module:

* ``clients`` — the options every redis-py client of ours gets, and the asyncio
  client (:func:`client_options`, :func:`make_async_client`).
* ``commands`` — :class:`RedisCommands`: publish, reads and presence, one Lua
  script per operation (``scripts.py``), pipelined where there are several,
  transient errors retried under :class:`broadcaster.retry.RetryPolicy`. The async
  SDK uses it as is.
* ``topology`` — which node a channel lives on (the cluster slot map, ``MOVED``
  overrides), and fresh pub/sub connections to a node.
* ``protocol`` — :class:`PubSubProtocol`: what each reply read on a pub/sub
  connection means (confirmations, messages, error replies, pongs; what was sent
  and not answered yet), with no I/O at all.
* ``link`` and ``subscriber`` — live delivery: ONE pub/sub connection per process
  (per primary on a cluster, with SSUBSCRIBE), read by a task of our own rather
  than by redis-py's ``PubSub``, which neither reconnects nor notices a dead link
  (redis-py #2089, #2417). The reader calls ``read_response()`` on the raw
  connection in a loop and feeds the link's protocol: cheaper per message than
  ``PubSub.listen()`` (no message dicts, no health check), and it sees the
  SUBSCRIBE confirmations, so ``subscribe`` returns only once Redis confirmed. An
  idle probe PINGs a quiet connection and rebuilds it when no PONG comes back (a
  silent link, e.g. a failover behind a proxy). Each connection is rebuilt on its
  own: only its channels are subscribed again and only their conversations go to
  the resubscribe callbacks (the hub repairs those from history); a channel whose
  cluster slot moved is subscribed again on its new owner alone.
* ``replication`` — ``wait_replicas``: ``WAIT`` after each publish, :class:`NotReplicated`
  when fewer replicas confirm (gateway and SDKs).
* ``backend`` — :class:`RedisBackend` joins the two halves with the shared
  :class:`ChannelRegistry`.

Sentinel: the clients come from redis-py's ``SentinelConnectionPool`` (every new
connection asks the sentinels for the master; ``READONLY`` drops a connection to a
demoted one); a pub/sub link checks ``ROLE`` before it subscribes and asks the sentinels
every second whether the master moved, and is rebuilt on the new master if so.
"""

from __future__ import annotations

from broadcaster.backends.redis.backend import RedisBackend
from broadcaster.backends.redis.clients import (
    COMMAND_TIMEOUT,
    CONNECT_TIMEOUT,
    MAX_CONNECTIONS,
    AsyncClient,
    client_options,
    make_async_client,
)
from broadcaster.backends.redis.commands import RedisCommands, send_on_one_connection
from broadcaster.backends.redis.protocol import PubSubProtocol

__all__ = [
    "COMMAND_TIMEOUT",
    "CONNECT_TIMEOUT",
    "MAX_CONNECTIONS",
    "AsyncClient",
    "PubSubProtocol",
    "RedisBackend",
    "RedisCommands",
    "client_options",
    "make_async_client",
    "send_on_one_connection",
]
