"""The ``/sse`` endpoint: one conversation as a Server-Sent Events stream (issue #18).

``GET /sse?conv_id=C&profile=&since=&epoch=&hydrate=&types=&token=`` (the query of
``/ws``; the token may come as ``Authorization: Bearer`` too) answers
``text/event-stream``. Every JSON object ``/ws`` would send for that subscription is one
event, its bytes unchanged::

    id: <epoch>:<seq>
    event: <type>            (the event type, or ws.hello / ws.subscribed / ws.state / ws.reset)
    data: <the JSON object of /ws>

orjson never writes a raw newline, so ``data:`` is always one line. The frame is built
from the bytes the hub rendered once per (event, profile): the hub tells an
:class:`~broadcaster.hub.EventSubscriber` each event's type, seq and epoch, so nothing
is parsed again. Control objects (a few per stream) are parsed here for their epoch/seq.

Resume. ``id`` is where the stream stands, so that a browser's ``EventSource``, which
sends the last id it saw as ``Last-Event-ID`` when it reconnects, resumes exactly: the
header is read as ``since`` + ``epoch`` (it wins over the query's since/epoch/hydrate).
The ids of control objects are the position they establish:

* ``ws.subscribed``: ``epoch:since`` on a resume in the same epoch (the replay that
  follows carries the ids on), else ``epoch:seq`` (live after the head); no id when the
  resume's epoch differs (the ``ws.reset`` that follows sets it);
* ``ws.state``: ``epoch:seq`` of the snapshot; ``ws.reset``: its ``epoch:seq`` (``E:0``
  after an epoch change: a reconnect then replays the new epoch from its start);
* ``ws.hello``: no id. A profile that hides events leaves gaps; resuming from the last
  seq delivered is exact all the same (the replay is filtered the same way).

Refusals happen before the stream starts, as JSON with an HTTP status (there are no
close codes): 400 (4400), 401 (4401), 403 (4403, and a refused Origin), 404 (4404),
503 (too many connections). Ends of a started stream: a slow reader (queue over
``--max-queue-bytes``, 4408) has its connection reset and is counted; a drain (1012)
ends the stream, and a new stream on a draining gateway ends at once, so that
``EventSource`` reconnects (after ``retry:``) elsewhere; a backend failure at subscribe
(1013) ends the stream the same way. 4429 and 1009 have no counterpart: one
conversation per stream, no client messages.

Expiry. A stream is bound by its token like a websocket: one event-loop timer per
stream ends it at the token's ``exp`` (4401 on ``/ws``). SSE has no refresh: the
client opens a new stream with a new token (``since``/``epoch`` from the last id;
``EventSource``'s own reconnect would resend the expired token and get 401).

Transport: an :class:`SseStream` is a :class:`~gateway.connection.Connection` (same
bounded queue, pool, drain, presence and counters). Like a websocket it has two ways
to the socket, one order: while uvicorn's transport takes writes (not paused), what was
queued in one event-loop pass is written at once as one HTTP chunk, straight to the
transport (the pool's one flush callback per pass, as for websockets' direct send);
otherwise the endpoint's own coroutine writes it as ``http.response.body`` through ASGI
(which waits for the socket to drain). A second coroutine subscribes and then waits for
the client to go away. Two coroutines per stream, like a websocket. The direct write
needs uvicorn's httptools request cycle (``transport``, ``flow.write_paused``, ``disconnected``,
``response_complete``, ``chunked_encoding``), checked at start-up (``gateway.compat``, feature
``sse_direct_write``); without them (``--compat``), or under another server, every write takes
the ASGI path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import Any

import orjson
from starlette.datastructures import QueryParams
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http import httptools_impl

from broadcaster.codec import dumps
from broadcaster.errors import BackendUnavailable
from broadcaster.hub import server_time_ms
from gateway import compat
from gateway.auth import AuthError, Grant, bearer
from gateway.connection import CLOSE_TOO_SLOW, Connection, ConnectionPool
from gateway.metrics import TransportCollector, TransportSources
from gateway.protocol import (
    CLOSE_BAD_REQUEST,
    CLOSE_FORBIDDEN,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNKNOWN_PROFILE,
    MAX_EPOCH_LENGTH,
    ProtocolError,
    SubscribeRequest,
    parse_connect_query,
)
from gateway.state import Gateway

log = logging.getLogger("gateway.sse")

SSE_PATH = "/sse"
CLOSE_TRY_AGAIN_LATER = 1013
HTTP_STATUS = {CLOSE_BAD_REQUEST: 400, CLOSE_UNAUTHORIZED: 401, CLOSE_FORBIDDEN: 403, CLOSE_UNKNOWN_PROFILE: 404}
"""The HTTP status of a refused stream, by the close code ``/ws`` would use."""
ERROR_NAMES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "unknown_profile",
               503: "unavailable"}
END_WRITE_SECONDS = 2.0
"""How long the end of a stream may wait for a reader that stopped reading before its connection is reset."""
PING = b": ping\n\n"
MAX_LAST_EVENT_ID = MAX_EPOCH_LENGTH + 20


@dataclass(slots=True)
class SseStats:
    """Counters of the SSE streams (the pool's counters include them too)."""

    open: int = 0
    opened: int = 0
    slow_consumer_closes: int = 0
    objects_written: int = 0
    bytes_written: int = 0


def parse_last_event_id(value: str) -> tuple[str, int]:
    """``<epoch>:<seq>`` as (epoch, since); ProtocolError 4400 when it is not one of our ids."""
    epoch, sep, seq = value.strip().rpartition(":")
    if (not sep or not epoch or len(value) > MAX_LAST_EVENT_ID or not epoch.isascii() or not epoch.isalnum()
            or not (seq.isascii() and seq.isdigit()) or len(seq) > 18):
        raise ProtocolError(CLOSE_BAD_REQUEST, "Last-Event-ID must be <epoch>:<seq> as sent in an id: line")
    return epoch, int(seq)


def stream_request(query: QueryParams, last_event_id: str | None) -> tuple[SubscribeRequest, str, str | None]:
    """(subscription, profile, token) of an ``/sse`` request; ProtocolError (close codes) when refused."""
    request = parse_connect_query(query)
    if request.subscribe is None:
        raise ProtocolError(CLOSE_BAD_REQUEST, "conv_id is required: one conversation per stream")
    subscribe = request.subscribe
    if last_event_id:
        epoch, since = parse_last_event_id(last_event_id)
        subscribe = dataclasses.replace(subscribe, since=since, epoch=epoch, hydrate=False)
    return subscribe, request.profile, request.token


class SseStream(Connection):
    """One ``/sse`` stream's outgoing side: SSE frames in the connection's bounded queue."""

    __slots__ = ("_abort", "_aborted", "_task", "ping_interval", "request", "sse_stats")

    def __init__(self, send: Send, connection_id: str, profile: str, pool: ConnectionPool, max_queue_bytes: int,
                 observe_wait: Callable[[float], None] | None, *, request: SubscribeRequest, ping_interval: float,
                 stats: SseStats, abort: Callable[[], None] | None) -> None:
        super().__init__(send, connection_id, profile, pool, max_queue_bytes, observe_wait)
        self._direct = direct_chunk_writer(send)
        self._wake = asyncio.Event()
        self.request = request
        self.ping_interval = ping_interval
        self.sse_stats = stats
        self._abort = abort
        self._aborted = False
        self._task: asyncio.Task[Any] | None = None

    # ---- what the hub and the endpoint queue ---------------------------------------------

    def send_event(self, data: bytes, kind: str, seq: int, epoch: str) -> None:
        """An event object: ``id: epoch:seq``, ``event: type``, ``data: object`` (no JSON parsed)."""
        Connection.send(self, b"id: %b:%d\nevent: %b\ndata: %b\n\n" % (epoch.encode(), seq, kind.encode(), data))

    def send(self, data: bytes) -> None:
        """A control object (``ws.*``): its id is the position it establishes (module docstring)."""
        obj = orjson.loads(data)
        kind = obj.get("type", "message")
        position: tuple[str, int] | None = None
        if kind == "ws.subscribed":
            request, epoch = self.request, obj["epoch"]
            if request.hydrate:
                position = (epoch, obj["seq"])
            elif request.epoch is not None and request.epoch != epoch:
                position = None  # the ws.reset that follows sets it
            elif request.since is not None:
                position = (epoch, request.since)
            else:
                position = (epoch, obj["seq"])
        elif kind in ("ws.state", "ws.reset"):
            position = (obj["epoch"], obj["seq"])
        if position is None:
            frame = b"event: %b\ndata: %b\n\n" % (kind.encode(), data)
        else:
            frame = b"id: %b:%d\nevent: %b\ndata: %b\n\n" % (position[0].encode(), position[1], kind.encode(), data)
        Connection.send(self, frame)

    def send_raw(self, frame: bytes) -> None:
        """Queue SSE bytes as they are (``retry:`` line, comments)."""
        Connection.send(self, frame)

    # ---- ending ------------------------------------------------------------------------

    def close(self, code: int, reason: str = "") -> None:
        """End the stream. A slow reader (4408) is counted, and its connection reset if a write waits on it;
        any other end (drain, backend failure) gives a waiting write :data:`END_WRITE_SECONDS` first."""
        if self._close is not None:
            return
        if code == CLOSE_TOO_SLOW:
            self.sse_stats.slow_consumer_closes += 1
        super().close(code, reason)
        if not self._sending:
            return
        if code == CLOSE_TOO_SLOW:  # the writer waits for a reader that does not read: do not wait with it
            self.abort()
        else:
            asyncio.get_running_loop().call_later(END_WRITE_SECONDS, self._abort_if_stuck)

    def _abort_if_stuck(self) -> None:
        if self._sending and not self._gone:
            self.abort()

    def abort(self) -> None:
        """Reset the connection now (the server's transport), else stop the writing coroutine."""
        if self._abort is not None:
            self._abort()
        elif self._task is not None and not self._aborted:
            self._aborted = True
            self._task.cancel()

    def flush(self) -> None:
        """Write what is queued as one HTTP chunk straight to the transport, or leave it to the writer."""
        if self._close is not None or self._gone or not self._queue:
            return
        direct = self._direct
        if direct is None or self._sending or not direct(b"".join(self._queue)):
            self.wake_writer()
            return
        batch, size = self._queue, self._queued
        self._queue, self._queued = [], 0
        stats, sse_stats = self.pool.stats, self.sse_stats
        stats.queued_bytes -= size
        if self.observe_wait is not None:
            self.observe_wait(time.monotonic() - self._waiting_since)
        stats.frames_written += 1
        stats.objects_written += len(batch)
        stats.bytes_written += size
        sse_stats.objects_written += len(batch)
        sse_stats.bytes_written += size

    def wake_writer(self) -> None:
        """The endpoint's coroutine is the writer: only wake it (no task is ever created here)."""
        if self._wake is not None:
            self._wake.set()

    # ---- the writer: the endpoint's coroutine -------------------------------------------

    async def run_writer(self) -> None:
        """Write queued frames as response body chunks until closed; then end the response."""
        stats, sse_stats, wake, send = self.pool.stats, self.sse_stats, self._wake, self._send
        assert wake is not None
        interval = self.ping_interval if self.ping_interval > 0 else None
        while True:
            if not wake.is_set():
                try:
                    async with asyncio.timeout(interval):
                        await wake.wait()
                except TimeoutError:
                    if self._close is None and not self._queue and not self._gone:
                        await self._write(PING)
                    continue
            wake.clear()
            if self._close is not None or self._gone:
                break
            if not self._queue:
                continue
            batch, size = self._queue, self._queued
            self._queue, self._queued = [], 0
            stats.queued_bytes -= size
            if self.observe_wait is not None:
                self.observe_wait(time.monotonic() - self._waiting_since)
            body = b"".join(batch) if len(batch) > 1 else batch[0]
            await self._write(body)
            stats.frames_written += 1
            stats.objects_written += len(batch)
            stats.bytes_written += len(body)
            sse_stats.objects_written += len(batch)
            sse_stats.bytes_written += len(body)
        try:
            async with asyncio.timeout(END_WRITE_SECONDS):
                self._sending = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            self.abort()
        finally:
            self._sending = False

    async def _write(self, body: bytes) -> None:
        self._sending = True
        try:
            await self._send({"type": "http.response.body", "body": body, "more_body": True})
        finally:
            self._sending = False


class SseTransport:
    """The SSE side of one gateway: its counters and their metrics (``transport`` label)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.stats = SseStats()
        pool, stats = gateway.pool, self.stats
        gateway.metrics.registry.register(TransportCollector(TransportSources(
            pool=pool.stats, connections=pool.__len__,
            sse_connections=lambda: stats.open, sse_opened=lambda: stats.opened,
            sse_slow_consumer_closes=lambda: stats.slow_consumer_closes,
            sse_objects_written=lambda: stats.objects_written, sse_bytes_written=lambda: stats.bytes_written)))


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {name: value for name, value in scope.get("headers", [])}


def _origin(gw: Gateway, headers: dict[bytes, bytes]) -> tuple[bool, bytes | None]:
    """(allowed, the Access-Control-Allow-Origin value to send or None)."""
    raw = headers.get(b"origin")
    allowed = gw.settings.allowed_origins
    if raw is None or not allowed:
        return True, None
    origin = raw.decode("latin-1")
    if origin in allowed or "*" in allowed:
        return True, raw
    return False, None


def _request_cycle(send: Send) -> httptools_impl.RequestResponseCycle | None:
    """uvicorn's httptools request cycle whose ``send`` this is, if the start-up check found what the direct
    write and the abort read on it (``gateway.compat``, feature ``sse_direct_write``); else None: ``--compat``
    runs without them, or another server (uvicorn's h11 implementation frames chunks itself) serves the app."""
    if not compat.passed(compat.SSE_DIRECT_WRITE) or not isinstance(send, MethodType):
        return None
    cycle = send.__self__
    return cycle if isinstance(cycle, httptools_impl.RequestResponseCycle) else None


def direct_chunk_writer(send: Send) -> Callable[[bytes], bool] | None:
    """A synchronous writer of one HTTP/1.1 chunk behind uvicorn's ``send`` (module docstring), or None.

    It writes and returns True when the transport takes writes now; False (nothing written) when
    it is paused, closing, or the response is over: the ASGI path then writes, in order.
    """
    cycle = _request_cycle(send)
    if cycle is None or cycle.chunked_encoding is not True:  # not chunked: a HEAD, or a length was set
        return None
    transport, flow = cycle.transport, cycle.flow

    def write(body: bytes) -> bool:
        if flow.write_paused or cycle.disconnected or cycle.response_complete or transport.is_closing():
            return False
        transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        return True

    return write


def _transport_abort(send: Send) -> Callable[[], None] | None:
    """The server connection's ``abort`` behind uvicorn's ``send`` (its request cycle's transport), or None."""
    cycle = _request_cycle(send)
    return None if cycle is None else cycle.transport.abort


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str,
                  cors: bytes | None = None) -> None:
    headers = {"access-control-allow-origin": cors.decode("latin-1"), "vary": "Origin"} if cors else None
    response = JSONResponse({"error": ERROR_NAMES.get(status, "error"), "message": message}, status_code=status,
                            headers=headers)
    await response(scope, receive, send)


async def sse_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """Serve one ``GET /sse`` from the checks to the end of the stream (module docstring)."""
    app: Any = scope["app"]
    gw: Gateway = app.state.gateway
    transport: SseTransport = app.state.sse
    headers = _headers(scope)
    allowed, cors = _origin(gw, headers)
    if not allowed:
        await _refuse(scope, receive, send, 403, "origin not allowed")
        return
    if len(gw.pool) >= gw.settings.max_connections:
        await _refuse(scope, receive, send, 503, "too many connections", cors)
        return
    last_event_id = headers.get(b"last-event-id", b"").decode("latin-1") or None
    try:
        request, profile_name, token = stream_request(QueryParams(scope.get("query_string", b"")), last_event_id)
        grant = gw.auth.verify(token or bearer(headers.get(b"authorization", b"").decode("latin-1") or None))
        profile = gw.profiles.get(profile_name)
        if profile is None:
            raise ProtocolError(CLOSE_UNKNOWN_PROFILE, f"unknown profile {profile_name!r}")
        grant.check_profile(profile.name)
        grant.check_conv(request.conv_id)
    except ProtocolError as exc:
        await _refuse(scope, receive, send, HTTP_STATUS.get(int(exc.code), 400), exc.message, cors)
        return
    except AuthError as exc:
        await _refuse(scope, receive, send, exc.status, exc.message, cors)
        return

    response_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache, no-transform"), (b"x-accel-buffering", b"no")]
    if cors is not None:
        response_headers += [(b"access-control-allow-origin", cors), (b"vary", b"Origin")]
    await send({"type": "http.response.start", "status": 200, "headers": response_headers})
    retry = b"retry: %d\n\n" % gw.settings.sse_retry_ms
    if gw.pool.draining:  # reconnect elsewhere: the stream ends at once, EventSource comes back after retry:
        await send({"type": "http.response.body", "body": retry, "more_body": False})
        return

    stream = SseStream(send, secrets.token_hex(8), profile.name, gw.pool, gw.settings.max_queue_bytes,
                       gw.metrics.queue_wait.observe, request=request, ping_interval=gw.settings.sse_ping_interval,
                       stats=transport.stats, abort=_transport_abort(send))
    stream._task = asyncio.current_task()
    stream.user, stream.info = grant.subject, grant.info
    stream.send_raw(retry)
    gw.pool.add(stream)
    expiry = _arm_expiry(gw, stream, grant)
    stats = transport.stats
    stats.open += 1
    stats.opened += 1
    stream.send(dumps({"type": "ws.hello", "connection_id": stream.connection_id, "gateway_id": gw.gateway_id,
                       "profile": profile.name, "server_time": server_time_ms()}))
    watcher = asyncio.create_task(_subscribe_and_watch(gw, stream, request, profile, receive))
    try:
        await stream.run_writer()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not stream._aborted or task is None:
            raise
        task.uncancel()  # our own abort (no transport to reset): the server closes the connection
    finally:
        if expiry is not None:
            expiry.cancel()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await gw.hub.unsubscribe_all(stream, stream.convs)
        stream.convs.clear()
        stats.open -= 1
        await gw.pool.remove(stream)


def _arm_expiry(gw: Gateway, stream: SseStream, grant: Grant) -> asyncio.TimerHandle | None:
    """The timer that ends ``stream`` at its token's ``exp`` (None with auth off)."""
    if grant.expires is None:
        return None
    return asyncio.get_running_loop().call_later(max(0.0, grant.expires - time.time()), _expire, gw, stream)


def _expire(gw: Gateway, stream: SseStream) -> None:
    """End ``stream``: its token expired (counted in ``broadcaster_token_expiry_closes_total``)."""
    gw.metrics.token_expiry_closes.inc("sse")
    stream.close(CLOSE_UNAUTHORIZED, "token expired")


async def _subscribe_and_watch(gw: Gateway, stream: SseStream, request: SubscribeRequest, profile: Any,
                               receive: Receive) -> None:
    """Subscribe the stream, then wait for the client to go away (the writer then ends)."""
    try:
        await gw.hub.subscribe(stream, request.conv_id, profile, types=request.types, since=request.since,
                               epoch=request.epoch, hydrate=request.hydrate)
        stream.convs.add(request.conv_id)
    except BackendUnavailable as exc:
        log.warning("sse subscribe %s failed: %s", request.conv_id, exc)
        stream.close(CLOSE_TRY_AGAIN_LATER, "backend unavailable")
        return
    except Exception:
        log.exception("sse subscribe %s failed", request.conv_id)
        stream.close(CLOSE_TRY_AGAIN_LATER, "subscribe failed")
        return
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
    stream._gone = True
    stream.wake_writer()
