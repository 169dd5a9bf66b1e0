"""Publishing straight to Redis: FCALL of the publish function the gateways load.

The function (``scripts.build_library``: ``publish.lua``'s core plus the namespaces'
policy) applies the conversation's policy: a producer carries none. Until a gateway
has loaded the library for this key prefix, a publish is retried within the retry
budget (a gateway may be starting), then :class:`BackendUnavailable` says so.

The async transport is :class:`broadcaster.backends.redis.RedisCommands` itself (the
gateway's own publish path). The blocking transport repeats only its I/O: building
calls, the retry-safe batch bookkeeping (:class:`PublishBatch`), NOSCRIPT handling
and the retry policy are the shared ones from :mod:`broadcaster.backends.scripts` and
:mod:`broadcaster.retry`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoScriptError, ResponseError
from redis.retry import Retry
from redis.sentinel import Sentinel

from broadcaster.backend import BackendStats, Presence
from broadcaster.backends import scripts
from broadcaster.backends.redis import RedisCommands, client_options, make_async_client
from broadcaster.backends.redis.clients import sentinel_kwargs
from broadcaster.backends.redis.replication import WaitingCommands, check_replicated, wait_command
from broadcaster.control import encode_control, now_ms, publish_command, revoke_command
from broadcaster.envelope import PublishResult
from broadcaster.errors import BackendUnavailable, PayloadTooLarge
from broadcaster.keys import KeyLayout
from broadcaster.retry import RetryPolicy
from broadcaster.validation import validate_conv_id
from producers.options import Outgoing, ProducerOptions, prepared_only

SyncClient = redis.Redis | RedisCluster


def disconnect_commands(layout: KeyLayout, message: dict[str, Any], sharded: bool) -> list[tuple[Any, ...]]:
    """The deny-list write (when the message has ``until``), then the control message's publish."""
    commands: list[tuple[Any, ...]] = []
    if "until" in message:
        commands.append(revoke_command(layout.revoked(), message["sub"], message["until"], now_ms()))
    commands.append(publish_command(layout.control(), encode_control(message), sharded))
    return commands


@contextmanager
def _explained() -> Iterator[None]:
    """A missing library outlasting the retry budget: say so rather than "unreachable"."""
    try:
        yield
    except BackendUnavailable as exc:
        if isinstance(exc.__cause__, scripts.LibraryMissing):
            raise BackendUnavailable(str(exc.__cause__)) from exc.__cause__
        raise


def _retry_policy(options: ProducerOptions) -> RetryPolicy:
    return RetryPolicy(budget=options.retry_budget, is_transient=scripts.transient_or_missing_library)


def make_sync_client(target: scripts.RedisTarget) -> SyncClient:
    """A blocking redis-py client for ``target``; its own retries are off (the policy retries).

    For ``redis+sentinel://``, a client of the service's master: each new connection asks
    the sentinels where it is, a READONLY reply (a demoted master) drops the connection
    and counts as a transient error, so a publish during a failover is retried onto the
    new master within the retry budget.
    """
    if target.is_sentinel:
        sentinels = list(target.sentinel_nodes)
        sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs(target))  # type: ignore[no-untyped-call]
        master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            target.service_name, retry=Retry(NoBackoff(), 0), **client_options(target), **target.master_options())
        return master
    if target.is_cluster:
        nodes = [ClusterNode(host, port) for host, port in target.cluster_nodes]  # type: ignore[no-untyped-call]
        return RedisCluster(startup_nodes=nodes, retry=Retry(NoBackoff(), 1), **client_options(target))
    return redis.Redis.from_url(target.url, retry=Retry(NoBackoff(), 0), **client_options(target))


class SyncRedisTransport:
    """Blocking publish and presence over redis-py (standalone or cluster)."""

    def __init__(self, target: scripts.RedisTarget, key_prefix: str, options: ProducerOptions) -> None:
        self.wait = wait_command(target, options.wait_replicas, options.wait_timeout_ms)  # before any connection
        # Any: redis-py's blocking cluster client is untyped; both kinds share the calls used here.
        self.client: Any = make_sync_client(target)
        self.layout = KeyLayout(key_prefix)
        self.settings = options.settings()
        self.retry = _retry_policy(options)
        self.sharded = target.is_cluster
        self.library = scripts.library_name(key_prefix)
        self.options = options
        self._acks: list[Any] = []

    def publish_many(self, batch: Sequence[Outgoing]) -> list[PublishResult]:
        if not batch:
            return []
        publish = scripts.PublishBatch(self.layout, prepared_only(batch), self.settings, "", self.sharded,
                                       self.library + "_publish")

        acks: list[Any] = []

        def attempt() -> list[PublishResult]:
            for _ in range(3):
                publish.feed(self._send(publish.commands(), acks))
                if publish.done:
                    return publish.results()
                if publish.needs_library:
                    raise scripts.LibraryMissing(self.layout.prefix, self.library)
                self._load_scripts()
            raise ResponseError("NOSCRIPT persists after SCRIPT LOAD")

        try:
            with _explained():
                results = self.retry.call(attempt)
        except scripts.DataTooLarge as exc:
            raise PayloadTooLarge("data", str(exc)) from None
        if self.wait is not None:
            check_replicated(results, acks, self.options.wait_replicas, self.options.wait_timeout_ms)
        return results

    def presence(self, conv: str) -> Presence:
        command = scripts.presence_call(self.layout, validate_conv_id(conv))

        def attempt() -> Any:
            try:
                return self.client.execute_command(*command)
            except NoScriptError:
                self._load_scripts()
                return self.client.execute_command(*command)

        return scripts.parse_presence(self.retry.call(attempt))

    def disconnect(self, message: dict[str, Any]) -> dict[str, Any]:
        """Write the deny list (with ``until``) and PUBLISH the control message, as ``POST /v1/disconnect`` does."""
        commands = disconnect_commands(self.layout, message, self.sharded)

        def attempt() -> None:
            for command in commands:
                self.client.execute_command(*command)

        with _explained():
            self.retry.call(attempt)
        return message

    def close(self) -> None:
        self.client.close()

    def _load_scripts(self) -> None:
        for script in scripts.SCRIPTS:
            self.client.script_load(script.source)

    def _send(self, commands: Sequence[scripts.Command], acks: list[Any] | None = None) -> list[Any]:
        """Send ``commands`` in one round trip; error replies come back as exception values.

        On a single server they go out in one write on one pooled connection, with
        none of redis-py's pipeline bookkeeping (and, with ``wait_replicas``, the WAIT
        right after them on the same connection: its reply goes to ``acks``). A
        cluster client routes a pipeline per node instead.
        """
        client = self.client
        if isinstance(client, redis.Redis):
            if self.wait is None or acks is None:
                return _send_on_one_connection(client.connection_pool, commands)
            replies = _send_on_one_connection(client.connection_pool, [*commands, self.wait])
            acks.append(replies.pop())
            return replies
        pipe = client.pipeline()
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute(raise_on_error=False))


def _send_on_one_connection(pool: redis.ConnectionPool, commands: Sequence[scripts.Command]) -> list[Any]:
    """Send every command on one pooled connection in one write, then read every reply, in order.

    The connection is dropped (not returned to the pool) unless every reply was read:
    unread replies must never reach the next user.
    """
    packed = b"".join(hiredis.pack_command(command) for command in commands)
    connection = pool.get_connection()
    complete = False
    try:
        connection.send_packed_command([packed])  # type: ignore[no-untyped-call]
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(connection.read_response())
            except ResponseError as exc:
                replies.append(exc)
        complete = True
        return replies
    finally:
        if not complete:
            connection.disconnect()  # type: ignore[no-untyped-call]
        pool.release(connection)


class AsyncRedisTransport:
    """Asyncio publish and presence: the gateway's own :class:`RedisCommands` (plus WAIT, if asked)."""

    def __init__(self, target: scripts.RedisTarget, key_prefix: str, options: ProducerOptions) -> None:
        wait = wait_command(target, options.wait_replicas, options.wait_timeout_ms)
        common: dict[str, Any] = {"layout": KeyLayout(key_prefix), "settings": options.settings(),
                                  "stats": BackendStats(), "retry": _retry_policy(options)}
        client = make_async_client(target)
        self.commands = RedisCommands(client, **common) if wait is None else WaitingCommands(client, wait, **common)
        self.layout = common["layout"]

    async def publish_many(self, batch: Sequence[Outgoing]) -> list[PublishResult]:
        with _explained():
            return await self.commands.publish_many(prepared_only(batch))

    async def presence(self, conv: str) -> Presence:
        return await self.commands.presence(conv)

    async def disconnect(self, message: dict[str, Any]) -> dict[str, Any]:
        commands = disconnect_commands(self.layout, message, self.commands.sharded)
        client = self.commands.client

        async def attempt() -> None:
            for command in commands:
                await client.execute_command(*command)

        with _explained():
            await self.commands.retry.acall(attempt)
        return message

    async def close(self) -> None:
        await self.commands.close()
