"""Memory of idle sockets: gateway.inbox's light waits, the protocol's slotted fields, the handshake's
headers let go once accepted, the keepalive wheel, and the compat fallbacks (#20 point 3)."""

from __future__ import annotations

import asyncio
import gc
import inspect
import tracemalloc
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from gateway import compat
from gateway.inbox import Inbox, WriteGate
from gateway.keepalive import RESOLUTION, PingEntry, PingWheel, wheel_of
from gateway.server import DirectSendProtocol, protocol_classes
from gateway.settings import Settings
from tests.support.gateway import InProcessGateway
from tests.support.polling import async_wait_until
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(60)


async def test_inbox_is_a_fifo_whose_cancelled_get_loses_nothing() -> None:
    inbox = Inbox()
    assert inbox.empty()
    waiting = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    inbox.put_nowait("a")
    inbox.put_nowait("b")
    assert await asyncio.wait_for(waiting, 5) == "a"
    assert await inbox.get() == "b" and inbox.empty()
    cancelled = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    inbox.put_nowait("c")
    assert inbox.qsize() == 1
    assert await asyncio.wait_for(inbox.get(), 5) == "c"


async def test_write_gate_waits_while_closed_and_set_wakes_every_waiter() -> None:
    gate = WriteGate()
    assert gate.is_set() and await gate.wait() is True
    gate.clear()
    waiters = [asyncio.ensure_future(gate.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    gate.set()
    gate.clear()  # cleared again at once: who was woken still returns, like asyncio.Event
    assert await asyncio.wait_for(asyncio.gather(*waiters), 5) == [True, True, True]
    late = asyncio.ensure_future(gate.wait())
    await asyncio.sleep(0)
    late.cancel()
    with pytest.raises(asyncio.CancelledError):
        await late
    gate.set()
    assert gate.is_set() and gate._waiters is None


def _protocol_bytes(ws_cls: type[Any], count: int = 300, upgrade: bytes = compat._UPGRADE,
                    negotiated: list[str] | None = None) -> float:
    """Bytes allocated per protocol object of ``ws_cls`` that received ``upgrade`` (compat's stand-ins); each
    negotiated the extensions named ``negotiated`` (default none)."""
    config = uvicorn.Config(compat._app, ws="websockets-sansio", lifespan="off", log_config=None)
    config.load()
    state, loop = ServerState(), compat._Loop()

    def make() -> Any:
        proto = ws_cls(config, state, {}, _loop=loop)
        proto.connection_made(compat._Transport())
        proto.data_received(upgrade)
        assert [ext.name for ext in proto.conn.extensions] == (negotiated or [])
        return proto

    keep = [make() for _ in range(5)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        keep += [make() for _ in range(count)]
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / count


def test_light_waits_and_slots_cut_several_kb_per_socket() -> None:
    report = compat.check(allow_fallback=False)
    _, light = protocol_classes(Settings(), report)
    heavy = type("Heavy", (light,), {"light_waits": False})
    saved = _protocol_bytes(heavy) - _protocol_bytes(light)
    assert saved > 3000, f"only {saved:.0f} bytes per socket saved"
    plain = _protocol_bytes(uvicorn.protocols.websockets.websockets_sansio_impl.WebSocketsSansIOProtocol)
    assert plain - _protocol_bytes(light) > 4000


def test_deflate_without_context_takeover_keeps_no_zlib_state_per_socket() -> None:
    """--ws-compression shared: permessage-deflate negotiated costs a socket next to nothing; with context
    takeover (deflate) each keeps a compressor and a decompressor (~36 KiB)."""
    report = compat.check(allow_fallback=False)
    _, shared = protocol_classes(Settings(ws_compression="shared"), report)
    _, context = protocol_classes(Settings(ws_compression="deflate"), report)
    deflate = ["permessage-deflate"]
    plain = _protocol_bytes(shared)
    squeezed = _protocol_bytes(shared, upgrade=compat._DEFLATE_UPGRADE, negotiated=deflate)
    kept = _protocol_bytes(context, upgrade=compat._DEFLATE_UPGRADE, negotiated=deflate)
    assert squeezed - plain < 1500, f"{squeezed - plain:.0f} bytes more per socket with deflate negotiated"
    assert kept - squeezed > 30000, f"context takeover only {kept - squeezed:.0f} bytes more"


async def test_an_accepted_socket_holds_light_waits_and_no_handshake_headers() -> None:
    async with InProcessGateway() as gw:
        client = await WsClient.connect(gw.ws_url("conv_id=idle"), additional_headers={"X-Big": "h" * 2000})
        await client.expect("ws.subscribed")
        (conn,) = gw.gateway.pool.connections.values()
        direct: Any = conn._direct
        proto = direct.__self__
        assert isinstance(proto, DirectSendProtocol)
        assert isinstance(proto.queue, Inbox) and isinstance(proto.writable, WriteGate)
        assert len(vars(proto)) <= 30, sorted(vars(proto))  # a dict sharing the class's keys
        assert proto.scope["headers"] == [] and proto.request is None
        for _ in range(10):  # client messages still go through the inbox, reads paused and resumed
            await client.send_json({"type": "ws.ping"})
        pongs = await client.until(lambda got: len(got) >= 10, keep=lambda o: o["type"] == "ws.pong")
        assert len(pongs) == 10
        await gw.gateway.backend.publish("idle", "chat.msg", {"n": 1})
        assert (await client.events(1))[0]["data"] == {"n": 1}
        await client.close()
        await async_wait_until(lambda: len(gw.gateway.pool) == 0, timeout=10, message="the socket to be gone")


async def test_the_compat_fallback_keeps_uvicorns_queue_and_event(monkeypatch: pytest.MonkeyPatch) -> None:
    original = inspect.getsource

    def source(obj: Any) -> str:
        text = original(obj)
        if getattr(obj, "__name__", "") == "uvicorn.protocols.websockets.websockets_sansio_impl":
            text += "\n        self.queue.task_done()\n"  # a method Inbox does not have
        return text

    with monkeypatch.context() as patched:
        patched.setattr(inspect, "getsource", source)
        with pytest.raises(compat.CompatError, match="light_waits"):
            compat.check(allow_fallback=False)
        report = compat.check(allow_fallback=True)
        assert set(report.missing) == {"light_waits"}
        _, ws = protocol_classes(Settings(), report)
        assert ws.light_waits is False
        gw = InProcessGateway(Settings(compat=True))
    async with gw:
        client = await WsClient.connect(gw.ws_url("conv_id=fallback"))
        await client.expect("ws.subscribed")
        (conn,) = gw.gateway.pool.connections.values()
        direct: Any = conn._direct
        assert isinstance(direct.__self__.queue, asyncio.Queue)
        await client.send_json({"type": "ws.ping"})
        await client.expect("ws.pong")
        await client.close()
    compat.check(allow_fallback=False)


class Pinged:
    def __init__(self, log: list[str], name: str, fail: bool = False) -> None:
        self.log, self.name, self.fail = log, name, fail

    def send_keepalive_ping(self) -> None:
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError("boom")


async def test_ping_wheel_fires_each_entry_once_on_its_tick_and_skips_cancelled_ones() -> None:
    loop = asyncio.get_running_loop()
    wheel = PingWheel(loop)
    log: list[str] = []
    started = loop.time()
    entries = [wheel.call_later(0.05, Pinged(log, name, fail=name == "a")) for name in "abc"]
    late = wheel.call_later(0.05 + RESOLUTION, Pinged(log, "late"))
    entries[2].cancel()
    assert len(wheel) == 3
    await async_wait_until(lambda: sorted(log) == ["a", "b"], timeout=5, message="the first tick")
    assert loop.time() - started <= 0.05 + RESOLUTION + 0.5
    await async_wait_until(lambda: "late" in log, timeout=5, message="the later tick")
    assert sorted(log) == ["a", "b", "late"] and len(wheel) == 0  # one failing ping cost the others nothing
    late.cancel()  # after it fired: nothing happens


async def test_an_accepted_socket_waits_for_its_ping_on_the_wheel() -> None:
    async with InProcessGateway(Settings(ping_interval=0.2)) as gw:
        client = await WsClient.connect(gw.ws_url("conv_id=pings"))
        await client.expect("ws.subscribed")
        (conn,) = gw.gateway.pool.connections.values()
        direct: Any = conn._direct
        proto = direct.__self__
        assert isinstance(proto.ping_timer, PingEntry)
        await async_wait_until(lambda: proto.ping_sent_at > 0 and proto.pending_ping_payload is None, timeout=10,
                               message="a ping sent and answered")
        await gw.gateway.backend.publish("pings", "chat.msg", {"n": 1})
        assert (await client.events(1))[0]["data"] == {"n": 1}
        await client.close()
        await async_wait_until(lambda: len(wheel_of(asyncio.get_running_loop())) == 0, timeout=10,
                               message="the closed socket's ping taken off the wheel")
    report = compat.check(allow_fallback=False)
    report.missing["shared_ping_timer"] = ["(test)"]
    _, ws = protocol_classes(Settings(), report)
    assert ws.shared_ping_timer is False
    compat.check(allow_fallback=False)
