"""Start-up check of the third-party internals this project relies on.

The Redis backend and the producer SDK use a few redis-py internals below its
command API (one write of packed commands on one pooled connection; pub/sub
connections built from the pool's own connection class and arguments); the
gateway uses uvicorn and websockets internals (:mod:`gateway.compat`). An upgrade
that renames one of them would otherwise show up as an ``AttributeError`` in the
middle of serving, or, where the code had a quiet default, as a feature silently
switched off.

A :class:`Feature` names what it needs (``probe`` returns the dotted names it did
not find) and what happens without it (``fallback``; None when there is no other
way). :func:`run` probes every feature once; :func:`enforce` refuses to go on
(:class:`CompatError`, naming each missing name and the tested versions) unless
fallbacks were allowed and every missing feature has one: then it logs a WARNING
per feature and returns the report, whose :meth:`CompatReport.ok` the guarded code
reads to choose its path.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

log = logging.getLogger("broadcaster.compat")

TESTED: dict[str, tuple[str, str]] = {"redis": ("5.3.1", "8.1.0")}
"""Distribution -> (lowest, newest) release the test suite passed with (see pyproject.toml)."""


class CompatError(RuntimeError):
    """An internal this process needs is missing from an installed dependency."""


@dataclass(frozen=True, slots=True)
class Feature:
    """Something the project does with a dependency's internals."""

    name: str
    needs: str
    """What it does, for the messages."""
    probe: Callable[[], list[str]]
    """Returns the dotted names of what is missing (empty: all there)."""
    fallback: str | None = None
    """What happens without it; None: no fallback, the process cannot run."""
    distributions: tuple[str, ...] = ()
    """The distributions whose internals it uses (their versions go in the messages)."""


@dataclass(slots=True)
class CompatReport:
    """The outcome of :func:`run`: the missing names of each feature that lacks some."""

    features: tuple[Feature, ...]
    missing: dict[str, list[str]] = field(default_factory=dict)
    tested: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    def ok(self, name: str) -> bool:
        """True when feature ``name`` found everything it needs."""
        return name not in self.missing

    def fallbacks(self) -> dict[str, int]:
        """Every probed feature name -> 1 when it runs on its fallback, else 0 (for a gauge)."""
        return {feature.name: int(feature.name in self.missing) for feature in self.features}

    def describe(self, feature: Feature) -> str:
        """One line: what is missing for ``feature``, from which installed versions, what was tested."""
        names = ", ".join(self.missing.get(feature.name, []))
        return (f"{feature.name} ({feature.needs}) needs {names}, missing from {installed(feature.distributions)}; "
                f"tested with {tested_range(self.tested, feature.distributions)}")


def installed(distributions: Iterable[str]) -> str:
    """``"uvicorn 0.54.0, websockets 17.4"``."""
    parts = []
    for dist in distributions:
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    return ", ".join(parts) or "the installed packages"


def tested_range(tested: Mapping[str, tuple[str, str]], distributions: Iterable[str]) -> str:
    """``"uvicorn 0.52.1 to 0.54.0, websockets 17.0 to 17.4"``."""
    parts = [f"{dist} {tested[dist][0]} to {tested[dist][1]}" for dist in distributions if dist in tested]
    return ", ".join(parts) or "the versions pinned in pyproject.toml"


def run(features: Iterable[Feature], tested: Mapping[str, tuple[str, str]]) -> CompatReport:
    """Probe every feature; a probe that raises counts as missing what it was probing."""
    report = CompatReport(tuple(features), tested=dict(tested))
    for feature in report.features:
        try:
            missing = feature.probe()
        except Exception as exc:  # a probe that cannot even build its objects: say why
            missing = [f"(probe failed: {exc!r})"]
        if missing:
            report.missing[feature.name] = missing
    return report


def enforce(report: CompatReport, *, allow_fallback: bool, option: str = "--compat") -> CompatReport:
    """Raise :class:`CompatError` for missing internals, unless ``allow_fallback`` and each has a fallback.

    With fallbacks allowed, log a WARNING per missing feature naming what is missing and
    what the process does instead, and return ``report``.
    """
    lacking = [f for f in report.features if not report.ok(f.name)]
    if not lacking:
        return report
    fatal = [f for f in lacking if f.fallback is None or not allow_fallback]
    if fatal:
        lines = [report.describe(f) for f in fatal]
        can_fall_back = all(f.fallback is not None for f in fatal)
        advice = "install a tested version"
        if can_fall_back:
            advice += f", or start with {option} to run without it ({'; '.join(str(f.fallback) for f in fatal)})"
        elif any(f.fallback is not None for f in fatal):
            advice += f" ({option} cannot help: some of these have no fallback)"
        raise CompatError("; ".join(lines) + f". Refusing to start: {advice}.")
    for feature in lacking:
        log.warning("compatibility fallback: %s. Running without it (%s): %s", report.describe(feature), option,
                    feature.fallback)
    return report


# ---- probe helpers ---------------------------------------------------------------------------


def lacking(owner: Any, label: str, *names: str) -> list[str]:
    """The ``label.name`` of each of ``names`` that ``owner`` (class or instance) does not have."""
    return [f"{label}.{name}" for name in names if not hasattr(owner, name)]


def lacking_parameters(function: Any, label: str, *, accepts: Iterable[str] = (), bare: bool = False) -> list[str]:
    """``label(name=)`` for each keyword ``function`` does not accept; ``label()`` if ``bare`` and it needs
    arguments. ``function`` is a bound method, or a function whose first parameter is ``self``."""
    if not callable(function):
        return [label]
    signature = inspect.signature(function)
    params = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [f"{label}({name}=)" for name in accepts if name not in params and not takes_any]
    if bare:
        try:
            signature.bind()
        except TypeError:
            missing.append(f"{label}() with no argument")
    return missing


# ---- redis-py ----------------------------------------------------------------------------------


def _probe_redis_one_write_send() -> list[str]:
    """``_send_on_one_connection`` (async: broadcaster.backends.redis.commands; sync: producers.redis_transport)."""
    import hiredis
    import redis
    from redis.asyncio import BlockingConnectionPool
    from redis.asyncio.connection import Connection as AsyncConnection

    missing = lacking(hiredis, "hiredis", "pack_command")
    for pool, label in ((BlockingConnectionPool(), "redis.asyncio.BlockingConnectionPool"),
                        (redis.ConnectionPool(), "redis.ConnectionPool")):
        missing += lacking(pool, label, "get_connection", "release")
        if hasattr(pool, "get_connection"):
            missing += lacking_parameters(pool.get_connection, f"{label}.get_connection", bare=True)
    for cls, label in ((AsyncConnection, "redis.asyncio.Connection"), (redis.Connection, "redis.Connection")):
        missing += lacking(cls, label, "send_packed_command", "read_response", "disconnect")
    if hasattr(AsyncConnection, "disconnect"):
        missing += lacking_parameters(AsyncConnection.disconnect, "redis.asyncio.Connection.disconnect",
                                      accepts=["nowait"])
    return missing


def _probe_redis_pubsub_links() -> list[str]:
    """The pub/sub links of broadcaster.backends.redis (topology, link, subscriber)."""
    from redis.asyncio import BlockingConnectionPool
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.connection import AbstractConnection

    missing = lacking(BlockingConnectionPool(), "redis.asyncio.BlockingConnectionPool", "connection_class",
                      "connection_kwargs")
    missing += lacking(AbstractConnection, "redis.asyncio.connection.AbstractConnection", "connect", "disconnect",
                       "is_connected", "send_command", "send_packed_command", "read_response")
    if hasattr(AbstractConnection, "send_packed_command"):
        missing += lacking_parameters(AbstractConnection.send_packed_command,
                                      "redis.asyncio.connection.AbstractConnection.send_packed_command",
                                      accepts=["check_health"])
    node = ClusterNode("127.0.0.1", 7000)
    missing += lacking(node, "redis.asyncio.cluster.ClusterNode", "name", "connection_class", "connection_kwargs")
    missing += lacking(RedisCluster, "redis.asyncio.cluster.RedisCluster", "initialize", "get_node", "get_primaries",
                       "get_node_from_key")
    cluster = RedisCluster(startup_nodes=[node])  # no I/O until initialize()
    try:
        missing += lacking(cluster, "redis.asyncio.cluster.RedisCluster", "nodes_manager")
        if hasattr(cluster, "nodes_manager"):
            missing += lacking(cluster.nodes_manager, "redis.asyncio.cluster.NodesManager", "initialize",
                               "connection_kwargs")
    finally:
        del cluster
    return missing


def _probe_redis_sentinel_switches() -> list[str]:
    """broadcaster.backends.redis.topology's MasterSwitches: the sentinel that announced ``+switch-master``
    moved to the front of the very list ``Sentinel.discover_master`` asks in order."""
    import inspect

    from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

    sentinel = Sentinel([("127.0.0.1", 26379)])  # type: ignore[no-untyped-call]  # no I/O until asked
    missing = lacking(sentinel, "redis.asyncio.sentinel.Sentinel", "sentinels", "discover_master")
    if not isinstance(getattr(sentinel, "sentinels", None), list):
        missing.append("redis.asyncio.sentinel.Sentinel.sentinels as a list")
    elif "self.sentinels" not in inspect.getsource(Sentinel.discover_master):
        missing.append("redis.asyncio.sentinel.Sentinel.discover_master asking self.sentinels")
    pool = SentinelConnectionPool("svc", sentinel)  # type: ignore[no-untyped-call]
    missing += lacking(pool, "redis.asyncio.sentinel.SentinelConnectionPool",
                       "sentinel_manager", "service_name", "get_master_address")
    return missing


REDIS_FEATURES: tuple[Feature, ...] = (
    Feature("redis_one_write_send", "a batch of commands in one write on one pooled connection",
            _probe_redis_one_write_send, distributions=("redis", "hiredis")),
    Feature("redis_pubsub_links", "pub/sub connections built from the client's pool or cluster nodes",
            _probe_redis_pubsub_links, distributions=("redis",)),
    Feature("redis_sentinel_switches", "the sentinel announcing +switch-master asked first from then on",
            _probe_redis_sentinel_switches, distributions=("redis",)),
)
"""No fallback for these: the Redis backend and the SDK have no other way to do them."""


def check_redis() -> CompatReport:
    """Probe the redis-py internals; :class:`CompatError` if one is missing (there is no fallback)."""
    return enforce(run(REDIS_FEATURES, TESTED), allow_fallback=False)
