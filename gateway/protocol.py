"""Client side of the websocket protocol, without I/O: query and message parsing (CONTRACT §3).

Parsers return plain dataclasses or raise :class:`ProtocolError` carrying the
``ws.error`` code (for messages) or the close code (for the connect query), and the
``conv_id`` the bad message was about when it names one (per-subscription errors).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from broadcaster.errors import ValidationError
from broadcaster.profiles import GlobSet, parse_type_filter
from broadcaster.validation import is_valid_conv_id, is_valid_name

CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_UNKNOWN_PROFILE = 4404
CLOSE_TOO_SLOW = 4408
CLOSE_TOO_MANY = 4429
CLOSE_TOO_BIG = 1009
CLOSE_DRAINING = 1012
MAX_EPOCH_LENGTH = 64
MAX_ECHOED_CONV_ID = 128
"""A refused ``conv_id`` is echoed in its ws.error only up to this length (a valid one is never longer)."""
CONV_ID_MESSAGE = "conv_id must be 1-128 characters of [A-Za-z0-9._:-], not only dots"


class ProtocolError(Exception):
    """Bad client input: ``code`` is a ws.error code string or an int close code.

    ``conv_id`` is the conversation the message named (a string of at most
    :data:`MAX_ECHOED_CONV_ID` characters, valid or not), else None.
    """

    def __init__(self, code: str | int, message: str, conv_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.conv_id = conv_id


@dataclass(slots=True, frozen=True)
class SubscribeRequest:
    conv_id: str
    since: int | None = None
    epoch: str | None = None
    hydrate: bool = False
    types: GlobSet | None = None
    delta: bool = False
    """Full upserts of keys the client holds may come as deltas (docs/streaming.md), where the namespace allows."""


@dataclass(slots=True, frozen=True)
class ConnectRequest:
    """What the ``/ws`` query asked for; ``subscribe`` is None without ``conv_id``."""

    profile: str
    subscribe: SubscribeRequest | None
    token: str | None


@dataclass(slots=True, frozen=True)
class Ping:
    pass


@dataclass(slots=True, frozen=True)
class Unsubscribe:
    conv_id: str


@dataclass(slots=True, frozen=True)
class Refresh:
    """``{"type":"ws.refresh","token":T}``: replace the connection's token without reconnecting."""

    token: str


ClientMessage = Ping | SubscribeRequest | Unsubscribe | Refresh


def _echoed(conv_id: Any) -> str | None:
    """The conv_id a refused message named, if it is a string short enough to echo."""
    return conv_id if isinstance(conv_id, str) and 0 < len(conv_id) <= MAX_ECHOED_CONV_ID else None


def _since(value: Any, code: str | int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ProtocolError(code, "since must be a non-negative integer")
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()) or len(value) > 18:  # isdigit alone admits "²", "٣"
            raise ProtocolError(code, "since must be a non-negative integer")
        return int(value)
    if isinstance(value, int) and 0 <= value < 10**18:
        return value
    raise ProtocolError(code, "since must be a non-negative integer")


def _epoch(value: Any, code: str | int) -> str | None:
    if value is None:
        return None
    if (not isinstance(value, str) or not value or len(value) > MAX_EPOCH_LENGTH or not value.isascii()
            or not value.isalnum()):
        raise ProtocolError(code, "epoch must be 1-64 alphanumeric characters")
    return value


def _flag(value: Any, code: str | int, name: str = "hydrate") -> bool:
    if value in (None, False, "0", "false", 0):
        return False
    if value in (True, "1", "true", 1):
        return True
    raise ProtocolError(code, f"{name} must be 1 or 0")


def _hydrate(value: Any, code: str | int) -> bool:
    return _flag(value, code)


def _subscribe(conv_id: Any, since: Any, epoch: Any, hydrate: Any, types: Any, code: str | int,
               delta: Any = None) -> SubscribeRequest:
    """A subscription request; a ProtocolError raised for it names its conv_id (when echoable)."""
    try:
        if not is_valid_conv_id(conv_id):
            raise ProtocolError(code, CONV_ID_MESSAGE)
        if types is not None and not isinstance(types, (str, list)):
            raise ProtocolError(code, "types must be a comma-separated string or a list of patterns")
        try:
            type_filter = parse_type_filter(types) if types is not None else None
        except ValidationError as exc:
            raise ProtocolError(code, exc.message) from None
        return SubscribeRequest(conv_id, _since(since, code), _epoch(epoch, code), _hydrate(hydrate, code),
                                type_filter, _flag(delta, code, "delta"))
    except ProtocolError as exc:
        exc.conv_id = _echoed(conv_id)
        raise


CONNECT_PARAMETERS = ("conv_id", "profile", "since", "epoch", "hydrate", "types", "token", "delta")
"""Query parameters ``/ws`` knows. Any other is refused (4400), except names starting with ``_``."""
IGNORED_PARAMETER_PREFIX = "_"
"""Query parameters whose name starts with this are the client's own (cache-busters like ``_=1712...``)."""
MAX_CLOSE_REASON = 120
"""A close reason is at most 123 bytes on the wire; the endpoint cuts reasons to this."""


def _unknown_parameters(query: Mapping[str, str]) -> None:
    """Refuse a query parameter the gateway does not know (a typo like ``convid`` would otherwise be ignored)."""
    unknown = [name for name in query if name not in CONNECT_PARAMETERS
               and not name.startswith(IGNORED_PARAMETER_PREFIX)]
    if not unknown:
        return
    allowed = ", ".join(CONNECT_PARAMETERS)
    names = ", ".join(repr(name[:24]) for name in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
    message = f"unknown query parameter{'s' if len(unknown) > 1 else ''} {names}; allowed: {allowed}"
    if len(message.encode()) > MAX_CLOSE_REASON:
        message = f"unknown query parameter {unknown[0][:24]!r}; allowed: {allowed}"
    if len(message.encode()) > MAX_CLOSE_REASON:  # non-ASCII names: keep the list of allowed ones whole
        message = f"unknown query parameter; allowed: {allowed}"
    raise ProtocolError(CLOSE_BAD_REQUEST, message)


def parse_connect_query(query: Mapping[str, str]) -> ConnectRequest:
    """Parse the ``/ws`` query string; ProtocolError codes are close codes (4400)."""
    _unknown_parameters(query)
    profile = query.get("profile", "default")
    if not is_valid_name(profile):
        raise ProtocolError(CLOSE_BAD_REQUEST, "profile must be 1-128 characters of [A-Za-z0-9._:-]")
    conv_id = query.get("conv_id")
    subscribe = None
    if conv_id is not None:
        subscribe = _subscribe(conv_id, query.get("since"), query.get("epoch"), query.get("hydrate"),
                               query.get("types"), CLOSE_BAD_REQUEST, query.get("delta"))
    elif any(k in query for k in ("since", "epoch", "hydrate", "types", "delta")):
        raise ProtocolError(CLOSE_BAD_REQUEST, "since, epoch, hydrate, types and delta need conv_id")
    return ConnectRequest(profile, subscribe, query.get("token") or None)


def parse_client_message(text: str | bytes) -> ClientMessage:
    """Parse one client message; ProtocolError codes are ws.error code strings."""
    if isinstance(text, str) and text.strip() == "ping":
        return Ping()
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ProtocolError("bad_json", "message is not valid JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("bad_message", "message must be a JSON object")
    kind = message.get("type")
    if kind == "ws.ping":
        return Ping()
    if kind == "ws.subscribe":
        return _subscribe(message.get("conv_id"), message.get("since"), message.get("epoch"),
                          message.get("hydrate"), message.get("types"), "bad_subscribe", message.get("delta"))
    if kind == "ws.unsubscribe":
        conv_id = message.get("conv_id")
        if not is_valid_conv_id(conv_id):
            raise ProtocolError("bad_unsubscribe", CONV_ID_MESSAGE, _echoed(conv_id))
        return Unsubscribe(conv_id)
    if kind == "ws.refresh":
        token = message.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError("bad_refresh", "ws.refresh needs a non-empty string 'token'")
        return Refresh(token)
    if not isinstance(kind, str):
        raise ProtocolError("bad_message", "message needs a string 'type'")
    raise ProtocolError("unknown_type", f"unknown message type {kind[:64]!r}")
