"""The HTTP API (CONTRACT §2): publish, history, state, presence, health, metrics.

Errors are JSON ``{"error": <code>, "message": <text>}`` (plus ``"field"`` for
invalid input) with the status codes of the contract.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from broadcaster.codec import embed, json_array
from broadcaster.envelope import PublishRequest
from broadcaster.errors import BackendUnavailable, PayloadTooLarge, ValidationError
from broadcaster.profiles import GlobSet, Profile, parse_type_filter
from broadcaster.validation import validate_conv_id
from gateway.auth import AuthError, Grant, bearer
from gateway.state import Gateway

router = APIRouter()
_BODY_KEYS = {"type", "data", "id", "key", "op"}
MAX_HISTORY_LIMIT = 1000
JSON_OVERHEAD = 64 * 1024
"""Bytes a publish body may carry beyond the event data (type, id, key, JSON syntax)."""


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return JSONResponse(body, status_code=self.status)


def _gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def _conv(conv_id: str) -> str:
    try:
        return validate_conv_id(conv_id)
    except ValidationError as exc:
        raise ApiError(422, "invalid", exc.message, exc.field) from None


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or not low <= int(raw) <= high:
        raise ApiError(422, "invalid", f"{name} must be an integer from {low} to {high}", name)
    return int(raw)


def _reader(request: Request, gw: Gateway, conv: str) -> tuple[Profile, GlobSet | None]:
    """Check the read token (when auth is on) and return the requested profile and types."""
    token = request.query_params.get("token") or bearer(request.headers.get("authorization"))
    try:
        grant: Grant = gw.auth.verify(token)
        grant.check_conv(conv)
        name = request.query_params.get("profile", "default")
        profile = gw.profiles.get(name)
        if profile is None:
            raise ApiError(404, "unknown_profile", f"unknown profile {name!r}", "profile")
        grant.check_profile(name)
    except AuthError as exc:
        raise ApiError(exc.status, "unauthorized" if exc.status == 401 else "forbidden", exc.message) from None
    try:
        types = parse_type_filter(request.query_params.get("types"))
    except ValidationError as exc:
        raise ApiError(422, "invalid", exc.message, exc.field) from None
    return profile, types


async def backend_call(coro: Any) -> Any:
    try:
        return await coro
    except BackendUnavailable as exc:
        raise ApiError(503, "unavailable", str(exc)) from None
    except (ConnectionError, OSError, TimeoutError) as exc:
        raise ApiError(503, "unavailable", f"backend unreachable: {exc.__class__.__name__}") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, read chunk by chunk and refused (413) as soon as it passes ``limit`` bytes.

    A chunked body has no Content-Length to check up front: reading it whole first
    would let one request fill the gateway's memory.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "too_large", f"body over {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "disconnected", "client disconnected before sending the whole body") from None
    return b"".join(chunks)


def json_error(body: bytes, exc: orjson.JSONDecodeError) -> str:
    """``body is not valid JSON: <what> at line L column C (byte B)``, with the text around it."""
    if not body.strip():
        return "body is not valid JSON: it is empty (send {\"type\": ..., \"data\": ...})"
    # orjson counts characters of the decoded text; the excerpt comes from the same text.
    text = body.decode("utf-8", "replace")
    pos = min(max(exc.pos, 0), len(text))
    near = text[max(0, pos - 20):pos + 20].replace("\n", " ")
    return f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (char {pos}), near {near!r}"


def require_json(request: Request) -> None:
    """415 unless the request declares ``Content-Type: application/json`` (parameters such as charset allowed).

    A cross-site page can send a "simple" POST (text/plain, form types) with no CORS preflight;
    requiring the JSON type makes every browser POST from another origin preflighted first.
    """
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "the body must be sent with "
                       f"Content-Type: application/json (got {media_type[:64] or 'none'!r})", "content-type")


def publisher_gateway(request: Request) -> Gateway:
    """The gateway, once the request showed the publish key (when one is set): 401 / 403 otherwise."""
    gw = _gateway(request)
    try:
        gw.publish_keys.check(request.headers.get("authorization"))
    except AuthError as exc:
        raise ApiError(exc.status, "unauthorized" if exc.status == 401 else "forbidden", exc.message) from None
    return gw


@router.post("/v1/conversations/{conv_id}/events")
async def publish(conv_id: str, request: Request) -> Response:
    gw = publisher_gateway(request)
    require_json(request)
    conv = _conv(conv_id)
    declared = request.headers.get("content-length")
    limit = gw.policies.resolve(conv).policy.max_data_bytes + JSON_OVERHEAD
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"body over {limit} bytes")
    body = await read_body(request, limit)
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(422, "invalid", json_error(body, exc), "body") from None
    if not isinstance(parsed, dict) or "type" not in parsed:
        raise ApiError(422, "invalid", 'body must be a JSON object with "type" (and "data", "id", "key", "op")',
                       "body")
    unknown = set(parsed) - _BODY_KEYS
    if unknown:
        raise ApiError(422, "invalid", f"unknown field(s) {sorted(unknown)}", "body")
    event_id, key, op = parsed.get("id"), parsed.get("key"), parsed.get("op")
    if event_id is not None and not isinstance(event_id, str):
        raise ApiError(422, "invalid", "id must be a string", "id")
    try:
        wanted = PublishRequest(conv, parsed["type"], parsed.get("data"), event_id, key, op)
        result = (await backend_call(gw.publisher.publish_many([wanted])))[0]
    except PayloadTooLarge as exc:
        raise ApiError(413, "too_large", exc.message, exc.field) from None
    except ValidationError as exc:
        raise ApiError(422, "invalid", exc.message, exc.field) from None
    return JSONResponse({"conv_id": result.conv_id, "seq": result.seq, "id": result.id, "epoch": result.epoch,
                         "duplicate": result.duplicate})


@router.get("/v1/conversations/{conv_id}/events")
async def history(conv_id: str, request: Request) -> Response:
    gw = _gateway(request)
    conv = _conv(conv_id)
    profile, types = _reader(request, gw, conv)
    since = _int_param(request, "since", 0, 0, 10**18)
    limit = _int_param(request, "limit", 100, 1, MAX_HISTORY_LIMIT)
    page = await backend_call(gw.backend.history(conv, since=since, limit=limit))
    events = json_array(raw for env in page.events if (raw := gw.hub.render(env, profile, types)) is not None)
    head = {"conv_id": conv, "epoch": page.epoch, "seq": page.seq, "truncated": page.truncated}
    return Response(embed(head, "events", events), media_type="application/json")


@router.get("/v1/conversations/{conv_id}/state")
async def state(conv_id: str, request: Request) -> Response:
    gw = _gateway(request)
    conv = _conv(conv_id)
    profile, types = _reader(request, gw, conv)
    snapshot = await backend_call(gw.backend.state(conv))
    entities = gw.hub.render_entities(snapshot.entities, profile, types)
    head = {"conv_id": conv, "epoch": snapshot.epoch, "seq": snapshot.seq}
    return Response(embed(head, "entities", entities), media_type="application/json")


@router.get("/v1/conversations/{conv_id}/presence")
async def presence(conv_id: str, request: Request) -> Response:
    gw = _gateway(request)
    conv = _conv(conv_id)
    _reader(request, gw, conv)
    found = await backend_call(gw.backend.presence(conv))
    body: dict[str, Any] = {"conv_id": conv, "connections": found.connections, "by_profile": found.by_profile}
    if gw.policies.resolve(conv).presence_users:  # docs/namespaces.md: at most users_limit (default 100, max 1000)
        limit = _int_param(request, "users_limit", 100, 1, 1000)
        users = await backend_call(gw.presence.read_users(conv, limit))  # at most one read per second
        body["users"] = [{"user": u.user, "connections": u.connections,
                          **({"info": u.info} if u.info is not None else {})} for u in users.users]
        body["users_total"] = users.total
        body["users_truncated"] = users.truncated
    return JSONResponse(body)


@router.get("/v1/conversations/{conv_id}/policy")
async def policy(conv_id: str, request: Request) -> Response:
    """The policy publishes to this conversation get, and the namespace that matched (docs/namespaces.md)."""
    gw = _gateway(request)
    conv = _conv(conv_id)
    _reader(request, gw, conv)
    found = await backend_call(gw.backend.policy(conv))
    return JSONResponse({"conv_id": conv, "namespace": found.namespace or None, "policy": found.policy.as_dict(),
                         "fingerprint": found.fingerprint, "conflict": found.conflict})


@router.get("/healthz")
async def healthz() -> Response:
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    ok, reason = await _gateway(request).ready()
    if ok:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_gateway(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
