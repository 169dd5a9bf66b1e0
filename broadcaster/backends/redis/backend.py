"""The Redis backend itself: the command half and the pub/sub half behind :class:`Backend`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from broadcaster.backend import (
    Backend,
    BackendSettings,
    BackendStats,
    ControlListener,
    Head,
    HistoryPage,
    HistoryRead,
    Listener,
    PolicyInfo,
    Presence,
    PresenceUsers,
    ReconnectCallback,
    ResubscribeCallback,
    StateSnapshot,
    UserCounts,
    UserReport,
)
from broadcaster.backends import scripts
from broadcaster.backends.base import ChannelRegistry, new_epoch, prepare_all
from broadcaster.backends.redis.clients import AsyncClient, make_async_client
from broadcaster.backends.redis.commands import RedisCommands
from broadcaster.backends.redis.replication import WaitingCommands, wait_command
from broadcaster.backends.redis.subscriber import Subscriber
from broadcaster.control import ControlListeners, encode_control, now_ms, publish_command, revoke_command
from broadcaster.envelope import Envelope, PublishRequest, PublishResult
from broadcaster.keys import KeyLayout
from broadcaster.retry import RetryPolicy

log = logging.getLogger("broadcaster.backend.redis")

CHANGE_EPOCH = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch == ARGV[1] then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2])
  return ARGV[2]
end
return epoch or ''
"""
"""Compare-and-set of a conversation's epoch (meta hash field ``epoch``): the first caller changes it."""

PRUNE_REVOKED = """
local now = tonumber(ARGV[1])
local all = redis.call('HGETALL', KEYS[1])
local kept = {}
for i = 1, #all, 2 do
  local expires = tonumber(all[i + 1])
  if expires and expires > now then
    kept[#kept + 1] = all[i]
    kept[#kept + 1] = all[i + 1]
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return kept
"""
"""The deny list (hash sub -> until ms) without its expired entries, which it deletes (atomic: no lost update)."""

POLICY_CHECK_INTERVAL = 3.0
"""Seconds between two checks that Redis still has this gateway's function library, with its policy."""


class RedisBackend(Backend):
    """The Redis / Redis Cluster backend (see the package docstring).

    ``url``: ``redis://``, ``rediss://``, ``redis+cluster://host:port[,host:port...]`` or
    ``rediss+cluster://...`` (see :func:`broadcaster.backends.scripts.parse_redis_url`).
    ``probe_interval`` / ``probe_timeout``: seconds of pub/sub silence before a
    PING, and seconds to wait for its PONG. ``retry_budget``: seconds transient
    errors are retried before :class:`BackendUnavailable` (also the time ``start``
    and a subscription wait for Redis). ``wait_replicas`` / ``wait_timeout_ms``: ``WAIT``
    for that many replicas after each publish, else :class:`NotReplicated` (see
    :mod:`broadcaster.backends.redis.replication`).

    ``client`` (keyword, optional): a redis-py asyncio client (``Redis`` or
    ``RedisCluster``) to use instead of one built from ``url`` — e.g. a fakeredis
    ``FakeAsyncRedis`` in tests. Its connection pool also builds the pub/sub
    connection, so the code path is the one used against a real server.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        key_prefix: str = "bc",
        settings: BackendSettings | None = None,
        probe_interval: float = 5.0,
        probe_timeout: float = 2.0,
        retry_budget: float = 10.0,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        client: AsyncClient | None = None,
    ) -> None:
        self.settings = settings or BackendSettings()
        self.stats = BackendStats()
        self.url = url
        self.layout = KeyLayout(key_prefix)
        self._retry_budget = retry_budget
        self._probe_timeout = probe_timeout
        target = scripts.parse_redis_url(url) if client is None else None
        wait = wait_command(target, wait_replicas, wait_timeout_ms)
        if client is None:
            assert target is not None
            client = make_async_client(target)
        self.policies = self.settings.policy_table()
        self.library = scripts.build_library(key_prefix, self.policies)
        common: dict[str, Any] = {"layout": self.layout, "settings": self.settings, "stats": self.stats,
                                  "retry": RetryPolicy(budget=retry_budget), "library": self.library}
        self.commands = (RedisCommands(client, **common) if wait is None
                         else WaitingCommands(client, wait, **common))
        self._policy_task: asyncio.Task[None] | None = None
        self._callbacks: list[ReconnectCallback] = []
        self._resubscribe_callbacks: list[ResubscribeCallback] = []
        self._control = ControlListeners(self.stats)
        self._subscriber = Subscriber(
            client, layout=self.layout, stats=self.stats, dispatch=self._dispatch,
            has_listeners=self._has_listeners, callbacks=self._callbacks,
            resubscribe_callbacks=self._resubscribe_callbacks, probe_interval=probe_interval,
            probe_timeout=probe_timeout, subscribe_timeout=max(retry_budget, 1.0),
            control=self._control.dispatch,
        )
        self._registry = ChannelRegistry(self._subscriber.subscribe, self._subscriber.unsubscribe, self.stats,
                                         self.settings.unsubscribe_delay)

    @classmethod
    def from_client(cls, client: AsyncClient, **options: Any) -> RedisBackend:
        """A backend over an existing redis-py asyncio client (see the ``client`` argument)."""
        return cls("client://", client=client, **options)

    def _dispatch(self, env: Envelope) -> None:
        self._registry.dispatch(env)

    def _has_listeners(self, conv: str) -> bool:
        return self._registry.has_listeners(conv)

    async def start(self) -> None:
        """Open the pub/sub connection; BackendUnavailable if Redis stays unreachable for ``retry_budget``."""
        await self._subscriber.start(max(self._retry_budget, 1.0))
        await self.commands.ensure_library()
        log.info("loaded function library %s (policy %s): %s", self.library.name, self.library.fingerprint,
                 self.library.description)
        if self._policy_task is None:
            self._policy_task = asyncio.create_task(self._watch_policy(), name="policy-watch")

    async def _watch_policy(self) -> None:
        """Every POLICY_CHECK_INTERVAL: reload the library where Redis lost it; report a foreign policy."""
        while True:
            await asyncio.sleep(POLICY_CHECK_INTERVAL)
            try:
                await self.commands.check_library()
            except Exception as exc:  # Redis down: the subscriber reports that; try again next time
                log.debug("policy check failed: %r", exc)

    async def check_policy(self) -> list[str]:
        """Check now (see :meth:`RedisCommands.check_library`): the differences with the policy Redis applies."""
        return await self.commands.check_library()

    async def close(self) -> None:
        if self._policy_task is not None:
            self._policy_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._policy_task
            self._policy_task = None
        await self._registry.close()
        await self._subscriber.close()
        await self.commands.close()

    @property
    def connected(self) -> bool:
        """True while live delivery works — on a cluster, while at least one primary's pub/sub link is up.

        One shard down pauses the live events of its own conversations only (they are
        repaired from history when it is back); the others keep flowing, so readiness
        does not drop on every gateway at once. ``down_nodes`` names the shards down.
        """
        return self._subscriber.up

    @property
    def down_nodes(self) -> list[str]:
        """Nodes (``host:port``; ``main`` for a single server) whose pub/sub link is down right now."""
        return self._subscriber.down_nodes

    async def ping(self) -> bool:
        return await self.commands.ping(self._probe_timeout)

    async def publish_many(self, requests: Sequence[PublishRequest]) -> list[PublishResult]:
        prepared = prepare_all(requests, self.policies)
        return await self.commands.publish_many(prepared)

    async def policy(self, conv: str) -> PolicyInfo:
        """What the library on ``conv``'s Redis node applies to it (``conflict``: not this gateway's policy)."""
        return await self.commands.policy(conv)

    async def subscribe(self, conv: str, listener: Listener) -> None:
        await self._registry.add(conv, listener)

    async def unsubscribe(self, conv: str, listener: Listener) -> None:
        await self._registry.remove(conv, listener)

    def add_reconnect_callback(self, callback: ReconnectCallback) -> None:
        """Call ``callback`` after each re-established pub/sub connection (one per node on a cluster)."""
        self._callbacks.append(callback)

    def add_resubscribe_callback(self, callback: ResubscribeCallback) -> None:
        """Call ``callback(convs)`` with the conversations of a re-established connection or of a moved channel.

        Only the conversations concerned, never ``None``: those whose channel was live,
        lost its subscription (its node's connection dropped, its slot moved) and is
        confirmed again.
        """
        self._resubscribe_callbacks.append(callback)

    async def head(self, conv: str) -> Head:
        return await self.commands.head(conv)

    async def history(self, conv: str, since: int = 0, limit: int | None = None) -> HistoryPage:
        return await self.commands.history(conv, since, limit)

    async def change_epoch(self, conv: str, seen: str) -> str:
        """A new epoch for ``conv`` if it is still in ``seen`` (one EVAL, compare-and-set; see Backend)."""
        meta = self.layout.meta(conv)
        client = self.commands.client

        async def attempt() -> Any:
            return await client.eval(CHANGE_EPOCH, 1, meta, seen, new_epoch())

        reply = await self.commands.retry.acall(attempt)
        epoch = reply.decode() if isinstance(reply, bytes) else str(reply)
        if epoch:
            if epoch != seen:
                log.warning("conversation %s: epoch %s -> %s", conv, seen, epoch)
            return epoch
        return (await self.head(conv)).epoch

    async def history_many(self, reads: Sequence[HistoryRead]) -> list[HistoryPage]:
        """Every read in one pipeline (one round trip per node); see :meth:`RedisCommands.history_many`."""
        return await self.commands.history_many(reads)

    async def state(self, conv: str) -> StateSnapshot:
        return await self.commands.state(conv)

    async def report_presence(self, gateway_id: str, counts: Mapping[str, Mapping[str, int]], ttl: float) -> None:
        await self.commands.report_presence(gateway_id, counts, ttl)

    async def presence(self, conv: str) -> Presence:
        return await self.commands.presence(conv)

    async def report_presence_users(
        self, gateway_id: str, reports: Mapping[str, UserCounts], ttl: float, *, leave_delay: float,
        announce: Collection[str] = (), sweep: Collection[str] | None = None,
    ) -> dict[str, UserReport]:
        """One script per conversation, one pipeline (presence_users_report.lua)."""
        return await self.commands.report_presence_users(gateway_id, reports, ttl, leave_delay, announce, sweep)

    async def presence_users(self, conv: str, limit: int = 100) -> PresenceUsers:
        return await self.commands.presence_users(conv, limit)

    async def publish_control(self, message: Mapping[str, Any]) -> None:
        """PUBLISH (SPUBLISH on a cluster) ``message`` on the control channel, retried like a publish."""
        command = publish_command(self.layout.control(), encode_control(message), self.commands.sharded)
        client = self.commands.client

        async def attempt() -> Any:
            return await client.execute_command(*command)

        await self.commands.retry.acall(attempt)

    def add_control_listener(self, listener: ControlListener) -> None:
        """Call ``listener`` with every message of the control channel (subscribed at start, and again after
        every reconnect, like a conversation's channel)."""
        self._control.add(listener)

    async def revoke(self, sub: str, until_ms: int) -> None:
        """HSET (or HDEL, for an ``until_ms`` in the past) ``sub`` in the deny-list hash."""
        command, client = revoke_command(self.layout.revoked(), sub, until_ms, now_ms()), self.commands.client

        async def attempt() -> Any:
            return await client.execute_command(*command)

        await self.commands.retry.acall(attempt)

    async def revocations(self) -> dict[str, int]:
        key, client = self.layout.revoked(), self.commands.client

        async def attempt() -> Any:
            return await client.eval(PRUNE_REVOKED, 1, key, str(now_ms()))

        reply = await self.commands.retry.acall(attempt)
        found: dict[str, int] = {}
        for i in range(0, len(reply) - 1, 2):
            sub, until = reply[i], reply[i + 1]
            found[sub.decode() if isinstance(sub, bytes) else str(sub)] = int(until)
        return found
