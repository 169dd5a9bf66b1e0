"""Publish, reads and presence over one redis-py asyncio client: the command half of the backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import ConnectionPool
from redis.exceptions import NoScriptError, RedisError, ResponseError

from broadcaster.backend import (
    BackendSettings,
    BackendStats,
    Head,
    HistoryPage,
    PolicyInfo,
    Presence,
    PresenceUsers,
    StateSnapshot,
    UserCounts,
    UserReport,
)
from broadcaster.backends import scripts
from broadcaster.backends.base import PreparedPublish, new_epoch
from broadcaster.backends.redis.clients import MAX_CONNECTIONS, AsyncClient
from broadcaster.envelope import PublishResult
from broadcaster.errors import BackendUnavailable, PayloadTooLarge
from broadcaster.keys import KeyLayout
from broadcaster.namespaces import Policy, differences
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
    and loaded on ``NOSCRIPT`` (a restarted or flushed server). Publishes FCALL the
    key prefix's function library (``scripts.build_library``), which applies the
    namespaces' policy: a gateway passes its ``library`` and loads it at start and
    wherever Redis lost it; a producer passes none and, finding no library, raises
    :class:`scripts.LibraryMissing` (retried under its own policy: a gateway may be
    starting). At most
    ``max_in_flight`` calls use the client at once; the others wait their turn, so a
    burst never asks a pool for more connections than it has.
    """

    def __init__(self, client: AsyncClient, *, layout: KeyLayout, settings: BackendSettings,
                 stats: BackendStats, retry: RetryPolicy, max_in_flight: int = MAX_CONNECTIONS,
                 library: scripts.FunctionLibrary | None = None) -> None:
        self.client = client
        self.layout = layout
        self.settings = settings
        self.library = library
        self.publish_function = (library.publish_function if library is not None
                                 else scripts.library_name(layout.prefix) + "_publish")
        self._conflict: str | None = None  # the foreign fingerprint last reported
        self._scripts_have_sha1: bool | None = None
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
        batch = scripts.PublishBatch(self.layout, prepared, self.settings, new_epoch(), self.sharded,
                                     self.publish_function)

        async def attempt() -> list[PublishResult]:
            for _ in range(3):
                batch.feed(await self._send(batch.commands()))
                if batch.done:
                    return batch.results()
                if batch.needs_library:
                    await self._library_lost()
                else:
                    await self.load_scripts()
            raise ResponseError("the publish function is still missing after FUNCTION LOAD")

        try:
            results = await self._retrying(attempt)
        except scripts.DataTooLarge as exc:
            raise PayloadTooLarge("data", str(exc)) from None
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

    async def report_presence_users(self, gateway_id: str, reports: Mapping[str, UserCounts], ttl: float,
                                    leave_delay: float, announce: Collection[str],
                                    sweep: Collection[str] | None = None) -> dict[str, UserReport]:
        """One ``presence_users_report.lua`` per conversation, in one pipeline (see ``Backend``).

        Not sent again after a reply was lost: a second run would not repeat the
        transitions the first found, so the retry policy is not applied to it; the caller
        reports again on its next tick (the report replaces itself).
        """
        convs = list(reports)
        commands = scripts.presence_users_report_calls(self.layout, gateway_id, reports, ttl, leave_delay, announce,
                                                       sweep)
        if not commands:
            return {}
        async with self._slots:
            replies = await self._send(commands)
            if any(scripts.is_noscript(r) for r in replies):
                await self.load_scripts()
                again = [i for i, r in enumerate(replies) if scripts.is_noscript(r)]
                for i, reply in zip(again, await self._send([commands[i] for i in again]), strict=True):
                    replies[i] = reply
        out = {}
        for conv, reply in zip(convs, replies, strict=True):
            if isinstance(reply, BaseException):
                raise reply
            out[conv] = scripts.parse_user_report(conv, reply)
        return out

    async def presence_users(self, conv: str, limit: int) -> PresenceUsers:
        command = scripts.presence_users_call(self.layout, validate_conv_id(conv), limit)
        return scripts.parse_presence_users(await self._eval(command))

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

    async def ensure_library(self) -> None:
        """:meth:`load_library` under the retry policy (a gateway's start)."""
        await self._retrying(self.load_library)

    async def load_library(self) -> None:
        """FUNCTION LOAD REPLACE this gateway's library (on every primary of a cluster)."""
        assert self.library is not None
        if self._scripts_have_sha1 is None:
            self._scripts_have_sha1 = bool(await self.client.execute_command(*scripts.SCRIPTS_HAVE_SHA1))
        await self.client.function_load(scripts.library_code(self.library, self._scripts_have_sha1), replace=True)
        self.stats.policy_loads += 1
        self._conflict = None
        self.stats.policy_conflict = 0

    async def _library_lost(self) -> None:
        if self.library is None:
            raise scripts.LibraryMissing(self.layout.prefix, scripts.library_name(self.layout.prefix))
        log.warning("the function library %s was missing on Redis (restarted or flushed?): loading it again",
                    self.library.name)
        await self.load_library()

    async def check_library(self) -> list[str]:
        """Compare the library loaded on Redis (every primary) with this gateway's; reload it where missing.

        Returns the differences found (empty: the same policy everywhere). A foreign
        policy is logged at WARNING once per fingerprint, naming the fields, and
        ``stats.policy_conflict`` is 1 while it lasts; it is not overwritten (two
        gateways would flap), see docs/namespaces.md.
        """
        library = self.library
        assert library is not None
        command = scripts.policy_fingerprint_call(library)
        replies: list[Any] = []
        if isinstance(self.client, RedisCluster):
            # Each primary on its own connection, not through the cluster client's routing: a dead
            # master must not make the client refresh its slot map under the publishes of the others.
            for node in self.client.get_primaries():
                try:
                    replies.append(await node.execute_command(*command))
                except ResponseError as exc:
                    replies.append(exc)
                except PING_ERRORS:
                    continue  # a shard down: checked again next time
        else:
            try:
                replies.append(await self.client.execute_command(*command))  # type: ignore[no-untyped-call]
            except ResponseError as exc:
                replies.append(exc)
        if any(scripts.is_library_missing(r) for r in replies):
            await self._library_lost()
            return []
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        found = []
        for reply in replies:
            fingerprint, description = scripts._text(reply[0]), scripts._text(reply[1])
            if fingerprint != library.fingerprint:
                found = differences(library.description, description) or [f"fingerprint {fingerprint}"]
                if self._conflict != fingerprint:
                    log.warning("namespace policy conflict on key prefix %r: Redis applies policy %s, this gateway's "
                                "is %s; differences: %s. Publishes follow the policy loaded last; restart the "
                                "gateways with one namespaces file and the same retention options",
                                self.layout.prefix, fingerprint, library.fingerprint, "; ".join(found))
                    self._conflict = fingerprint
                break
        else:
            if self._conflict is not None:
                log.info("namespace policy conflict on key prefix %r resolved", self.layout.prefix)
            self._conflict = None
        self.stats.policy_conflict = 1 if found else 0
        return found

    async def policy(self, conv: str) -> PolicyInfo:
        """The policy the library on ``conv``'s node applies to it."""
        library = self.library or scripts.FunctionLibrary(self.layout.prefix, scripts.library_name(self.layout.prefix),
                                                          "", "", "")
        command = scripts.policy_call(library, self.layout, validate_conv_id(conv))

        async def attempt() -> Any:
            try:
                return await self.client.execute_command(*command)
            except ResponseError as exc:
                if not scripts.is_library_missing(exc):
                    raise
                await self._library_lost()
                return await self.client.execute_command(*command)

        reply = await self._retrying(attempt)
        fingerprint = scripts._text(reply[0])
        policy = Policy(*(int(v) for v in reply[2:7]))
        own = library.fingerprint
        return PolicyInfo(scripts._text(reply[1]), policy, fingerprint, bool(own) and fingerprint != own)

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
