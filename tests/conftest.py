"""Shared fixtures. Servers are real: uvicorn on free ports, Redis at 127.0.0.1:6379 or started by the test."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

REDIS_URL = os.environ.get("BROADCASTER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def key_prefix() -> Iterator[str]:
    """A key prefix no other test uses, so tests can share the local Redis.

    Gateways load a function library per prefix (docs/namespaces.md); the one a test's
    prefix got is deleted afterwards, so runs do not pile libraries up in the shared Redis.
    """
    prefix = "t" + secrets.token_hex(6)
    yield prefix
    import redis

    from broadcaster.backends.scripts import library_name

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.function_delete(library_name(prefix))
    except redis.RedisError:
        pass  # never loaded (memory backend, or a test that did not publish), or Redis gone
    finally:
        client.close()


@pytest.fixture
def redis_url() -> str:
    """The local Redis the suite runs against (CI starts it); a test fails loudly if it does not answer."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {REDIS_URL} does not answer ({exc}); .ci/run starts one")
    finally:
        client.close()
    return REDIS_URL
