"""``GET /sse`` (issue #18) read with a raw HTTP client that parses the stream itself.

Real uvicorn gateways on free ports (in-process, the memory backend unless said), the
stream decoded byte by byte (tests/support/sseclient.py): the format and that its data
is exactly what ``/ws`` sends, resume by ``Last-Event-ID`` (which wins over the query),
``ws.reset`` when resuming is impossible, refusals as HTTP statuses with a JSON body,
profiles and ``types=``, hydrate, keep-alive comments, the slow reader closed and
counted, the drain, presence and the transport-labelled metrics.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest

from broadcaster.profiles import ProfileRegistry
from gateway.auth import mint_token
from gateway.protocol import CLOSE_DRAINING
from gateway.settings import Settings
from tests.support.gateway import InProcessGateway
from tests.support.sseclient import SseClient
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(30)

SECRET = "s" * 32
CHAT_PROFILES = ProfileRegistry.from_mapping({"profiles": {"chat": {"include": ["chat.*"]}}})
T = TypeVar("T")


async def poll(probe: Callable[[], Awaitable[T]], until: Callable[[T], bool], message: str,
               timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}; last: {value!r}")
        await asyncio.sleep(0.02)


async def publish(gw: InProcessGateway, conv: str, count: int, kind: str = "chat.msg",
                  start: int = 0) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=5) as http:
        out = []
        for i in range(start, start + count):
            r = await http.post(f"/v1/conversations/{conv}/events", json={"type": kind, "data": {"i": i}})
            assert r.status_code == 200, r.text
            out.append(r.json())
        return out


def open_sse(gw: InProcessGateway, query: str, **kw: Any) -> Awaitable[SseClient]:
    return SseClient.open(gw.settings.port, f"/sse?{query}", **kw)


async def test_format_and_data_identical_to_ws() -> None:
    async with InProcessGateway(Settings()) as gw:
        published = await publish(gw, "fmt", 3)
        epoch = published[0]["epoch"]
        ws = await WsClient.connect(gw.ws_url("conv_id=fmt&since=0"))
        async with await open_sse(gw, "conv_id=fmt&since=0") as s:
            assert s.status == 200
            assert s.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert s.headers["x-accel-buffering"] == "no" and "no-cache" in s.headers["cache-control"]
            hello = await s.expect("ws.hello")
            assert s.retry == gw.settings.sse_retry_ms  # the retry: line came first
            assert hello.id is None and hello.json()["gateway_id"] == gw.gateway.gateway_id
            subscribed = await s.expect("ws.subscribed")
            assert subscribed.json() == {"type": "ws.subscribed", "conv_id": "fmt", "epoch": epoch, "seq": 3}
            assert subscribed.id == f"{epoch}:0"  # where the stream stands: the replay follows
            replay = await s.events(3)
            assert [(e.id, e.event) for e in replay] == [(f"{epoch}:{i}", "chat.msg") for i in (1, 2, 3)]
            await publish(gw, "fmt", 1, kind="tool.call", start=3)
            live = await s.next()
            assert (live.id, live.event) == (f"{epoch}:4", "tool.call")
            await ws.expect("ws.hello")
            await ws.expect("ws.subscribed")
            ws_objects = await ws.events(4)
            # the very same JSON object, byte for byte, as /ws sends it
            assert [e.data.encode() for e in [*replay, live]] == [_canonical(o) for o in ws_objects]
            assert [e.json() for e in [*replay, live]] == ws_objects
        await ws.close()


def _canonical(obj: dict[str, Any]) -> bytes:
    import orjson

    return orjson.dumps(obj)


async def test_resume_by_last_event_id_header_wins_over_query() -> None:
    async with InProcessGateway(Settings()) as gw:
        published = await publish(gw, "res", 5)
        epoch = published[0]["epoch"]
        # query says since=0 and hydrate; the header (a reconnecting EventSource) says 2
        async with await open_sse(gw, "conv_id=res&since=0&hydrate=1",
                                  headers={"Last-Event-ID": f"{epoch}:2"}) as s:
            await s.expect("ws.hello")
            subscribed = await s.expect("ws.subscribed")
            assert subscribed.id == f"{epoch}:2"
            got = await s.events(3)
            assert [e.json()["seq"] for e in got] == [3, 4, 5]
            await publish(gw, "res", 2, start=5)
            got = await s.events(2)
            assert [e.id for e in got] == [f"{epoch}:6", f"{epoch}:7"]
        # resume from the last id delivered: the next event, no duplicate, no gap
        async with await open_sse(gw, "conv_id=res", headers={"Last-Event-ID": got[-1].id or ""}) as s:
            await s.expect("ws.hello")
            assert (await s.expect("ws.subscribed")).id == f"{epoch}:7"
            await publish(gw, "res", 1, start=7)
            assert [e.json()["seq"] for e in await s.events(1)] == [8]
        # since/epoch of the query are used without the header
        async with await open_sse(gw, f"conv_id=res&since=6&epoch={epoch}") as s:
            assert [e.json()["seq"] for e in await s.events(2)] == [7, 8]


async def test_reset_when_resume_is_impossible() -> None:
    async with InProcessGateway(Settings(history_size=3)) as gw:
        published = await publish(gw, "rst", 6)
        epoch = published[0]["epoch"]
        # another epoch: ws.subscribed carries no id, ws.reset sets it to the new epoch's head
        async with await open_sse(gw, "conv_id=rst", headers={"Last-Event-ID": "oldepoch:4"}) as s:
            await s.expect("ws.hello")
            assert (await s.expect("ws.subscribed")).id is None
            reset = await s.expect("ws.reset")
            assert reset.json()["reason"] == "epoch_changed" and reset.id == f"{epoch}:6"
            await publish(gw, "rst", 1, start=6)
            assert [e.id for e in await s.events(1)] == [f"{epoch}:7"]
        # history kept only 3: since=1 cannot be resumed exactly
        async with await open_sse(gw, "conv_id=rst", headers={"Last-Event-ID": f"{epoch}:1"}) as s:
            await s.expect("ws.hello")
            await s.expect("ws.subscribed")
            reset = await s.expect("ws.reset")
            assert reset.json()["reason"] == "history_truncated" and reset.id == f"{epoch}:7"


async def test_refusals_are_http_statuses_with_json() -> None:
    profiles = CHAT_PROFILES
    async with InProcessGateway(Settings(auth_secret=SECRET), profiles=profiles) as gw:
        token = mint_token(SECRET, convs=["mine-*"], profiles=["default"])
        cases = [
            ("conv_id=mine-1", {}, 401, "unauthorized"),
            ("conv_id=mine-1&token=garbage", {}, 401, "unauthorized"),
            (f"conv_id=theirs&token={token}", {}, 403, "forbidden"),
            (f"conv_id=mine-1&profile=chat&token={token}", {}, 403, "forbidden"),
            (f"conv_id=mine-1&profile=nope&token={token}", {}, 404, "unknown_profile"),
            (f"token={token}", {}, 400, "bad_request"),  # no conv_id
            (f"conv_id=mine-1&convid=x&token={token}", {}, 400, "bad_request"),  # unknown parameter
            (f"conv_id=bad%20id&token={token}", {}, 400, "bad_request"),
            (f"conv_id=mine-1&token={token}", {"Last-Event-ID": "no-colon"}, 400, "bad_request"),
        ]
        for query, headers, status, error in cases:
            async with await open_sse(gw, query, headers=headers) as s:
                assert (s.status, s.json()["error"]) == (status, error), (query, s.status, s.body)
                assert s.headers["content-type"] == "application/json"
        # a token in the query or as a bearer header; names starting with _ are ignored (cache busters)
        for query, headers in [(f"conv_id=mine-1&_=123&token={token}", {}),
                               ("conv_id=mine-1", {"Authorization": f"Bearer {token}"})]:
            async with await open_sse(gw, query, headers=headers) as s:
                assert s.status == 200
                await s.expect("ws.hello")
                await s.expect("ws.subscribed")


async def test_profiles_types_hydrate_and_gaps() -> None:
    profiles = CHAT_PROFILES
    async with InProcessGateway(Settings(), profiles=profiles) as gw:
        async with httpx.AsyncClient(base_url=gw.http_url, timeout=5) as http:
            for i, kind in enumerate(["chat.msg", "tool.call", "chat.msg", "debug.x", "chat.note"]):
                r = await http.post("/v1/conversations/pr/events",
                                    json={"type": kind, "data": {"i": i}, **({"key": f"k{i}"} if i < 2 else {})})
                epoch = r.json()["epoch"]
        async with await open_sse(gw, "conv_id=pr&profile=chat&since=0") as s:
            got = await s.events(3)
            assert [(e.event, e.json()["seq"]) for e in got] == [("chat.msg", 1), ("chat.msg", 3), ("chat.note", 5)]
        async with await open_sse(gw, "conv_id=pr&since=0&types=chat.msg,tool.*") as s:
            assert [e.json()["seq"] for e in await s.events(3)] == [1, 2, 3]
        # a resume from a filtered client's last id (seq 3) continues after it, gaps and all
        async with await open_sse(gw, "conv_id=pr&profile=chat", headers={"Last-Event-ID": f"{epoch}:3"}) as s:
            assert [e.json()["seq"] for e in await s.events(1)] == [5]
        async with await open_sse(gw, "conv_id=pr&hydrate=1") as s:
            await s.expect("ws.hello")
            assert (await s.expect("ws.subscribed")).id == f"{epoch}:5"
            state = await s.expect("ws.state")
            assert state.id == f"{epoch}:5" and set(state.json()["entities"]) == {"k0", "k1"}


async def test_keepalive_comment_on_idle_stream() -> None:
    async with InProcessGateway(Settings(sse_ping_interval=0.2)) as gw:
        async with await open_sse(gw, "conv_id=idle") as s:
            await s.expect("ws.hello")
            await s.expect("ws.subscribed")
            with pytest.raises(TimeoutError):  # nothing dispatched, but comments read meanwhile
                await s.next(timeout=0.7)
            assert s.comments.count("ping") >= 2


async def metrics(gw: InProcessGateway) -> str:
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=5) as http:
        return (await http.get("/metrics")).text


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


async def test_slow_reader_is_closed_and_counted_memory_bounded() -> None:
    async with InProcessGateway(Settings(max_queue_bytes=64 * 1024)) as gw:
        slow = await open_sse(gw, "conv_id=slow", rcvbuf=4096)
        fast = await open_sse(gw, "conv_id=slow")
        for s in (slow, fast):
            assert s.status == 200
        await fast.expect("ws.hello")
        await fast.expect("ws.subscribed")
        await poll(lambda: _presence(gw, "slow"), lambda p: p["connections"] == 2, "both streams subscribed")
        blob = "x" * 16 * 1024
        async with httpx.AsyncClient(base_url=gw.http_url, timeout=5) as http:
            for i in range(300):  # ~5 MB for a reader that reads nothing
                r = await http.post("/v1/conversations/slow/events", json={"type": "bulk", "data": {"b": blob, "i": i}})
                assert r.status_code == 200
                if i % 20 == 0:
                    assert len(await fast.events(1 if i == 0 else 20, timeout=10)) >= 1
                if gw.gateway.pool.stats.queued_bytes > 0:
                    assert gw.gateway.pool.stats.queued_bytes < 2 * 64 * 1024 + 20 * 1024
                if gw.app.state.sse.stats.slow_consumer_closes:
                    break
        text = await poll(lambda: metrics(gw), lambda t: 'transport="sse"} 1.0' in _slow_line(t),
                          "the slow SSE reader closed and counted")
        assert metric(text, 'broadcaster_transport_slow_consumer_closes_total{transport="ws"}') == 0
        assert metric(text, "broadcaster_slow_consumer_closes_total") == 1
        await poll(lambda: _presence(gw, "slow"), lambda p: p["connections"] == 1, "the slow stream gone")
        # the slow one's connection was reset: reading it now ends (after whatever the kernel held)
        with pytest.raises((EOFError, ConnectionError, asyncio.IncompleteReadError)):
            while True:
                await slow.next(timeout=10)
        await slow.close()
        await fast.close()


def _slow_line(text: str) -> str:
    return "\n".join(line for line in text.splitlines()
                     if line.startswith("broadcaster_transport_slow_consumer_closes_total"))


async def _presence(gw: InProcessGateway, conv: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=5) as http:
        body: dict[str, Any] = (await http.get(f"/v1/conversations/{conv}/presence")).json()
        return body


async def test_presence_metrics_and_drain_end_the_stream() -> None:
    async with InProcessGateway(Settings()) as gw:
        ws = await WsClient.connect(gw.ws_url("conv_id=dr&profile=debug"))
        streams = [await open_sse(gw, "conv_id=dr"), await open_sse(gw, "conv_id=dr&profile=debug")]
        for s in streams:
            await s.expect("ws.hello")
            await s.expect("ws.subscribed")
        presence = await poll(lambda: _presence(gw, "dr"), lambda p: p["connections"] == 3, "presence of 3")
        assert presence["by_profile"] == {"default": 1, "debug": 2}
        await publish(gw, "dr", 2)
        for s in streams:
            await s.events(2)
        text = await metrics(gw)
        assert metric(text, 'broadcaster_transport_connections{transport="sse"}') == 2
        assert metric(text, 'broadcaster_transport_connections{transport="ws"}') == 1
        assert metric(text, "broadcaster_connections") == 3
        assert metric(text, 'broadcaster_transport_connections_opened_total{transport="sse"}') == 2
        assert metric(text, 'broadcaster_transport_objects_written_total{transport="sse"}') >= 2 * 5
        assert metric(text, "broadcaster_subscriptions") == 3

        drain = asyncio.create_task(gw.gateway.pool.drain(1.0, CLOSE_DRAINING, "draining"))
        for s in streams:
            await s.read_to_end(timeout=5)
            assert s.ended  # the chunked body was terminated: an EventSource reconnects
        # a new stream on a draining gateway ends at once, with the retry hint
        async with await open_sse(gw, "conv_id=dr") as late:
            assert late.status == 200
            assert await late.read_to_end(timeout=5) == [] and late.ended and late.retry == gw.settings.sse_retry_ms
        await drain
        await ws.close()
        text = await metrics(gw)
        assert metric(text, 'broadcaster_transport_connections{transport="sse"}') == 0


async def test_disconnect_unsubscribes() -> None:
    async with InProcessGateway(Settings()) as gw:
        s = await open_sse(gw, "conv_id=bye")
        await s.expect("ws.hello")
        await s.expect("ws.subscribed")
        assert gw.gateway.hub.conversations() == ["bye"]
        await s.close()
        await poll(lambda: _async(len(gw.gateway.pool)), lambda n: n == 0, "the stream removed from the pool")
        assert gw.gateway.hub.conversations() == []
        assert gw.app.state.sse.stats.open == 0


async def _async(value: T) -> T:
    return value


async def test_origin_checked_and_cors_header_for_allowed_origins() -> None:
    async with InProcessGateway(Settings(allowed_origins=["http://app.test"])) as gw:
        async with await open_sse(gw, "conv_id=o", headers={"Origin": "http://evil.test"}) as s:
            assert (s.status, s.json()["error"]) == (403, "forbidden")
        async with await open_sse(gw, "conv_id=o", headers={"Origin": "http://app.test"}) as s:
            assert s.status == 200 and s.headers["access-control-allow-origin"] == "http://app.test"
            await s.expect("ws.hello")
