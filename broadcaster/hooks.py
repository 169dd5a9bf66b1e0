"""How backend code hooks into a gateway without touching sockets.

A plugin is a callable ``setup(ctx: PluginContext)`` (sync or async), named on the
command line as ``--plugin module:attr``. Through the context it can publish
(``ctx.publisher``), react to subscriptions, intercept every event before fan-out,
and run periodic emitters.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from broadcaster.backend import Backend, Presence
from broadcaster.envelope import Envelope, PublishRequest, PublishResult

log = logging.getLogger("broadcaster.hooks")


class Publisher(Protocol):
    """Publishing as seen by code inside the gateway process (and by the SDK)."""

    async def publish(
        self, conv: str, type: str, data: Any = None, *, id: str | None = None, key: str | None = None,
        op: str | None = None,
    ) -> PublishResult: ...

    async def publish_many(self, requests: list[PublishRequest]) -> list[PublishResult]: ...

    async def presence(self, conv: str) -> Presence: ...

    async def has_subscribers(self, conv: str, profile: str | None = None) -> bool: ...


class BackendPublisher:
    """The in-process :class:`Publisher`: publishes straight through the gateway's backend."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    async def publish(
        self, conv: str, type: str, data: Any = None, *, id: str | None = None, key: str | None = None,
        op: str | None = None,
    ) -> PublishResult:
        """``op="append"``: append to the state entry ``key`` (docs/streaming.md)."""
        if op is not None:
            return (await self._backend.publish_many([PublishRequest(conv, type, data, id, key, op)]))[0]
        return await self._backend.publish(conv, type, data, id=id, key=key)

    async def publish_many(self, requests: list[PublishRequest]) -> list[PublishResult]:
        return await self._backend.publish_many(requests)

    async def presence(self, conv: str) -> Presence:
        return await self._backend.presence(conv)

    async def has_subscribers(self, conv: str, profile: str | None = None) -> bool:
        found = await self._backend.presence(conv)
        return found.connections > 0 if profile is None else found.by_profile.get(profile, 0) > 0


@dataclass(slots=True, frozen=True)
class SubscriptionInfo:
    """One connection's subscription to one conversation."""

    conv_id: str
    profile: str
    connection_id: str


SubscriptionCallback = Callable[[SubscriptionInfo], Awaitable[None] | None]
Interceptor = Callable[[Envelope], Envelope | None]
"""Sees each event before fan-out; returns it (possibly changed) or None to deliver nothing.

Interceptors run once per event per gateway, on live events and on replays from
history alike, so they must be deterministic. To add derived events, publish them
with an id derived from the original (``f"{env.id}:summary"``): idempotency then
makes replays and several gateways publish them once.
"""
Emitter = Callable[[], Awaitable[None]]


@dataclass
class PluginContext:
    """What a plugin receives; it registers its callbacks here."""

    publisher: Publisher
    gateway_id: str
    on_subscribe_callbacks: list[SubscriptionCallback] = field(default_factory=list)
    on_unsubscribe_callbacks: list[SubscriptionCallback] = field(default_factory=list)
    interceptors: list[Interceptor] = field(default_factory=list)
    emitters: list[tuple[float, Emitter]] = field(default_factory=list)

    def on_subscribe(self, callback: SubscriptionCallback) -> SubscriptionCallback:
        """Call ``callback`` after a connection subscribed to a conversation (usable as a decorator)."""
        self.on_subscribe_callbacks.append(callback)
        return callback

    def on_unsubscribe(self, callback: SubscriptionCallback) -> SubscriptionCallback:
        """Call ``callback`` after a subscription ended (unsubscribe or disconnect)."""
        self.on_unsubscribe_callbacks.append(callback)
        return callback

    def intercept(self, interceptor: Interceptor) -> Interceptor:
        """Run ``interceptor`` on every event before fan-out (see :data:`Interceptor`)."""
        self.interceptors.append(interceptor)
        return interceptor

    def every(self, seconds: float, emitter: Emitter) -> Emitter:
        """Await ``emitter()`` every ``seconds`` while the gateway runs; errors are logged."""
        if seconds <= 0:
            raise ValueError("period must be positive")
        self.emitters.append((seconds, emitter))
        return emitter

    async def notify(self, callbacks: list[SubscriptionCallback], info: SubscriptionInfo) -> None:
        """Run subscription callbacks; one failing is logged and does not stop the others."""
        for callback in callbacks:
            try:
                result = callback(info)
                if result is not None:
                    await result
            except Exception:
                log.exception("subscription callback %r failed", callback)

    def start_emitters(self) -> list[asyncio.Task[None]]:
        """Start one task per periodic emitter; the caller cancels them on shutdown."""
        return [asyncio.create_task(_run_every(period, emitter)) for period, emitter in self.emitters]


async def _run_every(period: float, emitter: Emitter) -> None:
    while True:
        await asyncio.sleep(period)
        try:
            await emitter()
        except Exception:
            log.exception("periodic emitter %r failed", emitter)
