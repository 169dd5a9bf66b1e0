"""The narrow interface every backend implements (memory, Redis, Redis Cluster).

A backend numbers and stores events (publish), fans them out to the listeners of a
conversation inside this process (subscribe), and answers reads (head, history,
state, presence). It knows nothing of websockets, profiles or connections: the
:class:`broadcaster.hub.Hub` builds those on top of it.

Delivery contract towards listeners:

* listeners of a conversation are called synchronously, in the event loop, with
  each decoded :class:`Envelope` in the order the backend received them; a
  listener must not block;
* a payload that cannot be decoded is counted in ``stats.decode_errors`` and
  skipped; it never stops delivery;
* after the backend lost and regained its subscription connection it calls every
  reconnect callback; while disconnected ``connected`` is false (a backend with
  several subscription connections, one per Redis Cluster shard, stays connected
  while at least one of them is up: see its own ``connected``);
* whenever live events of some conversations may have been missed (a subscription
  connection came back, a channel was dropped by the server and subscribed again,
  e.g. on another Redis Cluster shard) it calls every resubscribe callback with those
  conversations once their subscription is active again (the hub then repairs them
  from history). A backend that cannot tell which conversations were affected
  reports ``None``: every conversation (the default of
  :meth:`Backend.add_resubscribe_callback`, built on the reconnect callbacks);
* ``subscribe`` returns once the subscription is active: every event published
  after it returns reaches the listener (unless the connection drops, which the
  reconnect callbacks report).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from broadcaster.envelope import Envelope, PublishRequest, PublishResult
from broadcaster.namespaces import Namespace, Policy, PolicyTable

Listener = Callable[[Envelope], None]
ReconnectCallback = Callable[[], Awaitable[None]]
ResubscribeCallback = Callable[[Collection[str] | None], Awaitable[None]]
"""Called with the conversations to repair from history, or None for every conversation."""
ControlListener = Callable[[dict[str, Any]], None]
"""Called on the event loop with each control message (see :meth:`Backend.add_control_listener`)."""

DEFAULT_HISTORY_SIZE = 1000
DEFAULT_HISTORY_TTL = 86400
DEFAULT_STATE_MAX_ENTRIES = 10_000
DEFAULT_STATE_MAX_BYTES = 8 * 1024 * 1024
DEFAULT_IDEMPOTENCY_TTL_AUTO = 300
"""Seconds an auto-generated id is remembered: long enough to cover retries."""


@dataclass(slots=True)
class BackendSettings:
    """Tuning shared by every backend."""

    history_size: int = DEFAULT_HISTORY_SIZE
    history_ttl: int = DEFAULT_HISTORY_TTL
    state_max_entries: int = DEFAULT_STATE_MAX_ENTRIES
    state_max_bytes: int = DEFAULT_STATE_MAX_BYTES
    """Encoded bytes of a conversation's state entries; past it the oldest-updated are evicted."""
    max_data_bytes: int = 1024 * 1024
    unsubscribe_delay: float = 2.0
    """Seconds a channel stays subscribed after its last listener left (absorbs churn)."""
    namespaces: tuple[Namespace, ...] = ()
    """Namespaces (``--namespaces FILE``), first match wins; the fields above are the default namespace."""

    def default_policy(self) -> Policy:
        return Policy(self.history_size, self.history_ttl, self.state_max_entries, self.state_max_bytes,
                      self.max_data_bytes)

    def policy_table(self) -> PolicyTable:
        """The namespaces with the default namespace's policy: what every publish applies."""
        return PolicyTable(self.default_policy(), self.namespaces)


@dataclass(slots=True)
class BackendStats:
    """Counters a backend keeps; the gateway exports them as metrics."""

    decode_errors: int = 0
    reconnects: int = 0
    channel_subscribes: int = 0
    channel_unsubscribes: int = 0
    state_evictions: int = 0
    policy_conflict: int = 0
    """1 while the policy Redis applies (the function library loaded there) is not this process's."""
    policy_loads: int = 0
    """Times this process loaded its function library (at start, and where Redis had lost it)."""


@dataclass(slots=True, frozen=True)
class Head:
    """Where a conversation stands: its epoch and the last seq assigned (0: none yet)."""

    epoch: str
    seq: int


@dataclass(slots=True, frozen=True)
class HistoryPage:
    """Events with seq > since, oldest first, at most ``limit``.

    ``truncated`` is true when events after ``since`` are no longer kept (the
    first returned event is not ``since + 1``, or none is returned although
    ``seq > since``).
    """

    epoch: str
    seq: int
    events: list[Envelope]
    truncated: bool


class HistoryRead(NamedTuple):
    """One read of :meth:`Backend.history_many`: the arguments of one :meth:`Backend.history` call."""

    conv: str
    since: int = 0
    limit: int | None = None


@dataclass(slots=True, frozen=True)
class StateSnapshot:
    """Every state entry of a conversation, consistent as of ``seq``."""

    epoch: str
    seq: int
    entities: dict[str, Envelope]


@dataclass(slots=True, frozen=True)
class PolicyInfo:
    """The policy publishes to a conversation get, and where it comes from.

    ``namespace``: the glob that matched (``""``: the default namespace). ``fingerprint``:
    of the policy applied (on Redis: of the library loaded on the conversation's node).
    ``conflict``: that policy is not this process's own (another gateway loaded its own).
    """

    namespace: str
    policy: Policy
    fingerprint: str
    conflict: bool = False


@dataclass(slots=True, frozen=True)
class Presence:
    """Live connections watching a conversation, over every gateway."""

    connections: int
    by_profile: dict[str, int] = field(default_factory=dict)


MAX_REPORTED_USERS = 1000
"""Users one gateway reports per conversation at most (those with the most connections)."""
MAX_USER_FIELDS = 10_000
"""Fields (gateway, user) one conversation's users hash holds at most: new ones past it are not stored."""
MAX_INFO_BYTES = 1024
"""A user's ``info`` claim, JSON-encoded, is stored only up to this size (a larger one is left out)."""
MAX_TRANSITIONS = 500
"""Joins and leaves one user report returns at most; the others are found by the next report, soon after."""


@dataclass(slots=True, frozen=True)
class UserPresence:
    """One user watching a conversation: its connections summed over every gateway, its ``info`` claim if any."""

    user: str
    connections: int
    info: Any = None


@dataclass(slots=True, frozen=True)
class PresenceUsers:
    """The users watching a conversation, most connections first: ``users`` holds at most the limit asked,
    ``total`` counts them all (``truncated``: some were left out)."""

    users: list[UserPresence]
    total: int

    @property
    def truncated(self) -> bool:
        return self.total > len(self.users)


@dataclass(slots=True, frozen=True)
class PresenceTransition:
    """A user's first connection to a conversation (``join``, with its info) or its last one gone (``leave``)."""

    kind: str
    conv: str
    user: str
    info: Any = None


@dataclass(slots=True, frozen=True)
class UserReport:
    """What one conversation's user report found: the transitions to announce, and in how many seconds a
    leave still debounced is due (None: none pending); report again then to announce it."""

    transitions: list[PresenceTransition] = field(default_factory=list)
    next_check: float | None = None


UserCounts = Mapping[str, tuple[int, Any]]
"""``{user: (connections, info)}`` of one conversation in one gateway."""


class Backend(abc.ABC):
    """Publish, subscribe and read conversations. See the module docstring."""

    settings: BackendSettings
    stats: BackendStats

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect; must be called before anything else."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every connection and task; listeners receive nothing more."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while the backend can deliver live events."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """True if the backend answers right now (readiness)."""

    async def publish(
        self, conv: str, type: str, data: Any = None, *, id: str | None = None, key: str | None = None
    ) -> PublishResult:
        """Number, store and fan out one event atomically (:meth:`publish_many` of one).

        Raises :class:`ValidationError` before touching storage when an argument
        breaks the contract. ``id`` defaults to a fresh random id.
        """
        return (await self.publish_many([PublishRequest(conv, type, data, id, key)]))[0]

    @abc.abstractmethod
    async def publish_many(self, requests: Sequence[PublishRequest]) -> list[PublishResult]:
        """Publish several events in order, in one round trip where the backend allows.

        Every request is validated before any is published.
        """

    @abc.abstractmethod
    async def subscribe(self, conv: str, listener: Listener) -> None:
        """Add a listener for the live events of ``conv`` (see module docstring)."""

    @abc.abstractmethod
    async def unsubscribe(self, conv: str, listener: Listener) -> None:
        """Remove a listener; the channel itself is dropped shortly after the last one."""

    @abc.abstractmethod
    def add_reconnect_callback(self, callback: ReconnectCallback) -> None:
        """Call ``callback`` after every re-established subscription connection."""

    def add_resubscribe_callback(self, callback: ResubscribeCallback) -> None:
        """Call ``callback(convs)`` once the subscriptions of ``convs`` are active again after a gap.

        ``convs`` are the conversations whose live events may have been missed. This
        default cannot tell which ones: it reports ``None`` (every conversation) after
        every re-established subscription connection. A backend that loses
        subscriptions piecemeal (one shard of a cluster, one moved channel) overrides
        it to name only the conversations concerned.
        """

        async def on_reconnect() -> None:
            await callback(None)

        self.add_reconnect_callback(on_reconnect)

    @abc.abstractmethod
    async def head(self, conv: str) -> Head:
        """The conversation's epoch and last seq; creates the epoch if it has none."""

    async def change_epoch(self, conv: str, seen: str) -> str:
        """Give ``conv`` a new epoch if it is still in epoch ``seen``; return the epoch it is in now.

        For a history that went back (a failover lost acknowledged events: the seqs after
        them are issued again): every gateway that notices asks, the first one changes
        it, the others get that new epoch (compare-and-set: idempotent). A backend whose
        history cannot go back keeps the epoch.
        """
        return (await self.head(conv)).epoch

    @abc.abstractmethod
    async def history(self, conv: str, since: int = 0, limit: int | None = None) -> HistoryPage:
        """Kept events with seq > ``since`` (see :class:`HistoryPage`)."""

    async def history_many(self, reads: Sequence[HistoryRead]) -> list[HistoryPage]:
        """``history(conv, since, limit)`` of every read, in order; all pages or the first error.

        A backend with round trips to save reads them together (the Redis backend: one
        pipeline); this default reads them one after the other.
        """
        return [await self.history(conv, since, limit) for conv, since, limit in reads]

    @abc.abstractmethod
    async def state(self, conv: str) -> StateSnapshot:
        """Every state entry, read atomically with the seq it is consistent at."""

    @abc.abstractmethod
    async def report_presence(self, gateway_id: str, counts: Mapping[str, Mapping[str, int]], ttl: float) -> None:
        """Replace this gateway's connection counts ``{conv: {profile: n}}`` for those conversations.

        Counts expire ``ttl`` seconds after the last report, so a dead gateway's
        counts vanish by themselves. A zero count removes the entry.
        """

    async def report_presence_users(
        self, gateway_id: str, reports: Mapping[str, UserCounts], ttl: float, *, leave_delay: float,
        announce: Collection[str] = (), sweep: Collection[str] | None = None,
    ) -> dict[str, UserReport]:
        """Update this gateway's user counts of those conversations; for those in ``announce``, find joins and leaves.

        ``reports``: ``{conv: {user: (connections, info)}}``, a zero count removing the user (the
        caller sends zeros for users gone since its last report, and at most
        ``MAX_REPORTED_USERS`` per conversation); users left out keep their last count. Counts
        expire ``ttl`` seconds after the report that last carried them, as
        :meth:`report_presence`'s do: a heartbeat report carries every user. ``sweep``: the
        conversations whose report also looks for expired counts of other gateways (a
        bounded step; None: all of them). For a conversation in ``announce`` the report
        also compares the users present now (every gateway, expired reports dropped) with
        the users announced so far, atomically: a present user never announced is a
        ``join``; an announced user absent for ``leave_delay`` seconds is a ``leave`` (one
        back within that delay is neither). Each transition is returned to exactly one
        caller, whichever gateway's report found it. This default keeps nothing.
        """
        return {conv: UserReport() for conv in reports}

    async def presence_users(self, conv: str, limit: int = 100) -> PresenceUsers:
        """The users watching ``conv`` over every gateway whose report has not expired (at most ``limit``).

        This default knows none.
        """
        return PresenceUsers([], 0)

    async def policy(self, conv: str) -> PolicyInfo:
        """The policy publishes to ``conv`` get (this default: the settings' own table)."""
        table = self.settings.policy_table()
        found = table.resolve(conv)
        return PolicyInfo(found.namespace, found.policy, table.fingerprint)

    @abc.abstractmethod
    async def presence(self, conv: str) -> Presence:
        """Connections watching ``conv`` over every gateway whose report has not expired."""

    # ---- control channel and deny list (revocation; see broadcaster.control) ----------

    async def publish_control(self, message: Mapping[str, Any]) -> None:
        """Send ``message`` (a small JSON object) to every process sharing this backend, this one included.

        At most once, to the processes connected at the time (nothing is stored); raises
        ValidationError for a message that is not a JSON object or is over
        ``broadcaster.control.MAX_CONTROL_BYTES``. This default and the three methods after it
        serve this process only (listeners called soon, by ``call_soon``; a dict of denials):
        a backend that several processes share overrides all four.
        """
        from broadcaster.control import encode_control  # broadcaster.control imports this module

        payload = encode_control(message)
        asyncio.get_running_loop().call_soon(self._local_control().dispatch, payload)

    def add_control_listener(self, listener: ControlListener) -> None:
        """Call ``listener(message)`` on the event loop with every control message received.

        Every listener gets every message, whatever its ``kind`` (a listener ignores the
        kinds it does not know); it must not block, and the dict is shared: read it only.
        Messages sent while this process was disconnected are lost: the reconnect
        callbacks tell when to reload what :meth:`revocations` keeps.
        """
        self._local_control().add(listener)

    async def revoke(self, sub: str, until_ms: int) -> None:
        """Deny subject ``sub`` until ``until_ms`` (ms since the epoch), replacing any earlier entry.

        An ``until_ms`` in the past removes the entry (lifts the revocation).
        """
        from broadcaster.control import now_ms, validate_subject

        denied = self._local_denied()
        if until_ms > now_ms():
            denied[validate_subject(sub)] = int(until_ms)
        else:
            denied.pop(validate_subject(sub), None)

    async def revocations(self) -> dict[str, int]:
        """The deny list ``sub -> until (ms since the epoch)``, shared by every process; expired entries pruned."""
        from broadcaster.control import now_ms

        denied, now = self._local_denied(), now_ms()
        for sub in [sub for sub, until in denied.items() if until <= now]:
            del denied[sub]
        return dict(denied)

    def _local_control(self) -> Any:
        """The listeners of the in-process defaults above (a ``broadcaster.control.ControlListeners``)."""
        found = self.__dict__.get("_default_control")
        if found is None:
            from broadcaster.control import ControlListeners

            found = self.__dict__["_default_control"] = ControlListeners(self.stats)
        return found

    def _local_denied(self) -> dict[str, int]:
        denied: dict[str, int] = self.__dict__.setdefault("_default_denied", {})
        return denied
