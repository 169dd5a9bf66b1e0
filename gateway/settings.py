"""Gateway options: one table drives the CLI flags, their environment variables and defaults.

Every option ``--some-name`` can also be set with ``BROADCASTER_SOME_NAME``; a
command-line option wins over the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

ENV_PREFIX = "BROADCASTER_"


@dataclass(slots=True)
class Settings:
    """Everything a gateway process is configured with."""

    host: str = "127.0.0.1"
    port: int = 8000
    workers: str = "1"
    redis_url: str | None = None
    profiles: str | None = None
    namespaces: str | None = None
    plugin: list[str] = field(default_factory=list)
    auth_secret: str | None = None
    auth_public_key: str | None = None
    auth_audience: str | None = None
    auth_issuer: str | None = None
    publish_key: list[str] = field(default_factory=list)
    key_prefix: str = "bc"
    history_size: int = 1000
    history_ttl: int = 86400
    state_max_entries: int = 10_000
    state_max_bytes: int = 8 * 1024 * 1024
    max_queue_bytes: int = 1024 * 1024
    max_client_message_bytes: int = 64 * 1024
    max_event_bytes: int = 1024 * 1024
    max_subscriptions: int = 100
    max_connections: int = 50_000
    max_pending_handshakes: int = 128
    client_messages_per_second: float = 50.0
    drain_seconds: float = 10.0
    ping_interval: float = 20.0
    handshake_timeout: float = 10.0
    ws_compression: str = "shared"
    sse_ping_interval: float = 15.0
    sse_retry_ms: int = 1000
    presence_ttl: float = 15.0
    join_leave_delay: float = 3.0
    redis_probe_interval: float = 5.0
    redis_probe_timeout: float = 2.0
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 1000
    allowed_origins: list[str] = field(default_factory=list)
    gateway_id: str | None = None
    log_level: str = "info"
    log_format: str = "text"
    compat: bool = False

    @staticmethod
    def env_name(option: str) -> str:
        """``max_queue_bytes`` -> ``BROADCASTER_MAX_QUEUE_BYTES``."""
        return ENV_PREFIX + option.upper()


HELP: dict[str, str] = {
    "host": "interface to listen on",
    "port": "TCP port for HTTP and websockets",
    "workers": "gateway processes serving --port together (SO_REUSEPORT), each with its own backend "
               "connections and gateway id, or auto (one per CPU this process may use); more than 1 needs "
               "--redis-url (docs/operations.md, \"Workers\")",
    "redis_url": "redis://, rediss://, redis+cluster://host:port[,host:port] or "
                 "redis+sentinel://host:port[,host:port]/service[/db]; unset = embedded memory backend",
    "profiles": "TOML file with [profiles.NAME] tables",
    "namespaces": "TOML file with [namespaces.\"GLOB\"] tables: retention and limits per group of conversations "
                  "(history_size, history_ttl, state_max_entries, state_max_bytes, max_data_bytes), first match "
                  "wins; the others get the options below (docs/namespaces.md)",
    "plugin": "module:attr of a plugin setup callable (repeatable; env: comma-separated)",
    "auth_secret": "HS256 secret: websocket clients need a JWT",
    "auth_public_key": "PEM file or text of an RS256/ES256 public key: websocket clients need a JWT",
    "auth_audience": "required 'aud' claim of tokens (unset: tokens carrying an 'aud' claim are refused)",
    "auth_issuer": "required 'iss' claim of tokens (unset: not checked)",
    "publish_key": "key required as 'Authorization: Bearer' to publish over HTTP (repeatable; env: comma-separated)",
    "key_prefix": "prefix of every Redis key",
    "history_size": "events kept per conversation",
    "history_ttl": "seconds a conversation's history and state live after its last publish",
    "state_max_entries": "state entries kept per conversation (oldest-updated evicted)",
    "state_max_bytes": "encoded bytes of state kept per conversation (oldest-updated evicted)",
    "max_queue_bytes": "bytes queued for one connection before it is closed 4408",
    "max_client_message_bytes": "largest websocket message accepted from a client (bigger: close 1009)",
    "max_event_bytes": "largest event data accepted for publishing (JSON bytes; bigger: 413)",
    "max_subscriptions": "conversations one connection may subscribe to (more: ws.error too_many_subscriptions)",
    "max_connections": "open websockets per gateway (more: HTTP 503 before the upgrade); lowered at start-up "
                       "to the open-files limit less 256 when above it",
    "max_pending_handshakes": "websocket handshakes (upgrade, auth, initial subscribe with its history replay) in "
                              "progress at once; more: HTTP 503 with Retry-After: 1 before the upgrade, so a "
                              "reconnect storm is admitted in turns (0: no limit)",
    "client_messages_per_second": "sustained client message rate (burst: 4x); faster: close 4429",
    "drain_seconds": "on SIGTERM, time to close every connection with 1012 before exiting",
    "ping_interval": "seconds between websocket pings; a client that does not answer one within the same time "
                     "is closed 1011 (0: off)",
    "handshake_timeout": "seconds a client has to send a complete HTTP request (websocket upgrade included) "
                         "once it connected or started a request; slower: connection dropped (0: off)",
    "ws_compression": "permessage-deflate when a client offers it (browsers do). shared: without context "
                      "takeover, so an idle socket keeps no zlib state and an event is compressed once for "
                      "every socket; deflate: with context takeover (smaller small messages, ~36 KiB of zlib "
                      "state per socket, each socket compresses every event itself); off: never compress",
    "sse_ping_interval": "seconds between keep-alive comment lines on an idle /sse stream (0: none)",
    "sse_retry_ms": "reconnect delay /sse suggests to EventSource clients (its 'retry:' line), milliseconds",
    "redis_probe_interval": "seconds of silence on a Redis pub/sub link before it is probed with PING",
    "redis_probe_timeout": "seconds a probe waits for PONG before the link is rebuilt",
    "redis_wait_replicas": "publishes through this gateway (HTTP API, plugins) WAIT for this many replicas and "
                           "fail with 503 when fewer confirm (redis://, redis+sentinel://; 0: no WAIT)",
    "redis_wait_timeout_ms": "milliseconds a publish waits for --redis-wait-replicas replicas",
    "presence_ttl": "seconds a gateway's presence counts outlive its last heartbeat (heartbeat: a third of it)",
    "join_leave_delay": "seconds a user must stay away (no connection on any gateway) before ws.leave is sent, "
                        "where namespaces have join_leave = true; back sooner: no leave, no second join "
                        "(docs/namespaces.md)",
    "allowed_origins": "Origin values allowed for browser sockets and CORS (repeatable; empty: any)",
    "gateway_id": "name of this gateway in presence and hello (default: host-pid-random)",
    "log_level": "debug, info, warning or error",
    "log_format": "json or text",
    "compat": "start even when an installed uvicorn / websockets lacks an internal the gateway uses: run the "
              "feature on its slower fallback, logged at WARNING and exported as broadcaster_compat_fallback "
              "(without it the gateway refuses to start, naming what is missing)",
}

WS_COMPRESSION = ("shared", "deflate", "off")
"""The ``--ws-compression`` modes (gateway.deflate)."""

LIST_OPTIONS = {"plugin", "publish_key", "allowed_origins"}


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _convert(name: str, raw: str, kind: Any) -> Any:
    if name in LIST_OPTIONS:
        return [item.strip() for item in raw.split(",") if item.strip()]
    if kind in ("bool", bool):  # a flag: BROADCASTER_COMPAT=1
        word = raw.strip().lower()
        if word not in TRUE_WORDS + FALSE_WORDS:
            raise ValueError(raw)
        return word in TRUE_WORDS
    if "int" in str(kind) and "str" not in str(kind):
        return int(raw)
    if "float" in str(kind):
        return float(raw)
    return raw


def settings_from(cli: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Merge defaults, environment and command-line values (CLI wins); raises ValueError on bad values."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        env_value = environ.get(Settings.env_name(f.name))
        if env_value is not None and env_value != "":
            try:
                values[f.name] = _convert(f.name, env_value, f.type)
            except ValueError:
                raise ValueError(f"{Settings.env_name(f.name)}={env_value!r} is not a valid {f.type}") from None
        cli_value = cli.get(f.name)
        if cli_value is not None and cli_value != []:
            values[f.name] = cli_value
    settings = Settings(**values)
    check(settings)
    return settings


def check(settings: Settings) -> None:
    """Reject values that cannot work; raises ValueError naming the option."""
    positive = ["history_size", "history_ttl", "state_max_entries", "state_max_bytes", "max_queue_bytes",
                "max_client_message_bytes", "max_event_bytes", "max_subscriptions", "max_connections",
                "client_messages_per_second", "presence_ttl", "redis_probe_interval", "redis_probe_timeout"]
    for name in positive:
        if getattr(settings, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if not 0 < settings.port < 65536:
        raise ValueError("--port must be 1-65535")
    if settings.log_format not in ("json", "text"):
        raise ValueError("--log-format must be json or text")
    if settings.ws_compression not in WS_COMPRESSION:
        raise ValueError("--ws-compression must be shared, deflate or off")
    for name in ("ping_interval", "handshake_timeout", "drain_seconds", "sse_ping_interval", "sse_retry_ms",
                 "redis_wait_replicas", "redis_wait_timeout_ms", "join_leave_delay", "max_pending_handshakes"):
        if getattr(settings, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or more")
    if settings.auth_secret and settings.auth_public_key:
        raise ValueError("give --auth-secret or --auth-public-key, not both")
    if worker_count(settings.workers) > 1 or settings.workers.strip().lower() == "auto":
        if not settings.redis_url:
            raise ValueError(f"--workers {settings.workers} needs --redis-url: on the embedded memory backend each "
                             "worker would have a memory of its own, and clients of one worker would not see "
                             "events published through another")


def worker_count(value: str) -> int:
    """``--workers``: a positive integer, or ``auto`` (the CPUs this process may run on: its affinity mask,
    not a cgroup CPU quota); ValueError otherwise."""
    word = value.strip().lower()
    if word == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not (word.isascii() and word.isdigit()) or int(word) < 1:
        raise ValueError(f"--workers must be a positive integer or auto, not {value!r}")
    return int(word)


def option_names() -> Sequence[str]:
    """Every option name (underscored), in declaration order."""
    return [f.name for f in fields(Settings)]
