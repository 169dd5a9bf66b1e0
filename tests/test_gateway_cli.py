"""The broadcaster-gateway command: options, environment variables, start-up errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.settings import Settings, option_names, settings_from


def test_every_option_has_an_env_var_and_cli_wins() -> None:
    env = {Settings.env_name("port"): "9001", Settings.env_name("history_size"): "5",
           Settings.env_name("publish_key"): "a, b", Settings.env_name("drain_seconds"): "2.5"}
    env[Settings.env_name("ws_compression")] = "off"
    s = settings_from({"port": 9002}, env)
    assert (s.port, s.history_size, s.publish_key, s.drain_seconds) == (9002, 5, ["a", "b"], 2.5)
    assert s.ws_compression == "off"
    defaults = settings_from({}, {})
    assert (defaults.host, defaults.port, defaults.redis_url, defaults.key_prefix) == ("127.0.0.1", 8000, None, "bc")
    assert (defaults.history_size, defaults.history_ttl, defaults.max_queue_bytes) == (1000, 86400, 1024 * 1024)
    assert (defaults.max_client_message_bytes, defaults.max_subscriptions, defaults.drain_seconds) == (65536, 100, 10)
    for required in ("host", "port", "redis_url", "profiles", "plugin", "auth_secret", "auth_public_key",
                     "publish_key", "key_prefix", "history_size", "history_ttl", "max_queue_bytes",
                     "max_client_message_bytes", "max_subscriptions", "drain_seconds", "log_level", "log_format"):
        assert required in option_names()


def test_ws_compression_defaults_to_shared_and_takes_each_mode() -> None:
    assert settings_from({}, {}).ws_compression == "shared"
    for mode in ("shared", "deflate", "off"):
        assert settings_from({}, {"BROADCASTER_WS_COMPRESSION": mode}).ws_compression == mode
        assert settings_from({"ws_compression": mode}, {"BROADCASTER_WS_COMPRESSION": "gzip"}).ws_compression == mode
    result = run_cli("--help")
    assert result.returncode == 0 and "--ws-compression" in result.stdout and "shared" in result.stdout


@pytest.mark.parametrize("env, message", [
    ({"BROADCASTER_PORT": "abc"}, "BROADCASTER_PORT"),
    ({"BROADCASTER_LOG_FORMAT": "xml"}, "--log-format"),
    ({"BROADCASTER_MAX_QUEUE_BYTES": "0"}, "--max-queue-bytes"),
    ({"BROADCASTER_WS_COMPRESSION": "gzip"}, "--ws-compression"),
])
def test_bad_values_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings_from({}, env)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def test_bad_profiles_file_stops_start_up_naming_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "profiles.toml"
    f.write_text('[profiles.chat]\nenrich = ["nowhere_module:fn"]\n')
    result = run_cli("--profiles", str(f), "--port", "1")
    assert result.returncode == 2
    assert str(f) in result.stderr and "profiles.chat.enrich" in result.stderr


def test_bad_plugin_and_bad_env_stop_start_up() -> None:
    result = run_cli("--plugin", "nowhere_module:setup")
    assert result.returncode == 2 and "nowhere_module:setup" in result.stderr
    result = run_cli(env={"BROADCASTER_HISTORY_SIZE": "many"})
    assert result.returncode == 2 and "BROADCASTER_HISTORY_SIZE" in result.stderr


def test_help_lists_env_vars() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "BROADCASTER_REDIS_URL" in result.stdout and "--max-queue-bytes" in result.stdout


def test_redis_options_reach_the_backend() -> None:
    from broadcaster.backends.redis import RedisBackend
    from gateway.state import Gateway

    settings = settings_from({"redis_url": "redis://127.0.0.1:1/0", "key_prefix": "kp"},
                             {"BROADCASTER_REDIS_PROBE_INTERVAL": "0.7", "BROADCASTER_REDIS_PROBE_TIMEOUT": "0.3",
                              "BROADCASTER_HISTORY_SIZE": "42"})
    backend = Gateway(settings).backend
    assert isinstance(backend, RedisBackend)
    assert backend.layout.prefix == "kp" and backend.settings.history_size == 42
    assert (backend._subscriber._probe_interval, backend._subscriber._probe_timeout) == (0.7, 0.3)
