"""The Redis backend: standalone Redis (``redis://``, ``rediss://``) or Redis Cluster (``redis+cluster://``).

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
  failover behind a proxy). After a rebuild every wanted channel is subscribed
  again and the reconnect callbacks run (the hub repairs from history there).

:class:`RedisBackend` joins them with the shared :class:`ChannelRegistry`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError

from broadcaster.backend import (
    Backend,
    BackendSettings,
    BackendStats,
    Head,
    HistoryPage,
    Listener,
    Presence,
    ReconnectCallback,
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


def make_async_client(target: scripts.RedisTarget) -> AsyncClient:
    """A redis-py asyncio client for ``target``; its own retries are off (our policy retries)."""
    options: dict[str, Any] = {
        "protocol": 2,
        "decode_responses": False,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": COMMAND_TIMEOUT,
        "health_check_interval": 0,
    }
    if target.is_cluster:
        nodes = [ClusterNode(host, port) for host, port in target.cluster_nodes]
        # One immediate in-client retry lets redis-py refresh its slot map after a MOVED/failover.
        return RedisCluster(startup_nodes=nodes, username=target.username, password=target.password,
                            retry=Retry(NoBackoff(), 1), **options)
    return Redis.from_url(target.url, retry=Retry(NoBackoff(), 0), **options)


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
        try:
            async with asyncio.timeout(timeout):
                return bool(await self.client.ping())
        except Exception:
            return False

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
        """Send ``commands`` in one round trip; error replies come back as exception values."""
        if len(commands) == 1:
            try:
                return [await self.client.execute_command(*commands[0])]
            except ResponseError as exc:
                return [exc]
        pipe = self.client.pipeline(transaction=False) if isinstance(self.client, Redis) else self.client.pipeline()
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))


class _Topology:
    """Which node a channel lives on, and fresh pub/sub connections to every node."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._initialised = False

    async def connections(self) -> dict[str, AbstractConnection]:
        """One new (unconnected) pub/sub connection per node, by node name."""
        overrides = {"protocol": 2, "socket_timeout": None, "health_check_interval": 0}
        if isinstance(self._client, RedisCluster):
            if self._initialised:
                await self._client.nodes_manager.initialize()
            else:
                await self._client.initialize()
                self._initialised = True
            return {
                node.name: node.connection_class(**{**node.connection_kwargs, **overrides})
                for node in self._client.get_primaries()
            }
        pool = self._client.connection_pool
        return {"main": pool.connection_class(**{**pool.connection_kwargs, **overrides})}

    def node_of(self, channel: str) -> str | None:
        if isinstance(self._client, RedisCluster):
            try:
                node = self._client.get_node_from_key(channel)
            except Exception:
                return None
            return node.name if node is not None else None
        return "main"


class _Link:
    """One pub/sub connection to one node, with its reader and idle-probe tasks."""

    def __init__(self, name: str, conn: AbstractConnection) -> None:
        self.name = name
        self.conn = conn
        self.received = 0
        self.pong: asyncio.Future[None] | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def send(self, *args: Any) -> None:
        await self.conn.send_command(*args, check_health=False)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await self.conn.disconnect(nowait=True)


class _Subscriber:
    """Live delivery over pub/sub; see the module docstring.

    ``subscribe``/``unsubscribe`` are the ChannelRegistry's channel hooks; messages
    go to ``dispatch``. ``_wanted`` is the set of channels the registry asked for
    (subscribed or being subscribed): a rebuilt connection subscribes all of them.
    """

    def __init__(
        self, client: AsyncClient, *, layout: KeyLayout, stats: BackendStats,
        dispatch: Callable[[Envelope], None], has_listeners: Callable[[str], bool],
        callbacks: list[ReconnectCallback], probe_interval: float, probe_timeout: float, subscribe_timeout: float,
    ) -> None:
        self._topology = _Topology(client)
        self._sharded = isinstance(client, RedisCluster)
        self._layout = layout
        self._stats = stats
        self._dispatch = dispatch
        self._has_listeners = has_listeners
        self._callbacks = callbacks
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self._subscribe_timeout = subscribe_timeout
        self._wanted: dict[bytes, str] = {}  # channel -> conv
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._unsubscribing: dict[bytes, int] = {}
        self._links: dict[str, _Link] = {}
        self._links_ready = False  # links exist and the wanted set was snapshotted for resubscription
        self._up = False
        self._lost = asyncio.Event()
        self._ever_up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        sub, unsub = ("SSUBSCRIBE", "SUNSUBSCRIBE") if self._sharded else ("SUBSCRIBE", "UNSUBSCRIBE")
        self._sub_cmd, self._unsub_cmd = sub, unsub

    @property
    def up(self) -> bool:
        return self._up

    async def start(self, timeout: float) -> None:
        """Start the supervisor; raise BackendUnavailable unless connected within ``timeout`` seconds."""
        if self._task is not None:
            return
        self._task = asyncio.create_task(self._supervise(), name="broadcaster-redis-pubsub")
        try:
            async with asyncio.timeout(timeout):
                await self._ever_up.wait()
        except TimeoutError:
            await self.close()
            raise BackendUnavailable(f"no pub/sub connection to Redis within {timeout:g}s") from None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        await self._teardown()
        for future in self._confirm.values():
            future.cancel()
        self._confirm.clear()
        self._wanted.clear()

    # -- channel hooks (called by the ChannelRegistry under its per-conversation lock) --

    async def subscribe(self, conv: str) -> None:
        channel = self._layout.live(conv).encode()
        self._wanted[channel] = conv
        future = self._confirmation(channel)
        if self._links_ready:
            await self._send_to_node(channel, self._sub_cmd)
        try:
            async with asyncio.timeout(self._subscribe_timeout):
                await asyncio.shield(future)
        except TimeoutError:
            del self._wanted[channel]
            self._confirm.pop(channel, None)
            if self._links_ready:
                await self._send_to_node(channel, self._unsub_cmd)
            raise BackendUnavailable(f"Redis did not confirm the subscription of {conv!r}") from None

    async def unsubscribe(self, conv: str) -> None:
        channel = self._layout.live(conv).encode()
        self._wanted.pop(channel, None)
        future = self._confirm.pop(channel, None)
        if future is not None and not future.done():
            future.set_result(None)  # only a resubscription round waits on it: nothing left to wait for
        if self._links_ready:
            await self._send_to_node(channel, self._unsub_cmd)

    def _confirmation(self, channel: bytes) -> asyncio.Future[None]:
        future = self._confirm.get(channel)
        if future is None or future.done():
            future = self._confirm[channel] = asyncio.get_running_loop().create_future()
        return future

    async def _send_to_node(self, channel: bytes, command: str) -> None:
        link = self._links.get(self._topology.node_of(channel.decode()) or "")
        if link is None:
            self._lose("a channel maps to a node we are not connected to (topology changed)")
            return
        if command == self._unsub_cmd:
            self._unsubscribing[channel] = self._unsubscribing.get(channel, 0) + 1
        try:
            await link.send(command, channel)
        except Exception as exc:  # the reader sees the same loss; the rebuild resubscribes
            self._lose(f"sending {command} failed: {exc!r}")

    # -- supervisor --

    async def _supervise(self) -> None:
        first = True
        while True:
            async for attempt in reconnect_retrying():
                with attempt:
                    await self._establish()
            self._up = True
            self._ever_up.set()
            if not first:
                self._stats.reconnects += 1
                log.warning("pub/sub reconnected; %d channel(s) resubscribed", len(self._wanted))
                await self._run_callbacks()
            first = False
            await self._lost.wait()
            self._up = False
            await self._teardown()

    async def _establish(self) -> None:
        """Connect every node, start the readers, resubscribe every wanted channel and await the confirmations."""
        self._lost.clear()
        try:
            # The pub/sub connection has no socket timeout (its reads block by design), so the
            # handshake gets a deadline here: a black-holed link must not hang the supervisor.
            async with asyncio.timeout(CONNECT_TIMEOUT + COMMAND_TIMEOUT):
                for name, conn in (await self._topology.connections()).items():
                    link = self._links[name] = _Link(name, conn)
                    await conn.connect()  # type: ignore[no-untyped-call]
                    link.tasks = [asyncio.create_task(self._read(link)), asyncio.create_task(self._probe(link))]
            wanted = list(self._wanted)
            self._links_ready = True  # from here on, subscribe() sends by itself
            futures = [self._confirmation(channel) for channel in wanted]
            await self._resubscribe(wanted)
            lost: asyncio.Future[Any] = asyncio.ensure_future(self._lost.wait())
            try:
                confirmed: asyncio.Future[Any] = asyncio.gather(*(asyncio.shield(f) for f in futures),
                                                                return_exceptions=True)
                done, _ = await asyncio.wait({confirmed, lost}, timeout=max(self._subscribe_timeout, 1.0),
                                             return_when=asyncio.FIRST_COMPLETED)
                if confirmed not in done:
                    confirmed.cancel()
                    raise ConnectionError("pub/sub connection lost or silent while resubscribing")
            finally:
                lost.cancel()
        except BaseException:
            await self._teardown()
            raise

    async def _resubscribe(self, channels: list[bytes]) -> None:
        by_node: dict[str, list[bytes]] = {}
        for channel in channels:
            by_node.setdefault(self._topology.node_of(channel.decode()) or "", []).append(channel)
        for node, node_channels in by_node.items():
            link = self._links.get(node)
            if link is None:
                raise ConnectionError(f"no pub/sub connection for node {node!r}")
            if self._sharded:  # SSUBSCRIBE takes channels of a single slot only
                for channel in node_channels:
                    await link.send(self._sub_cmd, channel)
            else:
                for i in range(0, len(node_channels), _SUBSCRIBE_CHUNK):
                    await link.send(self._sub_cmd, *node_channels[i : i + _SUBSCRIBE_CHUNK])

    async def _teardown(self) -> None:
        self._up = False
        self._links_ready = False
        links, self._links = self._links, {}
        self._unsubscribing.clear()
        for link in links.values():
            await link.close()

    async def _run_callbacks(self) -> None:
        for callback in list(self._callbacks):
            try:
                await callback()
            except Exception:
                log.exception("reconnect callback %r failed", callback)

    def _lose(self, reason: str) -> None:
        if not self._lost.is_set():
            log.warning("pub/sub connection lost: %s", reason)
            self._up = False
            self._links_ready = False
            self._lost.set()

    # -- per link --

    async def _read(self, link: _Link) -> None:
        """Read replies until the connection fails; never stops because of one bad payload."""
        read = link.conn.read_response
        on_message = self._on_message
        try:
            while True:
                reply = await read()
                link.received += 1
                kind = reply[0] if type(reply) is list else reply
                if kind == b"message" or kind == b"smessage":
                    on_message(reply[1], reply[2])
                elif kind == b"subscribe" or kind == b"ssubscribe":
                    future = self._confirm.pop(reply[1], None)
                    if future is not None and not future.done():
                        future.set_result(None)
                elif kind == b"unsubscribe" or kind == b"sunsubscribe":
                    self._on_unsubscribed(reply[1])
                elif kind == b"pong" or kind == b"PONG":
                    if link.pong is not None and not link.pong.done():
                        link.pong.set_result(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lose(f"reader on {link.name}: {exc!r}")

    def _on_unsubscribed(self, channel: bytes | None) -> None:
        if channel is None:
            return
        pending = self._unsubscribing.get(channel, 0)
        if pending:
            if pending == 1:
                del self._unsubscribing[channel]
            else:
                self._unsubscribing[channel] = pending - 1
        elif channel in self._wanted:
            # Redis dropped a channel we still want (sharded pub/sub: its slot moved).
            self._lose(f"server unsubscribed {channel!r}")

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
                self._lose(f"no PONG from {link.name} within {self._probe_timeout:g}s")
                return
            except Exception as exc:
                self._lose(f"probe on {link.name}: {exc!r}")
                return
            seen, quiet_since = link.received, loop.time()


class RedisBackend(Backend):
    """The Redis / Redis Cluster backend (see the module docstring).

    ``url``: ``redis://``, ``rediss://`` or ``redis+cluster://host:port[,host:port...]``.
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
        self._subscriber = _Subscriber(
            client, layout=self.layout, stats=self.stats, dispatch=self._dispatch,
            has_listeners=self._has_listeners, callbacks=self._callbacks, probe_interval=probe_interval,
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
        return self._subscriber.up

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
        self._callbacks.append(callback)

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
