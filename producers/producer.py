"""``Producer`` (blocking) and ``AsyncProducer`` (asyncio): publish events from any service (CONTRACT §5).

Both take the same URLs — ``redis://``, ``rediss://``, ``redis+cluster://`` publish
with the server-side script; ``http://``, ``https://`` go through a gateway — and
have the same methods; only the async ones are coroutines. Validation and event
ids happen up front (:mod:`producers.options`), the transport only sends.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol

from broadcaster.backend import Presence
from broadcaster.backends.scripts import RedisTarget, parse_redis_url
from broadcaster.control import DEFAULT_CLOSE_CODE, DEFAULT_CLOSE_REASON, disconnect_message, now_ms
from broadcaster.envelope import PublishResult
from broadcaster.errors import BackendUnavailable, NotReplicated, ValidationError
from broadcaster.urls import redact_url
from producers.http_transport import AsyncHttpTransport, SyncHttpTransport
from producers.options import Outgoing, ProducerOptions, PublishItem, prepare
from producers.redis_transport import AsyncRedisTransport, SyncRedisTransport
from producers.stream import DEFAULT_WINDOW, AsyncStream, Stream

HTTP_SCHEMES = ("http", "https")
REDIS_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel", "unix")


class SyncTransport(Protocol):
    def publish_many(self, batch: list[Outgoing]) -> list[PublishResult]: ...
    def presence(self, conv: str) -> Presence: ...
    def disconnect(self, message: dict[str, Any]) -> dict[str, Any]: ...
    def close(self) -> None: ...


class AsyncTransport(Protocol):
    async def publish_many(self, batch: list[Outgoing]) -> list[PublishResult]: ...
    async def presence(self, conv: str) -> Presence: ...
    async def disconnect(self, message: dict[str, Any]) -> dict[str, Any]: ...
    async def close(self) -> None: ...


_SCHEMES_HELP = ("http:// or https:// (a gateway's HTTP API), or redis://, rediss://, redis+cluster://, "
                 "rediss+cluster://, redis+sentinel://, rediss+sentinel://, unix:// (straight to Redis)")


def _scheme(url: str) -> str:
    """The URL's scheme, lower-cased; ValidationError (field ``url``) naming the URL and every scheme supported."""
    if not isinstance(url, str):
        raise ValidationError("url", f"expected a URL string, got {type(url).__name__}; use {_SCHEMES_HELP}")
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ValidationError("url", f"not a URL: {redact_url(url)!r}; use {_SCHEMES_HELP}")
    scheme = scheme.lower()
    if scheme not in HTTP_SCHEMES + REDIS_SCHEMES:
        raise ValidationError("url", f"unsupported scheme {scheme!r} in {redact_url(url)!r}; use {_SCHEMES_HELP}")
    return scheme


def _redis_target(url: str) -> RedisTarget:
    try:
        return parse_redis_url(url)
    except ValidationError as exc:  # its message may quote the URL whole: never with the password
        raise ValidationError("url", exc.message.replace(url, redact_url(url))) from None


@contextmanager
def _naming(where: str) -> Iterator[None]:
    """Say which URL stayed unreachable (credentials redacted)."""
    try:
        yield
    except NotReplicated as exc:  # keeps its type: the caller may publish again with the same ids
        raise NotReplicated(f"{where}: {exc}", exc.results, exc.acked) from exc
    except BackendUnavailable as exc:
        cause = exc.__cause__
        detail = f": {cause}" if cause is not None and str(cause) and str(cause) not in str(exc) else ""
        raise BackendUnavailable(f"{where}: {exc}{detail}") from exc


def _disconnect(sub: str | None, conv_id: str | None, until: datetime | int | None, code: int,
                reason: str) -> dict[str, Any]:
    """The disconnect control message of :meth:`Producer.disconnect`'s arguments; ValidationError if one is bad."""
    until_ms = None
    if until is not None:
        if isinstance(until, datetime):
            if until.tzinfo is None:
                raise ValidationError("until", "a datetime with a timezone (e.g. datetime.now(UTC) + ...)")
            until_ms = round(until.timestamp() * 1000)
        elif type(until) is int and until > 0:
            until_ms = now_ms() + until * 1000
        else:
            raise ValidationError("until", "a timezone-aware datetime, or a positive integer of seconds from now")
        if until_ms <= now_ms():
            raise ValidationError("until", "must be in the future")
    return disconnect_message(sub, conv_id, code=code, reason=reason, until_ms=until_ms)


def _watching(presence: Presence, profile: str | None) -> bool:
    return presence.connections > 0 if profile is None else presence.by_profile.get(profile, 0) > 0


class Producer:
    """Blocking producer; see :meth:`from_url`. Thread-safe as redis-py / httpx clients are."""

    def __init__(self, transport: SyncTransport, options: ProducerOptions, url: str = "") -> None:
        self._transport = transport
        self.options = options
        self.url = redact_url(url)
        """Where it publishes (credentials redacted)."""

    @classmethod
    def from_url(cls, url: str, key_prefix: str = "bc", **options: Any) -> Producer:
        """A producer for ``url``; ``options`` are the fields of :class:`ProducerOptions`.

        Connections open lazily, on the first call.
        """
        opts = ProducerOptions.from_kwargs(options)
        transport: SyncTransport
        if _scheme(url) in HTTP_SCHEMES:
            transport = SyncHttpTransport(url, opts)
        else:
            transport = SyncRedisTransport(_redis_target(url), key_prefix, opts)
        return cls(transport, opts, url)

    def publish(self, conv: str, type: str, data: Any = None, id: str | None = None,
                key: str | None = None, op: str | None = None) -> PublishResult:
        """Publish one event (see CONTRACT §5); retried on transient errors, then BackendUnavailable.

        ``op="append"`` (with ``key``, ``data`` an object): append to the key's state entry
        instead of replacing it (docs/streaming.md).
        """
        batch = prepare([(conv, type, data, id, key, op)], self.options)
        with _naming(self.url):
            return self._transport.publish_many(batch)[0]

    def publish_many(self, items: Iterable[PublishItem]) -> list[PublishResult]:
        """Publish events; results come back in the order of ``items``.

        Over Redis: one round trip, one atomic script call per conversation (per 256
        events), so each conversation's events keep their order, with no other
        producer's event between them within a call; events of different
        conversations are not ordered against each other. Over HTTP: one request per
        event, in order. Every item is validated before any is sent.
        """
        batch = prepare(items, self.options)
        with _naming(self.url):
            return self._transport.publish_many(batch)

    def stream(self, conv: str, key: str, type: str, *, window: float = DEFAULT_WINDOW, field: str = "text",
               final: dict[str, Any] | None = None) -> Stream:
        """A context manager streaming one growing message into state entry ``key`` (:mod:`producers.stream`).

        ``append`` calls within ``window`` seconds become one ``op="append"`` publish; on a
        clean exit the entry ends with a full upsert of the whole message (plus ``final``).
        """
        return Stream(self, conv, key, type, window, field, final)

    def presence(self, conv: str) -> Presence:
        """Live connections watching ``conv`` over every gateway."""
        with _naming(self.url):
            return self._transport.presence(conv)

    def has_subscribers(self, conv: str, profile: str | None = None) -> bool:
        """True if someone watches ``conv`` (with ``profile``, when given): skip producing otherwise."""
        return _watching(self.presence(conv), profile)

    def disconnect(self, sub: str | None = None, conv_id: str | None = None, *,
                   until: datetime | int | None = None, code: int = DEFAULT_CLOSE_CODE,
                   reason: str = DEFAULT_CLOSE_REASON) -> dict[str, Any]:
        """Close, on every gateway, the connections of user ``sub`` and / or of conversation ``conv_id``.

        ``until`` (needs ``sub``; a timezone-aware datetime or seconds from now): the user's
        tokens are also refused until then. ``code``: 1000, 1008 or 4000-4999 (4403: our
        clients stop reconnecting). Over HTTP this is ``POST /v1/disconnect`` (the publish
        key); over Redis the same deny-list write and control message. Returns the message sent.
        """
        message = _disconnect(sub, conv_id, until, code, reason)
        with _naming(self.url):
            return self._transport.disconnect(message)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncProducer:
    """Asyncio producer: :class:`Producer`'s methods as coroutines; ``async with`` closes it."""

    def __init__(self, transport: AsyncTransport, options: ProducerOptions, url: str = "") -> None:
        self._transport = transport
        self.options = options
        self.url = redact_url(url)
        """Where it publishes (credentials redacted)."""

    @classmethod
    def from_url(cls, url: str, key_prefix: str = "bc", **options: Any) -> AsyncProducer:
        """Like :meth:`Producer.from_url`; connections open lazily, in the running loop."""
        opts = ProducerOptions.from_kwargs(options)
        transport: AsyncTransport
        if _scheme(url) in HTTP_SCHEMES:
            transport = AsyncHttpTransport(url, opts)
        else:
            transport = AsyncRedisTransport(_redis_target(url), key_prefix, opts)
        return cls(transport, opts, url)

    async def publish(self, conv: str, type: str, data: Any = None, id: str | None = None,
                      key: str | None = None, op: str | None = None) -> PublishResult:
        batch = prepare([(conv, type, data, id, key, op)], self.options)
        with _naming(self.url):
            return (await self._transport.publish_many(batch))[0]

    async def publish_many(self, items: Iterable[PublishItem]) -> list[PublishResult]:
        batch = prepare(items, self.options)
        with _naming(self.url):
            return await self._transport.publish_many(batch)

    def stream(self, conv: str, key: str, type: str, *, window: float = DEFAULT_WINDOW, field: str = "text",
               final: dict[str, Any] | None = None) -> AsyncStream:
        """Like :meth:`Producer.stream`, for ``async with``; ``await s.append(token)``."""
        return AsyncStream(self, conv, key, type, window, field, final)

    async def presence(self, conv: str) -> Presence:
        with _naming(self.url):
            return await self._transport.presence(conv)

    async def has_subscribers(self, conv: str, profile: str | None = None) -> bool:
        return _watching(await self.presence(conv), profile)

    async def disconnect(self, sub: str | None = None, conv_id: str | None = None, *,
                         until: datetime | int | None = None, code: int = DEFAULT_CLOSE_CODE,
                         reason: str = DEFAULT_CLOSE_REASON) -> dict[str, Any]:
        """Like :meth:`Producer.disconnect`."""
        message = _disconnect(sub, conv_id, until, code, reason)
        with _naming(self.url):
            return await self._transport.disconnect(message)

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
