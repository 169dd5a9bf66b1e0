"""Byte encodings: msgpack for backend payloads, orjson for client-facing JSON.

The backend payload is the msgpack map of CONTRACT §6:
``{"v": 1, "id", "conv", "seq", "type", "ts", "data", "epoch"}`` plus ``"key"``
for state upserts. Every decoding failure raises :class:`PayloadDecodeError`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import orjson

from broadcaster.envelope import Envelope, make_envelope
from broadcaster.errors import PayloadDecodeError, PayloadTooLarge, ValidationError
from broadcaster.validation import is_valid_name

ENVELOPE_VERSION = 1
DEFAULT_MAX_DATA_BYTES = 1024 * 1024

_JSON_STRICT = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS


class _ThreadPackers(threading.local):
    """One reusable msgpack ``Packer`` per thread: ``msgpack.packb`` builds a new one per call,
    which costs more than packing a small event, and a ``Packer`` must not be shared by threads."""

    def __init__(self) -> None:
        self.pack = msgpack.Packer(use_bin_type=True).pack


_packers = _ThreadPackers()
_unpackb = msgpack.unpackb


def _pack(obj: Any) -> bytes:
    return _packers.pack(obj)  # type: ignore[no-any-return]


def encode_data(data: Any, max_bytes: int = DEFAULT_MAX_DATA_BYTES) -> bytes:
    """Validate event ``data`` and return its msgpack encoding.

    ``data`` must be plain JSON (dict with str keys, list, str, int, float, bool,
    None) and at most ``max_bytes`` once encoded as JSON; otherwise a
    :class:`ValidationError` (or :class:`PayloadTooLarge`) is raised.
    """
    try:
        as_json = orjson.dumps(data, option=_JSON_STRICT)
    except TypeError as exc:
        raise ValidationError("data", f"must be JSON-serialisable: {exc}") from None
    if len(as_json) > max_bytes:
        raise PayloadTooLarge("data", f"{len(as_json)} bytes encoded, over the limit of {max_bytes}")
    try:
        return _pack(data)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValidationError("data", f"must be JSON-serialisable: {exc}") from None


def envelope_fields_head(conv: str, etype: str) -> bytes:
    """The start of :func:`envelope_fields`, shared by every event of one conversation and type."""
    return b"\xa1v\x01\xa4conv" + _pack(conv) + b"\xa4type" + _pack(etype) + b"\xa2id"


APPEND = "append"
"""The one ``op`` an event may carry (docs/streaming.md)."""
_OP_APPEND = b"\xa2op\xa6append"


def envelope_fields(head: bytes, event_id: str, data: bytes, key: str | None, op: str | None = None) -> bytes:
    """The payload's ``v``, ``conv``, ``type``, ``id``, ``data`` (and ``key``) as msgpack keys and values.

    ``head`` is :func:`envelope_fields_head` of the event's conversation and type;
    ``data`` is already msgpack-encoded. The run has no map header: the publish script
    appends ``seq``, ``ts`` and ``epoch`` and puts the header in front (see
    :func:`encode_envelope`), so the SDK encodes most of each payload in C, not in Lua.
    """
    fields = head + _pack(event_id) + b"\xa4data" + data
    if key is None:
        return fields
    fields += b"\xa3key" + _pack(key)
    return fields if op is None else fields + _OP_APPEND


def encode_envelope(env: Envelope) -> bytes:
    """The msgpack payload for ``env``, byte for byte what the publish script builds."""
    fields = envelope_fields(envelope_fields_head(env.conv, env.type), env.id, _pack(env.data), env.key, env.op)
    header = b"\x88" if env.key is None else b"\x89" if env.op is None else b"\x8a"
    return header + fields + b"\xa3seq" + _pack(env.seq) + b"\xa2ts" + _pack(env.ts) + b"\xa5epoch" + _pack(env.epoch)


def decode_envelope(payload: bytes) -> Envelope:
    """Parse a backend payload; raise :class:`PayloadDecodeError` for anything invalid."""
    try:
        body = _unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many unrelated types on garbage
        raise PayloadDecodeError(f"not msgpack: {exc.__class__.__name__}") from None
    if not isinstance(body, dict):
        raise PayloadDecodeError("payload is not a map")
    get = body.get
    if get("v") != ENVELOPE_VERSION:
        raise PayloadDecodeError(f"unsupported envelope version {get('v')!r}")
    conv, seq, eid, etype, ts, epoch = get("conv"), get("seq"), get("id"), get("type"), get("ts"), get("epoch")
    key, op = get("key"), get("op")
    if not is_valid_name(conv):
        raise PayloadDecodeError("bad conv")
    if type(seq) is not int or seq < 1:
        raise PayloadDecodeError("bad seq")
    if not isinstance(eid, str) or not is_valid_name(etype):
        raise PayloadDecodeError("bad id or type")
    if type(ts) is not int or not isinstance(epoch, str):
        raise PayloadDecodeError("bad ts or epoch")
    if key is not None and not is_valid_name(key):
        raise PayloadDecodeError("bad key")
    if op is not None and (op != APPEND or key is None):
        raise PayloadDecodeError("bad op")
    return make_envelope(conv, seq, eid, etype, ts, get("data"), epoch, key, op)


dumps: Callable[[Any], bytes] = orjson.dumps
"""Compact JSON for client-facing objects; raises ``TypeError`` for non-JSON values (orjson's own function,
not a wrapper: the hub calls it once per event and profile)."""


def json_array(items: Iterable[bytes]) -> bytes:
    """A JSON array of already-encoded JSON values."""
    return b"[" + b",".join(items) + b"]"


def json_object(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A JSON object of already-encoded JSON values, by key."""
    return b"{" + b",".join(dumps(key) + b":" + value for key, value in members) + b"}"


def embed(head: dict[str, Any], field: str, raw: bytes) -> bytes:
    """The JSON of ``head`` (non-empty) with one more field whose value is the encoded JSON ``raw``."""
    return dumps(head)[:-1] + b"," + dumps(field) + b":" + raw + b"}"


def loads(data: bytes | str) -> Any:
    """Parse JSON; raises ``ValueError`` (``orjson.JSONDecodeError``) on bad input."""
    return orjson.loads(data)
