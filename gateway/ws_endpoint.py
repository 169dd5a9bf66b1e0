"""The ``/ws`` endpoint: handshake checks, the hello, and the client message loop (CONTRACT §3).

Custom close codes need the socket accepted first (a close before accept becomes
an HTTP 403 in uvicorn), so refusals accept and then close with their code.

The token binds the connection for its whole life (docs/protocol.md, "Tokens on an
open connection"): one event-loop timer per connection (no task) closes it 4401 at
the token's ``exp``; ``ws.refresh`` replaces the token (same ``sub``), re-arms the
timer and ends the subscriptions the new scope no longer allows. Errors about one
subscription are ``ws.error`` objects naming its ``conv_id``; the socket stays.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from urllib.parse import parse_qsl

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from broadcaster.codec import dumps
from broadcaster.errors import BackendUnavailable
from broadcaster.hub import server_time_ms
from broadcaster.profiles import Profile
from gateway.admission import AdmissionSlot
from gateway.auth import AuthError, Grant, bearer
from gateway.connection import Connection
from gateway.protocol import (
    CLOSE_DRAINING,
    CLOSE_FORBIDDEN,
    CLOSE_TOO_MANY,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNKNOWN_PROFILE,
    Ping,
    ProtocolError,
    Refresh,
    SubscribeRequest,
    Unsubscribe,
    parse_client_message,
    parse_connect_query,
)
from gateway.state import Gateway

log = logging.getLogger("gateway.ws")
CLOSE_TRY_AGAIN_LATER = 1013


class _DenialIsNoError(logging.Filter):
    """uvicorn's websockets (sansio) protocol logs "ASGI callable returned without completing handshake."
    at ERROR after every denial response it sent (``send_denial_response``: a 503 or 403 before the
    upgrade); this endpoint always accepts or denies, so here that line only says a refusal went out.
    Dropped: a reconnect storm refused in turns would log thousands of them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "ASGI callable returned without completing handshake."


logging.getLogger("uvicorn.error").addFilter(_DenialIsNoError())


class RateLimiter:
    """Token bucket: ``rate`` messages per second sustained, ``burst`` at once."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens, self._last = burst, time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


MAX_ERROR_MESSAGE = 200
"""ws.error messages are cut to this length: a hostile message is not echoed back at full size."""


def _error(code: str, message: str, conv_id: str | None = None) -> bytes:
    """A ``ws.error``; ``conv_id`` names the subscription it is about, when there is one."""
    error = {"type": "ws.error", "code": code, "message": message[:MAX_ERROR_MESSAGE]}
    if conv_id is not None:
        error["conv_id"] = conv_id
    return dumps(error)


def _close_code(exc: AuthError) -> int:
    """4403 for a valid token that is not allowed (a refused subject), 4401 for a missing or bad one."""
    return CLOSE_FORBIDDEN if exc.status == 403 else CLOSE_UNAUTHORIZED


async def _refuse(websocket: WebSocket, code: int, reason: str) -> None:
    await websocket.accept()
    await websocket.close(code, reason[:120])


class Session:
    """One accepted connection's protocol state: its grant, profile, subscriptions and expiry timer."""

    __slots__ = ("_expiry", "conn", "gateway", "grant", "profile")

    def __init__(self, gateway: Gateway, conn: Connection, grant: Grant, profile: Profile) -> None:
        self.gateway, self.conn, self.grant, self.profile = gateway, conn, grant, profile
        self._expiry: asyncio.TimerHandle | None = None

    # ---- the token's life ------------------------------------------------------------------

    def arm_expiry(self) -> None:
        """(Re)arm the one timer that closes the connection 4401 at the grant's ``exp`` (none with auth off)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        expires = self.grant.expires
        if expires is not None:
            self._expiry = asyncio.get_running_loop().call_later(max(0.0, expires - time.time()), self._expired)

    def _expired(self) -> None:
        self._expiry = None
        self.close_expired()

    def close_expired(self) -> None:
        """Close the socket 4401 ``token expired`` (counted in ``broadcaster_token_expiry_closes_total``)."""
        self.gateway.metrics.token_expiry_closes.inc("ws")
        self.conn.close(CLOSE_UNAUTHORIZED, "token expired")

    def expired(self) -> bool:
        """True once the grant's ``exp`` has passed (the timer may not have fired yet)."""
        return self.grant.expires is not None and time.time() >= self.grant.expires

    async def refresh(self, token: str) -> None:
        """Replace the grant with ``token``'s (same ``sub``); a refused token leaves the old one in force."""
        conn, gw = self.conn, self.gateway
        refreshes = gw.metrics.refreshes
        if not gw.auth.enabled:
            self._refuse_refresh("auth is off on this gateway: there is no token to refresh")
            return
        if self.expired():  # too late: the connection ended with its token (the timer may lag)
            refreshes.inc("expired")
            self.close_expired()
            return
        try:
            grant = gw.auth.verify(token)
        except AuthError as exc:
            self._refuse_refresh(f"refresh refused ({exc.status}): {exc.message}; the current token stays in "
                                 "force until its exp")
            return
        if grant.subject != self.grant.subject:
            self._refuse_refresh("refresh refused: the token is for another sub; the current token stays in "
                                 "force until its exp")
            return
        self.grant = grant
        conn.info = grant.info
        self.arm_expiry()
        try:
            grant.check_profile(self.profile.name)
        except AuthError as exc:
            refreshes.inc("forbidden")
            conn.close(CLOSE_FORBIDDEN, exc.message)
            return
        narrowed = False
        for conv_id in sorted(conn.convs):
            try:
                grant.check_conv(conv_id)
            except AuthError:
                narrowed = True
                await gw.hub.unsubscribe(conn, conv_id)
                conn.convs.discard(conv_id)
                conn.send(dumps({"type": "ws.unsubscribed", "conv_id": conv_id, "reason": "forbidden"}))
        assert grant.expires is not None  # verify requires exp
        refreshes.inc("narrowed" if narrowed else "ok")
        conn.send(dumps({"type": "ws.refreshed", "exp": int(grant.expires)}))

    def _refuse_refresh(self, message: str) -> None:
        """``ws.error bad_refresh``: the current token stays (counted as outcome ``bad_refresh``)."""
        self.gateway.metrics.refreshes.inc("bad_refresh")
        self.conn.send(_error("bad_refresh", message))

    # ---- subscriptions ---------------------------------------------------------------------

    async def subscribe(self, request: SubscribeRequest, *, initial: bool = False) -> None:
        conn, gw = self.conn, self.gateway
        if self.expired():
            self.close_expired()
            return
        try:
            self.grant.check_conv(request.conv_id)
        except AuthError as exc:
            conn.send(_error("forbidden", exc.message, request.conv_id))
            return
        if request.conv_id not in conn.convs and len(conn.convs) >= gw.settings.max_subscriptions:
            conn.send(_error("too_many_subscriptions", f"at most {gw.settings.max_subscriptions} subscriptions "
                                                       "per connection; unsubscribe one first", request.conv_id))
            return
        try:
            delta = request.delta and gw.policies.resolve(request.conv_id).delta  # allowed per namespace
            await gw.hub.subscribe(conn, request.conv_id, self.profile, types=request.types,
                                   since=request.since, epoch=request.epoch, hydrate=request.hydrate, delta=delta)
        except BackendUnavailable as exc:
            log.warning("subscribe %s failed: %s", request.conv_id, exc)
            self._subscribe_failed(request.conv_id, initial)
            return
        except Exception:
            log.exception("subscribe %s failed", request.conv_id)
            self._subscribe_failed(request.conv_id, initial)
            return
        conn.convs.add(request.conv_id)

    def _subscribe_failed(self, conv_id: str, initial: bool) -> None:
        """Tell the client; a failed re-subscribe ended the previous subscription too (the hub replaced it)."""
        self.conn.convs.discard(conv_id)
        if initial:
            self.conn.close(CLOSE_TRY_AGAIN_LATER, "backend unavailable")
        else:
            self.conn.send(_error("unavailable", f"cannot subscribe to {conv_id} right now", conv_id))

    async def unsubscribe(self, conv_id: str) -> None:
        await self.gateway.hub.unsubscribe(self.conn, conv_id)
        self.conn.convs.discard(conv_id)
        self.conn.send(dumps({"type": "ws.unsubscribed", "conv_id": conv_id}))

    async def handle(self, text: str | bytes) -> None:
        try:
            message = parse_client_message(text)
        except ProtocolError as exc:
            self.conn.send(_error(str(exc.code), exc.message, exc.conv_id))
            return
        if isinstance(message, Ping):
            self.conn.send(dumps({"type": "ws.pong", "server_time": server_time_ms()}))
        elif isinstance(message, SubscribeRequest):
            await self.subscribe(message)
        elif isinstance(message, Unsubscribe):
            await self.unsubscribe(message.conv_id)
        elif isinstance(message, Refresh):
            await self.refresh(message.token)

    async def end(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        await self.gateway.hub.unsubscribe_all(self.conn, self.conn.convs)
        self.conn.convs.clear()


def _origin_allowed(gw: Gateway, websocket: WebSocket) -> bool:
    allowed = gw.settings.allowed_origins
    if not allowed:  # the usual case: no header lookup
        return True
    origin = websocket.headers.get("origin")
    return origin is None or origin in allowed or "*" in allowed


def _connect_query(websocket: WebSocket) -> dict[str, str]:
    """The ``/ws`` query as Starlette's ``QueryParams`` reads it (latin-1, blanks kept, the last of a
    repeated name wins), parsed from the scope: ``websocket.query_params`` would keep that copy for the
    socket's life, and a plain dict costs less to build than its multi-dict."""
    return dict(parse_qsl(websocket.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))


async def websocket_endpoint(websocket: WebSocket) -> None:
    """Serve one websocket from handshake to disconnect.

    The handshake (checks, accept, the initial ``subscribe`` with its history replay) holds
    an admission slot (gateway.admission); with ``--max-pending-handshakes`` in progress a new
    one gets HTTP 503 with ``Retry-After: 1`` before the upgrade.
    """
    gw: Gateway = websocket.app.state.gateway
    if gw.pool.draining:
        await _refuse(websocket, CLOSE_DRAINING, "gateway draining; reconnect elsewhere")
        return
    if len(gw.pool) >= gw.settings.max_connections:
        await websocket.send_denial_response(JSONResponse({"error": "too many connections"}, status_code=503))
        return
    slot = gw.admission.enter()
    if slot is None:
        await websocket.send_denial_response(JSONResponse(
            {"error": "too many handshakes in progress; retry"}, status_code=503, headers={"Retry-After": "1"}))
        return
    try:
        await _serve(websocket, gw, slot)
    finally:
        slot.release()


async def _serve(websocket: WebSocket, gw: Gateway, slot: AdmissionSlot) -> None:
    """The handshake's checks, then the connection's life; ``slot`` is released once the initial subscribe ended."""
    if not _origin_allowed(gw, websocket):
        await websocket.send_denial_response(JSONResponse({"error": "origin not allowed"}, status_code=403))
        return
    try:
        request = parse_connect_query(_connect_query(websocket))
    except ProtocolError as exc:
        await _refuse(websocket, int(exc.code), exc.message)
        return
    try:
        grant = gw.auth.verify(request.token or bearer(websocket.headers.get("authorization")))
    except AuthError as exc:
        await _refuse(websocket, _close_code(exc), exc.message)
        return
    profile = gw.profiles.get(request.profile)
    if profile is None:
        await _refuse(websocket, CLOSE_UNKNOWN_PROFILE, f"unknown profile {request.profile!r}")
        return
    try:
        grant.check_profile(profile.name)
        if request.subscribe is not None:
            grant.check_conv(request.subscribe.conv_id)
    except AuthError as exc:
        await _refuse(websocket, CLOSE_FORBIDDEN, exc.message)
        return

    await websocket.accept()
    conn = Connection(websocket.send, secrets.token_hex(8), profile.name, gw.pool, gw.settings.max_queue_bytes,
                      gw.metrics.queue_wait.observe)
    conn.user, conn.info = grant.subject, grant.info
    gw.pool.add(conn)
    session = Session(gw, conn, grant, profile)
    session.arm_expiry()
    conn.send(dumps({"type": "ws.hello", "connection_id": conn.connection_id, "gateway_id": gw.gateway_id,
                     "profile": profile.name, "server_time": server_time_ms()}))
    limiter = RateLimiter(gw.settings.client_messages_per_second, 4 * gw.settings.client_messages_per_second)
    try:
        if request.subscribe is not None:
            await session.subscribe(request.subscribe, initial=True)
        slot.release()
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            if conn.closing:
                continue
            if not limiter.allow():
                conn.close(CLOSE_TOO_MANY, "too many messages")
                continue
            text = message.get("text")
            if text is None:
                text = message.get("bytes") or b""
            await session.handle(text)
    except (WebSocketDisconnect, OSError, RuntimeError) as exc:  # the peer went away mid-send or mid-receive
        log.debug("connection %s ended: %s", conn.connection_id, exc)
    except Exception:  # a bug: log it, and never let one connection take the gateway down
        log.exception("connection %s failed", conn.connection_id)
    finally:
        await session.end()
        await gw.pool.remove(conn)

