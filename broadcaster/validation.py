"""Syntax of conversation ids and event types (CONTRACT §3)."""

from __future__ import annotations

import re
from typing import TypeGuard

from broadcaster.errors import ValidationError

_NAME = re.compile(r"[A-Za-z0-9._:-]{1,128}")

#: Event types with this prefix are control objects; producers may not publish them.
CONTROL_PREFIX = "ws."


_known_valid: dict[str, None] = {}
_KNOWN_VALID_MAX = 16384


def is_valid_name(value: object) -> TypeGuard[str]:
    """True when ``value`` is 1-128 characters of ``[A-Za-z0-9._:-]``.

    The same few conversation ids and event types come by again and again (every
    payload a gateway decodes, every event a producer sends), so names found valid
    are remembered, up to ``_KNOWN_VALID_MAX`` of them, and the regex runs once each.
    """
    if type(value) is str and value in _known_valid:
        return True
    if not (isinstance(value, str) and _NAME.fullmatch(value) is not None):
        return False
    if len(_known_valid) >= _KNOWN_VALID_MAX:
        _known_valid.clear()
    _known_valid[value] = None
    return True


CONV_ID_RULE = "must be 1-128 characters of [A-Za-z0-9._:-], not only dots"
"""What :func:`validate_conv_id` says of a refused id (the gateway's errors say the same)."""


def is_valid_conv_id(value: object) -> TypeGuard[str]:
    """True when ``value`` is a valid name (:func:`is_valid_name`) made of something else than dots.

    ``.``, ``..``, ``...`` are refused: in a URL path a client or proxy may resolve them as
    path segments (``/v1/conversations/../events``), so the id a request names would not be
    the id it reaches.
    """
    return is_valid_name(value) and value.strip(".") != ""


def validate_conv_id(value: object) -> str:
    """Return ``value`` if it is a valid conversation id (:func:`is_valid_conv_id`), else raise ``ValidationError``."""
    if not is_valid_conv_id(value):
        raise ValidationError("conv_id", CONV_ID_RULE)
    return value


def validate_event_type(value: object) -> str:
    """Return ``value`` if producers may publish it as an event type, else raise."""
    if not is_valid_name(value):
        raise ValidationError("type", "must be 1-128 characters of [A-Za-z0-9._:-]")
    if value.startswith(CONTROL_PREFIX):
        raise ValidationError("type", f"types starting {CONTROL_PREFIX!r} are reserved for control objects")
    return value


def validate_event_id(value: object) -> str:
    """Return ``value`` if it is a usable idempotency id (1-128 printable ASCII, no spaces)."""
    if not (isinstance(value, str) and 1 <= len(value) <= 128 and value.isascii() and value.isprintable()
            and " " not in value):
        raise ValidationError("id", "must be 1-128 printable ASCII characters without spaces")
    return value


def validate_state_key(value: object) -> str:
    """Return ``value`` if it is a valid state key (same syntax as an event type, ``ws.`` allowed)."""
    if not is_valid_name(value):
        raise ValidationError("key", "must be 1-128 characters of [A-Za-z0-9._:-]")
    return value
