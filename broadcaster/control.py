"""Control messages: small JSON objects every process sharing a backend receives.

A control message is a JSON object (``kind`` names what it is for, e.g. ``"disconnect"``,
``"join"``, ``"leave"``) sent with :meth:`Backend.publish_control`. On the wire it is the
object's JSON (orjson) encoding, at most :data:`MAX_CONTROL_BYTES`. Delivery is at most
once and only to processes connected at the time: what must outlive a disconnection is
kept elsewhere (the deny list of :meth:`Backend.revoke`).

:class:`ControlListeners` is the listener list every backend keeps: each message is
decoded once and handed to every listener in order; a failing listener is logged and
does not stop the others; an undecodable payload is counted in
``stats.decode_errors`` and dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson

from broadcaster.backend import BackendStats, ControlListener
from broadcaster.errors import PayloadDecodeError, ValidationError
from broadcaster.validation import validate_conv_id

log = logging.getLogger("broadcaster.control")

MAX_CONTROL_BYTES = 64 * 1024
"""Largest encoded control message."""


def encode_control(message: Mapping[str, Any]) -> bytes:
    """The wire form of ``message``; ValidationError if it is not a small JSON object with string keys."""
    if not isinstance(message, Mapping):
        raise ValidationError("message", "a control message must be a JSON object")
    try:
        payload = orjson.dumps(dict(message))
    except TypeError as exc:
        raise ValidationError("message", f"must be JSON-serialisable: {exc}") from None
    if len(payload) > MAX_CONTROL_BYTES:
        raise ValidationError("message", f"{len(payload)} bytes encoded, over the limit of {MAX_CONTROL_BYTES}")
    return payload


def decode_control(payload: bytes) -> dict[str, Any]:
    """The control message of ``payload``; PayloadDecodeError unless it is a JSON object."""
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise PayloadDecodeError(f"control message is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise PayloadDecodeError("control message is not a JSON object")
    return message


class ControlListeners:
    """The control listeners of one backend, and the dispatch of one received payload to them."""

    def __init__(self, stats: BackendStats) -> None:
        self._stats = stats
        self._listeners: list[ControlListener] = []

    def add(self, listener: ControlListener) -> None:
        self._listeners.append(listener)

    def __len__(self) -> int:
        return len(self._listeners)

    def dispatch(self, payload: bytes) -> None:
        """Decode ``payload`` and hand it to every listener (must run on the event loop)."""
        try:
            message = decode_control(payload)
        except PayloadDecodeError as exc:
            self._stats.decode_errors += 1
            log.debug("dropped an undecodable control message: %s", exc)
            return
        for listener in tuple(self._listeners):
            try:
                listener(message)
            except Exception:
                log.exception("control listener %r failed on a %r message", listener, message.get("kind"))


MAX_SUBJECT_LENGTH = 512
"""Longest ``sub`` the deny list keeps."""


def validate_subject(sub: object) -> str:
    """``sub`` if it is a non-empty string of at most MAX_SUBJECT_LENGTH characters, else ValidationError."""
    if not isinstance(sub, str) or not sub or len(sub) > MAX_SUBJECT_LENGTH:
        raise ValidationError("sub", f"must be a non-empty string of at most {MAX_SUBJECT_LENGTH} characters")
    return sub


def now_ms() -> int:
    """Wall-clock time in ms since the epoch: what deny-list entries are compared with."""
    return time.time_ns() // 1_000_000


# ---- disconnect messages (revocation: POST /v1/disconnect, Producer.disconnect, gateway.revocation) ----

DISCONNECT = "disconnect"
"""``kind`` of a disconnect message: ``{"kind", "sub"?, "conv_id"?, "code", "reason", "until"?}``."""
LIFT = "lift"
"""``kind`` of ``{"kind": "lift", "sub"}``: ``sub`` left the deny list (``Backend.revoke`` with a past until)."""
DEFAULT_CLOSE_CODE = 4403
"""Our clients stop reconnecting on 4403: right for a revoked user."""
DEFAULT_CLOSE_REASON = "revoked"
MAX_REASON_BYTES = 120
"""A close frame's reason holds at most 123 bytes."""


def valid_close_code(code: object) -> bool:
    """Close codes a disconnect may use: 1000, 1008 and the application range 4000-4999."""
    return type(code) is int and (code in (1000, 1008) or 4000 <= code <= 4999)


def disconnect_message(sub: str | None = None, conv_id: str | None = None, *, code: int = DEFAULT_CLOSE_CODE,
                       reason: str = DEFAULT_CLOSE_REASON, until_ms: int | None = None) -> dict[str, Any]:
    """The control message closing ``sub``'s and / or ``conv_id``'s connections; ValidationError naming the field.

    ``until_ms`` (needs ``sub``): the subject is also denied until then (the caller writes
    the deny list with :meth:`Backend.revoke` first).
    """
    if sub is None and conv_id is None:
        raise ValidationError("body", 'give "sub", "conv_id" or both')
    message: dict[str, Any] = {"kind": DISCONNECT}
    if sub is not None:
        message["sub"] = validate_subject(sub)
    if conv_id is not None:
        message["conv_id"] = validate_conv_id(conv_id)
    if not valid_close_code(code):
        raise ValidationError("code", "must be 1000, 1008 or from 4000 to 4999")
    if not isinstance(reason, str) or len(reason.encode()) > MAX_REASON_BYTES:
        raise ValidationError("reason", f"must be a string of at most {MAX_REASON_BYTES} bytes")
    message["code"], message["reason"] = code, reason
    if until_ms is not None:
        if sub is None:
            raise ValidationError("until", 'needs "sub": only a user can be denied for a while')
        if type(until_ms) is not int:
            raise ValidationError("until", "must be an integer of ms since the epoch")
        message["until"] = until_ms
    return message


def publish_command(channel: str, payload: bytes, sharded: bool) -> tuple[str, str, bytes]:
    """The command sending ``payload`` on the control channel (SPUBLISH on a cluster)."""
    return ("SPUBLISH" if sharded else "PUBLISH", channel, payload)


def revoke_command(key: str, sub: str, until_ms: int, now: int) -> tuple[str, ...]:
    """The command writing ``sub -> until_ms`` in the deny-list hash ``key`` (HDEL for an until not after ``now``)."""
    sub = validate_subject(sub)
    return ("HSET", key, sub, str(int(until_ms))) if until_ms > now else ("HDEL", key, sub)
