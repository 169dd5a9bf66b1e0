"""Live delivery over pub/sub: one link per node, placement of channels, reconnects and the idle probe."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import MovedError, RedisClusterException, RedisError, ResponseError

from broadcaster.backend import BackendStats, ReconnectCallback, ResubscribeCallback
from broadcaster.backends.redis.clients import COMMAND_TIMEOUT, CONNECT_TIMEOUT, AsyncClient
from broadcaster.backends.redis.link import Link, cancel_tasks
from broadcaster.backends.redis.protocol import (
    Broken,
    Message,
    Pong,
    Refused,
    StrayError,
    Subscribed,
    Unsubscribed,
)
from broadcaster.backends.redis.topology import Topology
from broadcaster.codec import decode_envelope
from broadcaster.envelope import Envelope
from broadcaster.errors import BackendUnavailable, PayloadDecodeError
from broadcaster.keys import KeyLayout
from broadcaster.retry import reconnect_retrying

log = logging.getLogger("broadcaster.backend.redis")

SUBSCRIBE_CHUNK = 500
"""Channels per SUBSCRIBE command when a standalone link subscribes its channels again."""
REFRESH_INTERVAL = 2.0
"""Seconds between two slot-map refreshes asked for by pub/sub links that cannot connect."""
MASTER_CHECK_INTERVAL = 1.0
"""Seconds between two questions to the sentinels (``redis+sentinel://``): is our pub/sub link still on the master?"""
RETRY_DELAY_MAX = 5.0
"""Longest wait before subscribing again a channel a node refused (other than with MOVED)."""
LINK_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError, TimeoutError)
"""What an unreachable node or a failing pub/sub connection raises (the builtin ConnectionError is an OSError)."""


async def settles_within(future: asyncio.Future[Any], timeout: float, tick: float = 0.1) -> bool:
    """Whether ``future`` is done within ``timeout`` seconds of this loop running, checked every ``tick``:
    a loop stalled between two checks counts as two ticks at most (meanwhile a reply may sit unread in
    the socket, so the wall-clock time says nothing about the peer)."""
    loop = asyncio.get_running_loop()
    tick = min(tick, timeout)
    left, last = timeout, loop.time()
    while not future.done():
        if left <= 0:
            return False
        await asyncio.wait((future,), timeout=tick)
        now = loop.time()
        left -= min(now - last, 2 * tick)
        last = now
    return True


class Subscriber:
    """Live delivery over pub/sub: one :class:`Link` per node, each reconnected on its own.

    ``subscribe``/``unsubscribe`` are the ChannelRegistry's channel hooks; messages go
    to ``dispatch``. ``_wanted`` is the set of channels the registry asked for; each is
    placed on the link of the node owning it (``_placed``).

    A link that fails is rebuilt alone: only its channels are subscribed again, and
    only their conversations are reported to the resubscribe callbacks (after their
    confirmation); the reconnect callbacks run and ``stats.reconnects`` counts once
    per re-established link. A channel the server drops while we want it (its slot
    moved) is subscribed again where its slot now lives (following ``MOVED``), and
    only its conversation is reported — no reconnect is counted. A link that cannot
    connect asks for a slot-map refresh (at most every ``REFRESH_INTERVAL`` seconds):
    after a failover its channels move to the new primary.

    ``up`` (the backend's ``connected``) is true while at least one link is up: on a
    cluster, one shard down pauses the live events of that shard's conversations only
    (see ``down_nodes``), and must not make every gateway unready at once. On a single
    server it is simply that server's link.

    The control channel (``layout.control()``, when ``control`` is given) is wanted from
    ``start`` on like a conversation's channel, under the conversation ``""``: placed,
    resubscribed and moved the same way, never reported to the resubscribe callbacks;
    its payloads go to ``control`` undecoded.
    """

    def __init__(
        self, client: AsyncClient, *, layout: KeyLayout, stats: BackendStats,
        dispatch: Callable[[Envelope], None], has_listeners: Callable[[str], bool],
        callbacks: list[ReconnectCallback], resubscribe_callbacks: list[ResubscribeCallback],
        probe_interval: float, probe_timeout: float, subscribe_timeout: float,
        control: Callable[[bytes], None] | None = None,
    ) -> None:
        self._topology = Topology(client)
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
        self._placed: dict[bytes, Link] = {}
        self._live: set[bytes] = set()  # wanted channels confirmed at least once
        self._gapped: set[bytes] = set()  # live channels whose subscription was lost: report them once back
        self._unplaced: set[bytes] = set()  # wanted channels no known node owns (yet)
        self._retries: dict[bytes, int] = {}
        self._links: dict[str, Link] = {}
        self._known = False
        self._changed = asyncio.Event()
        self._refresh = asyncio.Event()
        self._last_refresh = 0.0
        self._notify: dict[str, None] = {}
        self._notify_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._control = control
        self._control_channel = layout.control().encode()

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
        if self._control is not None:
            # Wanted from the start like a conversation's channel (placed, resubscribed, moved the same
            # way), with no conversation: "" is never one. Its messages go to ``control``.
            self._wanted[self._control_channel] = ""
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
        await cancel_tasks([self._task, self._notify_task, *self._background, *(link.supervisor for link in links)])
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

    def _link(self, name: str) -> Link:
        """The link to node ``name``, created (and its supervisor started) if needed."""
        link = self._links.get(name)
        if link is None:
            link = self._links[name] = Link(name, sharded=self._sharded)
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

    async def _send(self, link: Link, subscribe: bool, *channels: bytes) -> None:
        """(UN)SUBSCRIBE ``channels`` on ``link`` if it is ready (else its next connection subscribes them)."""
        if not link.ready or not channels:
            return
        protocol = link.protocol
        command = protocol.subscribe(channels) if subscribe else protocol.unsubscribe(channels)
        try:
            await link.send(command)
        except LINK_ERRORS as exc:  # the reader sees the same loss; the rebuild resubscribes
            self._lose(link, f"sending {command[0]!s} failed: {exc!r}")
        except Exception as exc:
            log.exception("sending %s to %s failed unexpectedly", command[0], link.name)
            self._lose(link, f"sending {command[0]!s} failed: {exc!r}")

    def _request_refresh(self) -> None:
        self._refresh.set()

    async def _resend(self, link: Link, channel: bytes) -> None:
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
            await asyncio.sleep(max(0.0, self._last_refresh + REFRESH_INTERVAL - loop.time()))
            self._refresh.clear()
            self._last_refresh = loop.time()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT + COMMAND_TIMEOUT):
                    await self._topology.refresh()
                await self._reconcile()
            except LINK_ERRORS as exc:
                log.info("slot map refresh failed: %r", exc)
                continue
            except Exception:
                log.exception("slot map refresh failed unexpectedly")
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
                await cancel_tasks([link.supervisor])
                await link.teardown()
        self._changed.set()

    async def _run_link(self, link: Link) -> None:
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

    async def _establish(self, link: Link) -> None:
        """Connect ``link``, start its reader and probe, resubscribe its channels and await the confirmations."""
        link.lost.clear()
        try:
            # The pub/sub connection has no socket timeout (its reads block by design), so the
            # handshake gets a deadline here: a black-holed link must not hang the supervisor.
            async with asyncio.timeout(CONNECT_TIMEOUT + COMMAND_TIMEOUT):
                link.conn = self._topology.connection(link.name)
                await link.conn.connect()  # type: ignore[no-untyped-call]
                if self._topology.sentinel:
                    await self._check_role(link)
            link.tasks = [asyncio.create_task(self._read(link)), asyncio.create_task(self._probe(link))]
            if self._topology.sentinel:
                link.tasks.append(asyncio.create_task(self._watch_master(link)))
            channels = list(link.channels)
            link.begin_round(channels)
            link.ready = True  # from here on, subscribe() sends by itself
            await self._resubscribe(link, channels)
            try:
                async with asyncio.timeout(max(self._subscribe_timeout, 1.0)):
                    while not link.protocol.round_complete and not link.lost.is_set():
                        link.wake.clear()
                        await link.wake.wait()
            except TimeoutError:
                raise ConnectionError(f"{link.name} confirmed no resubscription of {len(link.protocol.awaiting)} "
                                      "channel(s) in time") from None
            if link.lost.is_set():
                raise ConnectionError(f"pub/sub connection to {link.name} lost while resubscribing")
        except BaseException:
            await link.teardown()
            raise

    async def _check_role(self, link: Link) -> None:
        """ROLE on a fresh connection (before it enters pub/sub): a replica, a demoted master, is refused.

        A replica would accept the subscriptions and relay what its master publishes, or
        nothing at all when cut from it; either way not the node producers write to.
        """
        conn = link.conn
        assert conn is not None
        await conn.send_command("ROLE", check_health=False)
        reply = await conn.read_response()
        role = reply[0] if isinstance(reply, list | tuple) and reply else reply
        if role not in (b"master", "master"):
            raise ConnectionError(f"{getattr(conn, 'host', '?')}:{getattr(conn, 'port', '?')} is a {role!r}, "
                                  "not the master (a failover is under way)")

    async def _watch_master(self, link: Link) -> None:
        """Where the sentinels say the master is, on their ``+switch-master`` announcement or every
        MASTER_CHECK_INTERVAL otherwise; another address than the link's = a lost link.

        A demoted master keeps our connection open and may stay silent (partitioned from
        the producers): the idle probe's PONG would still come, this does not.
        """
        conn = link.conn
        switches = self._topology.master_switches()
        assert conn is not None and switches is not None
        here = (str(getattr(conn, "host", "")), int(getattr(conn, "port", 0)))
        async with switches:
            while True:
                master = await switches.wait(MASTER_CHECK_INTERVAL)  # an announcement at once, else the poll
                if master is None:
                    try:
                        async with asyncio.timeout(CONNECT_TIMEOUT + COMMAND_TIMEOUT):
                            master = await self._topology.master_address()
                    except LINK_ERRORS as exc:  # no sentinel answers, or none knows a master: the reader tells
                        log.debug("asking the sentinels for the master failed: %r", exc)
                        continue
                if master is not None and master != here:
                    self._lose(link, f"the sentinels name {master[0]}:{master[1]} the master now, "
                                     f"not {here[0]}:{here[1]}")
                    return

    async def _resubscribe(self, link: Link, channels: list[bytes]) -> None:
        if self._sharded:  # SSUBSCRIBE takes channels of a single slot only
            for channel in channels:
                if self._placed.get(channel) is link:
                    await self._send(link, True, channel)
                else:
                    link.settle(channel)
            return
        for i in range(0, len(channels), SUBSCRIBE_CHUNK):
            chunk = [channel for channel in channels[i : i + SUBSCRIBE_CHUNK] if self._placed.get(channel) is link]
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

    def _lose(self, link: Link, reason: str) -> None:
        if link.lost.is_set():
            return
        log.warning("pub/sub connection to %s lost: %s", link.name, reason)
        link.ready = link.up = False
        self._gapped.update(channel for channel in link.channels if channel in self._live)
        link.lost.set()
        link.wake.set()
        self._changed.set()

    # -- per link: the reader drives the link's protocol --

    async def _read(self, link: Link) -> None:
        """Read replies until the connection fails; never stops because of one bad payload."""
        assert link.conn is not None
        read, receive = link.conn.read_response, link.protocol.receive
        on_message = self._on_message
        try:
            while True:
                try:
                    reply: object = await read()
                except ResponseError as exc:  # an error reply: the protocol decides what it means
                    reply = exc
                event = receive(reply)
                if type(event) is Message:
                    on_message(event.channel, event.payload)
                elif type(event) is Subscribed:
                    self._on_subscribed(link, event.channel)
                elif type(event) is Unsubscribed:
                    self._on_unsubscribed(link, event)
                elif type(event) is Pong:
                    if link.pong is not None and not link.pong.done():
                        link.pong.set_result(None)
                elif type(event) is Refused:
                    self._on_refused(link, event)
                elif type(event) is StrayError:
                    log.warning("unexpected error reply from %s: %s", link.name, event.error)
                elif type(event) is Broken:
                    self._lose(link, f"reader: {event.error!r}")
                    return
        except asyncio.CancelledError:
            raise
        except LINK_ERRORS as exc:
            self._lose(link, f"reader: {exc!r}")
        except Exception as exc:
            log.exception("pub/sub reader of %s failed unexpectedly", link.name)
            self._lose(link, f"reader: {exc!r}")

    def _on_subscribed(self, link: Link, channel: bytes) -> None:
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
            if channel != self._control_channel:
                self._report(self._wanted[channel])

    def _on_unsubscribed(self, link: Link, event: Unsubscribed) -> None:
        channel = event.channel
        if event.requested:
            return
        if self._placed.get(channel) is link and channel in self._wanted:
            # Redis dropped a channel we still want (sharded pub/sub: its slot moved). Subscribing it
            # again on the same node gets either a confirmation or a MOVED naming the new owner.
            log.info("%s dropped the subscription of %r; subscribing it again", link.name, channel)
            if channel in self._live:
                self._gapped.add(channel)
            self._spawn(self._resend(link, channel))

    def _on_refused(self, link: Link, event: Refused) -> None:
        """An error answering one of our SSUBSCRIBEs: follow MOVED, retry the rest a little later."""
        channel, exc = event.channel, event.error
        if not event.subscribe or self._placed.get(channel) is not link:
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
        delay = min(RETRY_DELAY_MAX, 0.1 * 2 ** min(attempt - 1, 16))
        log.warning("%s refused the subscription of %r (%s); retrying in %.1fs", link.name, channel, exc, delay)
        link.settle(channel)
        self._request_refresh()
        self._spawn(self._retry(link, channel, delay))

    async def _retry(self, link: Link, channel: bytes, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._placed.get(channel) is not link:
            return
        await self._place(channel)  # the refreshed slot map may name another owner
        await self._resend(link, channel)

    def _on_message(self, channel: bytes, payload: bytes) -> None:
        conv = self._wanted.get(channel)
        if not conv:  # not ours, or "": the control channel
            if conv is not None and self._control is not None:
                self._control(payload)
            return
        if not self._has_listeners(conv):
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

    async def _probe(self, link: Link) -> None:
        """PING a connection quiet for ``probe_interval``; no PONG within ``probe_timeout`` of the loop running
        = dead link (a stalled loop - a long callback, a full collection - does not count against the link)."""
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
                await link.send(link.protocol.ping())
                if not await settles_within(link.pong, self._probe_timeout):
                    self._lose(link, f"no PONG within {self._probe_timeout:g}s")
                    return
                await link.pong  # what the reader set on it: a PONG, or the error that ended the link
            except TimeoutError:
                self._lose(link, f"no PONG within {self._probe_timeout:g}s")
                return
            except LINK_ERRORS as exc:
                self._lose(link, f"probe: {exc!r}")
                return
            except Exception as exc:
                log.exception("pub/sub probe of %s failed unexpectedly", link.name)
                self._lose(link, f"probe: {exc!r}")
                return
            seen, quiet_since = link.received, loop.time()
