"""The /ws protocol end to end: a real uvicorn server on a free port and real websocket clients."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import httpx
import pytest
import websockets

from broadcaster.envelope import PublishRequest
from broadcaster.profiles import ProfileRegistry
from gateway.settings import Settings
from tests.support.gateway import InProcessGateway
from tests.support.polling import async_wait_until
from tests.support.wsclient import StalledClient, WsClient

pytestmark = pytest.mark.timeout(60)
JSON_TYPE = {"content-type": "application/json"}
"""What publishes of raw bodies declare (anything else is 415, #16)."""


def enrich_badge(event: dict, ctx: object) -> dict:
    event["badge"] = f"{ctx.profile}:{event['seq']}"  # type: ignore[attr-defined]
    return event


PROFILES = ProfileRegistry.from_mapping({"profiles": {
    "chat": {"include": ["chat.*", "llm.*"], "exclude": ["*.thinking.*"], "drop_fields": ["raw", "usage.tokens"],
             "enrich": ["tests.test_gateway_ws:enrich_badge"]},
    "timeline": {"include": ["timeline.*"]},
}})


async def get_json(http: httpx.AsyncClient, path: str) -> Any:
    return (await http.get(path)).json()


async def publish(gw: InProcessGateway, conv: str, etype: str, data: object = None) -> int:
    result = await gw.gateway.backend.publish(conv, etype, data)
    return result.seq


async def test_hello_subscribed_events_ping_and_errors() -> None:
    async with InProcessGateway() as gw:
        await publish(gw, "c1", "chat.msg", {"n": 1})
        client = await WsClient.connect(gw.ws_url("conv_id=c1&since=0"))
        hello = await client.next()
        assert hello["type"] == "ws.hello" and hello["profile"] == "default"
        assert hello["gateway_id"] == gw.gateway.gateway_id and isinstance(hello["server_time"], int)
        subscribed = await client.next()
        assert subscribed == {"type": "ws.subscribed", "conv_id": "c1", "epoch": subscribed["epoch"], "seq": 1}
        first = await client.next()
        assert (first["type"], first["seq"], first["data"]) == ("chat.msg", 1, {"n": 1})
        assert set(first) == {"type", "conv_id", "seq", "id", "ts", "data"}
        await publish(gw, "c1", "chat.msg", {"n": 2})
        assert (await client.next())["seq"] == 2

        await client.send_json({"type": "ws.ping"})
        assert (await client.next())["type"] == "ws.pong"
        await client.ws.send("ping")
        pong = await client.next()
        assert pong["type"] == "ws.pong" and isinstance(pong["server_time"], int)

        for bad, code in [("{not json", "bad_json"), ("[1,2]", "bad_message"), ('{"type":"ws.nope"}', "unknown_type"),
                          ('{"type":"ws.subscribe","conv_id":"bad id"}', "bad_subscribe"),
                          ('{"type":"ws.subscribe","conv_id":"c2","since":-1}', "bad_subscribe"),
                          ('{"type":"ws.unsubscribe"}', "bad_unsubscribe")]:
            await client.ws.send(bad)
            error = await client.next()
            assert error["type"] == "ws.error" and error["code"] == code, (bad, error)
            assert error["message"]
        # the connection is kept after errors
        await publish(gw, "c1", "chat.msg", {"n": 3})
        assert (await client.next())["seq"] == 3
        await client.close()


@pytest.mark.parametrize("query, code", [
    ("conv_id=bad%20id", 4400),
    ("conv_id=c1&since=abc", 4400),
    ("conv_id=c1&since=-3", 4400),
    ("since=3", 4400),
    ("conv_id=c1&types=" + ",".join(["a.*"] * 17), 4400),
    ("profile=bad%20name", 4400),
    ("conv_id=c1&profile=nope", 4404),
])
async def test_bad_connect_query_close_codes(query: str, code: int) -> None:
    async with InProcessGateway() as gw:
        client = await WsClient.connect(gw.ws_url(query))
        assert await client.close_code() == code


async def test_frame_too_big_closes_1009_and_others_keep_receiving() -> None:
    settings = Settings(max_client_message_bytes=1024)
    async with InProcessGateway(settings) as gw:
        other = await WsClient.connect(gw.ws_url("conv_id=c1"))
        await other.expect("ws.subscribed")
        big = await WsClient.connect(gw.ws_url("conv_id=c1"))
        await big.expect("ws.subscribed")
        await big.ws.send("x" * 5000)
        assert await big.close_code() == 1009
        await publish(gw, "c1", "chat.msg", {"after": True})
        assert (await other.events(1))[0]["data"] == {"after": True}


async def test_too_many_subscriptions_is_an_error_and_too_many_messages_close_4429() -> None:
    settings = Settings(max_subscriptions=2, client_messages_per_second=5)
    async with InProcessGateway(settings) as gw:
        client = await WsClient.connect(gw.ws_url())
        await client.expect("ws.hello")
        for conv in ("a", "b"):
            await client.send_json({"type": "ws.subscribe", "conv_id": conv})
            assert (await client.expect("ws.subscribed"))["conv_id"] == conv
        await client.send_json({"type": "ws.subscribe", "conv_id": "c"})
        error = await client.expect("ws.error")  # #16: one subscription refused, the socket stays
        assert (error["code"], error["conv_id"]) == ("too_many_subscriptions", "c")

        chatty = await WsClient.connect(gw.ws_url())
        await chatty.expect("ws.hello")
        for _ in range(40):  # burst allowance is 4 x 5 = 20
            try:
                await chatty.ws.send('{"type":"ws.ping"}')
            except websockets.ConnectionClosed:
                break
        assert await chatty.close_code() == 4429


async def test_burst_of_1000_arrives_complete_in_order_in_batched_frames() -> None:
    async with InProcessGateway() as gw:
        client = await WsClient.connect(gw.ws_url("conv_id=burst"))
        await client.expect("ws.subscribed")
        frames_before = client.frames
        await gw.gateway.backend.publish_many(
            [PublishRequest("burst", "chat.delta", {"i": i}) for i in range(1000)])
        events = await client.events(1000, timeout=20)
        assert [e["seq"] for e in events] == list(range(1, 1001))
        assert [e["data"]["i"] for e in events] == list(range(1000))
        assert client.frames - frames_before < 1000, "events were not batched into fewer frames"


async def test_two_profiles_filter_drop_enrich_and_render_once_per_profile() -> None:
    async with InProcessGateway(profiles=PROFILES) as gw:
        chats = [await WsClient.connect(gw.ws_url("conv_id=p1&profile=chat")) for _ in range(5)]
        timelines = [await WsClient.connect(gw.ws_url("conv_id=p1&profile=timeline")) for _ in range(5)]
        for c in chats + timelines:
            await c.expect("ws.subscribed")
        renders_before = gw.gateway.hub.stats.renders
        published = [
            ("chat.msg", {"text": "hi", "raw": "xx", "usage": {"tokens": 5, "cost": 1}}),
            ("timeline.upsert", {"id": "m1"}),
            ("llm.thinking.delta", {"t": "hmm"}),
            ("debug.trace", {"x": 1}),
            ("llm.delta", {"text": "yo"}),
        ]
        for etype, data in published:
            await publish(gw, "p1", etype, data)
        for c in chats:
            got = await c.events(2)
            assert [(e["type"], e["seq"]) for e in got] == [("chat.msg", 1), ("llm.delta", 5)]
            assert got[0]["data"] == {"text": "hi", "usage": {"cost": 1}}
            assert got[0]["badge"] == "chat:1" and got[1]["badge"] == "chat:5"
        for c in timelines:
            got = await c.events(1)
            assert [(e["type"], e["seq"], e["data"]) for e in got] == [("timeline.upsert", 2, {"id": "m1"})]
        # one render per (event, profile): 5 events x 2 profiles, however many connections
        assert gw.gateway.hub.stats.renders - renders_before == 10


async def test_types_narrow_never_widen() -> None:
    async with InProcessGateway() as gw:
        narrow = await WsClient.connect(gw.ws_url("conv_id=t1&types=chat.*,debug.*"))
        await narrow.expect("ws.subscribed")
        for etype in ("chat.a", "llm.b", "debug.c", "chat.d"):
            await publish(gw, "t1", etype)
        got = await narrow.events(2)
        assert [(e["type"], e["seq"]) for e in got] == [("chat.a", 1), ("chat.d", 4)]  # debug.* stays hidden


async def test_several_conversations_on_one_socket_and_unsubscribe() -> None:
    async with InProcessGateway() as gw:
        client = await WsClient.connect(gw.ws_url())
        await client.expect("ws.hello")
        for conv in ("m1", "m2"):
            await client.send_json({"type": "ws.subscribe", "conv_id": conv})
            await client.expect("ws.subscribed")
        await publish(gw, "m1", "chat.a")
        await publish(gw, "m2", "chat.b")
        got = await client.events(2)
        assert {(e["conv_id"], e["type"]) for e in got} == {("m1", "chat.a"), ("m2", "chat.b")}
        await client.send_json({"type": "ws.unsubscribe", "conv_id": "m1"})
        assert await client.expect("ws.unsubscribed") == {"type": "ws.unsubscribed", "conv_id": "m1"}
        await publish(gw, "m1", "chat.hidden")
        await publish(gw, "m2", "chat.c")
        got = await client.events(1)
        assert (got[0]["conv_id"], got[0]["type"]) == ("m2", "chat.c")


async def test_200_sockets_subscribing_at_once_all_receive_everything() -> None:
    async with InProcessGateway() as gw:
        clients = await asyncio.gather(*(WsClient.connect(gw.ws_url("conv_id=herd")) for _ in range(200)))
        await asyncio.gather(*(c.expect("ws.subscribed") for c in clients))
        for i in range(20):
            await publish(gw, "herd", "chat.msg", {"i": i})
        results = await asyncio.gather(*(c.events(20, timeout=20) for c in clients))
        for got in results:
            assert [e["seq"] for e in got] == list(range(1, 21))
        assert gw.gateway.backend.stats.channel_subscribes == 1
        await asyncio.gather(*(c.close() for c in clients))


async def test_slow_reader_closed_4408_fast_reader_gets_everything_memory_bounded() -> None:
    limit = 64 * 1024
    async with InProcessGateway(Settings(max_queue_bytes=limit)) as gw:
        fast = await WsClient.connect(gw.ws_url("conv_id=slow"))
        slow = StalledClient(gw.ws_url("conv_id=slow"), gw.settings.port)
        await asyncio.to_thread(slow.handshake)
        await fast.expect("ws.subscribed")
        await async_wait_until(lambda: sum(gw.gateway.hub.presence_counts("slow").values()), timeout=15,
                               message="the slow client to subscribe", until=lambda n: n >= 2)
        payload = {"blob": "x" * 2000}
        total = 3000  # ~6 MB: far beyond the slow socket's TCP buffers plus the queue limit
        peak = 0
        got: list[dict[str, Any]] = []

        async def read_all() -> None:
            while len(got) < total:
                got.extend(await fast.events(1, timeout=40))

        reader = asyncio.create_task(read_all())

        def caught_up(count: int) -> bool:
            return len(got) >= count or reader.done()

        for sent in range(0, total, 15):  # 30 KB bursts: under the limit for a reader that keeps up
            # "Keeps up" at any speed: the next burst goes once the fast reader has all the previous ones.
            await async_wait_until(functools.partial(caught_up, sent), timeout=30,
                                   message=f"the fast reader to get {sent} events")
            await gw.gateway.backend.publish_many([PublishRequest("slow", "chat.big", payload)] * 15)
            peak = max(peak, max((c.queued_bytes for c in gw.gateway.pool.connections.values()), default=0))
        await reader
        assert [e["seq"] for e in got] == list(range(1, total + 1))
        assert gw.gateway.pool.stats.slow_consumer_closes == 1
        assert peak <= limit + 4096, f"a connection queued {peak} bytes, over the limit"
        assert await asyncio.to_thread(slow.read_until_closed) == 4408


async def test_http_publish_history_state_presence_and_errors() -> None:
    async with InProcessGateway(Settings(max_event_bytes=1000)) as gw:
        ws = await WsClient.connect(gw.ws_url("conv_id=h1&profile=debug"))
        await ws.expect("ws.subscribed")
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            r = await http.post("/v1/conversations/h1/events", json={"type": "chat.msg", "data": {"a": 1}, "id": "x1"})
            assert r.status_code == 200
            body = r.json()
            assert body["seq"] == 1 and body["id"] == "x1" and body["duplicate"] is False and body["conv_id"] == "h1"
            again = await http.post("/v1/conversations/h1/events", json={"type": "chat.msg", "data": {}, "id": "x1"})
            assert again.json()["duplicate"] is True and again.json()["seq"] == 1
            await http.post("/v1/conversations/h1/events", json={"type": "debug.t", "data": 2})
            hist = (await http.get("/v1/conversations/h1/events", params={"since": 0})).json()
            assert [e["seq"] for e in hist["events"]] == [1]  # default profile hides debug.*
            hist = (await http.get("/v1/conversations/h1/events", params={"since": 0, "profile": "debug"})).json()
            assert [e["seq"] for e in hist["events"]] == [1, 2] and hist["seq"] == 2
            assert hist["epoch"] == body["epoch"]
            limited = (await http.get("/v1/conversations/h1/events", params={"since": 0, "limit": 1,
                                                                                "profile": "debug"})).json()
            assert [e["seq"] for e in limited["events"]] == [1]

            for payload, status in [({"type": "ws.hello"}, 422), ({"type": "bad type"}, 422), ({"data": 1}, 422),
                                    ({"type": "a", "extra": 1}, 422), ({"type": "a", "data": "x" * 2000}, 413)]:
                r = await http.post("/v1/conversations/h1/events", json=payload)
                assert r.status_code == status, (payload, r.text)
                assert r.json()["error"] and r.json()["message"]
            r = await http.post("/v1/conversations/h1/events", content=b"{nope", headers=JSON_TYPE)
            assert r.status_code == 422
            r = await http.post("/v1/conversations/bad%20id/events", json={"type": "a"})
            assert r.status_code == 422
            r = await http.post("/v1/conversations/h1/events", content=b"x" * 200_000, headers=JSON_TYPE)
            assert r.status_code == 413
            r = await http.get("/v1/conversations/h1/events", params={"since": "x"})
            assert r.status_code == 422

            presence = await async_wait_until(lambda: get_json(http, "/v1/conversations/h1/presence"), timeout=15,
                                              message="presence to count the websocket",
                                              until=lambda p: p.get("connections") == 1)
            assert presence == {"conv_id": "h1", "connections": 1, "by_profile": {"debug": 1}}
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/readyz")).json() == {"status": "ready"}
            metrics = (await http.get("/metrics")).text
            for name in ("broadcaster_connections", "broadcaster_events_out_total", "broadcaster_frames_written_total",
                         "broadcaster_drops_total", "broadcaster_publish_to_dispatch_seconds_bucket"):
                assert name in metrics
        got = await ws.events(2)
        assert [e["seq"] for e in got] == [1, 2]  # the duplicate fanned out nothing


async def test_publish_key_required_when_set() -> None:
    async with InProcessGateway(Settings(publish_key=["k1", "k2"])) as gw:
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            url = "/v1/conversations/k/events"
            assert (await http.post(url, json={"type": "a"})).status_code == 401
            assert (await http.post(url, json={"type": "a"}, headers={"Authorization": "Bearer no"})).status_code == 403
            ok = await http.post(url, json={"type": "a"}, headers={"Authorization": "Bearer k2"})
            assert ok.status_code == 200 and ok.json()["seq"] == 1


@pytest.mark.parametrize("setting", ["shared", "deflate", "off"])
async def test_ws_compression_option_decides_permessage_deflate(setting: str) -> None:
    """A client offering permessage-deflate (as browsers do) gets it unless --ws-compression off; under
    ``shared`` (the default) without context takeover either way, under ``deflate`` with it."""
    async with InProcessGateway(Settings(ws_compression=setting)) as gw:
        async with websockets.connect(gw.ws_url("conv_id=z"), compression="deflate") as ws:
            negotiated = [ext.name for ext in ws.protocol.extensions]
            assert negotiated == ([] if setting == "off" else ["permessage-deflate"])
            if setting != "off":
                stateless = setting == "shared"
                ext: Any = ws.protocol.extensions[0]
                assert (ext.local_no_context_takeover, ext.remote_no_context_takeover) == (stateless, stateless)
            await gw.gateway.backend.publish("z", "chat.msg", {"n": 1})
            seen = ""
            while '"chat.msg"' not in seen:
                seen = str(await asyncio.wait_for(ws.recv(), 10))
            assert '"n":1' in seen
