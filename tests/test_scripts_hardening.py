"""The Lua scripts' hardening (issue #13 item 4): reads never write, a conversation's
first publish adopts the epoch reads announced for it, a failed event consumes no seq,
and id and batch keys of a lost epoch are ignored.

Against the local Redis (keys under a prefix of the test, counted with SCAN MATCH), a
private redis-server where a test restarts or flushes it, and fakeredis (the INFO-less
fallback of the scripts) where noted.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import pytest
import redis

from broadcaster.backend import BackendSettings, BackendStats
from broadcaster.backends import scripts
from broadcaster.backends.base import prepare_publish
from broadcaster.backends.memory import EPOCH_PERIOD
from broadcaster.backends.redis import RedisBackend
from broadcaster.envelope import PublishRequest
from broadcaster.keys import KeyLayout
from gateway.settings import Settings
from tests.backend_suite import wait_for
from tests.support.gateway import InProcessGateway
from tests.support.redis_server import RedisServer
from tests.support.wsclient import WsClient

SCRIPTS_DIR = Path(scripts.__file__).parent
SETTINGS = BackendSettings(unsubscribe_delay=0)


@pytest.fixture(params=["redis", "fakeredis"])
def client(request: pytest.FixtureRequest, key_prefix: str) -> Iterator[tuple[redis.Redis, KeyLayout]]:
    """A blocking client on the local Redis or on fakeredis, scripts loaded; its prefix' keys deleted after."""
    conn: redis.Redis
    if request.param == "fakeredis":
        conn = fakeredis.FakeRedis()
    else:
        conn = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    for script in scripts.SCRIPTS:
        conn.script_load(script.source)
    yield conn, KeyLayout(key_prefix)
    keys = list(conn.scan_iter(match=f"{key_prefix}:*"))
    if keys:
        conn.delete(*keys)
    conn.close()


def keys_of(conn: redis.Redis, prefix: str) -> list[bytes]:
    return sorted(conn.scan_iter(match=f"{prefix}:*", count=1000))


@pytest.fixture
def local(redis_url: str, key_prefix: str) -> Iterator[redis.Redis]:
    """A client on the local Redis; the keys under the test's prefix are deleted after the test."""
    conn = redis.Redis.from_url(redis_url)
    yield conn
    keys = keys_of(conn, key_prefix)
    if keys:
        conn.delete(*keys)
    conn.close()


def read(conn: redis.Redis, layout: KeyLayout, conv: str, op: str, since: int = 0) -> Any:
    return conn.execute_command(*scripts.read_call(layout, conv, op, "caller-epoch", 600, since, 0))


def publish_one(conn: redis.Redis, layout: KeyLayout, conv: str, data: Any = None, *, id: str | None = None,
                epoch: str = "callers-own") -> Any:
    """The README's one-event form, with the (now ignored) caller epoch argument."""
    prepared = prepare_publish(PublishRequest(conv, "t.x", data, id), 600)
    keys, args = scripts.publish_call(layout, prepared, BackendSettings(), epoch, False)
    return conn.execute_command(*scripts.PUBLISH.command(keys, args))


def run_batch(conn: redis.Redis, batch: scripts.PublishBatch) -> list[Any]:
    """Send ``batch``'s pending calls one by one; error replies come back as values."""
    replies: list[Any] = []
    for command in batch.commands():
        try:
            replies.append(conn.execute_command(*command))
        except redis.ResponseError as exc:
            replies.append(exc)
    return replies


def events(conv: str, count: int, **options: Any) -> list[Any]:
    return [prepare_publish(PublishRequest(conv, "t.x", {"i": i}, **options), 600) for i in range(count)]


# --- reads are read-only --------------------------------------------------------------


async def test_10000_reads_of_unknown_conversations_store_no_key(key_prefix: str) -> None:
    """head, history and state of 10,000 names that were never published: not one key appears.

    On a server of its own: the announced epoch hangs on the server's flush counts and
    INFO stats (read.lua's unborn_epoch), which a FLUSHDB or CONFIG RESETSTAT by anyone
    else on a shared Redis changes between the two reads of the stability check.
    """
    with RedisServer() as server:
        backend = RedisBackend(server.url, key_prefix=key_prefix, settings=SETTINGS)
        await backend.start()
        conn = server.client()
        try:
            assert keys_of(conn, key_prefix) == []
            names = [f"nobody-{secrets.token_hex(8)}" for _ in range(10_000)]
            reads = (backend.head, backend.history, backend.state)
            for start in range(0, len(names), 500):
                answers = await asyncio.gather(*(reads[i % 3](name)
                                                 for i, name in enumerate(names[start:start + 500])))
                assert all(a.seq == 0 for a in answers)
            assert keys_of(conn, key_prefix) == []  # measured: 0 keys before, 0 after (the old read.lua: 10,000)
            epochs = [(await backend.head(name)).epoch for name in names[:50]]
            assert epochs == [(await backend.head(name)).epoch for name in names[:50]]  # stable between reads
            assert len(set(epochs)) == 50  # and one per conversation
            assert keys_of(conn, key_prefix) == []
        finally:
            await backend.close()
            conn.close()


def test_reads_store_nothing_on_both_servers(client: tuple[redis.Redis, KeyLayout]) -> None:
    """The same on fakeredis (no INFO, no redis.sha1hex: the scripts' fallbacks), op by op."""
    conn, layout = client
    for i in range(300):
        conv = f"ghost-{i}"
        assert read(conn, layout, conv, "head")[1] == 0
        assert read(conn, layout, conv, "history")[1:] == [0, 0]
        assert read(conn, layout, conv, "state")[1] == 0
    assert keys_of(conn, layout.prefix) == []


async def test_unknown_conversations_subscribed_over_the_gateway_leave_no_key(
    redis_url: str, key_prefix: str, local: redis.Redis,
) -> None:
    """A sample through a real /ws and the HTTP reads: 300 subscriptions and 60 reads, then no key at all."""
    conn = local
    async with InProcessGateway(Settings(redis_url=redis_url, key_prefix=key_prefix,
                                         client_messages_per_second=1000.0)) as gw, \
            httpx.AsyncClient(base_url=gw.http_url) as http:
        clients = [await WsClient.connect(gw.ws_url()) for _ in range(3)]
        for n, ws in enumerate(clients):
            await ws.expect("ws.hello")
            for i in range(100):
                query: dict[str, Any] = {"type": "ws.subscribe", "conv_id": f"ws-{n}-{i}"}
                if i % 3 == 1:
                    query.update(since=5, epoch="0123456789ab")
                elif i % 3 == 2:
                    query["hydrate"] = True
                await ws.send_json(query)
            subscribed = await ws.until(lambda got: len(got) == 100, keep=lambda o: o["type"] == "ws.subscribed")
            assert {o["seq"] for o in subscribed} == {0}
        for i in range(30):
            assert (await http.get(f"/v1/conversations/http-{i}/events?since=0")).json()["seq"] == 0
            assert (await http.get(f"/v1/conversations/http-{i}/state")).json()["entities"] == {}
        assert all(key.endswith(b":presence") for key in keys_of(conn, key_prefix))
        for ws in clients:
            await ws.close()
        # presence hashes exist while the sockets are subscribed; withdrawn, they are all that was written
        await wait_for(lambda: keys_of(conn, key_prefix) == [], timeout=10, what="no key left under the prefix")


# --- the epoch of a conversation not created yet ----------------------------------------


def test_the_first_publish_adopts_the_epoch_reads_announced(client: tuple[redis.Redis, KeyLayout]) -> None:
    """Both script forms; the caller's epoch argument (the README shape) is accepted and ignored."""
    conn, layout = client
    announced = read(conn, layout, "one", "head")[0]
    assert read(conn, layout, "one", "history")[0] == read(conn, layout, "one", "state")[0] == announced
    reply = publish_one(conn, layout, "one", {"a": 1}, epoch="ffffffffffff")
    assert (reply[0], reply[1], reply[2]) == (1, announced, 0)
    assert read(conn, layout, "one", "head") == [announced, 1]

    announced = read(conn, layout, "many", "head")[0]
    batch = scripts.PublishBatch(layout, events("many", 3), SETTINGS, "ignored", False)
    batch.feed(run_batch(conn, batch))
    assert {(r.epoch, r.duplicate) for r in batch.results()} == {(announced.decode(), False)}
    assert read(conn, layout, "other", "head")[0] != announced


async def test_a_subscriber_from_before_the_first_publish_gets_it_without_reset_and_resumes(
    redis_url: str, key_prefix: str, local: redis.Redis,
) -> None:
    async with InProcessGateway(Settings(redis_url=redis_url, key_prefix=key_prefix)) as gw:
        publisher = RedisBackend(redis_url, key_prefix=key_prefix, settings=SETTINGS)
        await publisher.start()
        try:
            early = await WsClient.connect(gw.ws_url("conv_id=later&since=0"))
            subscribed = await early.expect("ws.subscribed")
            assert subscribed["seq"] == 0
            results = [await publisher.publish("later", "chat.msg", {"i": i}) for i in range(3)]
            assert {r.epoch for r in results} == {subscribed["epoch"]}
            got = await early.until(lambda objs: len(objs) == 3, keep=lambda o: o["type"] != "ws.hello")
            assert [(o["type"], o.get("seq")) for o in got] == [("chat.msg", 1), ("chat.msg", 2), ("chat.msg", 3)]
            await early.close()
            await publisher.publish("later", "chat.msg", {"i": 3})
            resumed = await WsClient.connect(gw.ws_url(f"conv_id=later&since=2&epoch={subscribed['epoch']}"))
            got = await resumed.until(lambda objs: len(objs) == 3, keep=lambda o: o["type"] != "ws.hello")
            assert [(o["type"], o.get("seq")) for o in got] == [("ws.subscribed", 4), ("chat.msg", 3),
                                                                ("chat.msg", 4)]
            await resumed.close()
        finally:
            await publisher.close()


def test_restart_and_flush_change_the_announced_epoch() -> None:
    """What the derivation hangs on: a restart (run id) and FLUSHALL / FLUSHDB change the epoch of
    an unknown conversation, so a client holding the old one is reset rather than skipping events."""
    layout = KeyLayout("hard")
    with RedisServer() as server:
        conn = server.client()
        for script in scripts.SCRIPTS:
            conn.script_load(script.source)
        first = read(conn, layout, "c", "head")[0]
        assert publish_one(conn, layout, "c", 1)[1] == first
        conn.flushall()
        for script in scripts.SCRIPTS:
            conn.script_load(script.source)
        after_flush = read(conn, layout, "c", "head")
        assert after_flush[1] == 0 and after_flush[0] != first
        conn.flushdb()
        after_flushdb = read(conn, layout, "c", "head")[0]
        assert after_flushdb not in (first, after_flush[0])
        conn.close()
        server.restart()
        conn = server.client()
        for script in scripts.SCRIPTS:
            conn.script_load(script.source)
        after_restart = read(conn, layout, "c", "head")[0]
        assert after_restart not in (first, after_flush[0], after_flushdb)
        assert publish_one(conn, layout, "c", 1)[1] == after_restart
        conn.close()


def _unborn_block(name: str) -> str:
    source = (SCRIPTS_DIR / f"{name}.lua").read_text()
    return source[source.index("-- >>> unborn epoch"):source.index("-- <<< unborn epoch")]


def test_read_and_publish_derive_the_same_epoch_and_periods_roll_it(client: tuple[redis.Redis, KeyLayout]) -> None:
    """The derivation is one text in both scripts; the period part changes the epoch once per EPOCH_PERIOD.

    A conversation's meta hash lives at least EPOCH_PERIOD (see test_redis_backend's TTL
    test), so one created again after it expired is always in a later period: its epoch differs.
    """
    conn, _ = client
    block = _unborn_block("read")
    assert block == _unborn_block("publish")
    assert f"local EPOCH_PERIOD = {EPOCH_PERIOD}\n" in block  # the memory backend's constant
    # the same function with TIME taken from ARGV[1]: epochs at several instants
    probe = block.replace("redis.call('TIME')[1]", "ARGV[1]") + "\nreturn unborn_epoch(KEYS[1])"
    assert "redis.call('TIME')" not in probe
    sha = conn.script_load(probe)

    def at(t: int, key: str = "bc:{c}:meta") -> bytes:
        epoch: bytes = conn.evalsha(sha, 1, key, t)
        assert re.fullmatch(rb"[0-9a-f]{12}", epoch)
        return epoch

    base = 1_800_000_000
    by_day = [at(base + day * EPOCH_PERIOD) for day in range(5)]
    assert len(set(by_day)) == 5  # a period later: always another epoch
    within = [at(base + s) for s in range(0, EPOCH_PERIOD, 3600)]
    assert len(set(within)) <= 2  # within one period's length: at most one boundary, per conversation
    phases = {at(base, f"bc:{{c{i}}}:meta") != at(base + 3600, f"bc:{{c{i}}}:meta") for i in range(200)}
    assert phases == {False, True}  # boundaries are spread over the day, not all at once


def test_the_epoch_outlives_a_short_history_ttl(client: tuple[redis.Redis, KeyLayout]) -> None:
    """The meta hash lives max(history ttl, EPOCH_PERIOD); once the log expired, publishing goes on in
    the same epoch (a resumer gets history_truncated, not a renumbering) and the new log gets its TTL."""
    conn, layout = client
    short = BackendSettings(history_ttl=600)
    batch = scripts.PublishBatch(layout, events("short", 1), short, "", False)
    batch.feed(run_batch(conn, batch))
    [first] = batch.results()
    assert EPOCH_PERIOD - 10 <= conn.ttl(layout.meta("short")) <= EPOCH_PERIOD
    assert 590 <= conn.ttl(layout.log("short")) <= 600
    conn.delete(layout.log("short"))  # the log expired (10 minutes later) ...
    conn.expire(layout.meta("short"), EPOCH_PERIOD - 600)  # ... and so did as much of the meta hash's TTL
    batch = scripts.PublishBatch(layout, events("short", 1), short, "", False)
    batch.feed(run_batch(conn, batch))
    [second] = batch.results()
    assert (second.seq, second.epoch) == (2, first.epoch)
    assert 590 <= conn.ttl(layout.log("short")) <= 600
    assert EPOCH_PERIOD - 10 <= conn.ttl(layout.meta("short")) <= EPOCH_PERIOD
    page = scripts.parse_history(read(conn, layout, "short", "history"), 0, BackendStats())
    assert ([e.seq for e in page.events], page.truncated) == ([2], True)


# --- a failed event consumes no seq -------------------------------------------------------


def _break_log(conn: redis.Redis, layout: KeyLayout, conv: str) -> None:
    conn.rename(layout.log(conv), layout.log(conv) + ":saved")
    conn.set(layout.log(conv), "not a stream")  # XADD answers WRONGTYPE


def _mend_log(conn: redis.Redis, layout: KeyLayout, conv: str) -> None:
    conn.delete(layout.log(conv))
    conn.rename(layout.log(conv) + ":saved", layout.log(conv))


def test_a_failed_xadd_leaves_no_hole(client: tuple[redis.Redis, KeyLayout]) -> None:
    """One-event and batch forms: the call fails, the seq counter does not move, the next event is seq + 1."""
    conn, layout = client
    assert publish_one(conn, layout, "hole", 0)[0] == 1
    _break_log(conn, layout, "hole")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        publish_one(conn, layout, "hole", 1)
    batch = scripts.PublishBatch(layout, events("hole", 3), SETTINGS, "", False)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        batch.feed(run_batch(conn, batch))
    assert int(conn.hget(layout.meta("hole"), "seq")) == 1
    assert list(conn.scan_iter(match=layout.batch("hole", "*"))) == []  # nothing applied: no batch key either
    _mend_log(conn, layout, "hole")
    assert publish_one(conn, layout, "hole", 2)[0] == 2
    reply = read(conn, layout, "hole", "history", since=1)
    page = scripts.parse_history(reply, 1, BackendStats())
    assert ([e.seq for e in page.events], page.truncated) == ([2], False)  # no needless history_truncated


def test_a_batch_failing_part_way_records_what_it_applied_and_its_retry_goes_on(
    client: tuple[redis.Redis, KeyLayout],
) -> None:
    """The 3rd event's id key has the wrong type: events 1-2 stay applied and are in the batch key;
    the retry answers them as duplicates and publishes 3-4, each event once in history."""
    conn, layout = client
    assert publish_one(conn, layout, "part", 0)[0] == 1  # the conversation exists (a new one drops stale keys)
    evs = [*events("part", 2), *events("part", 1, id="chosen"), *events("part", 1)]
    conn.hset(layout.idempotency("part", "chosen"), "x", "y")  # GET answers WRONGTYPE, before any write
    batch = scripts.PublishBatch(layout, evs, SETTINGS, "", False)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        batch.feed(run_batch(conn, batch))
    assert int(conn.hget(layout.meta("part"), "seq")) == 3
    [batch_key] = conn.scan_iter(match=layout.batch("part", "*"))
    epoch = read(conn, layout, "part", "head")[0]
    assert conn.get(batch_key) == epoch + b":2 3"
    conn.delete(layout.idempotency("part", "chosen"))
    batch.feed(run_batch(conn, batch))  # the retry
    assert [(r.seq, r.duplicate) for r in batch.results()] == [(2, True), (3, True), (4, False), (5, False)]
    assert [i for i, _ in conn.xrange(layout.log("part"))] == [b"1-0", b"2-0", b"3-0", b"4-0", b"5-0"]
    assert conn.get(batch_key) == epoch + b":2 3 4 5"


# --- id and batch keys of a lost epoch -----------------------------------------------------


def _lose_epoch(conn: redis.Redis, layout: KeyLayout, conv: str) -> None:
    """The conversation's numbering was lost and started over (an eviction, say) while its id
    and batch keys lived on: a new epoch, seq 0, nothing in history."""
    conn.delete(layout.meta(conv), layout.log(conv), layout.state(conv), layout.state_order(conv))
    conn.hset(layout.meta(conv), mapping={"epoch": "0a0a0a0a0a0a", "seq": 0})


def test_a_batch_key_of_a_lost_epoch_is_ignored(client: tuple[redis.Redis, KeyLayout]) -> None:
    conn, layout = client
    batch = scripts.PublishBatch(layout, events("lost", 3), SETTINGS, "", False)
    run_batch(conn, batch)  # applied; pretend the reply was lost
    _lose_epoch(conn, layout, "lost")
    batch.feed(run_batch(conn, batch))  # the retry: the batch key names seqs of the lost epoch
    results = batch.results()
    assert [(r.seq, r.duplicate, r.epoch) for r in results] == [(i, False, "0a0a0a0a0a0a") for i in (1, 2, 3)]
    assert conn.xlen(layout.log("lost")) == 3  # really published in the new epoch


def test_an_id_key_of_a_lost_epoch_is_ignored(client: tuple[redis.Redis, KeyLayout]) -> None:
    conn, layout = client
    assert publish_one(conn, layout, "lostid", 1, id="evt")[2] == 0
    assert publish_one(conn, layout, "lostid", 1, id="evt")[2] == 1  # a duplicate within the epoch
    _lose_epoch(conn, layout, "lostid")
    again = publish_one(conn, layout, "lostid", 1, id="evt")
    assert (again[0], again[1], again[2]) == (1, b"0a0a0a0a0a0a", 0)  # published, not a duplicate of a lost seq
    batch = scripts.PublishBatch(layout, events("lostid", 1, id="evt"), SETTINGS, "", False)
    batch.feed(run_batch(conn, batch))
    assert [(r.seq, r.duplicate) for r in batch.results()] == [(1, True)]  # the new epoch's own record


def test_keys_written_by_the_previous_script_version_still_count(client: tuple[redis.Redis, KeyLayout]) -> None:
    """A rolling upgrade: id and batch keys holding bare seqs (the old format) are taken as the current epoch's."""
    conn, layout = client
    publish_one(conn, layout, "old", 1)
    conn.set(layout.idempotency("old", "legacy"), "1", ex=600)
    assert publish_one(conn, layout, "old", 2, id="legacy")[0:3:2] == [1, 1]
    batch = scripts.PublishBatch(layout, events("old", 2), SETTINGS, "", False)
    [command] = batch.commands()
    conn.set(command[8], "1 1", ex=600)  # KEYS[6]: this batch's key, as the old script wrote it
    batch.feed(run_batch(conn, batch))
    assert [(r.seq, r.duplicate) for r in batch.results()] == [(1, True), (1, True)]
