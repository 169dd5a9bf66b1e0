"""Reports this process's subscribers to the backend, so presence spans every gateway."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

from broadcaster.backend import MAX_REPORTED_USERS, Backend, PresenceTransition, PresenceUsers
from broadcaster.hub import Hub
from broadcaster.namespaces import PolicyTable

TransitionSink = Callable[[list[PresenceTransition]], Awaitable[None]]

USERS_READ_CACHE = 1.0
"""Seconds a presence users read is reused (see :meth:`PresenceReporter.read_users`)."""

log = logging.getLogger("broadcaster.presence")


class PresenceReporter:
    """Pushes ``{conv: {profile: n}}`` of a hub to the backend.

    Changes are flushed every ``flush_interval`` seconds; everything is refreshed
    every ``heartbeat`` seconds with a TTL of ``ttl``, so the counts of a gateway
    that dies expire by themselves.

    Users: for a conversation whose namespace (``policies``) has ``presence_users`` or
    ``join_leave``, the same reports (same slices, same TTL) also carry this gateway's
    ``{user: (subscriptions, info)}`` (the ``MAX_REPORTED_USERS`` most connected; zero for
    a user gone), and with ``join_leave`` the report sweeps: the joins and leaves it finds
    (``leave_delay``: seconds a user must stay away before its leave) go to
    ``on_transitions``. A report that says a debounced leave is due later brings that
    conversation's next report forward to then.
    """

    def __init__(
        self, hub: Hub, backend: Backend, gateway_id: str, *, heartbeat: float = 5.0, ttl: float = 15.0,
        flush_interval: float = 0.2, policies: PolicyTable | None = None, leave_delay: float = 2.0,
        on_transitions: TransitionSink | None = None,
    ) -> None:
        self._hub, self._backend, self._gateway_id = hub, backend, gateway_id
        self._heartbeat, self._ttl, self._flush_interval = heartbeat, ttl, flush_interval
        self._policies, self._leave_delay, self._on_transitions = policies, leave_delay, on_transitions
        self._reported: dict[str, set[str]] = {}  # conv -> profiles with a non-zero report
        self._reported_users: dict[str, dict[str, int]] = {}  # conv -> user -> the non-zero count last reported
        self._due: dict[str, float] = {}  # conv -> monotonic time a debounced leave is due
        self._changed: dict[str, dict[str, tuple[int, Any]]] = {}  # conv -> user changes not reported yet
        self._want_full: set[str] = set()  # convs with too many changes to list: a full report is due
        self._last_full: dict[str, float] = {}  # conv -> when such a full report was last sent
        self._slice = 1
        self._reads: dict[tuple[str, int], tuple[float, asyncio.Future[PresenceUsers]]] = {}

    async def read_users(self, conv: str, limit: int) -> PresenceUsers:
        """``backend.presence_users(conv, limit)``, answered from the read started in the last
        ``USERS_READ_CACHE`` seconds if any: however often clients ask, one read per conversation
        and limit per interval leaves this gateway (the read of a large conversation scans its hash)."""
        key, clock = (conv, limit), time.monotonic()
        cached = self._reads.get(key)
        if cached is None or cached[0] <= clock or (cached[1].done() and cached[1].exception() is not None):
            if len(self._reads) >= 1024:
                self._reads = {k: v for k, v in self._reads.items() if v[0] > clock}
                if len(self._reads) >= 1024:
                    self._reads.clear()
            cached = (clock + USERS_READ_CACHE, asyncio.ensure_future(self._backend.presence_users(conv, limit)))
            self._reads[key] = cached
        return await asyncio.shield(cached[1])

    def _counts(self, convs: set[str]) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for conv in convs:
            now = self._hub.presence_counts(conv)
            for gone in self._reported.get(conv, set()) - set(now):
                now[gone] = 0
            if now:
                counts[conv] = now
        return counts

    def _users(self, convs: Iterable[str], full: Collection[str] | None, withdraw: bool = False
               ) -> tuple[dict[str, dict[str, tuple[int, Any]]], set[str]]:
        """The user reports of ``convs`` (all zero when ``withdraw``), and those to sweep for joins and leaves.

        A conversation in ``full`` (None: all) reports every user (the heartbeat: it refreshes
        their expiry); another only the users whose count changed since the last report.
        """
        reports: dict[str, dict[str, tuple[int, Any]]] = {}
        announce: set[str] = set()
        if self._policies is None:
            return reports, announce
        for conv in convs:
            changed = self._hub.take_user_changes(conv)  # taken for every conversation: the hub keeps no backlog
            found = self._policies.resolve(conv)
            if not (found.presence_users or found.join_leave):
                continue
            held = self._changed.setdefault(conv, {})
            if changed is None:
                self._want_full.add(conv)  # too many changes to list: report everyone, once a second at most
            else:
                held.update(changed)  # kept until a report carrying them succeeds
            last = self._reported_users.get(conv, {})
            now: dict[str, tuple[int, Any]]
            clock = time.monotonic()
            if conv in self._want_full and clock - self._last_full.get(conv, 0.0) >= 1.0:
                if len(self._last_full) >= 4096:
                    self._last_full.clear()
                self._last_full[conv] = clock
                self._want_full.discard(conv)
                full = set(full or ()) | {conv} if full is not None else None
            if withdraw or full is None or conv in full:
                now = {} if withdraw else self._hub.presence_users(conv, MAX_REPORTED_USERS)
                for gone in set(last) - set(now):
                    now[gone] = (0, None)
            else:
                now, room = {}, MAX_REPORTED_USERS - len(last)
                for user, (n, info) in held.items():
                    if n > 0 and user not in last:
                        if room <= 0:
                            continue  # past the cap: the next heartbeat's top users decide
                        room -= 1
                    if n > 0 or user in last:
                        now[user] = (n, info)
            if found.join_leave:
                announce.add(conv)
                reports[conv] = now
            elif now:
                reports[conv] = now
            if conv not in reports:
                self._changed.pop(conv, None)  # nothing to carry: what was held is moot
        return reports, announce

    async def _report_users(self, convs: Iterable[str], full: Collection[str] | None = None,
                            withdraw: bool = False) -> None:
        reports, announce = self._users(convs, full, withdraw)
        if not reports:
            return
        found = await self._backend.report_presence_users(self._gateway_id, reports, self._ttl,
                                                          leave_delay=self._leave_delay, announce=announce,
                                                          sweep=full)
        for conv, users in reports.items():
            self._changed.pop(conv, None)
            last = self._reported_users.setdefault(conv, {})
            for user, (n, _) in users.items():
                if n > 0:
                    last[user] = n
                else:
                    last.pop(user, None)
            if not last:
                del self._reported_users[conv]
        transitions: list[PresenceTransition] = []
        clock = time.monotonic()
        for conv, result in found.items():
            if result.next_check is None or withdraw:
                self._due.pop(conv, None)
            else:
                self._due[conv] = clock + result.next_check
            transitions += result.transitions
        if transitions and self._on_transitions is not None:
            await self._on_transitions(transitions)

    async def report(self, convs: set[str], full: Collection[str] | None = None) -> None:
        """Report the current counts of ``convs`` (zero for profiles and users no longer watched).

        Users: every user of the conversations in ``full`` (None: all of them), the changed ones of the others.
        """
        counts = self._counts(convs)
        if counts:
            await self._backend.report_presence(self._gateway_id, counts, self._ttl)
            for conv, by_profile in counts.items():
                live = {p for p, n in by_profile.items() if n > 0}
                if live:
                    self._reported[conv] = live
                else:
                    self._reported.pop(conv, None)
        await self._report_users(convs, full)

    async def run(self) -> None:
        """Flush changes and heartbeats until cancelled; backend errors are logged and retried.

        The heartbeat is spread over its interval: every flush refreshes the next slice
        of the watched conversations, so each is refreshed once per ``heartbeat`` and no
        tick sends more than its share. (Refreshing thousands of conversations in one
        burst stalls the event loop and Redis for everyone.)
        """
        pending: set[str] = set()
        heartbeat: set[str] = set()  # those of ``pending`` due for a full report
        rotation: list[str] = []
        while True:
            pending |= self._hub.take_dirty() | self._want_full
            if self._due:
                clock = time.monotonic()
                for conv in [c for c, at in self._due.items() if at <= clock]:
                    del self._due[conv]
                    pending.add(conv)
            if not rotation:
                rotation = list(set(self._hub.conversations()) | set(self._reported) | set(self._reported_users))
                ticks = max(1, int(self._heartbeat / self._flush_interval))
                self._slice = max(1, -(-len(rotation) // ticks))  # ceil: one pass per heartbeat
            heartbeat.update(rotation[-self._slice:])
            pending |= heartbeat
            del rotation[-self._slice:]
            if pending:
                try:
                    await self.report(pending, heartbeat)
                    pending, heartbeat = set(), set()
                except Exception as exc:
                    log.warning("presence report failed: %s", exc)
            await asyncio.sleep(self._flush_interval)

    async def withdraw(self) -> None:
        """Report zero for everything this gateway reported (on shutdown).

        Its users' leaves are then announced by the gateways still watching, after the delay.
        """
        counts = {conv: dict.fromkeys(profiles, 0) for conv, profiles in self._reported.items()}
        if counts:
            await self._backend.report_presence(self._gateway_id, counts, self._ttl)
        self._reported.clear()
        await self._report_users(list(self._reported_users), withdraw=True)
        self._reported_users.clear()
        self._due.clear()


class JoinLeave:
    """Joins and leaves across gateways: published on the backend's control channel, sent to local subscribers.

    A presence report that finds transitions hands them to :meth:`announce`, which
    publishes one control message each (``{"kind": "join"|"leave", "conv_id", "user",
    "info"?}``) to every gateway, this one included; :meth:`on_control` turns each into
    ``ws.join`` / ``ws.leave`` for this gateway's subscribers of the conversation
    (:meth:`Hub.broadcast_control`), where its namespace has ``join_leave``. Delivery is
    at most once, as the control channel's.

    Counters by kind (read by the gateway's metrics): ``announced_by_kind`` the transitions this
    gateway published, ``sent`` the ``ws.join`` / ``ws.leave`` objects queued to its subscribers;
    ``announced`` / ``delivered`` their totals.
    """

    KINDS = ("join", "leave")

    def __init__(self, backend: Backend, hub: Hub, policies: PolicyTable) -> None:
        self._backend, self._hub, self._policies = backend, hub, policies
        self.announced_by_kind = dict.fromkeys(self.KINDS, 0)
        self.sent = dict.fromkeys(self.KINDS, 0)

    @property
    def announced(self) -> int:
        return sum(self.announced_by_kind.values())

    @property
    def delivered(self) -> int:
        return sum(self.sent.values())

    @property
    def enabled(self) -> bool:
        """Some namespace has ``join_leave``."""
        return any(ns.join_leave for ns in self._policies.namespaces)

    def listen(self) -> None:
        """Register :meth:`on_control` with the backend, if some namespace has ``join_leave``."""
        if self.enabled:
            self._backend.add_control_listener(self.on_control)

    async def announce(self, transitions: list[PresenceTransition]) -> None:
        """Publish each transition to every gateway, in order. When one fails (after the backend's
        retries) it and the rest of the batch are logged and dropped: the presence report loop
        must not wait out a retry budget per transition."""
        for index, transition in enumerate(transitions):
            message: dict[str, Any] = {"kind": transition.kind, "conv_id": transition.conv, "user": transition.user}
            if transition.kind == "join" and transition.info is not None:
                message["info"] = transition.info
            try:
                await self._backend.publish_control(message)
            except Exception as exc:
                log.warning("could not announce %s of %r in %s (%s); %d joins/leaves dropped", transition.kind,
                            transition.user, transition.conv, exc, len(transitions) - index)
                return
            self.announced_by_kind[transition.kind] = self.announced_by_kind.get(transition.kind, 0) + 1

    def on_control(self, message: dict[str, Any]) -> None:
        """A control message: send a join or leave to the local subscribers; ignore every other kind."""
        kind, conv, user = message.get("kind"), message.get("conv_id"), message.get("user")
        if kind not in self.KINDS or not isinstance(conv, str) or not isinstance(user, str):
            return
        if not self._policies.resolve(conv).join_leave:
            return
        fields: dict[str, Any] = {"user": user}
        if kind == "join" and message.get("info") is not None:
            fields["info"] = message["info"]
        self.sent[kind] += self._hub.broadcast_control(conv, f"ws.{kind}", **fields)
