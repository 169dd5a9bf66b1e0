"""Start-up check of the uvicorn, websockets and Starlette internals the gateway uses.

Nine features reach below the public APIs (the mechanics are in
:mod:`broadcaster.compat`; the redis-py ones are there too):

``request_deadline`` (gateway.handshake)
    uvicorn's httptools protocol hooks and fields: the per-request deadline and the
    request-head cap. Fallback: uvicorn's plain httptools protocol (no deadline, no cap).
``handshake_deadline`` (gateway.handshake, gateway.server)
    the sans-I/O websocket protocol's handshake state and websockets' refusal: the
    deadline from the upgrade to the app's accept, and the 414 / 431 answer to an
    upgrade websockets refused. Fallback: no deadline once upgraded, no such answer.
``direct_send`` (gateway.server, gateway.connection)
    the synchronous text send. Fallback: every frame through the ASGI ``send`` and a
    writer task per connection (the slow path, see BENCHMARKS.md).
``shared_frames`` (gateway.server, gateway.connection)
    one frame built per payload and written as it is to every uncompressed socket
    it goes to: websockets' server frames must be the unmasked RFC 6455 text frames
    :func:`gateway.connection.text_frame` builds (the pause it watches is asyncio's own
    ``pause_writing`` / ``resume_writing`` contract). Needs ``direct_send``.
    Fallback: each socket's payload is framed on its own (direct send).
``shared_deflate`` (gateway.server, gateway.deflate, gateway.connection)
    ``--ws-compression shared``: the permessage-deflate factory uvicorn builds in its
    protocol's ``__init__`` (``conn.available_extensions``) replaced by one without context
    takeover; websockets' PerMessageDeflate (``local_no_context_takeover``,
    ``local_max_window_bits``, ``compress_settings``) then keeps no zlib state between
    messages and compresses each message as :func:`gateway.deflate.deflate_frame` does, so
    one compressed frame serves every such socket. Fallback: uvicorn's factory, with
    context takeover (``--ws-compression deflate``: ~36 KiB of zlib state per socket, each
    socket compresses every event itself).
``light_waits`` (gateway.server, gateway.inbox)
    the per-socket ``queue`` (an ``asyncio.Queue``) and ``writable`` (an ``asyncio.Event``)
    of uvicorn's sans-I/O protocol, replaced by lighter objects with the methods the
    protocol's source calls on them (checked: no other). Fallback: uvicorn's own (~4 KB
    more per socket).
``shared_ping_timer`` (gateway.server, gateway.keepalive)
    the protocol's keepalive: ``schedule_ping`` arms ``ping_timer`` for
    ``send_keepalive_ping`` after ``ping_interval - last_ping_rtt``, and nothing but
    ``cancel`` is called on ``ping_timer``. Fallback: a TimerHandle per socket (~0.5 KB).
``handshake_release`` (gateway.server)
    dropping the handshake request and response once accepted (and the extension
    factories websockets' accept read). Fallback: they stay
    referenced for the life of the socket (a few KB per idle socket).
``sse_direct_write`` (gateway.sse)
    the synchronous HTTP chunk write of an SSE stream straight to the transport of
    uvicorn's httptools request cycle, and the reset of a slow reader's connection
    (the transport's ``abort``). Fallback: every chunk through the ASGI ``send``; a
    slow reader's stream ends by cancelling its writer (the connection is closed,
    not reset).

Instance fields are probed on real instances: a protocol built from a loaded
uvicorn config, given a stand-in transport and, for the websocket protocol, a real
upgrade request, for the SSE write a real ``GET`` whose request cycle answers it
(no socket, no event loop run). :func:`check` runs every probe,
refuses to start (:class:`CompatError`) when something is missing unless
``--compat`` allows the fallbacks, and returns the report the gateway builds its
protocol classes from (code that builds no protocol class, gateway.sse, asks
:func:`passed`); :class:`CompatCollector` exports it as
``broadcaster_compat_fallback{feature=...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import Callable, Iterator
from types import MethodType
from typing import Any, cast

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broadcaster.compat import REDIS_FEATURES, CompatError, CompatReport, Feature, enforce, lacking, run
from broadcaster.compat import TESTED as REDIS_TESTED

__all__ = ["FEATURES", "SSE_DIRECT_WRITE", "TESTED", "CompatCollector", "CompatError", "CompatReport", "check",
           "passed", "probe"]

SSE_DIRECT_WRITE = "sse_direct_write"
"""The feature gateway.sse asks :func:`passed` about."""

TESTED: dict[str, tuple[str, str]] = {
    "uvicorn": ("0.52.1", "0.54.0"),
    "websockets": ("17.0", "17.4"),
    "starlette": ("0.37.2", "1.10.0"),
    **REDIS_TESTED,
}
"""Distribution -> (lowest, newest) release the test suite passed with (see pyproject.toml)."""

_UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: compat.invalid\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


class _Transport(asyncio.Transport):
    """A transport with no socket: the probes' protocols write into a list."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.protocol: Any = None
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Task:
    def add_done_callback(self, callback: Callable[[Any], object]) -> None:
        pass

    def cancel(self) -> bool:
        return True


class _Loop:
    """Enough of an event loop for a protocol's constructor and handshake; runs nothing."""

    def create_task(self, coro: Any) -> _Task:
        coro.close()
        return _Task()

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> _Task:
        return _Task()

    def time(self) -> float:
        return 0.0


async def _app(scope: Any, receive: Any, send: Any) -> None:
    pass


async def _receive() -> dict[str, Any]:
    return {"type": "websocket.disconnect", "code": 1000}


async def _send(message: Any) -> None:
    pass


def _protocols() -> tuple[Any, Any, _Transport]:
    """An httptools protocol and a sans-I/O websocket protocol, connected to stand-in transports; the
    websocket one has parsed a real upgrade request (its handshake is initiated, not complete)."""
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from uvicorn.server import ServerState

    config = uvicorn.Config(_app, http="httptools", ws="websockets-sansio", lifespan="off", log_config=None)
    config.load()
    loop: Any = _Loop()
    http = HttpToolsProtocol(config, ServerState(), {}, _loop=loop)
    http.connection_made(_Transport())
    ws = WebSocketsSansIOProtocol(config, ServerState(), {}, _loop=loop)
    transport = _Transport()
    ws.connection_made(transport)
    ws.data_received(_UPGRADE)
    return http, ws, transport


def _transport_classes() -> list[tuple[Any, str]]:
    classes: list[tuple[Any, str]] = [(asyncio.Transport, "asyncio.Transport")]
    try:
        import uvloop.loop
    except ImportError:
        return classes
    module: Any = uvloop.loop
    if hasattr(module, "TCPTransport"):
        classes.append((module.TCPTransport, "uvloop.loop.TCPTransport"))
    return classes


def _probe_request_deadline() -> list[str]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    missing = lacking(HttpToolsProtocol, "uvicorn HttpToolsProtocol", "connection_made", "connection_lost",
                      "data_received", "send_400_response", "on_url", "on_header", "on_message_begin",
                      "on_headers_complete", "on_message_complete", "handle_websocket_upgrade", "_should_upgrade")
    http, _, _ = _protocols()
    missing += lacking(http, "uvicorn HttpToolsProtocol", "loop", "transport", "client", "parser")
    if hasattr(http, "parser"):
        missing += lacking(http.parser, "httptools.HttpRequestParser", "should_upgrade")
    for cls, label in _transport_classes():
        missing += lacking(cls, label, "write", "close", "is_closing", "get_protocol")
    if importlib.util.find_spec("uvloop") is not None and len(_transport_classes()) < 2:
        missing.append("uvloop.loop.TCPTransport")
    return missing


def _probe_handshake_deadline() -> list[str]:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    missing = lacking(WebSocketsSansIOProtocol, "uvicorn WebSocketsSansIOProtocol", "start_keepalive",
                      "connection_lost")
    _, ws, _ = _protocols()
    missing += lacking(ws, "uvicorn WebSocketsSansIOProtocol", "conn", "handshake_initiated", "handshake_complete",
                       "transport", "client")
    if hasattr(ws, "conn"):
        missing += lacking(ws.conn, "websockets ServerProtocol", "handshake_exc", "data_to_send")
    return missing


def _probe_direct_send() -> list[str]:
    from starlette.websockets import WebSocket
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from websockets.protocol import State

    missing = lacking(WebSocketsSansIOProtocol, "uvicorn WebSocketsSansIOProtocol", "handle_connect")
    _, ws, _ = _protocols()
    missing += lacking(ws, "uvicorn WebSocketsSansIOProtocol", "scope", "close_sent", "disconnected",
                       "handshake_complete", "initial_response", "writable", "conn", "transport")
    if isinstance(getattr(ws, "scope", None), dict) and not isinstance(ws.scope.get("extensions"), dict):
        missing.append('uvicorn WebSocketsSansIOProtocol.scope["extensions"]')
    if hasattr(ws, "writable"):
        missing += lacking(ws.writable, "uvicorn WebSocketsSansIOProtocol.writable", "is_set")
    if hasattr(ws, "conn"):
        missing += lacking(ws.conn, "websockets ServerProtocol", "extensions", "writes", "state",
                           "expect_continuation_frame", "send_text", "data_to_send")
    missing += lacking(State, "websockets.protocol.State", "OPEN")
    scope = {"type": "websocket", "extensions": {}}
    socket = WebSocket(scope, _receive, _send)
    if getattr(socket.send, "__self__", None) is not socket:
        missing.append("starlette WebSocket.send (a bound method)")
    elif getattr(socket, "scope", None) is not scope:
        missing.append("starlette WebSocket.scope")
    return missing


_FRAME_SIZES = (0, 1, 125, 126, 65535, 65536)
"""Payload sizes at each edge of the frame header's three length forms."""


_PROBE_LOG = logging.getLogger("gateway.compat.probes")
_PROBE_LOG.disabled = True  # the probes' websockets connections are no connections: no "connection open" lines


def _accepted(upgrade: bytes, extensions: Any = None) -> tuple[Any, Any] | None:
    """A websockets ServerProtocol (offering ``extensions``) that received ``upgrade`` and sent its
    accept, and that response; None when it did not parse the request."""
    from websockets.http11 import Request
    from websockets.server import ServerProtocol

    server = ServerProtocol(extensions=extensions, max_size=None, logger=_PROBE_LOG)
    server.receive_data(upgrade)
    requests = [event for event in server.events_received() if isinstance(event, Request)]
    if len(requests) != 1:
        return None
    response = server.accept(requests[0])
    server.send_response(response)
    server.data_to_send()
    return server, response


def _probe_shared_frames() -> list[str]:
    """websockets' server text frame of a payload (an accepted, uncompressed ServerProtocol) is exactly
    :func:`text_frame` of it, for every form of the length field."""
    from gateway.connection import text_frame

    accepted = _accepted(_UPGRADE)
    if accepted is None:
        return ["websockets ServerProtocol.events_received (the upgrade request)"]
    server, _ = accepted
    missing: list[str] = []
    for size in _FRAME_SIZES:
        payload = b"x" * size
        server.send_text(payload)
        if b"".join(server.data_to_send()) != text_frame(payload):
            missing.append(f"websockets ServerProtocol.send_text (an unmasked text frame, {size}-byte payload)")
            break
    return missing


_DEFLATE_UPGRADE = _UPGRADE[:-2] + b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
_DEFLATE_PAYLOADS = (b"", b"x", b'{"type":"chat.message","seq":1}', b'{"k":"' + b"ab" * 40 + b'"}', b"y" * 70000,
                     bytes(range(256)) * 300)
"""Payloads that do not compress and do, with each form of the length field."""


def _probe_shared_deflate() -> list[str]:
    """uvicorn's protocol keeps its extension factories in ``conn.available_extensions``; websockets, given
    gateway.deflate's factory, negotiates permessage-deflate without context takeover either way for a
    client that offered it without parameters, keeps no zlib state, and frames every message (twice in a
    row) as :func:`gateway.deflate.deflate_frame` does."""
    from gateway.deflate import WINDOW_BITS, deflate_frame, frame_kind, shared_factories

    _, ws, _ = _protocols()  # uvicorn's default config: ws_per_message_deflate on
    missing = lacking(ws, "uvicorn WebSocketsSansIOProtocol", "conn")
    if hasattr(ws, "conn"):
        missing += lacking(ws.conn, "websockets ServerProtocol", "available_extensions", "extensions")
        if not getattr(ws.conn, "available_extensions", None):
            missing.append("websockets ServerProtocol.available_extensions (uvicorn's permessage-deflate factory)")
    accepted = _accepted(_DEFLATE_UPGRADE, shared_factories())
    if accepted is None:
        return [*missing, "websockets ServerProtocol.events_received (the upgrade request)"]
    server, response = accepted
    offered = response.headers.get("Sec-WebSocket-Extensions", "")
    wanted = ("permessage-deflate", "server_no_context_takeover", "client_no_context_takeover",
              f"server_max_window_bits={WINDOW_BITS}")
    if not all(word in offered for word in wanted):
        missing.append(f"websockets ServerPerMessageDeflateFactory (answered {offered!r})")
    ext: Any = server.extensions[0] if server.extensions else None
    missing += lacking(ext, "websockets PerMessageDeflate", "local_no_context_takeover", "local_max_window_bits",
                       "compress_settings")
    if missing:
        return missing
    if frame_kind(server.extensions) != WINDOW_BITS or hasattr(ext, "encoder") or hasattr(ext, "decoder"):
        return [f"websockets PerMessageDeflate without context takeover (negotiated {ext!r})"]
    for payload in (*_DEFLATE_PAYLOADS, *_DEFLATE_PAYLOADS):
        server.send_text(payload)
        got = b"".join(server.data_to_send())
        ours = deflate_frame(payload, WINDOW_BITS)
        if (ours is not None and got != ours) or hasattr(ext, "encoder"):
            missing.append(f"websockets PerMessageDeflate.encode (a fresh compressor per message, the frame "
                           f"deflate_frame builds, {len(payload)}-byte payload)")
            break
    return missing


def _probe_light_waits() -> list[str]:
    """uvicorn's protocol has ``queue`` and ``writable`` per instance, and its source calls on them only
    methods gateway.inbox's replacements have."""
    import inspect
    import re

    from uvicorn.protocols.websockets import websockets_sansio_impl

    from gateway.inbox import Inbox, WriteGate

    _, ws, _ = _protocols()
    missing = lacking(ws, "uvicorn WebSocketsSansIOProtocol", "queue", "writable")
    try:
        source = inspect.getsource(websockets_sansio_impl)
    except (OSError, TypeError):
        return [*missing, "uvicorn websockets_sansio_impl source (to check how queue and writable are used)"]
    for field, replacement in (("queue", Inbox), ("writable", WriteGate)):
        used = set(re.findall(rf"\bself\.{field}\.(\w+)", source))
        passed_on = re.findall(rf"\bself\.{field}\b(?!\s*[.=:])", source)  # handed to something else
        unknown = sorted(name for name in used if not hasattr(replacement, name))
        if unknown or passed_on or not used:
            missing.append(f"uvicorn WebSocketsSansIOProtocol.{field} (used as: {sorted(used)}"
                           f"{', passed on' if passed_on else ''})")
    return missing


def _probe_shared_ping_timer() -> list[str]:
    """The keepalive fields and methods our ``schedule_ping`` replaces or calls, and uvicorn's source calling
    only ``cancel`` on ``ping_timer``."""
    import inspect
    import re

    from uvicorn.protocols.websockets import websockets_sansio_impl
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    missing = lacking(WebSocketsSansIOProtocol, "uvicorn WebSocketsSansIOProtocol", "schedule_ping",
                      "send_keepalive_ping", "stop_keepalive")
    _, ws, _ = _protocols()
    missing += lacking(ws, "uvicorn WebSocketsSansIOProtocol", "ping_timer", "ping_interval", "last_ping_rtt", "loop")
    try:
        source = inspect.getsource(websockets_sansio_impl)
    except (OSError, TypeError):
        return [*missing, "uvicorn websockets_sansio_impl source (to check how ping_timer is used)"]
    used = set(re.findall(r"\bself\.ping_timer\.(\w+)", source))
    passed_on = re.findall(r"\bself\.ping_timer\b(?!\s*(?:[.=:]|is\b))", source)
    if used != {"cancel"} or passed_on:
        missing.append(f"uvicorn WebSocketsSansIOProtocol.ping_timer (used as: {sorted(used)}"
                       f"{', passed on' if passed_on else ''})")
    return missing


def _probe_handshake_release() -> list[str]:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    missing = lacking(WebSocketsSansIOProtocol, "uvicorn WebSocketsSansIOProtocol", "start_keepalive")
    _, ws, _ = _protocols()
    missing += lacking(ws, "uvicorn WebSocketsSansIOProtocol", "request", "response", "conn")
    if hasattr(ws, "conn"):
        missing += lacking(ws.conn, "websockets ServerProtocol", "available_extensions")
    if hasattr(ws, "request"):
        missing += lacking(ws.request, "websockets Request", "headers")
        if hasattr(ws.request, "headers"):
            missing += lacking(ws.request.headers, "websockets Headers", "clear")
    return missing


_SSE_GET = b"GET /sse?conv_id=compat HTTP/1.1\r\nHost: compat.invalid\r\nAccept: text/event-stream\r\n\r\n"
_CYCLE = "uvicorn httptools RequestResponseCycle"


class _KeepingLoop(_Loop):
    """A :class:`_Loop` that keeps the coroutines it is given instead of closing them, for the probe to run."""

    def __init__(self) -> None:
        self.coroutines: list[Any] = []

    def create_task(self, coro: Any) -> _Task:
        self.coroutines.append(coro)
        return _Task()


def _lacking_cycle(http: Any, transport: _Transport) -> list[str]:
    """The fields gateway.sse reads on the request cycle of ``http`` (connected to ``transport``, a request
    received, its app not started): present, and the transport's and flow control's."""
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    cycle = getattr(http, "cycle", None)  # the probe's way to the cycle, not gateway.sse's (that is send.__self__)
    if not isinstance(cycle, RequestResponseCycle):
        return [f"uvicorn HttpToolsProtocol.cycle (a RequestResponseCycle, got {type(cycle).__name__})"]
    missing = lacking(cycle, _CYCLE, "send", "transport", "flow", "chunked_encoding", "disconnected",
                      "response_complete")
    if hasattr(cycle, "flow"):
        missing += lacking(cycle.flow, "uvicorn FlowControl", "write_paused")
    if missing:
        return missing
    if cycle.transport is not transport:
        missing.append(f"{_CYCLE}.transport (the connection's transport)")
    http.pause_writing()  # what the transport calls when its buffer is full
    if cycle.flow.write_paused is not True:
        missing.append(f"{_CYCLE}.flow.write_paused (True while the transport is paused)")
    http.resume_writing()
    return missing


def _probe_sse_direct_write() -> list[str]:
    """What gateway.sse reads behind the ``send`` of an httptools request: ``send.__self__`` (the request
    cycle), its ``transport``, ``flow.write_paused``, ``chunked_encoding``, ``disconnected``,
    ``response_complete``, and the transport's ``write`` / ``is_closing`` / ``abort``. Present, and meaning
    what the direct write assumes: checked by answering a real request with an SSE-like response."""
    import uvicorn
    from uvicorn.protocols.http import httptools_impl
    from uvicorn.server import ServerState

    missing = lacking(httptools_impl, "uvicorn.protocols.http.httptools_impl", "RequestResponseCycle")
    for cls, label in _transport_classes():
        missing += lacking(cls, label, "write", "is_closing", "abort")
    if importlib.util.find_spec("uvloop") is not None and len(_transport_classes()) < 2:
        missing.append("uvloop.loop.TCPTransport")
    if missing:
        return missing

    seen: list[tuple[Any, tuple[object, ...]]] = []  # (the app's send, the cycle's state once the response started)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        cycle = http.cycle
        seen.append((send, (cycle.chunked_encoding, cycle.disconnected, cycle.response_complete,
                            cycle.flow.write_paused, cycle.transport.is_closing())))
        await send({"type": "http.response.body", "body": b"data", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    config = uvicorn.Config(app, http="httptools", lifespan="off", log_config=None, access_log=False)
    config.load()
    loop = _KeepingLoop()
    http = httptools_impl.HttpToolsProtocol(config, ServerState(), {}, _loop=cast(Any, loop))
    transport = _Transport()
    http.connection_made(transport)
    try:
        http.data_received(_SSE_GET)
        if len(loop.coroutines) != 1:
            return [f"uvicorn HttpToolsProtocol.data_received (one ASGI task per request: {len(loop.coroutines)})"]
        missing += _lacking_cycle(http, transport)
        if missing:
            return missing
        cycle = http.cycle
        transport.written.clear()
        # The request's ASGI task, as uvicorn made it: the loaded app (middleware and all) on the cycle.
        if _runs_to_the_end(loop.coroutines[0]) is not True:
            return [f"{_CYCLE}.send (returns at once while the transport takes writes)"]
        send, state = seen[0] if seen else (None, ())
        if not isinstance(send, MethodType) or send.__self__ is not cycle:
            missing.append(f"{_CYCLE}.send (the app's send, a bound method of the request cycle)")
        if state != (True, False, False, False, False):
            missing.append(f"{_CYCLE}.chunked_encoding / disconnected / response_complete / flow.write_paused / "
                           f"transport.is_closing() (once a streamed response started: True, then all False; "
                           f"got {state})")
        if transport.written[1:] != [b"4\r\ndata\r\n", b"0\r\n\r\n"]:
            missing.append(f"{_CYCLE}.send (writes a body as one HTTP chunk: {transport.written[1:]!r})")
        if cycle.response_complete is not True:
            missing.append(f"{_CYCLE}.response_complete (True once the response ended)")
        http.data_received(_SSE_GET)  # a second request on the connection, then the client goes away
        second = http.cycle
        http.connection_lost(None)
        if second is cycle or second.disconnected is not True:
            missing.append(f"{_CYCLE}.disconnected (True once the client went away during a response)")
        return missing
    finally:
        for coroutine in loop.coroutines:
            with contextlib.suppress(RuntimeError):  # one suspended in a write that would write again
                coroutine.close()


def _runs_to_the_end(coroutine: Any) -> bool:
    """Run ``coroutine`` without an event loop: True if it finished, False if it waited for something."""
    try:
        coroutine.send(None)
    except StopIteration:
        return True
    return False


_WEB = ("uvicorn", "websockets")
FEATURES: tuple[Feature, ...] = (
    Feature("request_deadline", "the request deadline and head cap of gateway.handshake", _probe_request_deadline,
            "uvicorn's plain httptools protocol: no request deadline, no request-head cap", ("uvicorn", "httptools")),
    Feature("handshake_deadline", "the websocket handshake deadline and the 414/431 answer of refused upgrades",
            _probe_handshake_deadline, "no deadline once a request upgraded; refused upgrades get no answer", _WEB),
    Feature("direct_send", "the synchronous frame write of gateway.server", _probe_direct_send,
            "every frame goes through the ASGI send and a writer task (slower)", (*_WEB, "starlette")),
    Feature("shared_frames", "one frame per payload written to every uncompressed socket", _probe_shared_frames,
            "each socket frames its payloads itself (direct send)", _WEB),
    Feature("shared_deflate", "permessage-deflate without context takeover, compressed once per event",
            _probe_shared_deflate, "permessage-deflate with context takeover (~36 KiB of zlib state per socket, "
            "compressed per socket)", _WEB),
    Feature("light_waits", "lighter per-socket receive queue and write gate", _probe_light_waits,
            "each socket keeps uvicorn's asyncio.Queue and asyncio.Event (~4 KB)", ("uvicorn",)),
    Feature("shared_ping_timer", "one timer per tick for every socket's keepalive ping", _probe_shared_ping_timer,
            "a TimerHandle per socket for its next ping (~0.5 KB)", ("uvicorn",)),
    Feature("handshake_release", "freeing the handshake request and response of accepted sockets",
            _probe_handshake_release, "each socket keeps its handshake request and response (memory)", _WEB),
    Feature(SSE_DIRECT_WRITE, "the direct HTTP chunk write and connection reset of gateway.sse",
            _probe_sse_direct_write, "every SSE chunk goes through the ASGI send (slower); a slow reader's stream "
            "ends by cancelling its writer instead of resetting the connection", ("uvicorn",)),
)


def probe() -> CompatReport:
    """Probe every feature (the gateway's and redis-py's); nothing is enforced."""
    return run((*FEATURES, *REDIS_FEATURES), TESTED)


_checked: CompatReport | None = None
"""The report of this process's last :func:`check` that let the gateway start."""


def check(allow_fallback: bool) -> CompatReport:
    """:func:`probe`, then refuse to start (:class:`CompatError`) unless all is there or ``allow_fallback``
    (``--compat``) and every missing feature has a fallback (logged at WARNING). The report is kept
    for :func:`passed`."""
    global _checked
    report = enforce(probe(), allow_fallback=allow_fallback, option="--compat (BROADCASTER_COMPAT=1)")
    _checked = report
    return report


def passed(feature: str) -> bool:
    """True when the last :func:`check` of this process found everything ``feature`` needs; False when it
    did not (``--compat`` runs the fallback) or when nothing was checked (an app served without
    :func:`gateway.server.uvicorn_config`: no internal is used unchecked)."""
    return _checked is not None and _checked.ok(feature)


class CompatCollector(Collector):
    """``broadcaster_compat_fallback{feature}``: 1 for a feature running on its fallback, else 0."""

    def __init__(self, report: CompatReport) -> None:
        self.report = report

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("broadcaster_compat_fallback",
                                  "1 when a feature runs on its fallback (a dependency lacks an internal it uses)",
                                  labels=["feature"])
        for feature, value in sorted(self.report.fallbacks().items()):
            gauge.add_metric([feature], value)
        yield gauge
