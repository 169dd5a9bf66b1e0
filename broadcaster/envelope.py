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
    op: str | None = None
    """``"append"`` for an append to the state entry ``key`` (``data``: the chunk only); None otherwise."""

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
        if self.op is not None:
            obj["op"] = self.op
        return obj


_FIELDS = ("conv", "seq", "id", "type", "ts", "data", "epoch", "key", "op")
_new = object.__new__
_set_conv, _set_seq, _set_id, _set_type, _set_ts, _set_data, _set_epoch, _set_key, _set_op = (
    Envelope.__dict__[name].__set__ for name in _FIELDS)


def make_envelope(conv: str, seq: int, event_id: str, etype: str, ts: int, data: Any, epoch: str,
                  key: str | None = None, op: str | None = None) -> Envelope:
    """``Envelope(conv, seq, event_id, etype, ts, data, epoch, key, op)``, the same object, built without the
    frozen dataclass's ``__init__``: that one goes through ``object.__setattr__`` once per field, which was
    most of the cost of decoding a live payload. No checks: the caller has made them."""
    env: Envelope = _new(Envelope)
    _set_conv(env, conv)
    _set_seq(env, seq)
    _set_id(env, event_id)
    _set_type(env, etype)
    _set_ts(env, ts)
    _set_data(env, data)
    _set_epoch(env, epoch)
    _set_key(env, key)
    _set_op(env, op)
    return env


def apply_append(entry: Any, chunk: dict[str, Any]) -> dict[str, Any]:
    """The data of a state entry ``entry`` after the append ``chunk`` (what publish.lua does in Redis).

    A string value of ``chunk`` extends the entry's string at the same field (a missing
    field, or one that is not a string, starts empty); any other value replaces the
    field. Fields keep their order, new ones go last. An entry that is not an object
    starts as ``{}``.
    """
    merged = dict(entry) if isinstance(entry, dict) else {}
    for name, value in chunk.items():
        old = merged.get(name)
        merged[name] = old + value if isinstance(value, str) and isinstance(old, str) else value
    return merged


class PublishRequest(NamedTuple):
    """What a producer asks to publish; ``id``, ``key`` and ``op`` are optional.

    ``op="append"`` (with a ``key`` and an object ``data``): each string value of ``data``
    is appended to the same field of the key's state entry, other values are set
    (docs/streaming.md).
    """

    conv: str
    type: str
    data: Any = None
    id: str | None = None
    key: str | None = None
    op: str | None = None


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
