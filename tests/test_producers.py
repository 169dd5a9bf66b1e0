"""The producer SDK over Redis: sync and async, idempotency, retries through outages, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis

from broadcaster.backend import BackendSettings
from broadcaster.backends.redis import RedisBackend
from broadcaster.envelope import PublishRequest, PublishResult
from broadcaster.errors import BackendUnavailable, ValidationError
from broadcaster.keys import KeyLayout
from producers import AsyncProducer, Producer
from tests.support.policy import drop_library, load_library
from tests.support.polling import RetryLog, async_wait_until, wait_until
from tests.support.redis_server import RedisServer, free_port
from tests.support.tcp_proxy import TcpProxy


def stored_seqs(url: str, prefix: str, conv: str) -> list[int]:
    """Seqs in the conversation's history stream, read directly."""
    with contextlib.closing(redis.Redis.from_url(url)) as c:
        return [int(entry_id.split(b"-")[0]) for entry_id, _ in c.xrange(KeyLayout(prefix).log(conv))]


@pytest.fixture
def cleanup_prefix(redis_url: str, key_prefix: str) -> Iterator[str]:
    load_library(redis_url, key_prefix)  # what a gateway on this prefix does at start
    yield key_prefix
    drop_library(redis_url, key_prefix)
    with contextlib.closing(redis.Redis.from_url(redis_url)) as c:
        keys = list(c.scan_iter(match=f"{key_prefix}:*"))
        if keys:
            c.delete(*keys)


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    """A redis-server of this test, persisting every write, so it can be killed and restarted."""
    with RedisServer(appendonly=True) as server:
        load_library(server.url, "bc")  # persisted with the data, as a gateway's would be
        yield server


# --- the basics, blocking and asyncio ------------------------------------------


def test_sync_publish_publish_many_presence(redis_url: str, cleanup_prefix: str) -> None:
    with Producer.from_url(redis_url, key_prefix=cleanup_prefix) as p:
        first = p.publish("conv-1", "llm.delta", {"text": "hi"})
        assert (first.conv_id, first.seq, first.duplicate) == ("conv-1", 1, False) and first.id and first.epoch
        many = p.publish_many([("conv-1", "llm.delta", {"n": 1}), ("conv-2", "t.x", None, "my-id"),
                               PublishRequest("conv-1", "timeline.msg", {"n": 2}, key="m1")])
        assert [(r.conv_id, r.seq) for r in many] == [("conv-1", 2), ("conv-2", 1), ("conv-1", 3)]
        assert many[1].id == "my-id" and many[0].epoch == first.epoch
        assert p.presence("conv-1").connections == 0
        assert not p.has_subscribers("conv-1")
    assert stored_seqs(redis_url, cleanup_prefix, "conv-1") == [1, 2, 3]


async def test_async_publish_publish_many_presence(redis_url: str, cleanup_prefix: str) -> None:
    async with AsyncProducer.from_url(redis_url, key_prefix=cleanup_prefix) as p:
        first = await p.publish("a-1", "t.x", [1, 2])
        many = await p.publish_many([("a-1", "t.x", i) for i in range(5)])
        assert [r.seq for r in [first, *many]] == [1, 2, 3, 4, 5, 6]
        assert not await p.has_subscribers("a-1")
        # A gateway's presence report is what producers see.
        backend = RedisBackend(redis_url, key_prefix=cleanup_prefix)
        await backend.report_presence("gw-1", {"a-1": {"default": 2, "debug": 1}}, ttl=30)
        await backend.commands.close()
        presence = await p.presence("a-1")
        assert (presence.connections, presence.by_profile) == (3, {"default": 2, "debug": 1})
        assert await p.has_subscribers("a-1") and await p.has_subscribers("a-1", profile="debug")
        assert not await p.has_subscribers("a-1", profile="chat")


def test_producer_and_gateway_backend_share_the_numbering(redis_url: str, cleanup_prefix: str) -> None:
    with Producer.from_url(redis_url, key_prefix=cleanup_prefix) as p:
        p.publish("shared", "t.x", 1)

    async def from_backend() -> PublishResult:
        backend = RedisBackend(redis_url, key_prefix=cleanup_prefix)
        try:
            return await backend.publish("shared", "t.x", 2)
        finally:
            await backend.commands.close()

    assert asyncio.run(from_backend()).seq == 2


def test_idempotent_republish(redis_url: str, cleanup_prefix: str) -> None:
    with Producer.from_url(redis_url, key_prefix=cleanup_prefix) as p:
        first = p.publish("idem", "t.x", {"v": 1}, id="evt-1")
        again = p.publish("idem", "t.x", {"v": 2}, id="evt-1")
        assert again.duplicate and (again.seq, again.epoch) == (first.seq, first.epoch)
        batch = p.publish_many([("idem", "t.x", 1, "evt-1"), ("idem", "t.x", 2, "evt-2")])
        assert [(r.seq, r.duplicate) for r in batch] == [(1, True), (2, False)]
    assert stored_seqs(redis_url, cleanup_prefix, "idem") == [1, 2]


def test_validation_happens_before_any_io() -> None:
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    with Producer.from_url(unreachable, retry_budget=30) as p:
        began = time.monotonic()
        for call, error in [
            (lambda: p.publish("bad conv", "t.x"), ValidationError),
            (lambda: p.publish("c", "ws.hello"), ValidationError),
            (lambda: p.publish("c", "t.x", b"bytes"), ValidationError),
            (lambda: p.publish("c", "t.x", {1, 2}), ValidationError),
            (lambda: p.publish_many([("c", "t.x", 1), ("c", "ws.x", 1)]), ValidationError),
            (lambda: p.publish_many([("c",)]), ValidationError),
        ]:
            with pytest.raises(error):
                call()
        assert time.monotonic() - began < 0.5  # no connection attempt, no retry


def test_options_are_checked() -> None:
    with pytest.raises(TypeError, match="unknown producer option"):
        Producer.from_url("redis://127.0.0.1:6379/0", histroy_size=5)
    with pytest.raises(TypeError, match="namespace"):  # policy lives on the gateways now
        Producer.from_url("redis://127.0.0.1:6379/0", history_size=5)
    with pytest.raises(ValidationError):
        Producer.from_url("ftp://example.com")


# --- outages -----------------------------------------------------------------------


def test_publish_rides_out_a_redis_restart(aof_redis: RedisServer) -> None:
    with Producer.from_url(aof_redis.url, retry_budget=20) as p:
        before = p.publish("outage", "t.x", 1)
        aof_redis.kill()
        outcome: dict[str, Any] = {}

        def publish_while_down() -> None:
            try:
                outcome["result"] = p.publish("outage", "t.x", 2)
            except BaseException as exc:  # reported to the test thread
                outcome["error"] = exc

        with RetryLog() as retries:
            worker = threading.Thread(target=publish_while_down)
            worker.start()
            # Progress, not time: the worker failed a few attempts against the dead server, and retries.
            wait_until(lambda: retries.by_thread(worker) >= 3 or not worker.is_alive(), timeout=15,
                       message="the worker to retry its publish while Redis is down")
        assert worker.is_alive(), outcome
        aof_redis.restart()
        worker.join(timeout=20)
        assert "error" not in outcome, outcome
        after: PublishResult = outcome["result"]
        # The data survived (AOF): same epoch, the next seq, nothing lost or doubled.
        assert (after.seq, after.epoch, after.duplicate) == (2, before.epoch, False)
    assert stored_seqs(aof_redis.url, "bc", "outage") == [1, 2]


async def test_async_publish_rides_out_a_redis_restart(aof_redis: RedisServer) -> None:
    async with AsyncProducer.from_url(aof_redis.url, retry_budget=20) as p:
        await p.publish("outage", "t.x", 1)
        aof_redis.kill()
        with RetryLog() as retries:
            pending = asyncio.create_task(p.publish_many([("outage", "t.x", i) for i in range(3)]))
            await async_wait_until(lambda: retries.by_task(pending) >= 3 or pending.done(), timeout=15,
                                   message="the batch to be retried while Redis is down")
        assert not pending.done()
        await asyncio.to_thread(aof_redis.restart)
        results = await asyncio.wait_for(pending, 20)
    assert [r.seq for r in results] == [2, 3, 4]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_unavailable_after_the_retry_budget(aof_redis: RedisServer, kind: str) -> None:
    aof_redis.kill()
    budget = 1.5
    began = time.monotonic()
    with pytest.raises(BackendUnavailable):
        if kind == "sync":
            with Producer.from_url(aof_redis.url, retry_budget=budget) as p:
                p.publish("down", "t.x", 1)
        else:
            async def publish() -> None:
                async with AsyncProducer.from_url(aof_redis.url, retry_budget=budget) as p:
                    await p.publish("down", "t.x", 1)

            asyncio.run(publish())
    took = time.monotonic() - began
    assert budget - 0.1 <= took <= budget + 1.0, took


def test_lost_reply_is_retried_with_the_same_id(own_redis_for_proxy: RedisServer) -> None:
    """The script ran but its reply never came back: the retry must not publish twice."""
    with TcpProxy(own_redis_for_proxy.port) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0?socket_timeout=0.3"
        with Producer.from_url(url, retry_budget=20) as p:
            p.publish("lost", "t.x", 0)
            proxy.pause(upstream=False)  # commands reach Redis, replies are held
            outcome: dict[str, Any] = {}
            with RetryLog() as retries:
                worker = threading.Thread(target=lambda: outcome.update(r=p.publish_many(
                    [("lost", "t.x", 1), ("lost", "t.x", 2)])))
                worker.start()
                wait_until(lambda: stored_seqs(own_redis_for_proxy.url, "bc", "lost"), timeout=10,
                           message="the first attempt to reach Redis", until=lambda seqs: seqs == [1, 2, 3])
                # The first attempt times out; retries time out too while replies are held: wait
                # until it was retried twice (progress), not for a while.
                wait_until(lambda: retries.by_thread(worker) >= 2 or not worker.is_alive(), timeout=15,
                           message="the publish to be retried while its replies are held")
            assert worker.is_alive(), outcome
            proxy.resume()
            worker.join(timeout=20)
        results: list[PublishResult] = outcome["r"]
        assert [(r.seq, r.duplicate) for r in results] == [(2, True), (3, True)]
        assert stored_seqs(own_redis_for_proxy.url, "bc", "lost") == [1, 2, 3]


@pytest.fixture
def own_redis_for_proxy() -> Iterator[RedisServer]:
    with RedisServer() as server:
        load_library(server.url, "bc")
        yield server


# --- the CLI -----------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producers.cli", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_cli_publishes_and_prints_the_result(redis_url: str, cleanup_prefix: str) -> None:
    done = run_cli("cli-conv", "chat.message", '{"text": "hi"}', "--url", redis_url, "--key-prefix", cleanup_prefix,
                   "--id", "cli-1", "--key", "m1")
    assert done.returncode == 0, done.stderr
    out = orjson.loads(done.stdout)
    assert (out["conv_id"], out["seq"], out["id"], out["duplicate"]) == ("cli-conv", 1, "cli-1", False)
    again = run_cli("cli-conv", "chat.message", "{}", "--url", redis_url, "--key-prefix", cleanup_prefix,
                    "--id", "cli-1")
    assert again.returncode == 0 and orjson.loads(again.stdout)["duplicate"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["c", "t.x", "{not json"], "not valid JSON"),
        (["bad conv", "t.x", "1"], "invalid conv_id"),
        (["c", "ws.hello", "1"], "invalid type"),
    ],
)
def test_cli_rejects_bad_input_with_exit_2(args: list[str], message: str) -> None:
    done = run_cli(*args, "--url", f"redis://127.0.0.1:{free_port()}/0")
    assert done.returncode == 2
    assert message in done.stderr and done.stdout == ""


def test_cli_exits_1_when_the_backend_stays_down() -> None:
    done = run_cli("c", "t.x", "1", "--url", f"redis://127.0.0.1:{free_port()}/0", "--retry-budget", "0.3")
    assert done.returncode == 1
    assert "unavailable" in done.stderr


def test_settings_follow_the_gateways_policy(redis_url: str, cleanup_prefix: str) -> None:
    load_library(redis_url, cleanup_prefix, BackendSettings(state_max_entries=2))  # a gateway's --state-max-entries 2
    with Producer.from_url(redis_url, key_prefix=cleanup_prefix) as p:
        results = [p.publish("cap", "t.x", k, key=k) for k in ("a", "b", "c")]
    assert [r.evicted for r in results] == [0, 0, 1]

    async def state_keys() -> set[str]:
        backend = RedisBackend(redis_url, key_prefix=cleanup_prefix, settings=BackendSettings())
        try:
            return set((await backend.state("cap")).entities)
        finally:
            await backend.commands.close()

    assert asyncio.run(state_keys()) == {"b", "c"}
