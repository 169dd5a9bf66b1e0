"""The Redis backend: standalone Redis (``redis://``, ``rediss://``) or Redis Cluster
(``redis+cluster://``, ``rediss+cluster://`` for TLS).

Two halves:

* :class:`RedisCommands` — publish, reads and presence: one Lua script per
  operation (``scripts.py``), pipelined where there are several, transient errors
  retried under :class:`broadcaster.retry.RetryPolicy`. The async SDK uses it as is.
* :class:`_Subscriber` — live delivery: ONE pub/sub connection per process (per
  primary on a cluster, with SSUBSCRIBE), read by a task of our own rather than by
  redis-py's ``PubSub``, which neither reconnects nor notices a dead link
  (redis-py #2089, #2417). The reader calls ``read_response()`` on the raw
  connection in a loop: cheaper per message than ``PubSub.listen()`` (no message
  dicts, no health check), and it sees the SUBSCRIBE confirmations, so
  ``subscribe`` returns only once Redis confirmed. An idle probe PINGs a quiet
  connection and rebuilds it when no PONG comes back (a silent link, e.g. a
  failover behind a proxy). Each connection is rebuilt on its own: only its
  channels are subscribed again and only their conversations go to the
  resubscribe callbacks (the hub repairs those from history); a channel whose
  cluster slot moved is subscribed again on its new owner alone.

:class:`RedisBackend` joins them with the shared :class:`ChannelRegistry`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import MovedError, NoScriptError, ResponseError

from broadcaster.backend import (
    Backend,
    BackendSettings,
    BackendStats,
    Head,
    HistoryPage,
    Listener,
    Presence,
    ReconnectCallback,
    ResubscribeCallback,
    StateSnapshot,
)
from broadcaster.backends import scripts
from broadcaster.backends.base import ChannelRegistry, PreparedPublish, new_epoch, prepare_publish
from broadcaster.codec import decode_envelope
from broadcaster.envelope import Envelope, PublishRequest, PublishResult
from broadcaster.errors import BackendUnavailable, PayloadDecodeError
from broadcaster.keys import KeyLayout
from broadcaster.retry import RetryPolicy, reconnect_retrying
from broadcaster.validation import validate_conv_id

log = logging.getLogger("broadcaster.backend.redis")

AsyncClient = Redis | RedisCluster

CONNECT_TIMEOUT = 2.0
"""Seconds to open a TCP connection to Redis before the attempt counts as failed."""
COMMAND_TIMEOUT = 5.0
"""Seconds to wait for a command's reply before the attempt counts as failed."""
_SUBSCRIBE_CHUNK = 500
_MAIN = "main"
"""The one node of a standalone server."""
_REFRESH_INTERVAL = 2.0
"""Seconds between two slot-map refreshes asked for by pub/sub links that cannot connect."""
_RETRY_DELAY_MAX = 5.0
"""Longest wait before subscribing again a channel a node refused (other than with MOVED)."""


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


def make_async_client(target: scripts.RedisTarget) -> AsyncClient:
    """A redis-py asyncio client for ``target``; its own retries are off (our policy retries)."""
    if target.is_cluster:
        nodes = [ClusterNode(host, port) for host, port in target.cluster_nodes]
        # One immediate in-client retry lets redis-py refresh its slot map after a MOVED/failover.
        return RedisCluster(startup_nodes=nodes, retry=Retry(NoBackoff(), 1), **client_options(target))
    return Redis.from_url(target.url, retry=Retry(NoBackoff(), 0), **client_options(target))


class RedisCommands:
    """Publish, read and presence over one redis-py asyncio client (standalone or cluster).

    Every call is one Lua script (several in one pipeline for ``publish_many`` and
    ``report_presence``), retried under ``retry`` while the error is transient,
    then :class:`BackendUnavailable`. Scripts are called by SHA and loaded on
    ``NOSCRIPT`` (a restarted or flushed server).
    """

    def __init__(self, client: AsyncClient, *, layout: KeyLayout, settings: BackendSettings,
                 stats: BackendStats, retry: RetryPolicy) -> None:
        self.client = client
        self.layout = layout
        self.settings = settings
        self.stats = stats
        self.retry = retry
        self.sharded = isinstance(client, RedisCluster)

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

        results = await self.retry.acall(attempt)
        self.stats.state_evictions += sum(r.evicted for r in results)
        return results

    async def head(self, conv: str) -> Head:
        return scripts.parse_head(await self._read(conv, "head"))

    async def history(self, conv: str, since: int = 0, limit: int | None = None) -> HistoryPage:
        since = max(0, since)
        if limit is not None and limit <= 0:
            head = await self.head(conv)
            return HistoryPage(head.epoch, head.seq, [], False)
        reply = await self._read(conv, "history", since, limit or 0)
        return scripts.parse_history(reply, since, self.stats)

    async def state(self, conv: str) -> StateSnapshot:
        return scripts.parse_state(await self._read(conv, "state"), self.stats)

    async def _read(self, conv: str, op: str, since: int = 0, limit: int = 0) -> Any:
        command = scripts.read_call(self.layout, validate_conv_id(conv), op, new_epoch(), self.settings.history_ttl,
                                    since, limit)
        return await self._eval(command)

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

        await self.retry.acall(attempt)

    async def presence(self, conv: str) -> Presence:
        return scripts.parse_presence(await self._eval(scripts.presence_call(self.layout, validate_conv_id(conv))))

    async def ping(self, timeout: float) -> bool:
        """True if Redis answers PING within ``timeout`` — on a cluster, if at least one primary does."""
        try:
            async with asyncio.timeout(timeout):
                if isinstance(self.client, RedisCluster):
                    return await self._ping_any_primary(self.client)
                return bool(await self.client.ping())
        except Exception:
            return False

    @staticmethod
    async def _ping_any_primary(client: RedisCluster) -> bool:
        await client.initialize()
        pings = [asyncio.ensure_future(node.execute_command("PING")) for node in client.get_primaries()]
        try:
            for next_done in asyncio.as_completed(pings):
                with contextlib.suppress(Exception):
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

        return await self.retry.acall(attempt)

    async def _send(self, commands: Sequence[scripts.Command]) -> list[Any]:
        """Send ``commands`` in one round trip; error replies come back as exception values.

        On a single server they go out in one write on one pooled connection, with
        none of redis-py's pipeline bookkeeping (a write per command would cost an
        ``asyncio.wait_for`` each: concurrent callers overlap better than that).
        A cluster client routes a pipeline per node.
        """
        client = self.client
        if isinstance(client, Redis):
            return await _send_on_one_connection(client.connection_pool, commands)
        pipe = client.pipeline()
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))


async def _send_on_one_connection(pool: ConnectionPool, commands: Sequence[scripts.Command]) -> list[Any]:
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


class _Topology:
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

    def primaries(self) -> list[str]:
        if self._cluster is None:
            return [_MAIN]
        return [node.name for node in self._cluster.get_primaries()]

    def node_of(self, channel: bytes) -> str | None:
        """The node owning ``channel``'s slot, or None while no node is known to own it."""
        if self._cluster is None:
            return _MAIN
        moved = self._moved.get(key_slot(channel))
        if moved is not None:
            return moved
        try:
            node = self._cluster.get_node_from_key(channel.decode())
        except Exception:
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


class _Link:
    """The pub/sub connection to one node: its channels, its reader and idle-probe tasks, its state.

    ``channels`` are the wanted channels placed on this node: subscribed, or to be
    subscribed as soon as the connection is ready. ``sent`` lists the (UN)SUBSCRIBE
    commands whose reply was not read yet, in order, so that an error reply can be
    matched to its channel. ``awaiting`` are the channels a (re)connection subscribed
    and still waits the confirmation of.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.conn: AbstractConnection | None = None
        self.channels: dict[bytes, None] = {}
        self.sent: deque[tuple[bool, bytes]] = deque()
        self.awaiting: set[bytes] = set()
        self.ready = False
        """Connected and read: a new subscription is sent right away."""
        self.up = False
        """Ready, and every channel placed here before the connection was resubscribed."""
        self.ever_up = False
        self.tried = False
        self.lost = asyncio.Event()
        self.wake = asyncio.Event()
        self.received = 0
        self.pong: asyncio.Future[None] | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.supervisor: asyncio.Task[None] | None = None

    async def send(self, *args: Any) -> None:
        conn = self.conn
        if conn is None or not conn.is_connected:  # never let redis-py reconnect it silently
            raise ConnectionError(f"no pub/sub connection to {self.name}")
        await conn.send_command(*args, check_health=False)

    def settle(self, channel: bytes) -> None:
        """``channel`` no longer holds up the current (re)subscription round."""
        self.awaiting.discard(channel)
        if not self.awaiting:
            self.wake.set()

    async def teardown(self) -> None:
        self.ready = self.up = False
        self.sent.clear()
        self.awaiting.clear()
        tasks, self.tasks = self.tasks, []
        await _cancel(tasks)
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)


async def _cancel(tasks: Sequence[asyncio.Task[Any] | None]) -> None:
    """Cancel ``tasks`` and wait until they ended; their outcome is consumed (nothing logged later)."""
    pending = [task for task in tasks if task is not None]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    for task in pending:
        if not task.cancelled() and task.exception() is not None:
            log.debug("task %r ended with %r", task.get_name(), task.exception())


class _Subscriber:
    """Live delivery over pub/sub: one :class:`_Link` per node, each reconnected on its own.

    ``subscribe``/``unsubscribe`` are the ChannelRegistry's channel hooks; messages go
    to ``dispatch``. ``_wanted`` is the set of channels the registry asked for; each is
    placed on the link of the node owning it (``_placed``).

    A link that fails is rebuilt alone: only its channels are subscribed again, and
    only their conversations are reported to the resubscribe callbacks (after their
    confirmation); the reconnect callbacks run and ``stats.reconnects`` counts once
    per re-established link. A channel the server drops while we want it (its slot
    moved) is subscribed again where its slot now lives (following ``MOVED``), and
    only its conversation is reported — no reconnect is counted. A link that cannot
    connect asks for a slot-map refresh (at most every ``_REFRESH_INTERVAL`` seconds):
    after a failover its channels move to the new primary.

    ``up`` (the backend's ``connected``) is true while at least one link is up: on a
    cluster, one shard down pauses the live events of that shard's conversations only
    (see ``down_nodes``), and must not make every gateway unready at once. On a single
    server it is simply that server's link.
    """

    def __init__(
        self, client: AsyncClient, *, layout: KeyLayout, stats: BackendStats,
        dispatch: Callable[[Envelope], None], has_listeners: Callable[[str], bool],
        callbacks: list[ReconnectCallback], resubscribe_callbacks: list[ResubscribeCallback],
        probe_interval: float, probe_timeout: float, subscribe_timeout: float,
    ) -> None:
        self._topology = _Topology(client)
        self._sharded = isinstance(client, RedisCluster)
        self._layout = layout
        self._stats = stats
        self._dispatch = dispatch
        self._has_listeners = has_listeners
        self._callbacks = callbacks
        self._resubscribe_callbacks = resubscribe_callbacks
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self._subscribe_timeout = subscribe_timeout
        self._wanted: dict[bytes, str] = {}  # channel -> conv
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._placed: dict[bytes, _Link] = {}
        self._live: set[bytes] = set()  # wanted channels confirmed at least once
        self._gapped: set[bytes] = set()  # live channels whose subscription was lost: report them once back
        self._unplaced: set[bytes] = set()  # wanted channels no known node owns (yet)
        self._retries: dict[bytes, int] = {}
        self._links: dict[str, _Link] = {}
        self._known = False
        self._changed = asyncio.Event()
        self._refresh = asyncio.Event()
        self._last_refresh = 0.0
        self._notify: dict[str, None] = {}
        self._notify_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        sub, unsub = ("SSUBSCRIBE", "SUNSUBSCRIBE") if self._sharded else ("SUBSCRIBE", "UNSUBSCRIBE")
        self._sub_cmd, self._unsub_cmd = sub, unsub

    @property
    def up(self) -> bool:
        return any(link.up for link in self._links.values())

    @property
    def down_nodes(self) -> list[str]:
        return sorted(name for name, link in self._links.items() if not link.up)

    async def start(self, timeout: float) -> None:
        """Start; raise BackendUnavailable unless a link is up within ``timeout`` seconds.

        Returns once every link is up, or once each one tried at least once and one
        is up (a node down at start does not hold the others back).
        """
        if self._task is not None:
            return
        self._task = asyncio.create_task(self._supervise(), name="broadcaster-redis-pubsub")
        try:
            async with asyncio.timeout(timeout):
                while not self._started():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            await self.close()
            raise BackendUnavailable(f"no pub/sub connection to Redis within {timeout:g}s") from None

    def _started(self) -> bool:
        links = self._links.values()
        if not self._known or not links:
            return False
        ups = [link.up for link in links]
        return all(ups) or (any(ups) and all(link.tried for link in links))

    async def close(self) -> None:
        links = list(self._links.values())
        await _cancel([self._task, self._notify_task, *self._background, *(link.supervisor for link in links)])
        self._task = self._notify_task = None
        self._background.clear()
        for link in links:
            await link.teardown()
        self._links.clear()
        for future in self._confirm.values():
            future.cancel()
        self._confirm.clear()
        self._wanted.clear()
        self._placed.clear()
        self._live.clear()
        self._gapped.clear()
        self._unplaced.clear()
        self._notify.clear()

    # -- channel hooks (called by the ChannelRegistry under its per-conversation lock) --

    async def subscribe(self, conv: str) -> None:
        channel = self._layout.live(conv).encode()
        self._wanted[channel] = conv
        future = self._confirmation(channel)
        link = self._placed.get(channel)
        if link is None:
            await self._place(channel)
        else:
            await self._send(link, True, channel)
        try:
            async with asyncio.timeout(self._subscribe_timeout):
                await asyncio.shield(future)
        except TimeoutError:
            await self._forget(channel)
            raise BackendUnavailable(f"Redis did not confirm the subscription of {conv!r}") from None

    async def unsubscribe(self, conv: str) -> None:
        await self._forget(self._layout.live(conv).encode())

    async def _forget(self, channel: bytes) -> None:
        self._wanted.pop(channel, None)
        self._live.discard(channel)
        self._gapped.discard(channel)
        self._unplaced.discard(channel)
        self._retries.pop(channel, None)
        future = self._confirm.pop(channel, None)
        if future is not None and not future.done():
            future.set_result(None)  # only a subscription round waits on it: nothing left to wait for
        link = self._placed.pop(channel, None)
        if link is not None:
            link.channels.pop(channel, None)
            link.settle(channel)
            await self._send(link, False, channel)

    def _confirmation(self, channel: bytes) -> asyncio.Future[None]:
        future = self._confirm.get(channel)
        if future is None or future.done():
            future = self._confirm[channel] = asyncio.get_running_loop().create_future()
        return future

    # -- placement --

    def _link(self, name: str) -> _Link:
        """The link to node ``name``, created (and its supervisor started) if needed."""
        link = self._links.get(name)
        if link is None:
            link = self._links[name] = _Link(name)
            link.supervisor = asyncio.create_task(self._run_link(link), name=f"broadcaster-redis-pubsub-{name}")
        return link

    async def _place(self, channel: bytes) -> None:
        """Put ``channel`` on the link of the node owning it now and subscribe it there (moving it if needed)."""
        if channel not in self._wanted:  # forgotten while this was scheduled
            return
        name = self._topology.node_of(channel)
        current = self._placed.get(channel)
        if name is None:
            if current is None:
                self._unplaced.add(channel)
                self._request_refresh()
            return
        self._unplaced.discard(channel)
        if current is not None and current.name == name:
            return
        target = self._link(name)
        self._placed[channel] = target
        target.channels[channel] = None
        if current is not None:
            current.channels.pop(channel, None)
            current.settle(channel)
            if channel in self._live:
                self._gapped.add(channel)
            log.info("channel %r moved from %s to %s", channel, current.name, name)
        await self._send(target, True, channel)
        if current is not None and self._placed.get(channel) is not current:
            await self._send(current, False, channel)  # best effort: the old owner may have dropped it already

    async def _send(self, link: _Link, subscribe: bool, *channels: bytes) -> None:
        """(UN)SUBSCRIBE ``channels`` on ``link`` if it is ready (else its next connection subscribes them)."""
        if not link.ready or not channels:
            return
        command = self._sub_cmd if subscribe else self._unsub_cmd
        link.sent.extend((subscribe, channel) for channel in channels)
        try:
            await link.send(command, *channels)
        except Exception as exc:  # the reader sees the same loss; the rebuild resubscribes
            self._lose(link, f"sending {command} failed: {exc!r}")

    def _request_refresh(self) -> None:
        self._refresh.set()

    async def _resend(self, link: _Link, channel: bytes) -> None:
        """SUBSCRIBE ``channel`` again on ``link``, unless it was forgotten or moved meanwhile."""
        if self._placed.get(channel) is link:
            await self._send(link, True, channel)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("pub/sub background task failed", exc_info=exc)

    # -- supervisors --

    async def _supervise(self) -> None:
        """Load the slot map, open a link per primary; then refresh the map whenever a link asks."""
        async for attempt in reconnect_retrying():
            with attempt:
                async with asyncio.timeout(CONNECT_TIMEOUT + COMMAND_TIMEOUT):
                    await self._topology.refresh()
        loop = asyncio.get_running_loop()
        self._last_refresh = loop.time()
        await self._reconcile()
        self._known = True
        self._changed.set()
        while True:
            await self._refresh.wait()
            await asyncio.sleep(max(0.0, self._last_refresh + _REFRESH_INTERVAL - loop.time()))
            self._refresh.clear()
            self._last_refresh = loop.time()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT + COMMAND_TIMEOUT):
                    await self._topology.refresh()
                await self._reconcile()
            except Exception as exc:
                log.info("slot map refresh failed: %r", exc)
                continue
            if self._unplaced:
                self._request_refresh()

    async def _reconcile(self) -> None:
        """Open a link per primary, move every wanted channel to its owner, drop links nobody needs."""
        primaries = self._topology.primaries()
        for name in primaries:
            self._link(name)
        for channel in list(self._wanted):
            await self._place(channel)
        for name, link in list(self._links.items()):
            if name not in primaries and not link.channels:
                del self._links[name]
                await _cancel([link.supervisor])
                await link.teardown()
        self._changed.set()

    async def _run_link(self, link: _Link) -> None:
        """Keep ``link`` connected: (re)connect, resubscribe its channels, report them, wait for the loss."""
        while True:
            async for attempt in reconnect_retrying():
                with attempt:
                    try:
                        await self._establish(link)
                    except Exception:
                        link.tried = True
                        self._changed.set()
                        self._request_refresh()  # its slots may live elsewhere now (failover, resharding)
                        raise
            link.tried = link.up = True
            self._changed.set()
            if link.ever_up:
                self._stats.reconnects += 1
                log.warning("pub/sub connection to %s re-established; %d channel(s) resubscribed", link.name,
                            len(link.channels))
                await self._run_callbacks()
            link.ever_up = True
            await link.lost.wait()
            self._changed.set()
            await link.teardown()

    async def _establish(self, link: _Link) -> None:
        """Connect ``link``, start its reader and probe, resubscribe its channels and await the confirmations."""
        link.lost.clear()
        try:
            # The pub/sub connection has no socket timeout (its reads block by design), so the
            # handshake gets a deadline here: a black-holed link must not hang the supervisor.
            async with asyncio.timeout(CONNECT_TIMEOUT + COMMAND_TIMEOUT):
                link.conn = self._topology.connection(link.name)
                await link.conn.connect()  # type: ignore[no-untyped-call]
            link.tasks = [asyncio.create_task(self._read(link)), asyncio.create_task(self._probe(link))]
            channels = list(link.channels)
            link.awaiting = set(channels)
            link.wake.clear()
            link.ready = True  # from here on, subscribe() sends by itself
            await self._resubscribe(link, channels)
            try:
                async with asyncio.timeout(max(self._subscribe_timeout, 1.0)):
                    while link.awaiting and not link.lost.is_set():
                        link.wake.clear()
                        await link.wake.wait()
            except TimeoutError:
                raise ConnectionError(f"{link.name} confirmed no resubscription of {len(link.awaiting)} "
                                      "channel(s) in time") from None
            if link.lost.is_set():
                raise ConnectionError(f"pub/sub connection to {link.name} lost while resubscribing")
        except BaseException:
            await link.teardown()
            raise

    async def _resubscribe(self, link: _Link, channels: list[bytes]) -> None:
        if self._sharded:  # SSUBSCRIBE takes channels of a single slot only
            for channel in channels:
                if self._placed.get(channel) is link:
                    await self._send(link, True, channel)
                else:
                    link.settle(channel)
            return
        for i in range(0, len(channels), _SUBSCRIBE_CHUNK):
            chunk = [channel for channel in channels[i : i + _SUBSCRIBE_CHUNK] if self._placed.get(channel) is link]
            await self._send(link, True, *chunk)

    async def _run_callbacks(self) -> None:
        for callback in list(self._callbacks):
            try:
                await callback()
            except Exception:
                log.exception("reconnect callback %r failed", callback)

    def _report(self, conv: str) -> None:
        """Queue ``conv`` for the resubscribe callbacks (its subscription is active again after a gap)."""
        self._notify[conv] = None
        if self._notify_task is None or self._notify_task.done():
            self._notify_task = asyncio.create_task(self._flush_reports())

    async def _flush_reports(self) -> None:
        while self._notify:
            convs, self._notify = list(self._notify), {}
            for callback in list(self._resubscribe_callbacks):
                try:
                    await callback(convs)
                except Exception:
                    log.exception("resubscribe callback %r failed", callback)

    def _lose(self, link: _Link, reason: str) -> None:
        if link.lost.is_set():
            return
        log.warning("pub/sub connection to %s lost: %s", link.name, reason)
        link.ready = link.up = False
        self._gapped.update(channel for channel in link.channels if channel in self._live)
        link.lost.set()
        link.wake.set()
        self._changed.set()

    # -- per link --

    async def _read(self, link: _Link) -> None:
        """Read replies until the connection fails; never stops because of one bad payload."""
        assert link.conn is not None
        read = link.conn.read_response
        on_message = self._on_message
        try:
            while True:
                try:
                    reply = await read()
                except ResponseError as exc:  # an error reply: the connection itself is fine
                    if not self._sharded:
                        raise
                    link.received += 1
                    self._on_error_reply(link, exc)
                    continue
                link.received += 1
                kind = reply[0] if type(reply) is list else reply
                if kind == b"message" or kind == b"smessage":
                    on_message(reply[1], reply[2])
                elif kind == b"subscribe" or kind == b"ssubscribe":
                    self._on_subscribed(link, reply[1])
                elif kind == b"unsubscribe" or kind == b"sunsubscribe":
                    self._on_unsubscribed(link, reply[1])
                elif kind == b"pong" or kind == b"PONG":
                    if link.pong is not None and not link.pong.done():
                        link.pong.set_result(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lose(link, f"reader: {exc!r}")

    @staticmethod
    def _take_sent(link: _Link, subscribe: bool, channel: bytes) -> bool:
        """Match a reply to the command it answers; False if we sent no such command (a server push)."""
        sent, entry = link.sent, (subscribe, channel)
        if sent and sent[0] == entry:
            sent.popleft()
            return True
        try:
            sent.remove(entry)
        except ValueError:
            return False
        return True

    def _on_subscribed(self, link: _Link, channel: bytes) -> None:
        self._take_sent(link, True, channel)
        if self._placed.get(channel) is not link:
            return  # dropped or moved elsewhere meanwhile
        link.settle(channel)
        self._retries.pop(channel, None)
        future = self._confirm.pop(channel, None)
        if future is not None and not future.done():
            future.set_result(None)
        self._live.add(channel)
        if channel in self._gapped:
            self._gapped.discard(channel)
            self._report(self._wanted[channel])

    def _on_unsubscribed(self, link: _Link, channel: bytes | None) -> None:
        if channel is None or self._take_sent(link, False, channel):
            return
        if self._placed.get(channel) is link and channel in self._wanted:
            # Redis dropped a channel we still want (sharded pub/sub: its slot moved). Subscribing it
            # again on the same node gets either a confirmation or a MOVED naming the new owner.
            log.info("%s dropped the subscription of %r; subscribing it again", link.name, channel)
            if channel in self._live:
                self._gapped.add(channel)
            self._spawn(self._resend(link, channel))

    def _on_error_reply(self, link: _Link, exc: ResponseError) -> None:
        """An error answering one of our SSUBSCRIBEs: follow MOVED, retry the rest a little later."""
        entry = link.sent.popleft() if link.sent else None
        if entry is None:
            log.warning("unexpected error reply from %s: %s", link.name, exc)
            return
        subscribe, channel = entry
        if not subscribe or self._placed.get(channel) is not link:
            log.debug("error reply from %s for %r (no longer placed there): %s", link.name, channel, exc)
            return
        if isinstance(exc, MovedError):
            host = exc.host or link.name.rpartition(":")[0]
            self._topology.moved(exc.slot_id, f"{host}:{exc.port}")
            log.info("%r is served by %s:%s now (MOVED); subscribing it there", channel, host, exc.port)
            self._spawn(self._place(channel))
            return
        # ASK / TRYAGAIN (slot being migrated), CLUSTERDOWN, ...: again a little later, on a fresh slot map.
        attempt = self._retries[channel] = self._retries.get(channel, 0) + 1
        delay = min(_RETRY_DELAY_MAX, 0.1 * 2 ** min(attempt - 1, 16))
        log.warning("%s refused the subscription of %r (%s); retrying in %.1fs", link.name, channel, exc, delay)
        link.settle(channel)
        self._request_refresh()
        self._spawn(self._retry(link, channel, delay))

    async def _retry(self, link: _Link, channel: bytes, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._placed.get(channel) is not link:
            return
        await self._place(channel)  # the refreshed slot map may name another owner
        await self._resend(link, channel)

    def _on_message(self, channel: bytes, payload: bytes) -> None:
        conv = self._wanted.get(channel)
        if conv is None or not self._has_listeners(conv):
            return
        try:
            env = decode_envelope(payload)
        except PayloadDecodeError as exc:
            self._stats.decode_errors += 1
            log.debug("dropped an undecodable payload on %r: %s", channel, exc)
            return
        if env.conv != conv:
            self._stats.decode_errors += 1
            log.debug("dropped a payload for %r received on %r", env.conv, channel)
            return
        self._dispatch(env)

    async def _probe(self, link: _Link) -> None:
        """PING a connection quiet for ``probe_interval``; no PONG within ``probe_timeout`` = dead link."""
        loop = asyncio.get_running_loop()
        seen, quiet_since = link.received, loop.time()
        tick = max(self._probe_interval / 4, 0.01)
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            if link.received != seen:
                seen, quiet_since = link.received, now
                continue
            if now - quiet_since < self._probe_interval:
                continue
            link.pong = loop.create_future()
            try:
                await link.send("PING")
                async with asyncio.timeout(self._probe_timeout):
                    await link.pong
            except TimeoutError:
                self._lose(link, f"no PONG within {self._probe_timeout:g}s")
                return
            except Exception as exc:
                self._lose(link, f"probe: {exc!r}")
                return
            seen, quiet_since = link.received, loop.time()


class RedisBackend(Backend):
    """The Redis / Redis Cluster backend (see the module docstring).

    ``url``: ``redis://``, ``rediss://``, ``redis+cluster://host:port[,host:port...]`` or
    ``rediss+cluster://...`` (see :func:`broadcaster.backends.scripts.parse_redis_url`).
    ``probe_interval`` / ``probe_timeout``: seconds of pub/sub silence before a
    PING, and seconds to wait for its PONG. ``retry_budget``: seconds transient
    errors are retried before :class:`BackendUnavailable` (also the time ``start``
    and a subscription wait for Redis).

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
        client: AsyncClient | None = None,
    ) -> None:
        self.settings = settings or BackendSettings()
        self.stats = BackendStats()
        self.url = url
        self.layout = KeyLayout(key_prefix)
        self._retry_budget = retry_budget
        self._probe_timeout = probe_timeout
        if client is None:
            client = make_async_client(scripts.parse_redis_url(url))
        self.commands = RedisCommands(client, layout=self.layout, settings=self.settings, stats=self.stats,
                                      retry=RetryPolicy(budget=retry_budget))
        self._callbacks: list[ReconnectCallback] = []
        self._resubscribe_callbacks: list[ResubscribeCallback] = []
        self._subscriber = _Subscriber(
            client, layout=self.layout, stats=self.stats, dispatch=self._dispatch,
            has_listeners=self._has_listeners, callbacks=self._callbacks,
            resubscribe_callbacks=self._resubscribe_callbacks, probe_interval=probe_interval,
            probe_timeout=probe_timeout, subscribe_timeout=max(retry_budget, 1.0),
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

    async def close(self) -> None:
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

    async def publish(
        self, conv: str, type: str, data: Any = None, *, id: str | None = None, key: str | None = None
    ) -> PublishResult:
        return (await self.publish_many([PublishRequest(conv, type, data, id, key)]))[0]

    async def publish_many(self, requests: Sequence[PublishRequest]) -> list[PublishResult]:
        prepared = [prepare_publish(r, self.settings.history_ttl, self.settings.max_data_bytes) for r in requests]
        return await self.commands.publish_many(prepared)

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

    async def state(self, conv: str) -> StateSnapshot:
        return await self.commands.state(conv)

    async def report_presence(self, gateway_id: str, counts: Mapping[str, Mapping[str, int]], ttl: float) -> None:
        await self.commands.report_presence(gateway_id, counts, ttl)

    async def presence(self, conv: str) -> Presence:
        return await self.commands.presence(conv)
