"""``POST /v1/disconnect``: close connections on every gateway, and deny a user for a while.

Also ``GET /v1/revocations`` (the deny list) and ``DELETE /v1/revocations/{sub}`` (lift a
revocation on every gateway at once). All three need the publish key, as publishing does.

Body (JSON object, ``Content-Type: application/json``)::

    {"sub"?: str, "conv_id"?: str, "code"?: int, "reason"?: str, "until"?: str | int}

At least one of ``sub`` / ``conv_id`` (both: connections matching both). ``code``: 1000,
1008 or 4000-4999 (default 4403: our clients stop reconnecting). ``reason``: at most 120
bytes (default ``revoked``). ``until`` (needs ``sub``): an ISO-8601 time with a UTC offset
(``2026-12-01T19:00:00Z``) or an integer of seconds from now (1 to one year); the user's
tokens are refused on every gateway until then.

Answers 202 ``{"sent": <the control message>, "until": <ISO time> | null}``: the message
went out to every gateway of the backend (each closes its own connections at once); the
deny list was written before it. Errors: 401 / 403 (publish key), 415 (not JSON), 413,
422 (``{"error": "invalid", "message", "field"}``), 503 (backend unreachable).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from broadcaster.control import (
    DEFAULT_CLOSE_CODE,
    DEFAULT_CLOSE_REASON,
    LIFT,
    disconnect_message,
    now_ms,
    validate_subject,
)
from broadcaster.errors import ValidationError
from gateway.http_api import ApiError, backend_call, json_error, publisher_gateway, read_body, require_json
from gateway.revocation import Disconnect, iso_ms

router = APIRouter()

MAX_BODY_BYTES = 8 * 1024
MAX_UNTIL_SECONDS = 366 * 86400
_FIELDS = {"sub", "conv_id", "code", "reason", "until"}


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid", message, field)


def parse_until(value: object, now: int) -> int:
    """``until`` of a body as ms since the epoch: an ISO-8601 time with an offset, or seconds from now."""
    if type(value) is int:
        if not 1 <= value <= MAX_UNTIL_SECONDS:
            raise _invalid("until", f"seconds from now must be from 1 to {MAX_UNTIL_SECONDS}")
        return now + value * 1000
    if not isinstance(value, str) or len(value) > 64:
        raise _invalid("until", "must be an ISO-8601 time with a UTC offset, or an integer of seconds from now")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _invalid("until", f"not an ISO-8601 time: {value!r}") from None
    if moment.tzinfo is None:
        raise _invalid("until", "the time needs a UTC offset (e.g. Z or +02:00)")
    until = round(moment.timestamp() * 1000)
    if until <= now:
        raise _invalid("until", "must be in the future")
    if until > now + MAX_UNTIL_SECONDS * 1000:
        raise _invalid("until", "more than a year from now")
    return until


def parse_disconnect(body: object, now: int) -> Disconnect:
    """The disconnect a request body asks for; ApiError 422 naming the field otherwise."""
    if not isinstance(body, dict):
        raise _invalid("body", 'body must be a JSON object with "sub" and / or "conv_id"')
    unknown = set(body) - _FIELDS
    if unknown:
        raise _invalid("body", f"unknown field(s) {sorted(unknown)}")
    sub, conv_id = body.get("sub"), body.get("conv_id")
    code, reason = body.get("code", DEFAULT_CLOSE_CODE), body.get("reason", DEFAULT_CLOSE_REASON)
    try:
        message = disconnect_message(sub, conv_id, code=code, reason=reason)  # every field but until checked
    except ValidationError as exc:
        raise _invalid(exc.field, exc.message) from None
    until = None
    if body.get("until") is not None:
        if sub is None:
            raise _invalid("until", 'needs "sub": only a user can be denied for a while')
        until = parse_until(body["until"], now)
    return Disconnect(message.get("sub"), message.get("conv_id"), code, reason, until)


@router.get("/v1/revocations")
async def revocations(request: Request) -> Response:
    """The deny list: ``{"revocations": {sub: {"until": ms, "until_iso": str}}}`` (publish key)."""
    gw = publisher_gateway(request)
    found = await backend_call(gw.backend.revocations())
    return JSONResponse({"revocations": {sub: {"until": until, "until_iso": iso_ms(until)}
                                         for sub, until in sorted(found.items())}})


@router.delete("/v1/revocations/{sub}")
async def lift(sub: str, request: Request) -> Response:
    """Take ``sub`` off the deny list on every gateway (publish key); 200 ``{"sub", "lifted": bool}``."""
    gw = publisher_gateway(request)
    try:
        sub = validate_subject(sub)
    except ValidationError as exc:
        raise _invalid(exc.field, exc.message) from None
    was = sub in await backend_call(gw.backend.revocations())
    await backend_call(gw.backend.revoke(sub, 0))
    await backend_call(gw.backend.publish_control({"kind": LIFT, "sub": sub}))
    return JSONResponse({"sub": sub, "lifted": was})


@router.post("/v1/disconnect", status_code=202)
async def disconnect(request: Request) -> Response:
    gw = publisher_gateway(request)
    require_json(request)
    body = await read_body(request, MAX_BODY_BYTES)
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _invalid("body", json_error(body, exc)) from None
    wanted = parse_disconnect(parsed, now_ms())
    if wanted.until is not None and wanted.sub is not None:
        await backend_call(gw.backend.revoke(wanted.sub, wanted.until))  # first: a gateway reloading sees it
    message = wanted.message()
    await backend_call(gw.backend.publish_control(message))
    return JSONResponse({"sent": message, "until": iso_ms(wanted.until) if wanted.until is not None else None},
                        status_code=202)
