"""Append to a keyed state entry (#17 item 1) on every backend, through the SDK, HTTP, the CLI and /ws."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgpack
import pytest

from broadcaster.backend import Backend, BackendSettings
from broadcaster.backends import scripts
from broadcaster.codec import decode_envelope, encode_envelope
from broadcaster.envelope import Envelope, PublishRequest, apply_append
from broadcaster.errors import ValidationError
from broadcaster.keys import KeyLayout
from gateway.settings import Settings
from producers import AsyncProducer, Producer
from tests.backend_suite import KINDS, Harness, wait_for
from tests.support.gateway import InProcessGateway
from tests.support.policy import load_library
from tests.support.sseclient import SseClient
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=KINDS)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    h = Harness(request.param)
    yield h
    await h.close()


# A sequence that crosses every msgpack size class the script reads and writes: fixstr, str8,
# str16, str32 (a text past 64 KiB), a map past 15 keys (map16), nested values copied raw,
# values that are not strings replacing and being replaced, a field that is not a string then is.
STEPS: list[tuple[dict[str, Any] | None, str | None]] = [
    ({"text": "He", "role": "assistant", "n": 1, "meta": {"a": [1, 2, {"b": None}]}}, None),
    ({"text": "llo", "n": 2}, "append"),
    ({"text": " wörld" * 10, "tokens": 7}, "append"),  # past 31 bytes: str8
    ({"text": "x" * 300}, "append"),  # past 255: str16
    ({"n": "now a string", "meta": "replaced"}, "append"),
    ({"n": " and more", "big": -2**40, "f": 1.5, "t": True}, "append"),
    ({f"k{i}": f"v{i}" for i in range(14)}, "append"),  # 20+ fields: map16
    ({"text": "y" * 70_000}, "append"),  # past 65535: str32
]


def expected_after(steps: list[tuple[dict[str, Any] | None, str | None]]) -> Any:
    data: Any = None
    for chunk, op in steps:
        data = apply_append(data, chunk or {}) if op else chunk
    return data


async def publish_steps(b: Backend, conv: str, key: str, batched: bool) -> None:
    requests = [PublishRequest(conv, "llm.message", chunk, None, key, op) for chunk, op in STEPS]
    if batched:
        await b.publish_many(requests)
    else:
        for r in requests:
            await b.publish_many([r])


@pytest.mark.parametrize("batched", [True, False])
async def test_appends_accumulate_in_state_and_history_keeps_the_chunks(harness: Harness, batched: bool) -> None:
    b = await harness.make()
    live: list[Envelope] = []
    await b.subscribe("c1", live.append)
    await publish_steps(b, "c1", "m1", batched)

    snapshot = await b.state("c1")
    entry = snapshot.entities["m1"]
    assert entry.data == expected_after(STEPS)
    assert list(entry.data) == list(expected_after(STEPS))  # field order: old fields first, new ones last
    assert entry.seq == len(STEPS) == snapshot.seq and entry.op is None and entry.key == "m1"
    assert entry.type == "llm.message"

    page = await b.history("c1")
    assert [(e.seq, e.op, e.data) for e in page.events] == [
        (i + 1, op, chunk) for i, (chunk, op) in enumerate(STEPS)]
    await wait_for(lambda: len(live) == len(STEPS), what="live appends")
    assert [(e.op, e.key, e.data) for e in live] == [(op, "m1", chunk) for chunk, op in STEPS]
    assert live[1].event_object()["op"] == "append" and "op" not in live[0].event_object()

    if harness.kind != "memory":  # the script's merged entry is byte for byte what msgpack-python writes
        client = b.commands.client  # type: ignore[attr-defined]
        raw = await client.hget(KeyLayout(harness.prefix).state("c1"), "m1")
        assert encode_envelope(decode_envelope(raw)) == raw


async def test_append_starts_empty_and_replaces_data_that_is_no_object(harness: Harness) -> None:
    b = await harness.make()
    await b.publish_many([PublishRequest("c2", "t.x", {"text": "a"}, key="fresh", op="append")])
    await b.publish("c2", "t.x", ["a", "list"], key="odd")
    await b.publish_many([PublishRequest("c2", "t.x", {"text": "b"}, key="odd", op="append")])
    await b.publish("c2", "t.x", None, key="gone")  # nothing to delete: no entry
    snapshot = await b.state("c2")
    assert {k: (e.data, e.seq) for k, e in snapshot.entities.items()} == {
        "fresh": ({"text": "a"}, 1), "odd": ({"text": "b"}, 3)}


async def test_append_state_caps_count_the_merged_entry(harness: Harness) -> None:
    b = await harness.make(BackendSettings(unsubscribe_delay=0, state_max_entries=2))
    for key in ("a", "b", "c"):
        await b.publish_many([PublishRequest("c3", "t.x", {"text": key}, key=key, op="append")])
    await b.publish_many([PublishRequest("c3", "t.x", {"text": "+"}, key="b", op="append")])
    snapshot = await b.state("c3")
    assert {k: e.data["text"] for k, e in snapshot.entities.items()} == {"c": "c", "b": "b+"}


@pytest.mark.parametrize("request_", [
    PublishRequest("c", "t.x", {"text": "a"}, op="append"),  # no key
    PublishRequest("c", "t.x", ["a"], key="k", op="append"),  # not an object
    PublishRequest("c", "t.x", None, key="k", op="append"),
    PublishRequest("c", "t.x", {}, key="k", op="append"),
    PublishRequest("c", "t.x", {"text": "a"}, key="k", op="prepend"),
])
async def test_bad_appends_are_refused_before_anything_is_sent(request_: PublishRequest) -> None:
    from broadcaster.backends.memory import MemoryBackend

    with pytest.raises(ValidationError):
        await MemoryBackend().publish_many([request_])


async def test_raw_script_call_appends_and_refuses_data_that_is_no_map(redis_url: str, key_prefix: str) -> None:
    """The README's one-event FCALL with ARGV[13] "append"; a non-map chunk takes no seq."""
    import redis.asyncio as aredis

    library = load_library(redis_url, key_prefix)
    layout = KeyLayout(key_prefix)
    client = aredis.Redis.from_url(redis_url)
    try:
        def call(data: Any, event_id: str, op: str = "append") -> Any:
            keys = [layout.meta("r"), layout.log("r"), layout.live("r"), layout.state("r"),
                    layout.state_order("r"), layout.idempotency("r", event_id)]
            args = ["r", event_id, "llm.message", msgpack.packb(data), "m", 1000, 600, 600, "", 100, "0", 0, op]
            return client.fcall(library.publish_function, len(keys), *keys, *args)

        assert (await call({"text": "a"}, "e1"))[0] == 1
        assert (await call({"text": "b", "x": 1}, "e2"))[0] == 2
        for bad in (["no", "map"], "text", {1: "int key"}):
            with pytest.raises(Exception, match="BADAPPEND"):
                await call(bad, f"bad-{bad!r}")
        with pytest.raises(Exception, match="BADAPPEND unknown op"):
            await call({"text": "c"}, "e3", op="prepend")
        assert (await call({"text": "c"}, "e4"))[0] == 3  # no seq was taken by the refusals
        raw = await client.hget(layout.state("r"), "m")
        entry = decode_envelope(raw)
        assert (entry.data, entry.seq) == ({"text": "abc", "x": 1}, 3)
        stored = await client.xrange(layout.log("r"))
        assert [decode_envelope(fields[b"p"]).op for _, fields in stored] == ["append"] * 3
    finally:
        await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def gateway(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[InProcessGateway]:
    backend = None
    if request.param == "redis":
        from broadcaster.backends.redis import RedisBackend

        backend = RedisBackend(request.getfixturevalue("redis_url"), key_prefix=key_prefix,
                               settings=BackendSettings())
    async with InProcessGateway(Settings(), backend=backend) as gw:
        yield gw


async def test_ws_live_hydrate_resume_and_http_state_see_appends(gateway: InProcessGateway) -> None:
    """Live: the chunks with op/key; hydrate and GET /state: the whole entry; resume: the chunks again."""
    live = await WsClient.connect(gateway.ws_url("conv_id=w&since=0"))
    await live.expect("ws.subscribed")
    async with httpx.AsyncClient(base_url=gateway.http_url) as http:
        chunks = ["Hel", "lo", ", ", "world"]
        for i, text in enumerate(chunks):
            r = await http.post("/v1/conversations/w/events",
                                json={"type": "llm.message", "data": {"text": text, "i": i}, "key": "a1",
                                      "op": "append"})
            assert r.status_code == 200, r.text
        bad = await http.post("/v1/conversations/w/events",
                              json={"type": "llm.message", "data": "no object", "key": "a1", "op": "append"})
        assert bad.status_code == 422 and bad.json()["field"] == "data"
        events = await live.events(4)
        assert [(e["op"], e["key"], e["data"]["text"], e["seq"]) for e in events] == [
            ("append", "a1", t, i + 1) for i, t in enumerate(chunks)]

        state = (await http.get("/v1/conversations/w/state")).json()
        assert state["entities"]["a1"]["data"] == {"text": "Hello, world", "i": 3}
        assert state["entities"]["a1"]["seq"] == 4 and "op" not in state["entities"]["a1"]

    late = await WsClient.connect(gateway.ws_url("conv_id=w&hydrate=1"))
    hydrated = await late.expect("ws.state")
    assert hydrated["entities"]["a1"]["data"]["text"] == "Hello, world" and hydrated["seq"] == 4
    resumed = await WsClient.connect(gateway.ws_url("conv_id=w&since=2"))
    replay = await resumed.events(2)
    assert [(e["seq"], e["op"], e["data"]["text"]) for e in replay] == [(3, "append", ", "), (4, "append", "world")]
    # SSE frames the same JSON: op and key pass unchanged, hydrate gives the whole entry
    async with await SseClient.open(gateway.settings.port, "/sse?conv_id=w&since=3") as sse:
        (event,) = await sse.events(1)
        assert (event.json()["op"], event.json()["key"], event.json()["data"]["text"]) == ("append", "a1", "world")
    async with await SseClient.open(gateway.settings.port, "/sse?conv_id=w&hydrate=1") as sse:
        first = await sse.next()
        while first.event != "ws.state":  # ws.hello, ws.subscribed
            first = await sse.next()
        assert first.json()["entities"]["a1"]["data"]["text"] == "Hello, world"
    for ws in (live, late, resumed):
        await ws.close()


async def test_sdk_sync_async_and_cli_append_over_redis_and_http(redis_url: str, key_prefix: str) -> None:
    load_library(redis_url, key_prefix)
    from broadcaster.backends.redis import RedisBackend

    backend = RedisBackend(redis_url, key_prefix=key_prefix, settings=BackendSettings())
    async with InProcessGateway(Settings(), backend=backend) as gw:
        def sync_part() -> None:
            with Producer.from_url(redis_url, key_prefix=key_prefix) as p:
                p.publish("s", "llm.message", {"text": "a"}, key="m", op="append")
                p.publish_many([("s", "llm.message", {"text": "b"}, None, "m", "append"),
                                PublishRequest("s", "llm.message", {"text": "c"}, key="m", op="append")])
                with pytest.raises(ValidationError):
                    p.publish("s", "llm.message", {"text": "x"}, op="append")
            with Producer.from_url(gw.http_url) as p:
                p.publish("s", "llm.message", {"text": "d"}, key="m", op="append")
                p.publish_many([("s", "llm.message", {"text": "e"}, None, "m", "append")])

        await asyncio.to_thread(sync_part)
        async with AsyncProducer.from_url(redis_url, key_prefix=key_prefix) as ap:
            await ap.publish("s", "llm.message", {"text": "f"}, key="m", op="append")
            await ap.publish_many([("s", "llm.message", {"text": "g"}, None, "m", "append")])
        async with AsyncProducer.from_url(gw.http_url) as ap:
            await ap.publish("s", "llm.message", {"text": "h"}, key="m", op="append")
        cli = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "producers.cli", "s", "llm.message", '{"text": "i"}',
                             "--key", "m", "--op", "append", "--url", gw.http_url],
            capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["seq"] == 9
        snapshot = await gw.gateway.backend.state("s")
        assert snapshot.entities["m"].data == {"text": "abcdefghi"}
        assert [e.op for e in (await gw.gateway.backend.history("s")).events] == ["append"] * 9


async def test_plugins_publish_appends_through_the_publisher() -> None:
    from broadcaster.backends.memory import MemoryBackend
    from broadcaster.hooks import BackendPublisher

    backend = MemoryBackend()
    publisher = BackendPublisher(backend)
    await publisher.publish("p", "llm.message", {"text": "a"}, key="m", op="append")
    await publisher.publish("p", "llm.message", {"text": "b"}, key="m", op="append")
    assert (await backend.state("p")).entities["m"].data == {"text": "ab"}


def test_batch_call_marks_appends_with_code_8() -> None:
    from broadcaster.backends.base import prepare_publish

    events = [prepare_publish(PublishRequest("c", "t.x", {"t": "a"}, key="k", op="append"), 600),
              prepare_publish(PublishRequest("c", "t.x", {"t": "a"}, "chosen", "k", "append"), 600)]
    command = scripts.publish_batch_call(KeyLayout("bc"), "b1", events, BackendSettings(), "e", False, False)
    assert b"JK" in command


def test_an_append_never_runs_on_a_library_from_before_appends(redis_url: str, key_prefix: str) -> None:
    """A library without the append function (version 1, loaded by an older gateway): the SDK's append
    fails as a missing library (retried, then BackendUnavailable) instead of running as a delete."""
    import redis as sync_redis

    from broadcaster.errors import BackendUnavailable

    library = scripts.build_library(key_prefix, BackendSettings().policy_table())
    old = "\n".join(line for line in library.code.splitlines() if "_publish_append'" not in line)
    with sync_redis.Redis.from_url(redis_url) as client:
        has_sha1 = bool(client.execute_command(*scripts.SCRIPTS_HAVE_SHA1))
        client.function_load(scripts.library_code(scripts.FunctionLibrary(
            key_prefix, library.name, old, library.fingerprint, library.description), has_sha1), replace=True)
    with Producer.from_url(redis_url, key_prefix=key_prefix, retry_budget=0.3) as p:
        p.publish("o", "llm.message", {"text": "kept"}, key="m")
        with pytest.raises(BackendUnavailable):
            p.publish("o", "llm.message", {"text": "!"}, key="m", op="append")
    load_library(redis_url, key_prefix)  # a current gateway loads its library: appends work
    with Producer.from_url(redis_url, key_prefix=key_prefix) as p:
        p.publish("o", "llm.message", {"text": "!"}, key="m", op="append")
        assert p.publish("o", "llm.message", {"text": "?"}, key="m", op="append").seq == 3
    with sync_redis.Redis.from_url(redis_url) as client:
        entry = decode_envelope(client.hget(KeyLayout(key_prefix).state("o"), "m"))
    assert entry.data == {"text": "kept!?"}
