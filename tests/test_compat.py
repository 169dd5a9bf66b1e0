"""The start-up compatibility check (gateway.compat, broadcaster.compat): a dependency lacking an internal
the gateway uses stops the start, naming it; ``--compat`` runs the feature's fallback instead, logged at
WARNING and exported as ``broadcaster_compat_fallback``. Internals are hidden the way an upgrade would
lose them: deleted from the real class (or, for an instance field, from the real instances probed)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hiredis
import httpx
import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

import broadcaster.compat
from gateway import compat
from gateway.connection import enable_direct_send
from gateway.handshake import TimedHttpToolsProtocol
from gateway.server import protocol_classes, uvicorn_config
from gateway.settings import Settings, settings_from
from tests.support.gateway import GatewayProcess, InProcessGateway, free_port
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
HIDE_SEND_400 = ("from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol\n"
                 "del HttpToolsProtocol.send_400_response\n")


@pytest.fixture(autouse=True)
def _direct_send_back_on() -> Iterator[None]:
    yield
    enable_direct_send(True)  # a fallback test turned it off for the whole process


def fallback_gauge(metrics_text: str) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(r'^broadcaster_compat_fallback\{feature="([a-z_]+)"\} (\S+)$',
                                                  metrics_text, re.M)}


def hide_instance_field(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> None:
    """Make the instances the check probes lack ``name`` (a field set in ``__init__``). Serving instances
    keep it: uvicorn's own code still reads it, as a renamed uvicorn would read its new name."""
    original = cls.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if isinstance(kwargs.get("_loop"), compat._Loop):
            delattr(self, name)

    monkeypatch.setattr(cls, "__init__", init)


def test_the_installed_versions_have_everything() -> None:
    report = compat.check(allow_fallback=False)
    assert report.missing == {}
    assert set(report.fallbacks()) == {"request_deadline", "handshake_deadline", "direct_send", "handshake_release",
                                       "redis_one_write_send", "redis_pubsub_links"}
    assert set(report.fallbacks().values()) == {0}


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
        if dist != "starlette":  # only the three whose internals are used have an upper bound
            major, minor = high.split(".")[:2]
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
