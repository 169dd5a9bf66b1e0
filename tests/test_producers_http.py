"""The producer SDK's http(s):// transport against real gateway subprocesses."""

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

from broadcaster.errors import BackendUnavailable, PayloadTooLarge, ValidationError
from producers import AsyncProducer, Producer, PublishForbidden, UnexpectedResponse
from producers.http_transport import HttpProtocol, ServerError
from producers.options import ProducerOptions
from tests.support.gateway import GatewayProcess, free_port
from tests.support.polling import RetryLog, wait_until

PUBLISH_KEY = "s3cret-publish-key"


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    """One embedded-backend gateway that wants a publish key and caps event data at 1000 bytes."""
    with GatewayProcess("--publish-key", PUBLISH_KEY, "--max-event-bytes", "1000") as gw:
        yield gw


def test_sync_publish_over_http(gateway: GatewayProcess) -> None:
    with Producer.from_url(gateway.http_url, publish_key=PUBLISH_KEY) as p:
        first = p.publish("http-1", "llm.delta", {"text": "hi"})
        assert (first.conv_id, first.seq, first.duplicate) == ("http-1", 1, False) and first.id and first.epoch
        many = p.publish_many([("http-1", "t.x", 1), ("http-1", "timeline.msg", {"n": 1}, "m-1", "m1")])
        assert [(r.seq, r.id) for r in many] == [(2, many[0].id), (3, "m-1")]
        again = p.publish("http-1", "t.x", None, id="m-1")
        assert again.duplicate and again.seq == 3
        presence = p.presence("http-1")
        assert presence.connections == 0 and not p.has_subscribers("http-1")


async def test_async_publish_over_http(gateway: GatewayProcess) -> None:
    async with AsyncProducer.from_url(gateway.http_url, publish_key=PUBLISH_KEY) as p:
        results = await p.publish_many([("http-a", "t.x", i) for i in range(5)])
        assert [r.seq for r in results] == [1, 2, 3, 4, 5]
        assert (await p.publish("http-a", "t.x", key="k")).seq == 6
        assert not await p.has_subscribers("http-a", profile="debug")


def test_publish_key_is_required(gateway: GatewayProcess) -> None:
    with Producer.from_url(gateway.http_url) as p, pytest.raises(PublishForbidden) as missing:
        p.publish("http-k", "t.x")
    assert missing.value.status == 401
    with Producer.from_url(gateway.http_url, publish_key="wrong") as p, pytest.raises(PublishForbidden) as wrong:
        p.publish("http-k", "t.x")
    assert wrong.value.status in (401, 403)
    assert isinstance(wrong.value, PermissionError)


def test_server_side_size_limit_is_payload_too_large(gateway: GatewayProcess) -> None:
    with Producer.from_url(gateway.http_url, publish_key=PUBLISH_KEY) as p, pytest.raises(PayloadTooLarge):
        p.publish("http-big", "t.x", "x" * 5000)  # within the SDK's 1 MiB, over the gateway's 1000 bytes


def test_local_validation_needs_no_gateway() -> None:
    with Producer.from_url(f"http://127.0.0.1:{free_port()}", retry_budget=30) as p:
        began = time.monotonic()
        with pytest.raises(ValidationError):
            p.publish("bad conv", "t.x")
        with pytest.raises(ValidationError):
            p.publish("c", "ws.ping")
        assert time.monotonic() - began < 0.5


def test_retries_until_the_gateway_comes_up() -> None:
    port = free_port()
    outcome: dict[str, Any] = {}

    def publish() -> None:
        with Producer.from_url(f"http://127.0.0.1:{port}", retry_budget=30) as p:
            try:
                outcome["result"] = p.publish("late", "t.x", 1, id="late-1")
            except BaseException as exc:
                outcome["error"] = exc

    with RetryLog() as retries:
        worker = threading.Thread(target=publish)
        worker.start()
        # Progress, not time: the publish was refused a few times and is being retried.
        wait_until(lambda: retries.by_thread(worker) >= 3 or not worker.is_alive(), timeout=15,
                   message="the publish to be retried while no gateway listens")
    assert worker.is_alive(), outcome
    with GatewayProcess(port=port):
        worker.join(timeout=30)
    assert "error" not in outcome, outcome
    assert outcome["result"].seq == 1


def test_unavailable_when_no_gateway_answers() -> None:
    began = time.monotonic()
    with Producer.from_url(f"http://127.0.0.1:{free_port()}", retry_budget=1.0) as p, \
            pytest.raises(BackendUnavailable):
        p.publish("nobody", "t.x")
    assert 0.9 <= time.monotonic() - began <= 2.5


def test_http_and_redis_producers_share_the_conversation(redis_url: str, key_prefix: str) -> None:
    try:
        with GatewayProcess("--redis-url", redis_url, "--key-prefix", key_prefix) as gw:
            with Producer.from_url(gw.http_url) as over_http, \
                    Producer.from_url(redis_url, key_prefix=key_prefix) as direct:
                a = over_http.publish("mixed", "t.x", 1, id="dup")
                b = direct.publish("mixed", "t.x", 2)
                c = direct.publish("mixed", "t.x", 3, id="dup")
                d = over_http.publish("mixed", "t.x", 4)
            assert [(r.seq, r.duplicate) for r in (a, b, c, d)] == [(1, False), (2, False), (1, True), (3, False)]
            assert len({a.epoch, b.epoch, d.epoch}) == 1
    finally:
        with contextlib.closing(redis.Redis.from_url(redis_url)) as client:
            keys = list(client.scan_iter(match=f"{key_prefix}:*"))
            if keys:
                client.delete(*keys)


def test_cli_over_http(gateway: GatewayProcess) -> None:
    done = subprocess.run([sys.executable, "-m", "producers.cli", "http-cli", "t.x", '{"a": 1}', "--url",
                           gateway.http_url, "--publish-key", PUBLISH_KEY], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["seq"] == 1
    refused = subprocess.run([sys.executable, "-m", "producers.cli", "http-cli", "t.x", "1", "--url",
                              gateway.http_url], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "401" in refused.stderr


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (422, {"error": "invalid", "message": "type: nope", "field": "type"}, ValidationError),
        (413, {"error": "too_large", "message": "body over 1000 bytes"}, PayloadTooLarge),
        (401, {"error": "unauthorized", "message": "no key"}, PublishForbidden),
        (403, {"error": "forbidden", "message": "wrong key"}, PublishForbidden),
        (404, {"detail": "Not Found"}, UnexpectedResponse),
        (503, {"error": "unavailable"}, ServerError),
        (500, "oops", ServerError),
        (200, "not json", UnexpectedResponse),
    ],
)
def test_answers_map_to_errors(status: int, body: Any, error: type[Exception]) -> None:
    content = body.encode() if isinstance(body, str) else orjson.dumps(body)
    with pytest.raises(error) as raised:
        HttpProtocol(ProducerOptions()).parse_publish(status, content)
    if status == 422:
        assert isinstance(raised.value, ValidationError) and raised.value.field == "type"
        assert raised.value.message == "type: nope"


def test_async_and_sync_share_ids_across_retries(gateway: GatewayProcess) -> None:
    """A retried request carries the id generated before the first attempt."""

    async def run() -> list[str]:
        async with AsyncProducer.from_url(gateway.http_url, publish_key=PUBLISH_KEY) as p:
            transport: Any = p._transport
            sent: list[bytes] = []
            original = transport._send

            async def flaky(call: Any) -> Any:
                sent.append(call.body)
                response = await original(call)
                if len(sent) == 1:
                    raise ServerError(502, "reply lost after the gateway applied it")
                return response

            transport._send = flaky
            result = await p.publish("http-retry", "t.x", 1)
            assert result.duplicate and result.seq == 1
            return [orjson.loads(body)["id"] for body in sent]

    ids = asyncio.run(run())
    assert len(ids) == 2 and ids[0] == ids[1]
