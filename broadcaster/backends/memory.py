"""The embedded backend: one process, nothing else to run.

Same semantics as the Redis backend (seq, epoch, history window and TTL,
idempotency, keyed state, presence expiry), kept in dicts. Live delivery is
scheduled with ``loop.call_soon`` so a listener that publishes is never re-entered.
The control channel and the deny list are the base class's in-process defaults.

Each conversation gets its namespace's policy (``settings.namespaces``, see
:mod:`broadcaster.namespaces`), resolved here as the Redis function library resolves it.

Expiry works as Redis does it for the Redis backend: a conversation's events, state
and remembered ids go ``history_ttl`` seconds (its namespace's) after its last publish; its epoch and seq
stay until ``max(history_ttl, EPOCH_PERIOD)`` after it (the meta hash of
``publish.lua``), then it is gone. Records are dropped lazily when touched, and by an
incremental sweep: every operation retires at most ``SWEEP_PER_OPERATION`` expired
records, oldest first (records are kept in the order of their last publish, so that
is a look at the front), and one background task sweeps what idle periods left.

Reads never create anything. A conversation with no record answers seq 0 and the epoch
its first publish will get: derived from this backend's random salt (a new process, a
new salt: like Redis' run id in ``read.lua``), the conversation and the
``EPOCH_PERIOD``-long period, exactly as the scripts do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from broadcaster.backend import (
    MAX_INFO_BYTES,
    MAX_REPORTED_USERS,
    MAX_TRANSITIONS,
    MAX_USER_FIELDS,
    Backend,
    BackendSettings,
    BackendStats,
    Head,
    HistoryPage,
    Listener,
    PolicyInfo,
    Presence,
    PresenceTransition,
    PresenceUsers,
    ReconnectCallback,
    StateSnapshot,
    UserCounts,
    UserPresence,
    UserReport,
)
from broadcaster.backends.base import ChannelRegistry, PreparedPublish, prepare_all
from broadcaster.codec import dumps, encode_envelope, loads
from broadcaster.envelope import Envelope, PublishRequest, PublishResult, apply_append

EPOCH_PERIOD = 86400
"""Seconds; the ``EPOCH_PERIOD`` of ``read.lua`` and ``publish.lua`` (see their header)."""
SWEEP_PER_OPERATION = 32
"""Expired records an operation retires at most, besides the one it touches."""
SWEEP_INTERVAL = 1.0
"""Seconds between two runs of the background sweep."""
_SWEEP_SLICE = 1000


@dataclass(slots=True)
class _Conversation:
    epoch: str
    seq: int = 0
    log: deque[Envelope] = field(default_factory=deque)
    state: OrderedDict[str, Envelope] = field(default_factory=OrderedDict)  # oldest-updated first
    state_sizes: dict[str, int] = field(default_factory=dict)  # key -> encoded payload bytes
    state_bytes: int = 0
    ids: dict[str, tuple[int, float]] = field(default_factory=dict)  # id -> (seq, expires at)
    expires_at: float = 0.0  # of the events, state and ids: last publish + history ttl
    ttl: int = 0  # its namespace's history ttl, as of its last publish


class _Numbering(NamedTuple):
    """What outlives a conversation's data: its epoch and seq, until ``expires_at``."""

    epoch: str
    seq: int
    expires_at: float


class MemoryBackend(Backend):
    """In-process backend; see the module docstring.

    ``clock``: the monotonic time source of every expiry (tests pass a controllable one).
    """

    def __init__(self, settings: BackendSettings | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or BackendSettings()
        self.stats = BackendStats()
        self.policies = self.settings.policy_table()
        self._clock = clock
        self._salt = os.urandom(16)
        # both in the order their data expires (last publish first), so a sweep looks at the front only
        self._convs: OrderedDict[str, _Conversation] = OrderedDict()
        self._numbering: OrderedDict[str, _Numbering] = OrderedDict()
        self._peak_convs = self._peak_numbering = 0  # their largest sizes since they were last rebuilt
        self._presence: dict[str, dict[str, tuple[int, float]]] = {}  # conv -> "gw|profile" -> (n, expiry)
        self._users: dict[str, dict[tuple[str, str], tuple[int, float, Any]]] = {}
        """conv -> (gateway, user) -> (connections, expiry, info)."""
        self._announced: dict[str, tuple[dict[str, float | None], float]] = {}
        """conv -> ({user: None (announced, present) or absent since}, expiry)."""
        self._registry = ChannelRegistry(self._noop, self._noop, self.stats, self.settings.unsubscribe_delay)
        self._started = False
        self._sweeper: asyncio.Task[None] | None = None

    @staticmethod
    async def _noop(conv: str) -> None:
        return None

    async def start(self) -> None:
        self._started = True
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="memory-backend-sweep")

    async def close(self) -> None:
        self._started = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self._registry.close()

    @property
    def connected(self) -> bool:
        return self._started

    async def ping(self) -> bool:
        return self._started

    # ---- expiry ------------------------------------------------------------------------

    @property
    def records(self) -> int:
        """Conversations held, with their data or only their epoch and seq."""
        return len(self._convs) + len(self._numbering)

    def sweep(self, limit: int | None = None) -> int:
        """Drop what has expired, oldest first, at most ``limit`` records (None: all); returns how many."""
        now, done = self._clock(), 0
        while self._convs and (limit is None or done < limit):
            conv, record = next(iter(self._convs.items()))
            if record.expires_at > now:
                break
            self._retire(conv, record)
            done += 1
        while self._numbering and (limit is None or done < limit):
            conv, numbering = next(iter(self._numbering.items()))
            if numbering.expires_at > now:
                break
            del self._numbering[conv]
            done += 1
        if done:
            self._compact()
        return done

    def _compact(self) -> None:
        """Give back the table space of swept records: a dict never shrinks when entries go."""
        if len(self._convs) * 8 < self._peak_convs:
            self._convs = OrderedDict(self._convs)
            self._peak_convs = len(self._convs)
        if len(self._numbering) * 8 < self._peak_numbering:
            self._numbering = OrderedDict(self._numbering)
            self._peak_numbering = len(self._numbering)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            swept = _SWEEP_SLICE
            while swept == _SWEEP_SLICE:  # a long backlog goes in slices, letting other tasks run between
                swept = self.sweep(_SWEEP_SLICE)
                await asyncio.sleep(0)

    def _retire(self, conv: str, record: _Conversation) -> None:
        """``record``'s data expired: keep its numbering as long as the meta hash would live."""
        del self._convs[conv]
        ttl = record.ttl
        if EPOCH_PERIOD > ttl:
            self._numbering[conv] = _Numbering(record.epoch, record.seq, record.expires_at - ttl + EPOCH_PERIOD)
            self._peak_numbering = max(self._peak_numbering, len(self._numbering))

    def _find(self, conv: str, now: float) -> _Conversation | _Numbering | None:
        """The conversation's live record, or its numbering alone, or None; expired ones are dropped."""
        self.sweep(SWEEP_PER_OPERATION)
        record = self._convs.get(conv)
        if record is not None:
            if record.expires_at > now:
                return record
            self._retire(conv, record)
        numbering = self._numbering.get(conv)
        if numbering is not None:
            if numbering.expires_at > now:
                return numbering
            del self._numbering[conv]
        return None

    def unborn_epoch(self, conv: str, now: float | None = None) -> str:
        """The epoch ``conv`` gets when it is created at ``now`` (default: the clock's), if it has no record."""
        now = self._clock() if now is None else now
        phase = int.from_bytes(hashlib.sha1(conv.encode()).digest()[:4], "big") % EPOCH_PERIOD
        period = int((now + phase) // EPOCH_PERIOD)
        return hashlib.sha1(self._salt + f"|{period}|{conv}".encode()).hexdigest()[:12]

    # ---- publish -----------------------------------------------------------------------

    def _record_for_publish(self, conv: str, now: float) -> _Conversation:
        found = self._find(conv, now)
        if isinstance(found, _Conversation):
            return found
        if isinstance(found, _Numbering):
            del self._numbering[conv]
            record = _Conversation(epoch=found.epoch, seq=found.seq)
        else:
            record = _Conversation(epoch=self.unborn_epoch(conv, now))
        self._convs[conv] = record
        self._peak_convs = max(self._peak_convs, len(self._convs))
        return record

    def _refresh(self, conv: str, record: _Conversation, now: float, ttl: int) -> None:
        """A publish: the conversation's TTL starts again, and it moves to the back of the expiry order."""
        record.ttl = ttl
        record.expires_at = now + ttl
        self._convs.move_to_end(conv)

    def _apply(self, prepared: PreparedPublish) -> tuple[PublishResult, Envelope | None]:
        # Everything that can fail comes before the first change: a failed event takes no seq.
        data = msgpack.unpackb(prepared.data, raw=False)
        policy = self.policies.resolve(prepared.conv).policy
        now = self._clock()
        record = self._record_for_publish(prepared.conv, now)
        known = record.ids.get(prepared.id)
        if known is not None and known[1] > now:
            self._refresh(prepared.conv, record, now, policy.history_ttl)  # as publish.lua does for a duplicate
            return PublishResult(prepared.conv, known[0], prepared.id, record.epoch, duplicate=True), None
        seq = record.seq + 1
        env = Envelope(prepared.conv, seq, prepared.id, prepared.type, int(time.time() * 1000), data,
                       record.epoch, prepared.key, prepared.op)
        entry = env  # what the state keeps: for an append, the entry with the chunk merged in (as publish.lua)
        if prepared.op is not None and prepared.key is not None:
            previous = record.state.get(prepared.key)
            entry = Envelope(env.conv, seq, env.id, env.type, env.ts,
                             apply_append(previous.data if previous is not None else None, data),
                             env.epoch, env.key)
        size = len(encode_envelope(entry)) if prepared.key is not None and data is not None else 0
        record.seq = seq
        record.log.append(env)
        while len(record.log) > policy.history_size:
            record.log.popleft()
        record.ids[prepared.id] = (seq, now + min(prepared.id_ttl, policy.history_ttl))
        if len(record.ids) > 4 * policy.history_size:
            record.ids = {k: v for k, v in record.ids.items() if v[1] > now}
        evicted = 0
        if prepared.key is not None:
            if record.state.pop(prepared.key, None) is not None:
                record.state_bytes -= record.state_sizes.pop(prepared.key)
            if data is not None:
                record.state[prepared.key] = entry  # ``size``: what the Redis backend stores for it
                record.state_sizes[prepared.key] = size
                record.state_bytes += size
                max_bytes = policy.state_max_bytes
                while len(record.state) > policy.state_max_entries or (
                        max_bytes > 0 and record.state_bytes > max_bytes and len(record.state) > 1):
                    oldest, _ = record.state.popitem(last=False)
                    record.state_bytes -= record.state_sizes.pop(oldest)
                    evicted += 1
        self.stats.state_evictions += evicted
        self._refresh(prepared.conv, record, now, policy.history_ttl)
        return PublishResult(prepared.conv, seq, prepared.id, record.epoch, evicted=evicted), env

    def _fan_out(self, env: Envelope | None) -> None:
        if env is not None:
            asyncio.get_running_loop().call_soon(self._registry.dispatch, env)

    async def publish_many(self, requests: Sequence[PublishRequest]) -> list[PublishResult]:
        prepared = prepare_all(requests, self.policies)
        results = []
        for item in prepared:
            result, env = self._apply(item)
            self._fan_out(env)
            results.append(result)
        return results

    async def policy(self, conv: str) -> PolicyInfo:
        found = self.policies.resolve(conv)
        return PolicyInfo(found.namespace, found.policy, self.policies.fingerprint)

    async def subscribe(self, conv: str, listener: Listener) -> None:
        await self._registry.add(conv, listener)

    async def unsubscribe(self, conv: str, listener: Listener) -> None:
        await self._registry.remove(conv, listener)

    def add_reconnect_callback(self, callback: ReconnectCallback) -> None:
        """The embedded backend never loses its connection: callbacks are never called."""

    async def head(self, conv: str) -> Head:
        now = self._clock()
        found = self._find(conv, now)
        if found is None:
            return Head(self.unborn_epoch(conv, now), 0)
        return Head(found.epoch, found.seq)

    async def history(self, conv: str, since: int = 0, limit: int | None = None) -> HistoryPage:
        now = self._clock()
        found = self._find(conv, now)
        if found is None:
            return HistoryPage(self.unborn_epoch(conv, now), 0, [], False)
        if isinstance(found, _Numbering):  # the events expired, the numbering did not
            return HistoryPage(found.epoch, found.seq, [], since < found.seq)
        first_kept = found.log[0].seq if found.log else found.seq + 1
        events = [e for e in found.log if e.seq > since]
        if limit is not None:
            events = events[:limit]
        truncated = since < found.seq and first_kept > since + 1
        return HistoryPage(found.epoch, found.seq, events, truncated)

    async def state(self, conv: str) -> StateSnapshot:
        now = self._clock()
        found = self._find(conv, now)
        if found is None:
            return StateSnapshot(self.unborn_epoch(conv, now), 0, {})
        if isinstance(found, _Numbering):
            return StateSnapshot(found.epoch, found.seq, {})
        return StateSnapshot(found.epoch, found.seq, dict(found.state))

    async def report_presence(self, gateway_id: str, counts: Mapping[str, Mapping[str, int]], ttl: float) -> None:
        expires = self._clock() + ttl
        for conv, by_profile in counts.items():
            entries = self._presence.setdefault(conv, {})
            for profile, n in by_profile.items():
                field_name = f"{gateway_id}|{profile}"
                if n > 0:
                    entries[field_name] = (n, expires)
                else:
                    entries.pop(field_name, None)
            if not entries:
                del self._presence[conv]

    async def presence(self, conv: str) -> Presence:
        now = self._clock()
        entries = self._presence.get(conv, {})
        by_profile: dict[str, int] = {}
        for field_name, (n, expires) in list(entries.items()):
            if expires <= now:
                del entries[field_name]
                continue
            profile = field_name.split("|", 1)[1]
            by_profile[profile] = by_profile.get(profile, 0) + n
        return Presence(sum(by_profile.values()), by_profile)

    # ---- users in presence, joins and leaves (presence_users_report.lua, presence_users.lua) ----

    async def report_presence_users(
        self, gateway_id: str, reports: Mapping[str, UserCounts], ttl: float, *, leave_delay: float,
        announce: Collection[str] = (), sweep: Collection[str] | None = None,
    ) -> dict[str, UserReport]:
        """As the Redis scripts do it, on this backend's clock (see ``Backend.report_presence_users``); every
        report sweeps every field (in process, no round trip; ``sweep`` changes nothing here)."""
        now = self._clock()
        out: dict[str, UserReport] = {}
        for conv, users in reports.items():
            fields = self._users.setdefault(conv, {})
            live = 0
            for user, (count, info) in sorted(users.items(), key=lambda item: (item[1][0] > 0, -item[1][0])):
                key = (gateway_id, user)
                if count <= 0:
                    fields.pop(key, None)
                elif live < MAX_REPORTED_USERS:
                    live += 1
                    if len(fields) < MAX_USER_FIELDS or key in fields:
                        fields[key] = (count, now + ttl, _stored_info(info))
            out[conv] = (self._announce(conv, fields, now, ttl, leave_delay) if conv in announce
                         else UserReport())
            if not fields:
                del self._users[conv]
        return out

    def _present(self, fields: dict[tuple[str, str], tuple[int, float, Any]], now: float) -> dict[str, list[Any]]:
        """``{user: [connections, info]}`` of the unexpired fields (expired ones dropped), first info kept."""
        present: dict[str, list[Any]] = {}
        for key, (count, expires, info) in list(fields.items()):
            if expires <= now:
                del fields[key]
                continue
            found = present.get(key[1])
            if found is None:
                present[key[1]] = [count, info]
            else:
                found[0] += count
                if found[1] is None:
                    found[1] = info
        return present

    def _announce(self, conv: str, fields: dict[tuple[str, str], tuple[int, float, Any]], now: float, ttl: float,
                  delay: float) -> UserReport:
        present = self._present(fields, now)
        record = self._announced.get(conv)
        announced: dict[str, float | None] = record[0] if record is not None and record[1] > now else {}
        transitions: list[PresenceTransition] = []
        wait: float | None = None
        for user, since in list(announced.items()):
            if user in present:
                announced[user] = None
                continue
            if since is None:
                since = announced[user] = now
            if now - since < delay:
                wait = min(wait, since + delay - now) if wait is not None else since + delay - now
            elif len(transitions) < MAX_TRANSITIONS:
                del announced[user]
                transitions.append(PresenceTransition("leave", conv, user))
            else:
                wait = 0.0
        for user, (_, info) in present.items():
            if user not in announced:
                if len(transitions) < MAX_TRANSITIONS:
                    announced[user] = None
                    transitions.append(PresenceTransition("join", conv, user, info))
                else:
                    wait = 0.0
        if announced:
            self._announced[conv] = (announced, now + 2 * ttl + delay)
        else:
            self._announced.pop(conv, None)
        return UserReport(transitions, wait)

    async def presence_users(self, conv: str, limit: int = 100) -> PresenceUsers:
        fields = self._users.get(conv)
        if not fields:
            return PresenceUsers([], 0)
        present = self._present(fields, self._clock())
        if not fields:
            del self._users[conv]
        ranked = sorted(present.items(), key=lambda item: (-item[1][0], item[0]))
        return PresenceUsers([UserPresence(user, n, info) for user, (n, info) in ranked[:max(0, limit)]],
                             len(ranked))


def _stored_info(info: Any) -> Any:
    """``info`` as the Redis backend would give it back: JSON-encodable and at most ``MAX_INFO_BYTES``, else None."""
    if info is None:
        return None
    try:
        encoded = dumps(info)
    except TypeError:
        return None
    return loads(encoded) if len(encoded) <= MAX_INFO_BYTES else None
