"""The envelope: one published event as it travels through the system (CONTRACT §6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


@dataclass(slots=True, frozen=True)
class Envelope:
    """One numbered event of a conversation.

    ``seq`` starts at 1 per conversation and ``epoch`` changes whenever the
    conversation's numbering starts over (its state was lost). ``key`` is set for
    state upserts (CONTRACT §5); ``data is None`` with a key removes the entry.
    """

    conv: str
    seq: int
    id: str
    type: str
    ts: int
    data: Any
    epoch: str
    key: str | None = None

    def event_object(self) -> dict[str, Any]:
        """The client-facing event object of CONTRACT §3 (``key`` only when set)."""
        obj: dict[str, Any] = {
            "type": self.type,
            "conv_id": self.conv,
            "seq": self.seq,
            "id": self.id,
            "ts": self.ts,
            "data": self.data,
        }
        if self.key is not None:
            obj["key"] = self.key
        return obj


class PublishRequest(NamedTuple):
    """What a producer asks to publish; ``id`` and ``key`` are optional."""

    conv: str
    type: str
    data: Any = None
    id: str | None = None
    key: str | None = None


class PublishResult(NamedTuple):
    """The outcome of one publish: the event's seq, id and epoch.

    ``duplicate`` is true when the id had already been published to this
    conversation: ``seq`` is then the first publish's seq and nothing was fanned out.
    (A named tuple, not a frozen dataclass: ``publish_many`` makes one per event and a
    frozen dataclass costs several times as much to build.)
    """

    conv_id: str
    seq: int
    id: str
    epoch: str
    duplicate: bool = False
    evicted: int = 0
    """State entries evicted by this publish to keep the conversation under its cap."""
