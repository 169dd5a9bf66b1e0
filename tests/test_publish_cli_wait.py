"""``broadcaster-publish --wait-replicas``: acknowledged only once replicas have the event."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.policy import drop_library, load_library

BIN = Path(sys.executable).parent / "broadcaster-publish"


def _publish(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), "c1", "chat.msg", '{"n": 1}', *args], capture_output=True, text=True,
                          timeout=60)


def test_wait_replicas_on_a_redis_without_replicas_is_not_acknowledged(redis_url: str, key_prefix: str) -> None:
    load_library(redis_url, key_prefix)
    try:
        common = ("--url", redis_url, "--key-prefix", key_prefix, "--retry-budget", "0")
        short = _publish(*common, "--wait-replicas", "1")
        assert short.returncode == 1, short
        assert "replica" in short.stderr.lower(), short.stderr
        plain = _publish(*common)
        assert plain.returncode == 0, plain.stderr
        assert '"seq":' in plain.stdout
    finally:
        drop_library(redis_url, key_prefix)


def test_wait_replicas_over_http_is_refused_with_what_applies_instead() -> None:
    result = _publish("--url", "http://127.0.0.1:9", "--wait-replicas", "1")
    assert result.returncode == 2
    assert "--redis-wait-replicas" in result.stderr


def test_negative_wait_replicas_is_refused() -> None:
    result = _publish("--wait-replicas", "-1")
    assert result.returncode == 2
    assert "0 or more" in result.stderr
