"""Publish, reads and presence over one redis-py asyncio client: the command half of the backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import ConnectionPool
from redis.exceptions import NoScriptError, RedisError, ResponseError

from broadcaster.backend import BackendSettings, BackendStats, Head, HistoryPage, Presence, StateSnapshot
from broadcaster.backends import scripts
from broadcaster.backends.base import PreparedPublish, new_epoch
from broadcaster.backends.redis.clients import MAX_CONNECTIONS, AsyncClient
from broadcaster.envelope import PublishResult
from broadcaster.errors import BackendUnavailable
from broadcaster.keys import KeyLayout
from broadcaster.retry import RetryPolicy
from broadcaster.validation import validate_conv_id

log = logging.getLogger("broadcaster.backend.redis")

T = TypeVar("T")

PING_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError, BackendUnavailable)
"""What a failed readiness PING raises: the server is not answering (anything else is a bug, logged)."""


class RedisCommands:
    """Publish, read and presence over one redis-py asyncio client (standalone or cluster).

    Every call is one Lua script (several in one pipeline for ``publish_many``,
    ``history_many`` and ``report_presence``), retried under ``retry`` while the
    error is transient, then :class:`BackendUnavailable`. Scripts are called by SHA
    and loaded on ``NOSCRIPT`` (a restarted or flushed server). At most
    ``max_in_flight`` calls use the client at once; the others wait their turn, so a
    burst never asks a pool for more connections than it has.
    """

    def __init__(self, client: AsyncClient, *, layout: KeyLayout, settings: BackendSettings,
                 stats: BackendStats, retry: RetryPolicy, max_in_flight: int = MAX_CONNECTIONS) -> None:
        self.client = client
        self.layout = layout
        self.settings = settings
        self.stats = stats
        self.retry = retry
        self.sharded = isinstance(client, RedisCluster)
        self._slots = asyncio.Semaphore(max_in_flight)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` under the retry policy, each try holding one of the in-flight slots."""
        async def bounded() -> T:
            async with self._slots:
                return await attempt()

        return await self.retry.acall(bounded)

    async def publish_many(self, prepared: Sequence[PreparedPublish]) -> list[PublishResult]:
        """Run ``publish.lua`` for each event, in order, in one pipeline (one round trip)."""
        if not prepared:
            return []
        batch = scripts.PublishBatch(self.layout, prepared, self.settings, new_epoch(), self.sharded)

        async def attempt() -> list[PublishResult]:
            for _ in range(3):
                batch.feed(await self._send(batch.commands()))
                if batch.done:
                    return batch.results()
                await self.load_scripts()
            raise ResponseError("NOSCRIPT persists after SCRIPT LOAD")

        results = await self._retrying(attempt)
        self.stats.state_evictions += sum(r.evicted for r in results)
        return results

    async def head(self, conv: str) -> Head:
        return scripts.parse_head(await self._eval(self._read_call(conv, "head")))

    async def history(self, conv: str, since: int = 0, limit: int | None = None) -> HistoryPage:
        since = max(0, since)
        if limit is not None and limit <= 0:
            head = await self.head(conv)
            return HistoryPage(head.epoch, head.seq, [], False)
        reply = await self._eval(self._read_call(conv, "history", since, limit or 0))
        return scripts.parse_history(reply, since, self.stats)

    async def history_many(self, reads: Sequence[tuple[str, int, int | None]]) -> list[HistoryPage]:
        """``history(conv, since, limit)`` for each read, in one pipeline (one round trip per node).

        All or nothing: the first error reply (after the retries) is raised.
        """
        if not reads:
            return []
        if any(limit is not None and limit <= 0 for _, _, limit in reads):
            return [await self.history(conv, since, limit) for conv, since, limit in reads]
        sinces = [max(0, since) for _, since, _ in reads]
        commands = [self._read_call(conv, "history", since, limit or 0)
                    for (conv, _, limit), since in zip(reads, sinces, strict=True)]

        async def attempt() -> list[Any]:
            replies = await self._send(commands)
            if any(scripts.is_noscript(r) for r in replies):
                await self.load_scripts()
                replies = await self._send(commands)  # reads: sending them again is harmless
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
            return replies

        replies = await self._retrying(attempt)
        return [scripts.parse_history(reply, since, self.stats) for reply, since in zip(replies, sinces, strict=True)]

    async def state(self, conv: str) -> StateSnapshot:
        return scripts.parse_state(await self._eval(self._read_call(conv, "state")), self.stats)

    def _read_call(self, conv: str, op: str, since: int = 0, limit: int = 0) -> scripts.Command:
        return scripts.read_call(self.layout, validate_conv_id(conv), op, new_epoch(), self.settings.history_ttl,
                                 since, limit)

    async def report_presence(self, gateway_id: str, counts: Mapping[str, Mapping[str, int]], ttl: float) -> None:
        commands = scripts.presence_report_calls(self.layout, gateway_id, counts, ttl)
        if not commands:
            return

        async def attempt() -> None:
            replies = await self._send(commands)
            if any(scripts.is_noscript(r) for r in replies):
                await self.load_scripts()
                replies = await self._send(commands)  # idempotent: a report overwrites itself
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply

        await self._retrying(attempt)

    async def presence(self, conv: str) -> Presence:
        return scripts.parse_presence(await self._eval(scripts.presence_call(self.layout, validate_conv_id(conv))))

    async def ping(self, timeout: float) -> bool:
        """True if Redis answers PING within ``timeout`` — on a cluster, if at least one primary does."""
        try:
            async with asyncio.timeout(timeout):
                if isinstance(self.client, RedisCluster):
                    return await self._ping_any_primary(self.client)
                return bool(await self.client.ping())
        except PING_ERRORS:
            return False
        except Exception:
            log.exception("readiness PING failed unexpectedly")
            return False

    @staticmethod
    async def _ping_any_primary(client: RedisCluster) -> bool:
        await client.initialize()
        pings = [asyncio.ensure_future(node.execute_command("PING")) for node in client.get_primaries()]
        try:
            for next_done in asyncio.as_completed(pings):
                with contextlib.suppress(*PING_ERRORS):
                    if await next_done:
                        return True
            return False
        finally:
            for ping in pings:
                ping.cancel()
            await asyncio.gather(*pings, return_exceptions=True)

    async def load_scripts(self) -> None:
        """SCRIPT LOAD every script (on every primary of a cluster)."""
        for script in scripts.SCRIPTS:
            await self.client.script_load(script.source)

    async def close(self) -> None:
        await self.client.aclose()

    async def _eval(self, command: scripts.Command) -> Any:
        async def attempt() -> Any:
            try:
                return await self.client.execute_command(*command)
            except NoScriptError:
                await self.load_scripts()
                return await self.client.execute_command(*command)

        return await self._retrying(attempt)

    async def _send(self, commands: Sequence[scripts.Command]) -> list[Any]:
        """Send ``commands`` in one round trip; error replies come back as exception values.

        On a single server they go out in one write on one pooled connection, with
        none of redis-py's pipeline bookkeeping (a write per command would cost an
        ``asyncio.wait_for`` each: concurrent callers overlap better than that).
        A cluster client routes a pipeline per node.
        """
        client = self.client
        if isinstance(client, Redis):
            return await send_on_one_connection(client.connection_pool, commands)
        pipe = client.pipeline()
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))


async def send_on_one_connection(pool: ConnectionPool, commands: Sequence[scripts.Command]) -> list[Any]:
    """Send every command on one pooled connection in one write, then read every reply, in order.

    The connection is dropped (not returned to the pool) unless every reply was read,
    cancellation included: unread replies must never reach the next user.
    """
    packed = [hiredis.pack_command(command) for command in commands]
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    complete = False
    try:
        await connection.send_packed_command(packed)
        replies: list[Any] = []
        for _ in packed:
            try:
                replies.append(await connection.read_response())
            except ResponseError as exc:
                replies.append(exc)
        complete = True
        return replies
    finally:
        if not complete:
            await connection.disconnect(nowait=True)
        await pool.release(connection)
