"""Pieces every backend shares: request preparation and the channel registry."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

from broadcaster.backend import DEFAULT_IDEMPOTENCY_TTL_AUTO, BackendStats, Listener
from broadcaster.codec import APPEND, DEFAULT_MAX_DATA_BYTES, encode_data
from broadcaster.envelope import Envelope, PublishRequest
from broadcaster.errors import ValidationError
from broadcaster.locks import KeyedLock
from broadcaster.namespaces import PolicyTable
from broadcaster.validation import validate_conv_id, validate_event_id, validate_event_type, validate_state_key

log = logging.getLogger("broadcaster.backend")


class _RandomIds:
    """Random ids of 20 url-safe characters (120 bits), cut from one large random draw.

    ``secrets.token_urlsafe`` per id costs a system call and a base64 pass each time,
    a measurable share of a ``publish_many``; here one draw serves 256 ids. The pool
    is emptied in a forked child, which must not hand out its parent's ids.
    """

    _BYTES, _CHARS, _BATCH = 15, 20, 256

    def __init__(self) -> None:
        self._pool: list[str] = []
        os.register_at_fork(after_in_child=self._pool.clear)

    def next(self) -> str:
        try:
            return self._pool.pop()  # atomic under the GIL: threads never share an id
        except IndexError:
            text = base64.urlsafe_b64encode(os.urandom(self._BYTES * self._BATCH)).decode()
            self._pool.extend(text[i : i + self._CHARS] for i in range(self._CHARS, len(text), self._CHARS))
            return text[: self._CHARS]


new_event_id = _RandomIds().next
"""A random id for events published without one (20 url-safe characters)."""


def new_epoch() -> str:
    """A random epoch: changes whenever a conversation's numbering starts over."""
    return secrets.token_hex(6)


class PreparedPublish(NamedTuple):
    """A validated publish request, ready for a backend.

    ``data`` is the msgpack encoding of the event data. ``id_ttl`` is how long the
    id is remembered for idempotency: the history TTL for caller-chosen ids, a
    short retry window for generated ones (they only protect the SDK's retries).
    ``chosen_id`` tells the two apart: in a Redis batch a generated id needs no key of
    its own, the batch's key covers retries.
    """

    conv: str
    type: str
    id: str
    key: str | None
    data: bytes
    id_ttl: int
    chosen_id: bool
    op: str | None = None
    """``"append"``: append ``data`` (an object) to the state entry ``key``."""


def prepare_all(requests: Sequence[PublishRequest], policies: PolicyTable) -> list[PreparedPublish]:
    """Validate and encode every request under its conversation's namespace policy, before any is sent."""
    prepared = []
    for r in requests:
        policy = policies.resolve(r.conv).policy if isinstance(r.conv, str) else policies.default
        prepared.append(prepare_publish(r, policy.history_ttl, policy.max_data_bytes))
    return prepared


def prepare_publish(
    request: PublishRequest, history_ttl: int, max_data_bytes: int = DEFAULT_MAX_DATA_BYTES
) -> PreparedPublish:
    """Validate ``request`` and encode its data; raises ``ValidationError`` on bad input."""
    conv = validate_conv_id(request.conv)
    etype = validate_event_type(request.type)
    key = validate_state_key(request.key) if request.key is not None else None
    op = request.op
    if op is not None:
        if op != APPEND:
            raise ValidationError("op", f'unknown op {op!r}: the one op is "append"')
        if key is None:
            raise ValidationError("key", 'op "append" needs a state key')
        if not isinstance(request.data, dict) or not request.data:
            raise ValidationError("data", 'op "append" needs data that is a non-empty object')
    chosen_id = request.id is not None
    if chosen_id:
        event_id, id_ttl = validate_event_id(request.id), history_ttl
    else:
        event_id, id_ttl = new_event_id(), generated_id_ttl(history_ttl)
    return PreparedPublish(conv, etype, event_id, key, encode_data(request.data, max_data_bytes), id_ttl, chosen_id,
                           op)


def generated_id_ttl(history_ttl: int) -> int:
    """How long a generated id (or a batch of them) is remembered: long enough for the SDK's retries."""
    return min(history_ttl, DEFAULT_IDEMPOTENCY_TTL_AUTO)


SubscribeFn = Callable[[str], Awaitable[None]]


class ChannelRegistry:
    """Listeners per conversation, and the one backend channel each needs.

    The first listener of a conversation subscribes its channel; concurrent first
    listeners wait on a per-conversation lock, so exactly one subscribe happens and
    every one of them is registered once it is active. When the last listener
    leaves, the channel is dropped after ``unsubscribe_delay`` seconds unless a new
    listener came back meanwhile.
    """

    def __init__(
        self,
        subscribe_channel: SubscribeFn,
        unsubscribe_channel: SubscribeFn,
        stats: BackendStats,
        unsubscribe_delay: float,
    ) -> None:
        self._subscribe_channel = subscribe_channel
        self._unsubscribe_channel = unsubscribe_channel
        self._stats = stats
        self._delay = unsubscribe_delay
        self._listeners: dict[str, dict[Listener, None]] = {}
        self._active: set[str] = set()
        self._locked = KeyedLock()
        self._drops: dict[str, asyncio.Task[None]] = {}

    @property
    def active_channels(self) -> frozenset[str]:
        """Conversations whose channel is subscribed (to resubscribe after a reconnect)."""
        return frozenset(self._active)

    def has_listeners(self, conv: str) -> bool:
        return bool(self._listeners.get(conv))

    async def add(self, conv: str, listener: Listener) -> None:
        async with self._locked(conv):
            drop = self._drops.pop(conv, None)
            if drop is not None:
                drop.cancel()
            if conv not in self._active:
                await self._subscribe_channel(conv)
                self._active.add(conv)
                self._stats.channel_subscribes += 1
            self._listeners.setdefault(conv, {})[listener] = None

    async def remove(self, conv: str, listener: Listener) -> None:
        async with self._locked(conv):
            listeners = self._listeners.get(conv)
            if listeners is None or listener not in listeners:
                return
            del listeners[listener]
            if listeners:
                return
            del self._listeners[conv]
            if self._delay <= 0:
                await self._drop(conv)
            elif conv not in self._drops:
                self._drops[conv] = asyncio.create_task(self._drop_later(conv))

    async def _drop_later(self, conv: str) -> None:
        await asyncio.sleep(self._delay)
        async with self._locked(conv):
            if self._drops.get(conv) is asyncio.current_task():
                del self._drops[conv]
            if not self._listeners.get(conv):
                await self._drop(conv)

    async def _drop(self, conv: str) -> None:
        if conv in self._active:
            self._active.discard(conv)
            self._stats.channel_unsubscribes += 1
            await self._unsubscribe_channel(conv)

    def dispatch(self, env: Envelope) -> None:
        """Hand ``env`` to every listener of its conversation; a failing listener is logged."""
        listeners = self._listeners.get(env.conv)
        if not listeners:
            return
        for listener in tuple(listeners):
            try:
                listener(env)
            except Exception:
                log.exception("listener failed on %s seq %s", env.conv, env.seq)

    async def close(self) -> None:
        for task in self._drops.values():
            task.cancel()
        self._drops.clear()
        self._listeners.clear()
        self._active.clear()
