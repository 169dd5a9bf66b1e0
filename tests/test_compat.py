"""The start-up compatibility check (gateway.compat, broadcaster.compat): a dependency lacking an internal
the gateway uses stops the start, naming it; ``--compat`` runs the feature's fallback instead, logged at
WARNING and exported as ``broadcaster_compat_fallback``. Internals are hidden the way an upgrade would
lose them: deleted from the real class (or, for an instance field, from the real instances probed)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import hiredis
import httpx
import pytest
import uvicorn
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

import broadcaster.compat
from gateway import compat, sse
from gateway.connection import enable_direct_send
from gateway.handshake import TimedHttpToolsProtocol
from gateway.server import protocol_classes, uvicorn_config
from gateway.settings import Settings, settings_from
from tests.support.gateway import GatewayProcess, InProcessGateway, free_port
from tests.support.sseclient import SseClient
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
HIDE_SEND_400 = ("from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol\n"
                 "del HttpToolsProtocol.send_400_response\n")
CYCLE = "uvicorn httptools RequestResponseCycle"


@pytest.fixture(autouse=True)
def _direct_send_back_on() -> Iterator[None]:
    checked = compat._checked
    yield
    enable_direct_send(True)  # a fallback test turned it off for the whole process
    compat._checked = checked  # and the SSE direct write (compat.passed)


def fallback_gauge(metrics_text: str) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(r'^broadcaster_compat_fallback\{feature="([a-z_]+)"\} (\S+)$',
                                                  metrics_text, re.M)}


def hide_instance_field(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> None:
    """Make the instances the check probes lack ``name`` (a field set in ``__init__``). Serving instances
    keep it: uvicorn's own code still reads it, as a renamed uvicorn would read its new name. Probed
    instances are those built with the check's stand-in loop or transport."""
    original = cls.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if any(isinstance(arg, compat._Loop | compat._Transport) for arg in (*args, *kwargs.values())):
            delattr(self, name)

    monkeypatch.setattr(cls, "__init__", init)


def test_the_installed_versions_have_everything() -> None:
    report = compat.check(allow_fallback=False)
    assert report.missing == {}
    assert set(report.fallbacks()) == {"request_deadline", "handshake_deadline", "direct_send", "handshake_release",
                                       "shared_frames", "shared_deflate", "light_waits", "shared_ping_timer",
                                       "sse_direct_write", "redis_one_write_send",
                                       "redis_pubsub_links", "redis_sentinel_switches"}
    assert set(report.fallbacks().values()) == {0}
    assert compat.passed("sse_direct_write")


def test_a_missing_method_is_named_with_the_tested_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(HttpToolsProtocol, "send_400_response")
    with pytest.raises(compat.CompatError) as refused:
        compat.check(allow_fallback=False)
    message = str(refused.value)
    assert "uvicorn HttpToolsProtocol.send_400_response" in message
    assert "request_deadline" in message and "uvicorn 0.52.1 to 0.54.0" in message
    assert "--compat" in message
    report = compat.check(allow_fallback=True)
    assert report.missing == {"request_deadline": ["uvicorn HttpToolsProtocol.send_400_response"]}
    http, _ = protocol_classes(Settings(), report)
    assert http is HttpToolsProtocol  # uvicorn's own protocol: no deadline, no head cap


def test_a_missing_instance_field_turns_off_only_its_feature(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_instance_field(monkeypatch, WebSocketsSansIOProtocol, "disconnected")
    with pytest.raises(compat.CompatError, match=r"uvicorn WebSocketsSansIOProtocol\.disconnected"):
        compat.check(allow_fallback=False)
    report = compat.check(allow_fallback=True)
    assert report.missing == {"direct_send": ["uvicorn WebSocketsSansIOProtocol.disconnected"]}
    http, ws = protocol_classes(Settings(), report)
    assert ws.direct_send is False and ws.release_handshake is True
    assert issubclass(http, HttpToolsProtocol) and http is not HttpToolsProtocol


def test_a_hidden_keepalive_hook_turns_off_the_handshake_features(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(WebSocketsSansIOProtocol, "start_keepalive")
    report = compat.check(allow_fallback=True)
    assert set(report.missing) == {"handshake_deadline", "handshake_release"}
    http, ws = protocol_classes(Settings(), report)
    assert issubclass(http, TimedHttpToolsProtocol) and http.handshake_deadline is False
    assert ws.release_handshake is False


def _wrap_send_in_middleware(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn's proxy-headers middleware (in front of every app it serves) hands the app a wrapper of send."""
    original = ProxyHeadersMiddleware.__call__

    async def call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        async def wrapped(message: Any) -> None:
            await send(message)

        await original(self, scope, receive, wrapped)

    monkeypatch.setattr(ProxyHeadersMiddleware, "__call__", call)


def _hiding(cls: type, name: str) -> Callable[[pytest.MonkeyPatch], None]:
    return lambda monkeypatch: hide_instance_field(monkeypatch, cls, name)


SSE_HIDDEN: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], str]] = {
    **{name: (_hiding(RequestResponseCycle, name), f"{CYCLE}.{name}")
       for name in ("transport", "flow", "chunked_encoding", "disconnected", "response_complete")},
    "send": (lambda mp: mp.delattr(RequestResponseCycle, "send"), f"{CYCLE}.send"),
    "write_paused": (_hiding(FlowControl, "write_paused"), "uvicorn FlowControl.write_paused"),
    "abort": (lambda mp: mp.delattr(asyncio.WriteTransport, "abort"), "asyncio.Transport.abort"),
    "cycle class": (lambda mp: mp.delattr(httptools_impl, "RequestResponseCycle"),
                    "uvicorn.protocols.http.httptools_impl.RequestResponseCycle"),
    # there, but no longer meaning what the direct write assumes
    "write_paused not kept": (lambda mp: mp.setattr(FlowControl, "pause_writing", lambda self: None),
                              f"{CYCLE}.flow.write_paused (True while the transport is paused)"),
    "send wrapped": (_wrap_send_in_middleware, f"{CYCLE}.send (the app's send, a bound method of the request cycle)"),
}


@pytest.mark.parametrize("hidden", SSE_HIDDEN)
def test_each_internal_of_the_sse_direct_write_is_checked(monkeypatch: pytest.MonkeyPatch, hidden: str) -> None:
    hide, name = SSE_HIDDEN[hidden]
    hide(monkeypatch)
    with pytest.raises(compat.CompatError) as refused:
        compat.check(allow_fallback=False)
    message = str(refused.value)
    assert f"sse_direct_write (the direct HTTP chunk write and connection reset of gateway.sse) needs {name}" in message
    assert "tested with uvicorn 0.52.1 to 0.54.0" in message and "--compat" in message
    report = compat.check(allow_fallback=True)
    assert report.missing == {"sse_direct_write": [name]}
    assert not compat.passed("sse_direct_write") and compat.passed("direct_send")


async def test_the_sse_direct_write_is_for_the_checked_httptools_cycle_only() -> None:
    """The gateway serves httptools (uvicorn_config); behind uvicorn's h11 cycle, which frames the body
    itself, and before any check, gateway.sse takes the ASGI path."""
    assert issubclass(InProcessGateway(Settings()).server.config.http, HttpToolsProtocol)  # type: ignore[arg-type]
    start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    sends = {}
    for name, cls in (("httptools", HttpToolsProtocol), ("h11", H11Protocol)):
        config = uvicorn.Config(compat._app, http=name, lifespan="off", log_config=None, access_log=False)
        config.load()
        http = cls(config, ServerState(), {}, _loop=compat._Loop())  # type: ignore[arg-type]
        transport = compat._Transport()
        http.connection_made(transport)
        http.data_received(b"GET /sse?conv_id=c HTTP/1.1\r\nHost: test.invalid\r\n\r\n")
        assert http.cycle is not None
        sends[name] = send = http.cycle.send
        await send(start)  # type: ignore[arg-type]
        assert b"transfer-encoding: chunked" in transport.written[-1].lower()
        if name == "httptools":
            write = sse.direct_chunk_writer(send)  # type: ignore[arg-type]
            assert write is not None and write(b"x") is True
            assert transport.written[-1] == b"1\r\nx\r\n"
            assert sse._transport_abort(send) == transport.abort  # type: ignore[arg-type]
        else:
            assert sse.direct_chunk_writer(send) is None  # type: ignore[arg-type]
            assert sse._transport_abort(send) is None  # type: ignore[arg-type]
    compat._checked = None  # nothing checked in this process: no internal is read
    assert sse.direct_chunk_writer(sends["httptools"]) is None  # type: ignore[arg-type]
    assert sse._transport_abort(sends["httptools"]) is None  # type: ignore[arg-type]


def test_redis_internals_have_no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(hiredis, "pack_command")
    for check in (lambda: compat.check(allow_fallback=True), broadcaster.compat.check_redis):
        with pytest.raises(compat.CompatError) as refused:
            check()
        assert "hiredis.pack_command" in str(refused.value) and "redis 5.3.1 to 8.1.0" in str(refused.value)
        assert "cannot help" in str(refused.value) or "--compat" not in str(refused.value)


def test_compat_is_an_option_with_an_environment_variable() -> None:
    assert settings_from({}, {}).compat is False
    assert settings_from({}, {"BROADCASTER_COMPAT": "1"}).compat is True
    assert settings_from({}, {"BROADCASTER_COMPAT": "off"}).compat is False
    assert settings_from({"compat": True}, {"BROADCASTER_COMPAT": "0"}).compat is True
    with pytest.raises(ValueError, match="BROADCASTER_COMPAT"):
        settings_from({}, {"BROADCASTER_COMPAT": "perhaps"})


def test_the_tested_ranges_are_the_declared_ones() -> None:
    """pyproject's bounds, the lowest-versions constraints and the check's messages say the same."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lowest = dict(line.split("==") for line in (ROOT / ".ci/constraints-lowest.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    for dist, (low, high) in compat.TESTED.items():
        spec = next(d for d in declared if re.match(rf"{dist}(\[|>)", d, re.I))
        assert f">={low}" in spec, spec
        assert lowest[dist] == low
        major, minor = high.split(".")[:2]  # the checked ones: below the next minor after the newest tested
        assert f"<{major}.{int(minor) + 1}" in spec, spec


async def test_in_process_gateway_refuses_or_serves_on_the_slow_path(monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    hide_instance_field(monkeypatch, WebSocketsSansIOProtocol, "disconnected")
    with pytest.raises(compat.CompatError, match="disconnected"):
        InProcessGateway(Settings())
    caplog.set_level(logging.WARNING, logger="broadcaster.compat")
    async with InProcessGateway(Settings(compat=True)) as gw:
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "broadcaster.compat"]
        assert any("direct_send" in r.getMessage() and "disconnected" in r.getMessage() for r in warnings)
        client = await WsClient.connect(gw.ws_url("conv_id=slow"))
        await client.expect("ws.subscribed")
        (conn,) = gw.gateway.pool.connections.values()
        assert conn._direct is None  # the ASGI send and its writer task
        await gw.gateway.backend.publish("slow", "chat.msg", {"n": 1})
        (event,) = await client.events(1)
        assert event["data"] == {"n": 1} and conn.writer is not None
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            gauge = fallback_gauge((await http.get("/metrics")).text)
        assert gauge["direct_send"] == 1 and gauge["request_deadline"] == 0 and gauge["handshake_deadline"] == 0
        await client.close()


async def test_direct_send_is_used_when_everything_is_there() -> None:
    async with InProcessGateway(Settings()) as gw:
        client = await WsClient.connect(gw.ws_url("conv_id=fast"))
        await client.expect("ws.subscribed")
        (conn,) = gw.gateway.pool.connections.values()
        assert conn._direct is not None
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            assert set(fallback_gauge((await http.get("/metrics")).text).values()) == {0}
        await client.close()


async def _sse_stream_through(gw: InProcessGateway, conv: str) -> tuple[sse.SseStream, list[bytes]]:
    """Open an SSE stream and publish one event on it; (its stream, the bodies it sent through ASGI)."""
    async with await SseClient.open(gw.settings.port, f"/sse?conv_id={conv}") as client:
        assert client.status == 200
        await client.expect("ws.hello")
        await client.expect("ws.subscribed")
        (stream,) = gw.gateway.pool.connections.values()
        assert isinstance(stream, sse.SseStream)
        asgi_bodies: list[bytes] = []
        asgi_send = stream._send

        async def recording(message: Any) -> None:
            if message.get("body"):
                asgi_bodies.append(message["body"])
            await asgi_send(message)

        stream._send = recording
        await gw.gateway.backend.publish(conv, "chat.msg", {"n": 1})
        (event,) = await client.events(1)
        assert event.event == "chat.msg" and event.json()["data"] == {"n": 1}
        return stream, asgi_bodies


async def test_sse_refuses_or_streams_through_asgi_without_the_direct_write(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    hide_instance_field(monkeypatch, RequestResponseCycle, "chunked_encoding")
    with pytest.raises(compat.CompatError) as refused:
        InProcessGateway(Settings())
    assert (f"sse_direct_write (the direct HTTP chunk write and connection reset of gateway.sse) needs {CYCLE}."
            f"chunked_encoding, missing from uvicorn {version('uvicorn')}; tested with uvicorn 0.52.1 to 0.54.0"
            in str(refused.value))
    caplog.set_level(logging.WARNING, logger="broadcaster.compat")
    async with InProcessGateway(Settings(compat=True)) as gw:
        warnings = [r.getMessage() for r in caplog.records
                    if r.levelno == logging.WARNING and r.name == "broadcaster.compat"]
        assert any("sse_direct_write" in m and "chunked_encoding" in m for m in warnings), warnings
        stream, asgi_bodies = await _sse_stream_through(gw, "slow-sse")
        assert stream._direct is None and stream._abort is None  # the writer coroutine; a cancel to end it
        assert [body for body in asgi_bodies if b"event: chat.msg" in body], asgi_bodies
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            gauge = fallback_gauge((await http.get("/metrics")).text)
        assert gauge["sse_direct_write"] == 1 and gauge["direct_send"] == 0 and gauge["request_deadline"] == 0


async def test_sse_direct_write_is_used_when_everything_is_there() -> None:
    async with InProcessGateway(Settings()) as gw:
        stream, asgi_bodies = await _sse_stream_through(gw, "fast-sse")
        assert stream._direct is not None and stream._abort is not None
        assert asgi_bodies == []  # the event went straight to the transport
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            assert fallback_gauge((await http.get("/metrics")).text)["sse_direct_write"] == 0


def test_uvicorn_config_registers_the_gauge_once() -> None:
    gw = InProcessGateway(Settings())
    uvicorn_config(gw.app, gw.settings)  # a second config for the same app: still one collector
    from prometheus_client import generate_latest

    text = generate_latest(gw.gateway.metrics.registry).decode()
    assert text.count('broadcaster_compat_fallback{feature="direct_send"}') == 1


def _env_hiding(tmp_path: Path, code: str) -> dict[str, str]:
    """The environment of a gateway process whose uvicorn lacks what ``code`` deletes (a sitecustomize)."""
    (tmp_path / "sitecustomize.py").write_text(code)
    path = os.pathsep.join(p for p in (str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


def test_cli_refuses_to_start_naming_the_missing_attribute(tmp_path: Path) -> None:
    env = {**os.environ, **_env_hiding(tmp_path, HIDE_SEND_400)}
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "--port", str(free_port())], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "uvicorn HttpToolsProtocol.send_400_response" in done.stderr
    assert "tested with uvicorn 0.52.1 to 0.54.0" in done.stderr and "--compat" in done.stderr


def test_cli_with_compat_serves_warns_and_exports_the_fallback(tmp_path: Path) -> None:
    with GatewayProcess(env={**_env_hiding(tmp_path, HIDE_SEND_400), "BROADCASTER_COMPAT": "1"}) as gw:
        gauge = fallback_gauge(httpx.get(gw.http_url + "/metrics", timeout=5).text)
        assert gauge["request_deadline"] == 1
        assert gauge["direct_send"] == 0 and gauge["handshake_release"] == 0
        output = gw.output()
        assert re.search(r"WARNING broadcaster\.compat: .*request_deadline.*send_400_response", output), output


def test_a_sentinel_list_asked_elsewhere_stops_the_redis_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """MasterSwitches reorders Sentinel.sentinels in place: if discover_master stopped asking that list, the
    reordering would silently do nothing, so the start refuses (no fallback for the Redis features)."""
    from redis.asyncio.sentinel import Sentinel

    async def discover_master(self: Any, service_name: str) -> Any:
        return ("127.0.0.1", 6379)

    monkeypatch.setattr(Sentinel, "discover_master", discover_master)
    with pytest.raises(broadcaster.compat.CompatError) as refused:
        broadcaster.compat.check_redis()
    assert "discover_master asking self.sentinels" in str(refused.value)
