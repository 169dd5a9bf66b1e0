"""The composition root: one :class:`Gateway` per process wires backend, hub, pool and hooks."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import secrets
import socket
import time
from typing import Any

from broadcaster.backend import Backend, BackendSettings
from broadcaster.backends import backend_from_url
from broadcaster.envelope import Envelope
from broadcaster.hooks import BackendPublisher, PluginContext
from broadcaster.hub import Hub
from broadcaster.importing import import_callable
from broadcaster.namespaces import load_namespaces
from broadcaster.presence import JoinLeave, PresenceReporter
from broadcaster.profiles import ProfileRegistry
from gateway import gcpolicy
from gateway.admission import Admission
from gateway.auth import Authenticator, PublishKeys
from gateway.connection import ConnectionPool
from gateway.looplag import LoopLag
from gateway.metrics import Metrics, MetricSources
from gateway.revocation import Revocations
from gateway.settings import Settings

log = logging.getLogger("gateway")


class StartupError(RuntimeError):
    """A configuration problem found at start-up (bad profiles file, plugin that does not import...)."""


def default_gateway_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def load_plugin(path: str) -> Any:
    """Import ``module:attr``; raises StartupError naming the plugin."""
    try:
        return import_callable(path)
    except ValueError as exc:
        raise StartupError(f"--plugin {path!r}: {exc}") from None


class Gateway:
    """Everything one gateway process runs, and its start / stop order."""

    def __init__(self, settings: Settings, backend: Backend | None = None,
                 profiles: ProfileRegistry | None = None) -> None:
        self.settings = settings
        self.gateway_id = settings.gateway_id or default_gateway_id()
        if profiles is None:
            profiles = ProfileRegistry.from_file(settings.profiles) if settings.profiles else ProfileRegistry()
        self.profiles = profiles
        try:
            namespaces = tuple(load_namespaces(settings.namespaces)) if settings.namespaces else ()
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        backend_settings = BackendSettings(
            history_size=settings.history_size, history_ttl=settings.history_ttl,
            state_max_entries=settings.state_max_entries,
            state_max_bytes=settings.state_max_bytes, max_data_bytes=settings.max_event_bytes,
            namespaces=namespaces)
        self.backend = backend or backend_from_url(
            settings.redis_url, key_prefix=settings.key_prefix, settings=backend_settings,
            probe_interval=settings.redis_probe_interval, probe_timeout=settings.redis_probe_timeout,
            wait_replicas=settings.redis_wait_replicas, wait_timeout_ms=settings.redis_wait_timeout_ms)
        self.policies = self.backend.settings.policy_table()
        """The namespaces' policy (the HTTP API sizes a publish body by its conversation's max_data_bytes)."""
        self.publisher = BackendPublisher(self.backend)
        self.plugins = PluginContext(self.publisher, self.gateway_id)
        self.plugin_setups = [load_plugin(path) for path in settings.plugin]
        self.hub = Hub(self.backend, gateway_id=self.gateway_id, hooks=self.plugins,
                       on_dispatch=self._observe_dispatch)
        self.pool = ConnectionPool()
        self.admission = Admission(settings.max_pending_handshakes)
        """Websocket handshakes in progress (gateway.admission)."""
        self.metrics = Metrics(self._metric_sources())
        self.auth = Authenticator(settings.auth_secret, settings.auth_public_key, audience=settings.auth_audience,
                                  issuer=settings.auth_issuer)
        self.publish_keys = PublishKeys(settings.publish_key)
        self.revocations = Revocations(self.backend, self.pool, self.auth, registry=self.metrics.registry)
        self.join_leave = JoinLeave(self.backend, self.hub, self.policies)
        self.join_leave.listen()
        self.metrics.watch_join_leave(self.join_leave)
        self.loop_lag = LoopLag(self.metrics.registry)
        self.presence = PresenceReporter(self.hub, self.backend, self.gateway_id,
                                         heartbeat=settings.presence_ttl / 3, ttl=settings.presence_ttl,
                                         policies=self.policies, leave_delay=settings.join_leave_delay,
                                         on_transitions=self.join_leave.announce)
        self._tasks: list[asyncio.Task[None]] = []

    def _metric_sources(self) -> MetricSources:
        pool, hub, backend, admission = self.pool, self.hub, self.backend, self.admission
        return MetricSources(
            pool=pool.stats, hub=hub.stats, backend=backend.stats,
            connections=pool.__len__,
            subscriptions=lambda: sum(len(c.convs) for c in pool.connections.values()),
            conversations=lambda: len(hub.conversations()),
            draining=lambda: pool.draining,
            backend_connected=lambda: backend.connected,
            handshakes_pending=lambda: admission.pending, handshakes_refused=lambda: admission.refused)

    def _observe_dispatch(self, env: Envelope) -> None:
        self.metrics.dispatch_latency.observe(max(0.0, time.time() - env.ts / 1000))

    async def start(self) -> None:
        gcpolicy.tune_young()
        await self.backend.start()
        await self.revocations.start()
        self._tasks.append(asyncio.create_task(self.revocations.run()))
        self._tasks.append(asyncio.create_task(self.loop_lag.run()))
        for setup in self.plugin_setups:
            result = setup(self.plugins)
            if inspect.isawaitable(result):
                await result
        self._tasks.append(asyncio.create_task(self.presence.run()))
        self._tasks.extend(self.plugins.start_emitters())
        log.info("gateway %s started on the %s backend", self.gateway_id, type(self.backend).__name__)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.presence.withdraw(), timeout=2.0)
        await self.hub.close()
        await self.backend.close()

    async def ready(self) -> tuple[bool, str]:
        """Readiness: backend reachable and delivering, not draining."""
        if self.pool.draining:
            return False, "draining"
        if not self.backend.connected:
            return False, "backend disconnected"
        try:
            ok = await asyncio.wait_for(self.backend.ping(), timeout=1.0)
        except Exception:
            ok = False
        return (True, "ok") if ok else (False, "backend unreachable")
