"""The hub: subscriptions, resume, gap repair, profile rendering and dispatch.

The hub is the broker half of the broker / transport split. It owns one *feed* per
conversation watched in this process (one backend listener, ref-counted by the
connections subscribed), keeps each feed's epoch and last delivered seq, and hands
every subscriber the bytes of each JSON object it must send, in order, through
:meth:`Subscriber.send`. It never touches a socket.

Guarantees, per subscription (CONTRACT §3):

* ``ws.subscribed`` first; then events after ``since`` (from history) or a
  ``ws.state`` snapshot (hydrate); then live events - no gap, no duplicate. The
  subscriber is registered on the feed *before* history is read and the live
  events arriving meanwhile are buffered and merged by seq.
* A feed delivers seq ``n + 1`` only after ``n``: a jump triggers a history read
  that fills the gap first; late or repeated payloads (seq already delivered) are
  dropped. When the backend resubscribed a conversation after a gap (a reconnect, a
  moved cluster slot) its feed repairs from history.
* When a conversation's epoch changes (its backend state was lost) every
  subscriber gets ``ws.reset`` ``epoch_changed`` with seq 0, then the events of the
  new epoch. A client never receives an event of an epoch it was not told (by
  ``ws.subscribed``, ``ws.state`` or ``ws.reset``): a resume whose history read finds
  another epoch stops there and is reset by the feed, like everyone else.
* Repairs read history through one :class:`BatchedHistory`: however many feeds
  repair at once (every feed after a pub/sub reconnect), a few batched reads run at
  a time. Resumes read through another one (many clients resuming at once after a
  gateway died share a few batched reads; they never queue behind an all-feeds
  repair). When the gap cannot be filled because history no longer holds it,
  ``ws.reset`` ``history_truncated`` and live from the latest seq.
* Each event is intercepted once and rendered once per profile (filter,
  drop_fields, enrich, JSON encode) no matter how many connections use it.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from broadcaster.backend import Backend, HistoryPage, Listener
from broadcaster.batched_reads import DEFAULT_BATCH_SIZE, DEFAULT_CONCURRENCY, BatchedHistory
from broadcaster.codec import dumps, embed, json_object, loads
from broadcaster.delta import make_patch
from broadcaster.envelope import Envelope
from broadcaster.errors import BackendUnavailable
from broadcaster.hooks import PluginContext, SubscriptionInfo
from broadcaster.locks import KeyedLock
from broadcaster.profiles import EnrichContext, GlobSet, Profile

log = logging.getLogger("broadcaster.hub")

REPAIR_PAGE = 1000
MAX_SYNC_BUFFER = 100_000
"""Live events buffered while a feed syncs; past this they are dropped (history refills them)."""
MAX_USER_CHANGES = 2000
"""User changes a conversation keeps between two :meth:`Hub.take_user_changes`; past it, "too many" (report all)."""
MAX_DELTA_KEYS = 10_000
"""Keys whose last version a delta group (or a delta subscriber) remembers; past this it forgets them all
(the next upsert of each goes out whole)."""


class Subscriber(Protocol):
    """A connection as the hub sees it: something that queues encoded JSON objects."""

    connection_id: str

    def send(self, data: bytes) -> None:
        """Queue one encoded JSON object for the connection; must not block."""


class EventSubscriber(Subscriber, Protocol):
    """A subscriber told each event object's type, seq and epoch along with its bytes (an SSE stream
    frames its ``event:`` and ``id:`` lines from them, without parsing the JSON).

    The hub calls ``send_event`` instead of ``send`` for event objects when the subscriber has it
    (looked up once per subscription); control objects (``ws.*``) still go through ``send``.
    """

    def send_event(self, data: bytes, kind: str, seq: int, epoch: str) -> None:
        """Queue one encoded event object of type ``kind``; must not block."""


EventSend = Callable[[bytes, str, int, str], None]


@dataclass(slots=True)
class HubStats:
    """Counters exported as metrics."""

    events_in: int = 0
    events_delivered: int = 0
    deliveries: int = 0
    renders: int = 0
    duplicates_dropped: int = 0
    stale_dropped: int = 0
    gap_repairs: int = 0
    resets: int = 0
    history_went_back: int = 0
    """Feeds that found their history behind what they had delivered (a failover lost events): new epoch."""
    render_errors: int = 0
    intercept_drops: int = 0


_GroupKey = tuple[str, tuple[str, ...]]
_Pending = tuple[int, bytes, bool, str, str]  # (seq, payload, is_reset, epoch, type)


@dataclass(slots=True, eq=False)
class _Member:
    """One subscription. ``epoch`` is the last epoch its client was told (``ws.subscribed``,
    ``ws.state`` or ``ws.reset``): it receives events of that epoch only. ``pending`` queues
    what the feed sends while the subscription preamble is still going out."""

    sub: Subscriber
    group: _Group
    send: Callable[[bytes], None]
    """``sub.send``, looked up once."""
    position: int = 0
    epoch: str = ""
    pending: list[_Pending] | None = field(default_factory=list)
    send_event: EventSend | None = None
    """The subscriber's ``send_event`` (:class:`EventSubscriber`), else None: events go through ``send``."""
    user: str | None = None
    """The subscriber's ``user`` (read once, at join): counted in its feed's ``users``."""
    held: dict[str, tuple[str, int]] | None = None
    """Delta subscribers only: key -> (epoch, seq) of the version of that key it was sent live (whole or as a
    delta), so it certainly holds it; a delta goes to it only against that version (docs/streaming.md)."""


@dataclass(slots=True, eq=False)
class _Group:
    profile: Profile
    types: GlobSet | None
    members: dict[Subscriber, _Member] = field(default_factory=dict)
    delta_members: int = 0
    versions: dict[str, tuple[str, int, Any]] = field(default_factory=dict)
    """While ``delta_members``: key -> (epoch, seq, data) of the last version of that key this group rendered live."""
    live: _Live | None = None
    """The members as one :class:`_Live` when every one is live in one epoch (else ``NOT_LIVE``); None: to be
    worked out at the next event. Reset to None whenever a member joins, leaves, goes live or is reset."""

    def wants(self, event_type: str) -> bool:
        return self.types is None or self.types.matches(event_type)


@dataclass(slots=True, eq=False)
class _Live:
    """A group whose members are all live in ``epoch``, none past ``after``: each event of that epoch past it
    goes to every one of them, so :meth:`Hub._deliver` calls their sends without looking at each member."""

    epoch: str
    after: int
    sends: list[Callable[[bytes], None]]
    event_sends: list[EventSend]


NOT_LIVE = _Live("", 0, [], [])
"""A group with a member still in its preamble or in another epoch: its members are looked at one by one."""


def _live_of(group: _Group) -> _Live:
    """``group``'s members as one :class:`_Live`, or ``NOT_LIVE``."""
    members = iter(group.members.values())
    first = next(members, None)
    if first is None or first.pending is not None:
        return NOT_LIVE
    live = _Live(first.epoch, 0, [], [])
    for member in (first, *members):
        if member.pending is not None or member.epoch != live.epoch:
            return NOT_LIVE
        live.after = max(live.after, member.position)
        if member.send_event is None:
            live.sends.append(member.send)
        else:
            live.event_sends.append(member.send_event)
    return live


@dataclass(slots=True, eq=False)
class _Feed:
    conv: str
    epoch: str = ""
    last_seq: int = 0
    syncing: bool = True
    buffer: list[Envelope] = field(default_factory=list)
    groups: dict[_GroupKey, _Group] = field(default_factory=dict)
    members: dict[Subscriber, _Member] = field(default_factory=dict)
    sync_task: asyncio.Task[None] | None = None
    last_id: str = ""
    """The id of the event delivered at ``last_seq`` (to tell a history that went back, see ``_went_back``)."""
    verify: bool = False
    """The backend resubscribed: check the history still holds what was delivered before repairing."""
    again: bool = False
    """A reconnect happened while a repair was running: its history read may predate the outage."""
    users: dict[str, list[Any]] = field(default_factory=dict)
    """user -> [subscriptions, info] of the members with a ``user``, kept as they join and leave."""
    listener: Listener = field(init=False)


CONTROL_QUEUED = -1
"""The seq of a control object (``ws.join``, ``ws.leave``) queued in a member's ``pending``: sent in its turn."""


class Hub:
    """See the module docstring."""

    def __init__(
        self,
        backend: Backend,
        *,
        gateway_id: str,
        hooks: PluginContext | None = None,
        on_dispatch: Callable[[Envelope], None] | None = None,
        repair_batch: int = DEFAULT_BATCH_SIZE,
        repair_concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        """``repair_batch`` / ``repair_concurrency``: feeds repairing from history read it in
        batches of that many conversations, that many batches at a time (see
        :class:`broadcaster.batched_reads.BatchedHistory`); resumes' history reads likewise,
        in a queue of their own."""
        self.backend = backend
        self.gateway_id = gateway_id
        self.hooks = hooks
        self.stats = HubStats()
        self._on_dispatch = on_dispatch
        self._feeds: dict[str, _Feed] = {}
        self._feed_lock = KeyedLock()
        self._dirty: set[str] = set()
        self._user_changes: dict[str, set[str] | None] = {}  # conv -> users whose count changed (None: too many)
        self._repair_reads = BatchedHistory(backend, batch_size=repair_batch, concurrency=repair_concurrency)
        self._resume_reads = BatchedHistory(backend, batch_size=repair_batch, concurrency=repair_concurrency)
        backend.add_resubscribe_callback(self.repair)

    # ---- subscriptions -------------------------------------------------------------------

    async def subscribe(
        self,
        sub: Subscriber,
        conv: str,
        profile: Profile,
        *,
        types: GlobSet | None = None,
        since: int | None = None,
        epoch: str | None = None,
        hydrate: bool = False,
        delta: bool = False,
    ) -> None:
        """Subscribe ``sub`` to ``conv``; sends ``ws.subscribed`` and what follows (module docstring).

        Subscribing again to a conversation already subscribed replaces the old
        subscription. Raises whatever the backend raises if it is unreachable; the
        subscriber is then not registered. ``delta``: send a keyed upsert of a key this
        subscriber certainly holds as a delta against that version, when smaller
        (docs/streaming.md); ``ws.subscribed`` then says ``"delta": true``.
        """
        await self.unsubscribe(sub, conv)
        feed, member = await self._join(sub, conv, profile, types, delta)
        try:
            await self._start(feed, member, since=since, epoch=epoch, hydrate=hydrate)
        except BaseException:
            await self._leave(feed, sub)
            raise
        if self.hooks is not None and self.hooks.on_subscribe_callbacks:
            info = SubscriptionInfo(conv, profile.name, sub.connection_id)
            await self.hooks.notify(self.hooks.on_subscribe_callbacks, info)

    async def unsubscribe(self, sub: Subscriber, conv: str) -> bool:
        """End ``sub``'s subscription to ``conv``; False if it had none."""
        feed = self._feeds.get(conv)
        if feed is None or sub not in feed.members:
            return False
        profile = feed.members[sub].group.profile.name
        await self._leave(feed, sub)
        if self.hooks is not None and self.hooks.on_unsubscribe_callbacks:
            info = SubscriptionInfo(conv, profile, sub.connection_id)
            await self.hooks.notify(self.hooks.on_unsubscribe_callbacks, info)
        return True

    async def unsubscribe_all(self, sub: Subscriber, convs: Iterable[str]) -> None:
        """End every subscription of ``sub`` among ``convs`` (on disconnect)."""
        for conv in list(convs):
            await self.unsubscribe(sub, conv)

    def conversations(self) -> list[str]:
        """Conversations with at least one subscriber in this process."""
        return list(self._feeds)

    def presence_counts(self, conv: str) -> dict[str, int]:
        """Subscribers of ``conv`` in this process, by profile."""
        feed = self._feeds.get(conv)
        counts: dict[str, int] = {}
        if feed is not None:
            for group in feed.groups.values():
                name = group.profile.name
                counts[name] = counts.get(name, 0) + len(group.members)
        return counts

    def presence_users(self, conv: str, limit: int | None = None) -> dict[str, tuple[int, Any]]:
        """Subscribers of ``conv`` in this process by user: ``{user: (subscriptions, info)}``, the ``limit``
        (None: all) with the most subscriptions.

        A subscriber's ``user`` and ``info`` attributes are read once, when it subscribes;
        one without ``user`` (or with None) is not counted. ``info``: the first non-None one
        seen among the user's subscriptions.
        """
        feed = self._feeds.get(conv)
        if feed is None:
            return {}
        users = feed.users.items()
        if limit is not None and len(feed.users) > limit:
            users = heapq.nlargest(limit, users, key=lambda item: item[1][0])  # type: ignore[assignment]
        return {user: (entry[0], entry[1]) for user, entry in users}

    def take_user_changes(self, conv: str) -> dict[str, tuple[int, Any]] | None:
        """The users of ``conv`` whose subscription count changed since the last call, with their
        ``(subscriptions, info)`` now (0 and None: gone); None when more than ``MAX_USER_CHANGES``
        changed (take :meth:`presence_users` instead). Kept until taken: the gateway's presence
        reporter takes them for every conversation it reports (those of :meth:`take_dirty`)."""
        if conv not in self._user_changes:
            return {}
        changed = self._user_changes.pop(conv)
        if changed is None:
            return None
        feed = self._feeds.get(conv)
        users = feed.users if feed is not None else {}
        return {user: ((entry[0], entry[1]) if (entry := users.get(user)) is not None else (0, None))
                for user in changed}

    def broadcast_control(self, conv: str, kind: str, **fields: Any) -> int:
        """Send ``{"type": kind, "conv_id": conv, **fields}`` to this process's subscribers of ``conv``.

        For presence announcements (``ws.join``, ``ws.leave``): a subscription gets it when
        its profile allows ``kind`` and its ``types`` (if any) match it, as for an event type;
        the profile's drop_fields and enrich hooks do not apply. Encoded once. A member
        still sending its subscription preamble (history replay) gets it queued, in order
        with the events, once live. Returns the number of subscriptions it went to.
        """
        feed = self._feeds.get(conv)
        if feed is None:
            return 0
        payload: bytes | None = None
        sent = 0
        for group in feed.groups.values():
            if not (group.profile.allows(kind) and group.wants(kind)):
                continue
            if payload is None:
                payload = self._control(kind, conv, **fields)
            for member in group.members.values():
                if member.pending is not None:
                    member.pending.append((CONTROL_QUEUED, payload, False, member.epoch, kind))
                else:
                    member.send(payload)
                sent += 1
        return sent

    def take_dirty(self) -> set[str]:
        """Conversations whose subscriber counts changed since the last call."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    def _user_changed(self, conv: str, user: str) -> None:
        changes = self._user_changes.setdefault(conv, set())
        if changes is not None:
            changes.add(user)
            if len(changes) > MAX_USER_CHANGES:
                self._user_changes[conv] = None

    async def close(self) -> None:
        """Stop every feed; subscribers receive nothing more."""
        for conv in list(self._feeds):
            feed = self._feeds.pop(conv)
            if feed.sync_task is not None:
                feed.sync_task.cancel()
            await self.backend.unsubscribe(conv, feed.listener)
        await self._repair_reads.close()
        await self._resume_reads.close()

    async def _join(
        self, sub: Subscriber, conv: str, profile: Profile, types: GlobSet | None, delta: bool = False
    ) -> tuple[_Feed, _Member]:
        async with self._feed_lock(conv):
            feed = self._feeds.get(conv)
            if feed is None:
                feed = await self._open_feed(conv)
            key: _GroupKey = (profile.name, types.patterns if types is not None else ())
            group = feed.groups.get(key)
            if group is None:
                group = feed.groups[key] = _Group(profile, types)
            member = _Member(sub, group, sub.send, send_event=getattr(sub, "send_event", None),
                             held={} if delta else None)
            user = getattr(sub, "user", None)
            if isinstance(user, str):
                member.user = user
                self._user_changed(conv, user)
                entry = feed.users.get(user)
                if entry is None:
                    feed.users[user] = [1, getattr(sub, "info", None)]
                else:
                    entry[0] += 1
                    if entry[1] is None:
                        entry[1] = getattr(sub, "info", None)
            if delta:
                group.delta_members += 1
            group.members[sub] = member
            group.live = None
            feed.members[sub] = member
            self._dirty.add(conv)
            return feed, member

    async def _leave(self, feed: _Feed, sub: Subscriber) -> None:
        async with self._feed_lock(feed.conv):
            member = feed.members.pop(sub, None)
            if member is None:
                return
            group = member.group
            group.members.pop(sub, None)
            group.live = None
            if member.user is not None:
                self._user_changed(feed.conv, member.user)
                entry = feed.users.get(member.user)
                if entry is not None:
                    entry[0] -= 1
                    if entry[0] <= 0:
                        del feed.users[member.user]
            if member.held is not None:
                group.delta_members -= 1
                if not group.delta_members:
                    group.versions.clear()
            if not group.members:
                feed.groups = {k: g for k, g in feed.groups.items() if g is not group}
            self._dirty.add(feed.conv)
            if feed.members or self._feeds.get(feed.conv) is not feed:
                return
            del self._feeds[feed.conv]
            if feed.sync_task is not None:
                feed.sync_task.cancel()
            await self.backend.unsubscribe(feed.conv, feed.listener)

    async def _open_feed(self, conv: str) -> _Feed:
        """Create, subscribe and position a feed: live first (buffered), then the head."""
        feed = _Feed(conv)
        feed.listener = lambda env: self._on_envelope(feed, env)
        await self.backend.subscribe(conv, feed.listener)
        try:
            head = await self.backend.head(conv)
        except BaseException:
            await self.backend.unsubscribe(conv, feed.listener)
            raise
        feed.epoch, feed.last_seq = head.epoch, head.seq
        self._feeds[conv] = feed
        if not self._drain(feed):  # a live event past head + 1 arrived meanwhile: repair, do not stall
            self._start_sync(feed)
        return feed

    async def _start(
        self, feed: _Feed, member: _Member, *, since: int | None, epoch: str | None, hydrate: bool
    ) -> None:
        """Send the subscription preamble, then merge the buffered live events by seq."""
        conv, sub = feed.conv, member.sub
        if hydrate:
            snapshot = await self.backend.state(conv)
            member.epoch = snapshot.epoch
            sub.send(self._control("ws.subscribed", conv, epoch=snapshot.epoch, seq=snapshot.seq,
                                   **_delta_flag(member)))
            head = {"type": "ws.state", "conv_id": conv, "epoch": snapshot.epoch, "seq": snapshot.seq}
            sub.send(embed(head, "entities", self.render_entities(snapshot.entities, member.group.profile,
                                                                  member.group.types)))
            position = snapshot.seq
            if snapshot.epoch != feed.epoch:
                self._notice_epoch(feed)
        else:
            latest, current_epoch = feed.last_seq, feed.epoch
            member.epoch = current_epoch
            sub.send(self._control("ws.subscribed", conv, epoch=current_epoch, seq=latest, **_delta_flag(member)))
            position = latest
            if epoch is not None and epoch != current_epoch:
                sub.send(self._reset(conv, "epoch_changed", current_epoch, latest))
            elif since is not None and since >= latest:
                position = since
            elif since is not None:
                position = await self._replay(feed, member, since, latest)
        self._go_live(member, position)

    async def _replay(self, feed: _Feed, member: _Member, since: int, latest: int) -> int:
        """Send kept events with seq > since; returns the position reached (or resets).

        Pages are taken only in the epoch the client was told (``member.epoch``): a page
        of another epoch ends the replay. The client is then reset by the feed, which
        resets every subscriber when it moves to the new epoch: the reset is already
        queued in ``member.pending`` if the feed moved while the page was read, or
        follows once the feed, told to look, finds the new epoch in history.
        """
        position = since
        while True:
            page = await self._resume_reads.history(feed.conv, position, REPAIR_PAGE)
            if page.epoch != member.epoch:
                if feed.epoch == member.epoch:
                    self._notice_epoch(feed)
                return position
            if page.truncated:
                member.sub.send(self._reset(feed.conv, "history_truncated", page.epoch, latest))
                return latest
            for env in page.events:
                if env.seq > position:
                    position = env.seq
                    payload = self.render(env, member.group.profile, member.group.types)
                    if payload is None:
                        continue
                    if member.send_event is None:
                        member.sub.send(payload)
                    else:
                        member.send_event(payload, env.type, env.seq, page.epoch)
            if not page.events or position >= page.seq:
                return position

    def _notice_epoch(self, feed: _Feed) -> None:
        """A read showed ``feed``'s conversation in another epoch: repair the feed, which resets everyone."""
        self._start_sync(feed)

    def _go_live(self, member: _Member, position: int) -> None:
        """Send what the feed queued for ``member`` during its preamble; from now on it is sent live."""
        pending = member.pending or []
        member.pending = None
        member.group.live = None
        send, epoch, send_event = member.send, member.epoch, member.send_event
        for seq, payload, is_reset, item_epoch, kind in pending:
            if is_reset:
                send(payload)
                position, epoch = seq, item_epoch
            elif seq == CONTROL_QUEUED:
                send(payload)
            elif seq > position and item_epoch == epoch:
                if send_event is None:
                    send(payload)
                else:
                    send_event(payload, kind, seq, item_epoch)
        member.position, member.epoch = position, epoch

    # ---- live path -----------------------------------------------------------------------

    def _on_envelope(self, feed: _Feed, env: Envelope) -> None:
        """Backend listener: deliver in seq order, repair gaps, drop what was delivered."""
        self.stats.events_in += 1
        if feed.syncing:
            if len(feed.buffer) < MAX_SYNC_BUFFER:
                feed.buffer.append(env)
            return
        if env.epoch == feed.epoch:
            if env.seq == feed.last_seq + 1:
                self._deliver(feed, env)
                return
            if env.seq <= feed.last_seq:
                self.stats.duplicates_dropped += 1
                return
        feed.buffer.append(env)
        self._start_sync(feed)

    def _deliver(self, feed: _Feed, env: Envelope) -> None:
        feed.last_seq, feed.last_id = env.seq, env.id
        self.stats.events_delivered += 1
        if self._on_dispatch is not None:
            self._on_dispatch(env)
        intercepted = self._intercept(env)
        if intercepted is None:
            return
        obj = intercepted.event_object()
        rendered: dict[str, bytes | None] = {}
        deltas: dict[tuple[str, int], tuple[bytes | None, Any]] | None = None  # (profile, base seq) -> (delta, data)
        seq, epoch = env.seq, env.epoch
        for group in feed.groups.values():
            name = group.profile.name
            if name in rendered:
                payload = rendered[name]
            else:
                payload = rendered[name] = self._render(obj, intercepted, group.profile)
            if payload is None or not group.wants(env.type):
                if group.delta_members and env.key is not None:
                    group.versions.pop(env.key, None)  # its members do not get this change: no base any more
                continue
            if group.delta_members and env.key is not None:
                if deltas is None:
                    deltas = {}
                self._deliver_keyed(group, env, payload, deltas)
                continue
            live = group.live
            if live is None:
                live = group.live = _live_of(group)
            if live is not NOT_LIVE and live.epoch == epoch and seq > live.after:
                for send in live.sends:
                    send(payload)
                for send_event in live.event_sends:
                    send_event(payload, env.type, seq, epoch)
                self.stats.deliveries += len(live.sends) + len(live.event_sends)
                continue
            for member in group.members.values():
                if member.pending is not None:
                    member.pending.append((seq, payload, False, epoch, env.type))
                elif seq > member.position and member.epoch == epoch:
                    if member.send_event is None:
                        member.send(payload)
                    else:
                        member.send_event(payload, env.type, seq, epoch)
                    self.stats.deliveries += 1

    def _deliver_keyed(self, group: _Group, env: Envelope, payload: bytes,
                       deltas: dict[tuple[str, int], tuple[bytes | None, Any]]) -> None:
        """:meth:`_deliver`'s member loop for a keyed event in a group with delta subscribers.

        The group remembers the data of the last version of each key it rendered live; a
        full upsert of a key with such a version is also encoded as a delta against it
        (once per profile and base, whatever the groups and connections), and a delta
        subscriber gets that delta only if the version it was last sent of this key live,
        in this epoch, is that base (it certainly holds it). Anyone else gets the whole
        event, and an append, a delete or an event this group does not render leaves the
        key without a base: its next upsert goes out whole.
        """
        key, seq, epoch = env.key or "", env.seq, env.epoch
        base = group.versions.get(key)
        upsert = env.op is None and env.data is not None
        delta: bytes | None = None
        data: Any = None
        if upsert:
            name = group.profile.name
            cached = deltas.get((name, base[1] if base is not None and base[0] == epoch else 0))
            if cached is not None:
                delta, data = cached
            else:
                obj = loads(payload)
                data = obj.get("data")
                if base is not None and base[0] == epoch:
                    patch = make_patch(base[2], data)
                    if patch is not None:
                        obj["op"], obj["base"], obj["data"] = "delta", base[1], patch
                        encoded = dumps(obj)
                        delta = encoded if len(encoded) < len(payload) else None
                deltas[(name, base[1] if base is not None and base[0] == epoch else 0)] = (delta, data)
            if len(group.versions) >= MAX_DELTA_KEYS and key not in group.versions:
                group.versions.clear()
            group.versions[key] = (epoch, seq, data)
        else:
            group.versions.pop(key, None)
        base_id = (base[0], base[1]) if base is not None else None
        for member in group.members.values():
            if member.pending is not None:
                member.pending.append((seq, payload, False, epoch, env.type))
                continue
            if seq <= member.position or member.epoch != epoch:
                continue
            out = payload
            held = member.held
            if held is not None:
                if delta is not None and held.get(key) == base_id:
                    out = delta
                if upsert:
                    if len(held) >= MAX_DELTA_KEYS and key not in held:
                        held.clear()
                    held[key] = (epoch, seq)
                else:
                    held.pop(key, None)
            if member.send_event is None:
                member.send(out)
            else:
                member.send_event(out, env.type, seq, epoch)
            self.stats.deliveries += 1

    def _broadcast_reset(self, feed: _Feed, reason: str, epoch: str, seq: int) -> None:
        payload = self._reset(feed.conv, reason, epoch, seq)
        for group in feed.groups.values():
            group.live = None
        for member in feed.members.values():
            if member.held:
                member.held.clear()  # the client empties its entities on a reset: it holds no base
            if member.pending is not None:
                member.pending.append((seq, payload, True, epoch, "ws.reset"))
            else:
                member.send(payload)
                member.position, member.epoch = seq, epoch

    def _start_sync(self, feed: _Feed) -> None:
        feed.syncing = True
        if feed.sync_task is None or feed.sync_task.done():
            feed.sync_task = asyncio.create_task(self._sync(feed))

    async def repair(self, convs: Collection[str] | None) -> None:
        """Repair the feeds of ``convs`` (every feed if None) from history: the backend resubscribed them.

        A feed already repairing reads history once more: the read it has in flight may
        have been answered before the events lost during the outage were published.
        """
        if convs is None:
            feeds = list(self._feeds.values())
        else:
            feeds = [feed for conv in convs if (feed := self._feeds.get(conv)) is not None]
        for feed in feeds:
            if feed.sync_task is not None and not feed.sync_task.done():
                feed.again = True
            feed.verify = True
            self._start_sync(feed)

    async def _sync(self, feed: _Feed) -> None:
        """Catch up from history until the buffered live events continue without a gap."""
        self.stats.gap_repairs += 1
        delay = 0.05
        while self._feeds.get(feed.conv) is feed:
            feed.again = False
            before = (feed.epoch, feed.last_seq)
            try:
                await self._catch_up(feed)
            except BackendUnavailable as exc:  # logged once per failed batch by BatchedHistory
                log.debug("repair of %s failed (%s); retrying in %.2fs", feed.conv, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            except Exception:
                log.exception("repair of %s failed; retrying in %.2fs", feed.conv, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if feed.again:
                continue
            if self._drain(feed):
                return
            if (feed.epoch, feed.last_seq) == before:
                # History does not (yet) hold what the buffered live events continue from: do not spin.
                log.warning("repair of %s made no progress at seq %d; retrying in %.2fs", feed.conv,
                            feed.last_seq, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    @staticmethod
    def _went_back(feed: _Feed, page: HistoryPage) -> str | None:
        """After a resubscription: does history still hold the event delivered last, at its seq?

        ``page`` was read from ``last_seq - 1``. A failover to a replica that missed
        acknowledged writes takes the seq counter back: the next publishes reuse seqs
        already delivered, which would be dropped as duplicates - silent loss. Seen here
        as a head below ``last_seq`` or another id at ``last_seq`` (what was found, else
        None); the conversation then moves to a new epoch (every gateway agrees:
        ``Backend.change_epoch`` is a compare-and-set), so every client is reset.
        """
        at = page.events[0] if page.events and page.events[0].seq == feed.last_seq else None
        if page.seq >= feed.last_seq and (at is None or at.id == feed.last_id):
            return None
        return f"head {page.seq}" if at is None else f"id {at.id!r} at seq {at.seq}"

    async def _catch_up(self, feed: _Feed) -> None:
        verify, feed.verify = feed.verify, False
        while True:
            verify = verify and feed.last_seq > 0 and bool(feed.last_id)
            since = feed.last_seq - 1 if verify else feed.last_seq  # one event more: the one delivered last
            page = await self._repair_reads.history(feed.conv, since, REPAIR_PAGE)
            if verify and page.epoch == feed.epoch:
                verify = False
                found = self._went_back(feed, page)
                if found is not None:
                    log.warning("history of %s went back (delivered seq %d id %r, now %s): a failover lost "
                                "events; moving it to a new epoch", feed.conv, feed.last_seq, feed.last_id, found)
                    self.stats.history_went_back += 1
                    await self.backend.change_epoch(feed.conv, feed.epoch)
                    continue
                if page.truncated and page.events and page.events[0].seq == feed.last_seq + 1:
                    page = replace(page, truncated=False)  # only the extra event is gone: nothing after it
            if page.epoch != feed.epoch:
                self.stats.resets += 1
                feed.epoch, feed.last_seq = page.epoch, 0
                self._broadcast_reset(feed, "epoch_changed", page.epoch, 0)
                continue
            if page.truncated:
                self.stats.resets += 1
                feed.last_seq = page.seq
                self._broadcast_reset(feed, "history_truncated", page.epoch, page.seq)
                return
            for env in page.events:
                if env.seq == feed.last_seq + 1:
                    # History kept across an epoch change (a history that went back) holds events
                    # tagged with the old epoch: they are this epoch's now.
                    self._deliver(feed, env if env.epoch == page.epoch else replace(env, epoch=page.epoch))
            if not page.events or feed.last_seq >= page.seq:
                return

    def _drain(self, feed: _Feed) -> bool:
        """Deliver buffered live events in seq order; False if a gap remains (sync again)."""
        buffered, feed.buffer = sorted(feed.buffer, key=lambda e: e.seq), []
        for index, env in enumerate(buffered):
            if env.epoch != feed.epoch:
                self.stats.stale_dropped += 1
            elif env.seq <= feed.last_seq:
                self.stats.duplicates_dropped += 1
            elif env.seq == feed.last_seq + 1:
                self._deliver(feed, env)
            else:
                feed.buffer = buffered[index:]
                return False
        feed.syncing = False
        return True

    # ---- rendering -----------------------------------------------------------------------

    def _intercept(self, env: Envelope) -> Envelope | None:
        if self.hooks is None or not self.hooks.interceptors:
            return env
        current: Envelope | None = env
        for interceptor in self.hooks.interceptors:
            try:
                current = interceptor(current)  # type: ignore[arg-type]
            except Exception:
                log.exception("interceptor %r failed on %s seq %s; event passed on unchanged", interceptor,
                              env.conv, env.seq)
                continue
            if current is None:
                self.stats.intercept_drops += 1
                return None
        return current

    def _shape(self, obj: dict[str, Any], env: Envelope, profile: Profile) -> dict[str, Any] | None:
        if not profile.allows(env.type):
            return None
        if not profile.drop_fields and not profile.enrich:
            return obj
        try:
            return profile.shape(obj, EnrichContext(profile.name, env.conv, self.gateway_id))
        except Exception:
            self.stats.render_errors += 1
            log.exception("profile %s failed on %s seq %s", profile.name, env.conv, env.seq)
            return None

    def _render(self, obj: dict[str, Any], env: Envelope, profile: Profile) -> bytes | None:
        """The bytes ``profile`` sends for ``env``, or None if it sends nothing."""
        self.stats.renders += 1
        shaped = self._shape(obj, env, profile)
        if shaped is None:
            return None
        try:
            return dumps(shaped)
        except TypeError:
            self.stats.render_errors += 1
            log.warning("event %s seq %s is not JSON-encodable; skipped", env.conv, env.seq)
            return None

    def render(self, env: Envelope, profile: Profile, types: GlobSet | None = None) -> bytes | None:
        """``env`` as ``profile`` (narrowed by ``types``) sends it, encoded; None if it sends nothing.

        For history replays, snapshots and HTTP reads; the live path renders once per
        profile in :meth:`_deliver`.
        """
        intercepted = self._intercept(env)
        if intercepted is None or (types is not None and not types.matches(env.type)):
            return None
        return self._render(intercepted.event_object(), intercepted, profile)

    def render_entities(self, entities: Mapping[str, Envelope], profile: Profile,
                        types: GlobSet | None = None) -> bytes:
        """A state snapshot's entities as ``profile`` shows them: one encoded JSON object by key."""
        return json_object((key, raw) for key, env in entities.items()
                           if (raw := self.render(env, profile, types)) is not None)

    @staticmethod
    def _control(kind: str, conv: str, **fields: Any) -> bytes:
        return dumps({"type": kind, "conv_id": conv, **fields})

    def _reset(self, conv: str, reason: str, epoch: str, seq: int) -> bytes:
        return self._control("ws.reset", conv, reason=reason, epoch=epoch, seq=seq)


def _delta_flag(member: _Member) -> dict[str, bool]:
    return {"delta": True} if member.held is not None else {}


def server_time_ms() -> int:
    """Wall-clock milliseconds, as in ``server_time`` fields."""
    return int(time.time() * 1000)
