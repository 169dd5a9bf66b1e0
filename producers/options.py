"""Producer options, and turning what callers pass into validated, id-stamped events.

Validation happens here, before any transport sees an event: a bad request raises
:class:`ValidationError` (or :class:`PayloadTooLarge`) and nothing is sent. Each
event gets its id here too, once, so every retry of it carries the same id and a
publish applied by a timed-out attempt is reported as a duplicate, never doubled.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from broadcaster.backend import (
    DEFAULT_HISTORY_SIZE,
    DEFAULT_HISTORY_TTL,
    DEFAULT_STATE_MAX_BYTES,
    DEFAULT_STATE_MAX_ENTRIES,
    BackendSettings,
)
from broadcaster.backends.base import PreparedPublish, prepare_publish
from broadcaster.codec import DEFAULT_MAX_DATA_BYTES
from broadcaster.envelope import PublishRequest
from broadcaster.errors import ValidationError

PublishItem = PublishRequest | tuple[Any, ...]
"""A :class:`PublishRequest` or a tuple ``(conv, type, data[, id[, key]])``."""


@dataclass(frozen=True, slots=True)
class ProducerOptions:
    """What ``Producer.from_url(url, **options)`` accepts.

    ``history_size``, ``history_ttl``, ``state_max_entries``, ``state_max_bytes`` and ``max_data_bytes``
    must match the gateways' settings when publishing straight to Redis (the
    publish script applies them); over HTTP the gateway applies its own and
    ``max_data_bytes`` only checks early. ``retry_budget``: seconds transient errors
    are retried before :class:`BackendUnavailable`. ``timeout``: seconds per HTTP
    request. ``publish_key``: HTTP ``Authorization: Bearer`` for publishing;
    ``token``: the same for reads (presence) when the gateway requires auth.
    """

    history_size: int = DEFAULT_HISTORY_SIZE
    history_ttl: int = DEFAULT_HISTORY_TTL
    state_max_entries: int = DEFAULT_STATE_MAX_ENTRIES
    state_max_bytes: int = DEFAULT_STATE_MAX_BYTES
    max_data_bytes: int = DEFAULT_MAX_DATA_BYTES
    retry_budget: float = 10.0
    timeout: float = 5.0
    publish_key: str | None = None
    token: str | None = None

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> ProducerOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown producer option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    def settings(self) -> BackendSettings:
        return BackendSettings(history_size=self.history_size, history_ttl=self.history_ttl,
                               state_max_entries=self.state_max_entries,
                               state_max_bytes=self.state_max_bytes, max_data_bytes=self.max_data_bytes)


class Outgoing(NamedTuple):
    """One validated event: the request as given, and its encoded form (``prepared.id`` is its id)."""

    request: PublishRequest
    prepared: PreparedPublish


def to_request(item: PublishItem) -> PublishRequest:
    """A :class:`PublishRequest` from a request or a ``(conv, type, data[, id[, key]])`` tuple."""
    if isinstance(item, PublishRequest):
        return item
    if isinstance(item, tuple) and 2 <= len(item) <= 5:
        return PublishRequest(*item)
    raise ValidationError("request", f"expected PublishRequest or (conv, type, data[, id[, key]]), got {item!r}")


def prepare(items: Iterable[PublishItem], options: ProducerOptions) -> list[Outgoing]:
    """Validate and id-stamp every item; raises before anything is sent if one is bad."""
    out = []
    for item in items:
        request = to_request(item)
        out.append(Outgoing(request, prepare_publish(request, options.history_ttl, options.max_data_bytes)))
    return out


def prepared_only(batch: Sequence[Outgoing]) -> list[PreparedPublish]:
    return [o.prepared for o in batch]
