"""``BroadcasterClient``: a resuming asyncio consumer of the gateway's ``/ws`` protocol.

```python
from producers.client import BroadcasterClient, Event, Joined, Left, Reset, State, Unsubscribed

async with BroadcasterClient(["ws://gw1:8000", "ws://gw2:8000"], ["conv-1", "conv-2"],
                             get_token=fetch_jwt) as client:   # or token="..." (never refreshed)
    async for item in client:
        if isinstance(item, Event):
            handle(item.conv_id, item.seq, item.type, item.data)
        elif isinstance(item, Reset):      # the stream started over: reload what you show
            reload(item.conv_id)
        elif isinstance(item, Unsubscribed):  # e.g. the refreshed token no longer allows it
            hide(item.conv_id, item.reason)
        elif isinstance(item, Joined | Left):  # who comes and goes (namespaces with join_leave)
            show_presence(item)
```

What it does for you (docs/delivery.md has the why):

* keeps one websocket open to one of the gateway URLs; when it drops, reconnects with
  jittered exponential backoff, moving to the next URL on every attempt;
* remembers, per conversation, the epoch and the seq of the last event it handed out,
  and resumes with ``since``/``epoch`` on the new connection: the server sends exactly
  what was missed, on any gateway sharing the backend;
* drops any event whose seq it already handed out (a safety net: the server itself
  never repeats one) and counts it in ``stats.duplicates``;
* surfaces ``ws.reset`` as a :class:`Reset` item and ``ws.state`` as a :class:`State`
  item, in stream order with the events;
* keeps each conversation's entities whole (:meth:`BroadcasterClient.entities`,
  :meth:`~BroadcasterClient.entity`, the ``on_entity`` callback): ``ws.state``, keyed
  upserts, appends (``"op": "append"`` chunks merged in) and deletes, so application
  code sees whole messages, never chunks (:mod:`producers.entities`, docs/streaming.md);
* keeps its identity alive (docs/security.md): with ``get_token`` (a function, sync or async,
  returning a fresh JWT) the client asks for a token before every connect and, on the open
  socket, ahead of the token's ``exp`` (read from the JWT payload, never verified here): at
  80-90 % of the life left (jittered, so a fleet spreads out; at least min(5 s, a third of
  it) before exp) it sends ``ws.refresh`` and, on ``ws.refreshed``, plans the next one. A
  refused refresh (``bad_refresh``), a ``get_token`` that raises or no answer is retried a
  few times before exp; a gateway from before ``ws.refresh`` (``unknown_type``) is not asked
  again on that socket. A socket closed anyway with 4401 ``token expired`` reconnects at once
  with a fresh token and resumes (no gap, no duplicate); a 4401 before the next ``ws.hello``
  is fatal. A static ``token`` is sent as it is, never refreshed: its expiry ends the client
  (4401). Give ``token`` or ``get_token``, not both; a token without a readable ``exp`` is
  never refreshed ahead. A synchronous ``get_token`` runs on the event loop: keep it quick
  (return a cached token), or make it a coroutine function when it has to fetch one;
* ends one subscription, not the client, when the gateway refuses or ends only that one: a
  ``ws.error`` naming the conversation (``forbidden``: the token does not allow it;
  ``too_many_subscriptions``) or a ``ws.unsubscribed`` with a reason (``forbidden`` after a
  refresh narrowed the token) drops it - no resubscribe on reconnect - and yields an
  :class:`Unsubscribed` item in stream order, like :class:`Reset` and :class:`State`;
* surfaces ``ws.join`` / ``ws.leave`` (sent where the conversation's namespace has
  ``join_leave = true``, docs/namespaces.md) as :class:`Joined` / :class:`Left` items in
  stream order, for subscribed conversations only. They carry no seq: they are not
  replayed after a reconnect, so a client away at the time misses them (read
  ``GET .../presence`` to know who is there now);
* stops for good on what a retry cannot cure - the close codes 4400, 4401 (other than the
  ``token expired`` above), 4403 (a revoked user, a token that lost the profile), 4404, and
  a ``ws.error`` ``bad_subscribe`` answering one of its subscriptions
  (:class:`SubscribeRefused`): the iterator raises :class:`ClientClosed` saying why;
  any other close (1006, 1012, 1013, 4408, 4429...), ``ws.error`` ``unavailable`` or
  network error means reconnect. Arguments that cannot work (a malformed conversation
  id, epoch or ``since``) raise ``ValueError`` at once instead.

Items are queued for the consumer up to ``max_queue``; past that the client stops
reading, the gateway eventually closes the slow socket (4408) and the client resumes
from the last item it queued, so nothing is lost while memory stays bounded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import inspect
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from broadcaster.validation import is_valid_conv_id, is_valid_name
from producers.entities import Entity, EntityMap

MAX_EPOCH_LENGTH = 64
MAX_SINCE = 10**18

log = logging.getLogger("producers.client")

FATAL_CLOSE_CODES = frozenset({4400, 4401, 4403, 4404})
"""Close codes after which reconnecting cannot help: the client stops."""
FATAL_SUBSCRIBE_ERRORS = frozenset({"bad_subscribe"})
"""``ws.error`` codes answering a ``ws.subscribe`` that every gateway would give again: the client stops."""
SUBSCRIPTION_ENDING_ERRORS = frozenset({"forbidden", "too_many_subscriptions"})
"""``ws.error`` codes naming a ``conv_id`` that end that one subscription (an :class:`Unsubscribed` item)."""
TOKEN_EXPIRED_REASON = "token expired"
"""Reason of the 4401 close at a token's ``exp``: with ``get_token``, reconnect with a fresh token."""
REFRESH_LEAD_MAX = 5.0
"""Seconds: a refresh goes out at least min(this, a third of the token's remaining life) before exp."""
REFRESH_RETRIES = 3
"""Failed refreshes retried (spread over the remaining life) before letting the token expire."""
REFRESH_ANSWER_TIMEOUT = 10.0
"""Seconds (at most; half the remaining life when less) to wait for ``ws.refreshed``."""

TokenSource = Callable[[], str | Awaitable[str]]
"""``get_token``: returns a fresh token, directly or as an awaitable."""


def token_expiry(token: str | None) -> float | None:
    """The ``exp`` claim of a JWT (seconds since the epoch), read without verification; None when unreadable."""
    if not token:
        return None
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        return None
    return float(exp)


def refresh_delay(remaining: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before refreshing a token with ``remaining`` seconds left.

    80-90 % (jittered) of the life left once a lead of min(5 s, a third of it) is kept for
    the round trip and the retries; 0 when the token is spent.
    """
    if remaining <= 0:
        return 0.0
    usable = remaining - min(REFRESH_LEAD_MAX, remaining / 3)
    return usable * (0.8 + 0.1 * rand())


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a conversation (CONTRACT §3 event object)."""

    conv_id: str
    seq: int
    type: str
    id: str
    ts: int
    data: Any
    key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields a profile's enrich hooks added, beyond the standard ones."""
    op: str | None = None
    """``"append"``: ``data`` is a chunk appended to the entity ``key`` (whole: :meth:`BroadcasterClient.entity`)."""

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> Event:
        known = {"type", "conv_id", "seq", "id", "ts", "data", "key", "op"}
        return cls(str(obj["conv_id"]), int(obj["seq"]), str(obj["type"]), str(obj.get("id", "")),
                   int(obj.get("ts", 0)), obj.get("data"), obj.get("key"),
                   {k: v for k, v in obj.items() if k not in known}, obj.get("op"))


@dataclass(frozen=True, slots=True)
class Reset:
    """The server could not continue the stream where the client was (``ws.reset``).

    ``reason`` is ``history_truncated`` (away longer than the history kept) or
    ``epoch_changed`` (the conversation's numbering started over). The events that
    follow have seq > ``seq`` in ``epoch``. Reload what you show from the conversation's
    state (``hydrate``) or its HTTP API.
    """

    conv_id: str
    reason: str
    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class State:
    """A conversation's keyed state as of ``seq`` (``ws.state``, when subscribing with hydrate)."""

    conv_id: str
    epoch: str
    seq: int
    entities: dict[str, Event]


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """The gateway ended one subscription; the client dropped it and will not resubscribe it.

    ``reason`` is ``forbidden`` (the token - after a refresh, or for a later subscribe - does
    not allow the conversation) or ``too_many_subscriptions``; ``message`` is the gateway's
    explanation, when it gave one. The other subscriptions and the connection go on.
    """

    conv_id: str
    reason: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class Joined:
    """A user's first connection (over every gateway) subscribed to the conversation (``ws.join``).

    ``info`` is the user's token ``info`` claim, None when it had none. At most once, never
    replayed (no seq): only for conversations whose namespace has ``join_leave = true``.
    """

    conv_id: str
    user: str
    info: Any = None


@dataclass(frozen=True, slots=True)
class Left:
    """A user's last connection left the conversation and stayed away ``--join-leave-delay`` seconds (``ws.leave``)."""

    conv_id: str
    user: str


Item = Event | Reset | State | Unsubscribed | Joined | Left


class ClientClosed(Exception):
    """The gateway refused the client in a way a retry cannot cure: close code 4400, 4401, 4403 or 4404,
    or (subclass :class:`SubscribeRefused`) a subscription it refuses."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed by the gateway with {code}: {reason}")
        self.code = code
        self.reason = reason


class SubscribeRefused(ClientClosed):
    """The gateway refused a subscription the way it would refuse it again (``ws.error`` ``bad_subscribe``).

    The client stopped rather than reconnect forever with a request no gateway accepts.
    ``conv_id`` is the conversation, ``error_code`` / ``message`` the gateway's ``ws.error``;
    ``code`` is 4400 (bad request), as for a refused connect query.
    """

    def __init__(self, conv_id: str, error_code: str, message: str) -> None:
        Exception.__init__(self, f"the gateway refused the subscription to {conv_id!r} ({error_code}: {message}); "
                                 "retrying cannot fix it: change the subscribe arguments")
        self.code = 4400
        self.reason = message
        self.conv_id = conv_id
        self.error_code = error_code
        self.message = message


@dataclass(slots=True)
class ClientStats:
    """What the client saw, for logs, metrics and tests."""

    connections: int = 0
    """Connections that reached ``ws.hello``."""
    failed_attempts: int = 0
    """Connection attempts that failed before ``ws.hello``."""
    events: int = 0
    duplicates: int = 0
    """Events dropped because their seq had already been handed out."""
    resets: int = 0
    refreshes: int = 0
    """Tokens replaced on an open socket (``ws.refreshed``)."""
    refresh_failures: int = 0
    """Refresh attempts that failed: ``bad_refresh``, ``get_token`` raising, or no answer in time."""
    close_codes: list[int] = field(default_factory=list)
    """Close code of every connection that ended (1006: no close frame)."""
    gateway_ids: list[str] = field(default_factory=list)
    """``gateway_id`` of every ``ws.hello``, in order."""


@dataclass(slots=True)
class _Conversation:
    conv_id: str
    types: tuple[str, ...] | None
    hydrate: bool
    epoch: str | None = None
    seq: int | None = None
    """Seq of the last event handed out (or where the stream was positioned); None: unknown yet."""
    subscribed: bool = False


_END = object()


class BroadcasterClient:
    """A resuming consumer of one or more conversations; see the module docstring.

    ``urls``: gateway websocket URLs (``ws://host:port/ws``; ``ws://host:port`` and
    ``http(s)://`` are accepted too). ``conversations``: conversation ids to follow
    (more with :meth:`subscribe`). ``profile``, ``token`` (sent as
    ``Authorization: Bearer``; or ``get_token``, called for a fresh one before every connect and
    ahead of each token's exp - module docstring), ``types`` (globs narrowing the profile) and ``hydrate``
    (start each conversation from its state) apply to every conversation unless
    :meth:`subscribe` says otherwise. ``start_at``: index of the first URL to try
    (default: random, which spreads clients over gateways). ``backoff_initial`` /
    ``backoff_max``: seconds; the n-th consecutive failed attempt waits a random time
    in ``[0, min(backoff_max, backoff_initial * 2**n)]``. ``on_entity(conv_id, key,
    entity)``: called, in stream order, with each entity whole after every change to it
    (``None``: deleted); see :meth:`entities`. ``delta``: ask for delta upserts (where the
    conversation's namespace allows them, docs/streaming.md): the entity map applies them, and
    the :class:`Event` items of those are the deltas themselves (``op == "delta"``).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        conversations: Iterable[str] = (),
        *,
        profile: str = "default",
        token: str | None = None,
        get_token: TokenSource | None = None,
        types: Sequence[str] | None = None,
        hydrate: bool = False,
        start_at: int | None = None,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        max_queue: int = 10_000,
        on_entity: Callable[[str, str, Entity | None], None] | None = None,
        delta: bool = False,
    ) -> None:
        url_list = [urls] if isinstance(urls, str) else list(urls)
        if not url_list:
            raise ValueError("at least one gateway URL is needed")
        if not is_valid_name(profile):
            raise ValueError(f"invalid profile name {profile!r}")
        self.urls = [_ws_url(u, profile) for u in url_list]
        self.profile = profile
        if token is not None and get_token is not None:
            raise ValueError("give token or get_token, not both")
        if get_token is not None and not callable(get_token):
            raise ValueError("get_token must be a callable returning a token (or an awaitable of one)")
        self.token = token
        self.get_token = get_token
        self._conn_exp: float | None = None  # exp of the current connection's token (ws.refreshed's once refreshed)
        self._clock_skew = 0.0  # the gateway's clock (ws.hello server_time) minus ours, seconds
        self._renewing = False  # a "token expired" close led to a fresh token; a 4401 before the next hello is fatal
        self._reconnect_now = False
        self._refresh_answer: asyncio.Future[str] | None = None  # "ok" / "refused" / "unsupported"
        if isinstance(types, str):
            raise ValueError("types must be a sequence of globs, e.g. ['chat.*'], not a string")
        self.types = tuple(types) if types is not None else None
        self.hydrate = hydrate
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.open_timeout = open_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.stats = ClientStats()
        self.gateway_id: str | None = None
        self.url: str | None = None
        """URL of the current connection (None while disconnected)."""
        self._next_url = random.randrange(len(self.urls)) if start_at is None else start_at % len(self.urls)
        self._convs: dict[str, _Conversation] = {}
        self._queue: asyncio.Queue[Any] = asyncio.Queue(max_queue)
        self._ws: ClientConnection | None = None
        self._awaiting: deque[str] = deque()  # conv ids of ws.subscribe sent and not answered yet, in order
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._end: object | None = None
        self._subscribe_failed = False
        self._refused: SubscribeRefused | None = None
        self._changed = asyncio.Event()
        self._entities: dict[str, EntityMap] = {}
        self.on_entity = on_entity
        self.delta = delta
        for conv in conversations:
            self._add(conv, since=None, epoch=None, types=None, hydrate=None)

    # ---- public API --------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background (``async with`` and iterating do it for you)."""
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="broadcaster-client")

    async def close(self) -> None:
        """Disconnect and stop; the iterator ends after the items already queued."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._finish(_END)

    async def subscribe(self, conv_id: str, *, since: int | None = None, epoch: str | None = None,
                        types: Sequence[str] | None = None, hydrate: bool | None = None) -> None:
        """Follow ``conv_id`` (again, with new options, if already followed).

        ``since`` / ``epoch``: resume after that seq of that epoch (omit both to start
        live, or with ``hydrate`` from the state). ``types`` / ``hydrate`` override the
        client's defaults for this conversation.
        """
        self._add(conv_id, since=since, epoch=epoch, types=types, hydrate=hydrate)
        await self._send_subscribe(self._convs[conv_id])

    async def unsubscribe(self, conv_id: str) -> None:
        """Stop following ``conv_id``; its events still in flight are dropped."""
        if self._convs.pop(conv_id, None) is None:
            return
        self._changed.set()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(orjson.dumps({"type": "ws.unsubscribe", "conv_id": conv_id}).decode())

    def entities(self, conv_id: str) -> EntityMap:
        """``conv_id``'s entities as of the last item the client queued: whole, by key (empty if none yet)."""
        return self._entities.setdefault(conv_id, EntityMap())

    def entity(self, conv_id: str, key: str) -> Entity | None:
        """The whole entity ``key`` of ``conv_id`` (an event object whose ``data`` holds every append), or None."""
        found = self._entities.get(conv_id)
        return found.get(key) if found is not None else None

    def _track(self, conv_id: str, obj: dict[str, Any]) -> None:
        changes = self.entities(conv_id).apply(obj)
        if self.on_entity is not None:
            for key, entity in changes:
                try:
                    self.on_entity(conv_id, key, entity)
                except Exception:
                    log.exception("on_entity callback failed for %s %s", conv_id, key)

    def position(self, conv_id: str) -> tuple[str | None, int | None]:
        """``(epoch, seq)`` the client would resume ``conv_id`` from."""
        conv = self._convs[conv_id]
        return conv.epoch, conv.seq

    @property
    def connected(self) -> bool:
        """True while a connection is open and every conversation is subscribed on it."""
        return self._ws is not None and all(c.subscribed for c in self._convs.values())

    async def wait_subscribed(self, timeout: float | None = None) -> None:
        """Wait until :attr:`connected`; TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not self.connected:
                if self._closed or (self._task is not None and self._task.done()):
                    raise ConnectionError("client stopped")
                self._changed.clear()
                await self._changed.wait()

    async def get(self) -> Item:
        """The next item; raises ClientClosed after a fatal close, StopAsyncIteration once closed."""
        await self.start()
        if self._end is not None and self._queue.empty():
            self._raise_end()
        item = await self._queue.get()
        if item is _END or isinstance(item, ClientClosed):
            self._raise_end()
        result: Item = item
        return result

    def _raise_end(self) -> NoReturn:
        if isinstance(self._end, ClientClosed):
            raise self._end
        raise StopAsyncIteration

    def __aiter__(self) -> BroadcasterClient:
        return self

    async def __anext__(self) -> Item:
        return await self.get()

    async def __aenter__(self) -> BroadcasterClient:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # ---- connection loop ---------------------------------------------------------------

    def _add(self, conv_id: str, *, since: int | None, epoch: str | None, types: Sequence[str] | None,
             hydrate: bool | None) -> None:
        if not is_valid_conv_id(conv_id):
            raise ValueError(f"invalid conversation id {conv_id!r}")
        if since is not None and (isinstance(since, bool) or not isinstance(since, int)
                                  or not 0 <= since < MAX_SINCE):
            raise ValueError(f"since must be an integer from 0 to {MAX_SINCE - 1}, not {since!r}")
        if epoch is not None and (not isinstance(epoch, str) or not 0 < len(epoch) <= MAX_EPOCH_LENGTH
                                  or not epoch.isascii() or not epoch.isalnum()):
            raise ValueError(f"epoch must be 1-{MAX_EPOCH_LENGTH} ASCII letters and digits (as the gateway "
                             f"sends them in ws.subscribed), not {epoch!r}")
        if isinstance(types, str):
            raise ValueError("types must be a sequence of globs, e.g. ['chat.*'], not a string")
        old = self._convs.get(conv_id)
        conv = _Conversation(conv_id, tuple(types) if types is not None else self.types,
                             self.hydrate if hydrate is None else hydrate)
        if since is not None or epoch is not None:
            conv.seq, conv.epoch = since, epoch
        elif old is not None:
            conv.seq, conv.epoch = old.seq, old.epoch
        self._convs[conv_id] = conv
        self._changed.set()

    async def _run(self) -> None:
        failures = 0
        while not self._closed:
            url = self.urls[self._next_url]
            self._next_url = (self._next_url + 1) % len(self.urls)
            try:
                established = await self._session(url)
            except ClientClosed as exc:
                log.warning("stopped: %s", exc)
                self._finish(exc)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused, DNS, handshake, timeout: try the next URL
                log.info("connection to %s failed: %r", url, exc)
                established = False
            if established:
                failures = 0
            else:
                self.stats.failed_attempts += 1
                failures += 1
            if self._reconnect_now:  # the token expired: no failure of the gateway, no backoff
                self._reconnect_now = False
                continue
            ceiling = min(self.backoff_max, self.backoff_initial * 2 ** min(failures, 30))
            await asyncio.sleep(random.uniform(0, ceiling))

    async def _fresh_token(self) -> str | None:
        """The token for a connect or a refresh: ``get_token()``'s (awaited if need be), else the static one."""
        if self.get_token is None:
            return self.token
        token = self.get_token()
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str) or not token:
            raise TypeError(f"get_token returned {type(token).__name__}, not a non-empty string")
        return token

    def _closed_by(self, code: int, reason: str) -> None:
        """Decide on a close: raise what ends the client, or mark a token expiry for an immediate reconnect."""
        if self._refused is not None:
            raise self._refused from None
        if code == 4401 and reason == TOKEN_EXPIRED_REASON and self.get_token is not None and not self._renewing:
            self._renewing = True
            self._reconnect_now = True
            log.info("token expired; reconnecting with a fresh one")
            return
        if code in FATAL_CLOSE_CODES:
            raise ClientClosed(code, reason) from None

    def _token_remaining(self) -> float:
        """Seconds the connection's token has left by the gateway's clock (0 when its exp is unknown)."""
        return 0.0 if self._conn_exp is None else self._conn_exp - (time.time() + self._clock_skew)

    async def _refresh_loop(self, ws: ClientConnection) -> None:
        """Refresh the open socket's token ahead of each exp, retrying failures; ends when it cannot."""
        failures = 0
        while self._conn_exp is not None:
            remaining = self._token_remaining()
            await asyncio.sleep(refresh_delay(remaining) if failures == 0 else remaining / 3)
            outcome = await self._refresh_once(ws)
            if outcome == "ok":
                failures = 0
                continue
            if outcome == "unsupported":
                return  # a gateway from before ws.refresh: the socket lives until exp, then 4401 renews
            self.stats.refresh_failures += 1
            failures += 1
            if failures > REFRESH_RETRIES or self._token_remaining() <= 0.3:
                return  # the gateway closes at exp ("token expired"): the reconnect gets a fresh token

    async def _refresh_once(self, ws: ClientConnection) -> str:
        """One ``ws.refresh``: "ok", "failed" (refused, get_token raised, no answer) or "unsupported"."""
        try:
            token = await self._fresh_token()
        except Exception as exc:
            log.warning("get_token failed; the refresh is retried: %r", exc)
            return "failed"
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._refresh_answer = answer
        try:
            await ws.send(orjson.dumps({"type": "ws.refresh", "token": token}).decode())
            timeout = max(0.2, min(REFRESH_ANSWER_TIMEOUT, self._token_remaining() / 2))
            try:
                outcome = await asyncio.wait_for(answer, timeout)
            except TimeoutError:
                log.warning("no answer to ws.refresh within %.1fs", timeout)
                return "failed"
        except ConnectionClosed:
            return "failed"  # the session loop sees the close
        finally:
            if self._refresh_answer is answer:
                self._refresh_answer = None
        if outcome == "ok" and self._conn_exp is None:
            self._conn_exp = token_expiry(token)  # ws.refreshed without a usable exp
        return outcome

    def _refresh_answered(self, outcome: str, exp: Any = None) -> None:
        answer = self._refresh_answer
        if answer is None or answer.done():
            return  # not an answer to a refresh of this client
        self._refresh_answer = None
        if outcome == "ok":
            self._conn_exp = float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
            self.stats.refreshes += 1
        answer.set_result(outcome)

    async def _session(self, url: str) -> bool:
        """One connection from handshake to close; True if it got as far as ``ws.hello``."""
        token = await self._fresh_token()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._conn_exp = token_expiry(token)
        established = False
        self._subscribe_failed = False
        self._refused = None
        refresher: asyncio.Task[None] | None = None
        try:
            async with connect(url, additional_headers=headers, open_timeout=self.open_timeout,
                               ping_interval=self.ping_interval, ping_timeout=self.ping_timeout,
                               max_size=None, max_queue=64, compression=None) as ws:
                async for frame in ws:
                    text = frame if isinstance(frame, str) else frame.decode()
                    for line in text.split("\n"):
                        if not line:
                            continue
                        obj = orjson.loads(line)
                        if not isinstance(obj, dict):
                            continue
                        if not established:
                            if obj.get("type") != "ws.hello":
                                raise ConnectionError(f"expected ws.hello, got {obj.get('type')!r}")
                            established = True
                            await self._on_hello(ws, url, obj)
                            if self.get_token is not None and self._conn_exp is not None:
                                refresher = asyncio.create_task(self._refresh_loop(ws), name="broadcaster-refresh")
                            continue
                        await self._on_object(ws, obj)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            reason = exc.rcvd.reason if exc.rcvd is not None else ""
            self._disconnected(code)
            self._closed_by(code, reason)
            log.info("connection to %s closed with %s %s", url, code, reason)
            return established and not self._subscribe_failed
        except BaseException:
            if established:
                self._disconnected(1006)
            raise
        finally:
            if refresher is not None:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await refresher
            self._refresh_answer = None
        # the server ended the stream cleanly (close frame read by the iterator)
        rcvd = ws.close_code if ws.close_code is not None else 1006
        self._disconnected(rcvd)
        self._closed_by(rcvd, ws.close_reason or "")
        return established and not self._subscribe_failed

    async def _on_hello(self, ws: ClientConnection, url: str, hello: dict[str, Any]) -> None:
        self.stats.connections += 1
        self._renewing = False  # the token was accepted
        server_time = hello.get("server_time")
        if isinstance(server_time, int | float) and not isinstance(server_time, bool):
            self._clock_skew = server_time / 1000 - time.time()
        self.gateway_id = str(hello.get("gateway_id"))
        self.stats.gateway_ids.append(self.gateway_id)
        self.url = url
        self._ws = ws
        self._awaiting.clear()
        for conv in list(self._convs.values()):
            await self._send_subscribe(conv)

    def _disconnected(self, code: int) -> None:
        self.stats.close_codes.append(code)
        self._ws = None
        self.url = None
        self._awaiting.clear()
        for conv in self._convs.values():
            conv.subscribed = False
        self._changed.set()

    async def _send_subscribe(self, conv: _Conversation) -> None:
        ws = self._ws
        if ws is None:
            return  # sent on the next connection
        message: dict[str, Any] = {"type": "ws.subscribe", "conv_id": conv.conv_id}
        if conv.seq is not None:
            message["since"] = conv.seq
            if conv.epoch is not None:
                message["epoch"] = conv.epoch
        elif conv.hydrate:
            message["hydrate"] = True
        if conv.types is not None:
            message["types"] = list(conv.types)
        if self.delta:
            message["delta"] = True
        conv.subscribed = False
        self._awaiting.append(conv.conv_id)
        with contextlib.suppress(ConnectionClosed):  # the session loop sees the close
            await ws.send(orjson.dumps(message).decode())

    # ---- protocol ----------------------------------------------------------------------

    async def _on_object(self, ws: ClientConnection, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if not isinstance(kind, str):
            return
        if not kind.startswith("ws."):
            await self._on_event(obj)
            return
        conv = self._convs.get(str(obj.get("conv_id")))
        if kind == "ws.subscribed":
            self._answered(str(obj.get("conv_id")))
            if conv is not None:
                self._on_subscribed(conv, obj)
        elif kind == "ws.state" and conv is not None:
            epoch, seq = str(obj["epoch"]), int(obj["seq"])
            conv.epoch, conv.seq = epoch, seq
            entities = {str(k): Event.from_object(v) for k, v in dict(obj.get("entities") or {}).items()}
            self._track(conv.conv_id, obj)
            await self._emit(State(conv.conv_id, epoch, seq, entities))
        elif kind == "ws.reset" and conv is not None:
            reset = Reset(conv.conv_id, str(obj.get("reason")), str(obj["epoch"]), int(obj["seq"]))
            conv.epoch, conv.seq = reset.epoch, reset.seq
            self.stats.resets += 1
            self._track(conv.conv_id, obj)
            await self._emit(reset)
            if conv.hydrate:  # reload the state rather than leave the caller with a hole
                conv.seq = None
                await self._send_subscribe(conv)
        elif kind in ("ws.join", "ws.leave") and conv is not None and isinstance(obj.get("user"), str):
            user = obj["user"]
            await self._emit(Joined(conv.conv_id, user, obj.get("info")) if kind == "ws.join"
                             else Left(conv.conv_id, user))
        elif kind == "ws.refreshed":
            self._refresh_answered("ok", obj.get("exp"))
        elif kind == "ws.unsubscribed":
            reason = obj.get("reason")
            if conv is not None and isinstance(reason, str) and reason:
                # The gateway ended it (e.g. a refresh narrowed the token): do not ask for it again.
                await self._drop(conv, reason, str(obj.get("message") or ""))
        elif kind == "ws.error":
            code = str(obj.get("code"))
            log.warning("gateway error %s: %s", code, obj.get("message"))
            named = obj.get("conv_id") if isinstance(obj.get("conv_id"), str) else None
            if named is not None and code in SUBSCRIPTION_ENDING_ERRORS:
                if conv is not None:
                    await self._drop(conv, code, str(obj.get("message") or ""))
            elif named is None and code == "bad_refresh":
                self._refresh_answered("failed")
            elif named is None and code == "unknown_type" and self._refresh_answer is not None:
                self._refresh_answered("unsupported")
            elif code in FATAL_SUBSCRIBE_ERRORS and (named is not None or self._awaiting):
                # The answer to a pending ws.subscribe (the one it names; older gateways name none: the
                # oldest), and any gateway would answer it the same way: stop, saying why, rather than
                # reconnect forever.
                refused = named if named is not None else self._awaiting[0]
                self._refused = SubscribeRefused(refused, code, str(obj.get("message")))
                await ws.close(1000, "subscription refused; stopping")
            elif code == "unavailable" and self._awaiting:
                # The backend is unreachable from this gateway: reconnect, with backoff, to the next URL.
                self._subscribe_failed = True
                await ws.close(1000, "subscribe failed; reconnecting")

    async def _drop(self, conv: _Conversation, reason: str, message: str) -> None:
        """The gateway ended ``conv``'s subscription: forget it (no resubscribe) and say so in the stream."""
        if self._convs.get(conv.conv_id) is not conv:
            return
        del self._convs[conv.conv_id]
        self._answered(conv.conv_id)
        self._changed.set()
        await self._emit(Unsubscribed(conv.conv_id, reason, message))

    def _answered(self, conv_id: str) -> None:
        if self._awaiting and self._awaiting[0] == conv_id:
            self._awaiting.popleft()
        else:
            with contextlib.suppress(ValueError):
                self._awaiting.remove(conv_id)

    def _on_subscribed(self, conv: _Conversation, obj: dict[str, Any]) -> None:
        epoch, seq = str(obj["epoch"]), int(obj["seq"])
        if conv.seq is None:
            if not conv.hydrate:
                conv.seq = seq  # live from here; with hydrate, ws.state positions the stream
            conv.epoch = epoch
        elif conv.epoch is None:
            conv.epoch = epoch  # resumed with a since of unknown epoch: it is this one
        # else: a different epoch is followed by ws.reset, which repositions the stream
        if conv.conv_id not in self._awaiting:
            conv.subscribed = True
            self._changed.set()

    async def _on_event(self, obj: dict[str, Any]) -> None:
        conv = self._convs.get(str(obj.get("conv_id")))
        if conv is None:
            return  # unsubscribed meanwhile
        seq = obj.get("seq")
        if not isinstance(seq, int):
            return
        if conv.seq is not None and seq <= conv.seq:
            self.stats.duplicates += 1
            return
        conv.seq = seq
        self.stats.events += 1
        if "key" in obj:
            self._track(conv.conv_id, obj)
        await self._emit(Event.from_object(obj))

    async def _emit(self, item: Item) -> None:
        await self._queue.put(item)

    def _finish(self, end: object) -> None:
        """Mark the stream ended (``_END`` or a ClientClosed); ``get`` reports it once the queue is empty."""
        if self._end is None:
            self._end = end
        if self._queue.empty():
            self._queue.put_nowait(end)  # wake a consumer waiting in get()
        self._changed.set()


def _ws_url(url: str, profile: str) -> str:
    """``url`` as a ``ws(s)://.../ws`` URL with ``profile`` in its query."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"gateway URL {url!r}: expected ws://, wss://, http:// or https://")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "profile"]
    if profile != "default":
        query.append(("profile", profile))
    return urlunsplit((scheme, parts.netloc, path, urlencode(query), ""))


__all__ = ["BroadcasterClient", "ClientClosed", "ClientStats", "Entity", "EntityMap", "Event", "Item", "Joined", "Left",
           "Reset", "State", "SubscribeRefused", "TokenSource", "Unsubscribed", "refresh_delay", "token_expiry"]
