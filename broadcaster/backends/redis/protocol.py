"""The reply side of one pub/sub connection, without I/O (sans-I/O, as in ``websockets``).

:class:`PubSubProtocol` builds the commands a link writes (``subscribe``,
``unsubscribe``, ``ping``), remembers the (UN)SUBSCRIBEs sent but not yet
answered, and is fed every reply the link reads (:meth:`PubSubProtocol.receive`;
an error reply as the ``ResponseError`` redis-py made of it). Each reply becomes
exactly one event saying what it means. Deciding what to do about an event (which
channel lives where, what to repair) is the subscriber's job; reading and writing
the socket is the link's. Nothing here awaits, sleeps or touches a socket.

Reply shapes (RESP2): ``[b"message", channel, payload]``, ``[b"smessage", ...]``,
``[b"subscribe" | b"ssubscribe", channel, count]``, ``[b"unsubscribe" |
b"sunsubscribe", channel | None, count]``, ``[b"pong", b""]`` once subscribed,
``b"PONG"`` before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from redis.exceptions import ResponseError

Command = tuple[str | bytes, ...]


@dataclass(slots=True)
class Message:
    """A published payload on ``channel`` (MESSAGE or SMESSAGE)."""

    channel: bytes
    payload: bytes


@dataclass(slots=True)
class Subscribed:
    """The server confirmed ``channel``; ``requested``: it answers a (S)SUBSCRIBE we sent."""

    channel: bytes
    requested: bool


@dataclass(slots=True)
class Unsubscribed:
    """``channel`` is no longer subscribed; ``requested`` False: the server dropped it (its slot moved)."""

    channel: bytes
    requested: bool


@dataclass(slots=True)
class Refused:
    """An error reply answering our (UN)SUBSCRIBE of ``channel`` (sharded pub/sub: MOVED, TRYAGAIN, ...)."""

    channel: bytes
    subscribe: bool
    error: ResponseError


@dataclass(slots=True)
class StrayError:
    """An error reply answering no command we are waiting on."""

    error: ResponseError


@dataclass(slots=True)
class Broken:
    """An error reply on a non-sharded link: the connection cannot be trusted, rebuild it."""

    error: ResponseError


@dataclass(slots=True)
class Pong:
    """The answer to a PING; ``requested``: one of ours was outstanding."""

    requested: bool


@dataclass(slots=True)
class Ignored:
    """A reply that means nothing to us (an unknown kind, an UNSUBSCRIBE of no channel)."""

    reply: object


Event = Message | Subscribed | Unsubscribed | Refused | StrayError | Broken | Pong | Ignored


class PubSubProtocol:
    """State of one pub/sub connection's conversation with its server (see the module docstring).

    ``sharded``: SSUBSCRIBE / SUNSUBSCRIBE (Redis Cluster), where the server answers a
    refused subscription with an error reply instead of failing the connection.

    ``pending`` lists, in order, the ``(subscribe, channel)`` commands sent and not
    answered yet: a confirmation removes its entry (wherever it is: a server may
    confirm out of the order we expect after a failover), an error reply the oldest
    one. ``awaiting`` is the current (re)subscription round: the channels a fresh
    connection subscribed whose confirmation it still waits for. ``received``
    counts replies (the idle probe watches it), ``pings`` the PINGs not answered.
    """

    __slots__ = ("_sub", "_unsub", "awaiting", "pending", "pings", "received", "sharded")

    def __init__(self, *, sharded: bool) -> None:
        self.sharded = sharded
        self._sub, self._unsub = ("SSUBSCRIBE", "SUNSUBSCRIBE") if sharded else ("SUBSCRIBE", "UNSUBSCRIBE")
        self.pending: deque[tuple[bool, bytes]] = deque()
        self.awaiting: set[bytes] = set()
        self.received = 0
        self.pings = 0

    # -- commands to write --

    def subscribe(self, channels: Iterable[bytes]) -> Command:
        """The (S)SUBSCRIBE command for ``channels``, recorded as waiting for its replies."""
        chans = tuple(channels)
        self.pending.extend((True, channel) for channel in chans)
        return (self._sub, *chans)

    def unsubscribe(self, channels: Iterable[bytes]) -> Command:
        """The (S)UNSUBSCRIBE command for ``channels``, recorded as waiting for its replies."""
        chans = tuple(channels)
        self.pending.extend((False, channel) for channel in chans)
        return (self._unsub, *chans)

    def ping(self) -> Command:
        self.pings += 1
        return ("PING",)

    # -- the resubscription round of a fresh connection --

    def begin_round(self, channels: Iterable[bytes]) -> None:
        """Wait for the confirmation of ``channels`` (the ones a new connection subscribes again)."""
        self.awaiting = set(channels)

    def settle(self, channel: bytes) -> bool:
        """``channel`` no longer holds up the round (confirmed, moved, dropped); True once none does."""
        self.awaiting.discard(channel)
        return not self.awaiting

    @property
    def round_complete(self) -> bool:
        return not self.awaiting

    def reset(self) -> None:
        """The connection is gone: nothing sent on it will be answered."""
        self.pending.clear()
        self.awaiting.clear()
        self.pings = 0

    # -- replies read --

    def receive(self, reply: object) -> Event:
        """What ``reply`` (a parsed reply, or the ``ResponseError`` of an error reply) means."""
        self.received += 1
        if type(reply) is list and len(reply) >= 2:
            kind = reply[0]
            if kind == b"message" or kind == b"smessage":
                return Message(reply[1], reply[2])
            if kind == b"subscribe" or kind == b"ssubscribe":
                return Subscribed(reply[1], self._take(True, reply[1]))
            if kind == b"unsubscribe" or kind == b"sunsubscribe":
                channel = reply[1]
                if channel is None:
                    return Ignored(reply)
                return Unsubscribed(channel, self._take(False, channel))
            if kind == b"pong":
                return self._pong()
            return Ignored(reply)
        if reply == b"PONG":
            return self._pong()
        if isinstance(reply, ResponseError):
            return self._error(reply)
        return Ignored(reply)

    def _pong(self) -> Pong:
        requested = self.pings > 0
        self.pings = max(0, self.pings - 1)
        return Pong(requested)

    def _error(self, error: ResponseError) -> Event:
        if not self.sharded:
            return Broken(error)
        if not self.pending:
            return StrayError(error)
        subscribe, channel = self.pending.popleft()
        return Refused(channel, subscribe, error)

    def _take(self, subscribe: bool, channel: bytes) -> bool:
        """Remove the pending command a confirmation answers; False if we sent none (a server push)."""
        pending, entry = self.pending, (subscribe, channel)
        if pending and pending[0] == entry:
            pending.popleft()
            return True
        try:
            pending.remove(entry)
        except ValueError:
            return False
        return True
