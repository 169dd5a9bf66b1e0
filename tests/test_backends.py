"""The shared backend suite on every backend: memory, RedisBackend over fakeredis, and over real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.backend_suite import KINDS, BackendSuite, Harness


@pytest.fixture(params=KINDS)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "redis":
        request.getfixturevalue("redis_url")  # fails loudly when the local Redis is down
    h = Harness(request.param)
    try:
        yield h
    finally:
        await h.close()


class TestBackend(BackendSuite):
    """Every test of the suite, once per backend kind."""
