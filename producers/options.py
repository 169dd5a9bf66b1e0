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

from broadcaster.backend import BackendSettings
from broadcaster.backends.base import PreparedPublish, prepare_publish
from broadcaster.envelope import PublishRequest
from broadcaster.errors import ValidationError
from broadcaster.namespaces import POLICY_FIELDS

PublishItem = PublishRequest | tuple[Any, ...]
"""A :class:`PublishRequest` or a tuple ``(conv, type, data[, id[, key[, op]]])``."""


@dataclass(frozen=True, slots=True)
class ProducerOptions:
    """What ``Producer.from_url(url, **options)`` accepts.

    No retention or limits: history size and TTL, state caps and the largest data are
    the policy of the conversation's namespace, set once on the gateways
    (``--namespaces FILE``, ``--history-size`` and friends) and applied by whoever
    numbers the event: the gateway over HTTP, the function library the gateways load
    into Redis when publishing straight to Redis (docs/namespaces.md). Passing one of
    them is refused with a :class:`TypeError` saying so.

    ``retry_budget``: seconds transient errors are retried before
    :class:`BackendUnavailable` (over Redis, a key prefix no gateway has loaded its
    library for yet is retried too). ``timeout``: seconds per HTTP request.
    ``publish_key``: HTTP ``Authorization: Bearer`` for publishing; ``token``: the same
    for reads (presence) when the gateway requires auth.

    ``wait_replicas`` (over ``redis://`` / ``redis+sentinel://``): after each publish
    call, ``WAIT wait_replicas wait_timeout_ms`` on the same connection; fewer replicas
    confirming in time raises :class:`broadcaster.errors.NotReplicated` instead of
    reporting success (docs/operations.md: what it costs, what it buys).
    """

    retry_budget: float = 10.0
    timeout: float = 5.0
    publish_key: str | None = None
    token: str | None = None
    wait_replicas: int = 0
    wait_timeout_ms: int = 1000

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> ProducerOptions:
        known = {f.name for f in fields(cls)}
        policy = sorted(set(options) & set(POLICY_FIELDS))
        if policy:
            raise TypeError(
                f"{', '.join(policy)}: not a producer option any more. Retention and limits are the policy of "
                "the conversation's namespace, set once on the gateways (--namespaces FILE, --history-size, "
                "--history-ttl, --state-max-entries, --state-max-bytes, --max-event-bytes) and applied to every "
                "publish whoever sends it; see docs/namespaces.md. GET /v1/conversations/{conv_id}/policy shows "
                "a conversation's.")
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown producer option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    def settings(self) -> BackendSettings:
        """Placeholder values for the publish call's policy arguments, which the publish function ignores."""
        return BackendSettings()


class Outgoing(NamedTuple):
    """One validated event: the request as given, and its encoded form (``prepared.id`` is its id)."""

    request: PublishRequest
    prepared: PreparedPublish


def to_request(item: PublishItem) -> PublishRequest:
    """A :class:`PublishRequest` from a request or a ``(conv, type, data[, id[, key[, op]]])`` tuple."""
    if isinstance(item, PublishRequest):
        return item
    if isinstance(item, tuple) and 2 <= len(item) <= 6:
        return PublishRequest(*item)
    raise ValidationError("request",
                          f"expected PublishRequest or (conv, type, data[, id[, key[, op]]]), got {item!r}")


ID_TTL = 10 * 365 * 86400
"""The id TTL a producer asks for a chosen id: the publish function caps it at the namespace's history TTL."""
MAX_DATA_BYTES = 512 * 1024 * 1024
"""The producer's own size check: Redis' largest argument. The namespace's ``max_data_bytes`` is checked
by whoever applies the policy (the gateway, the publish function: PayloadTooLarge)."""


def prepare(items: Iterable[PublishItem], options: ProducerOptions) -> list[Outgoing]:
    """Validate and id-stamp every item; raises before anything is sent if one is bad."""
    out = []
    for item in items:
        request = to_request(item)
        out.append(Outgoing(request, prepare_publish(request, ID_TTL, MAX_DATA_BYTES)))
    return out


def prepared_only(batch: Sequence[Outgoing]) -> list[PreparedPublish]:
    return [o.prepared for o in batch]
