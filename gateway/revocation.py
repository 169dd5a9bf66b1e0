"""Revocation on this gateway: ``disconnect`` control messages close local connections, the deny list refuses.

A ``{"kind": "disconnect", "sub"?, "conv_id"?, "code"?, "reason"?, "until"?}`` control
message (:meth:`Backend.publish_control`, sent by ``POST /v1/disconnect``) reaches every
gateway of the backend. Each closes its own connections (websocket and SSE: both are
:class:`Connection` objects of the pool) whose user is ``sub`` and / or that subscribe
``conv_id`` (both given: both must match), with ``code`` (default 4403, which makes our
clients stop reconnecting) and ``reason`` (default ``revoked``).

With ``until`` (ms since the epoch) and ``sub``, the subject is also denied until then:
:meth:`Revocations.refusal` is the Authenticator's ``refuse_subject``, so its tokens are
refused (4403 / HTTP 403) at connect and at refresh. The deny map is the backend's
:meth:`Backend.revocations`, loaded at start, after every reconnect of the backend's
pub/sub and every ``reload_interval`` seconds (messages sent while this gateway was cut
from Redis are lost; the persisted list is not). After a reload that found new entries, and one
second after each deny message, a sweep closes (4403) the local connections of those subjects: a
missed message still takes effect, and so does a deny that arrived while a handshake
that had verified its token was not in the pool yet.

Metrics: ``broadcaster_revocation_closes_total``, ``broadcaster_disconnect_messages_total``,
``broadcaster_denied_subjects``.

Other kinds of control messages (``join``, ``leave``...) are ignored here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broadcaster.backend import Backend
from broadcaster.control import (
    DEFAULT_CLOSE_CODE,
    DEFAULT_CLOSE_REASON,
    DISCONNECT,
    LIFT,
    MAX_REASON_BYTES,
    disconnect_message,
    now_ms,
    valid_close_code,
)
from gateway.auth import Authenticator
from gateway.connection import ConnectionPool

log = logging.getLogger("gateway.revocation")

KIND = DISCONNECT
DEFAULT_CODE = DEFAULT_CLOSE_CODE
DEFAULT_REASON = DEFAULT_CLOSE_REASON
RELOAD_INTERVAL = 30.0
"""Seconds between two reloads of the deny list (the backstop for a control message missed)."""
SWEEP_DELAY = 1.0
"""Seconds after a deny before the connections are looked at again: a handshake that verified its token
just before the message arrived is in the pool by then."""


def iso_ms(ms: int) -> str:
    """``ms`` since the epoch as an ISO-8601 UTC time (second precision)."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Disconnect:
    """What a disconnect message asks: which connections to close (``sub`` and / or ``conv_id``), how, how long."""

    sub: str | None = None
    conv_id: str | None = None
    code: int = DEFAULT_CODE
    reason: str = DEFAULT_REASON
    until: int | None = None

    def message(self) -> dict[str, Any]:
        """The control message (fields left out when unset); ValidationError if a field is out of bounds."""
        return disconnect_message(self.sub, self.conv_id, code=self.code, reason=self.reason, until_ms=self.until)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Disconnect | None:
        """The disconnect a control message asks for, or None if it is malformed (logged)."""
        sub, conv_id = message.get("sub"), message.get("conv_id")
        code, reason, until = message.get("code", DEFAULT_CODE), message.get("reason", DEFAULT_REASON), \
            message.get("until")
        if (sub is not None and not isinstance(sub, str)) or (conv_id is not None and not isinstance(conv_id, str)) \
                or (sub is None and conv_id is None) or not valid_close_code(code) or not isinstance(reason, str) \
                or (until is not None and (type(until) is not int or sub is None)):
            log.warning("ignored a malformed disconnect message: %.200r", message)
            return None
        return cls(sub, conv_id, code, reason.encode()[:MAX_REASON_BYTES].decode(errors="ignore"), until)


class Revocations:
    """This gateway's side of revocation (see the module docstring)."""

    def __init__(self, backend: Backend, pool: ConnectionPool, auth: Authenticator, *,
                 reload_interval: float = RELOAD_INTERVAL, registry: CollectorRegistry | None = None) -> None:
        self._backend = backend
        self._pool = pool
        self._auth = auth
        self._reload_interval = reload_interval
        self._denied: dict[str, int] = {}  # sub -> until (ms since the epoch)
        self.closed = 0
        """Connections this gateway closed for a disconnect (a message, a reload, a sweep)."""
        self.messages = 0
        """Disconnect messages received."""
        if registry is not None:
            registry.register(_Collector(self))

    @property
    def denied(self) -> dict[str, int]:
        """The deny map as this gateway knows it (expired entries may linger until looked at)."""
        return dict(self._denied)

    async def start(self) -> None:
        """Listen to control messages, load the deny list and refuse its subjects (call once the backend started)."""
        self._backend.add_control_listener(self.on_control)
        self._backend.add_reconnect_callback(self.reload)
        self._auth.refuse_subject = self.refusal
        await self.reload()

    async def run(self) -> None:
        """Reload the deny list every ``reload_interval`` seconds, forever (a task of the gateway)."""
        while True:
            await asyncio.sleep(self._reload_interval)
            try:
                await self.reload()
            except Exception as exc:  # Redis down: the reconnect callback reloads when it is back
                log.debug("reloading the deny list failed: %r", exc)

    async def reload(self) -> None:
        """Replace the deny map with the backend's; close the connections of subjects newly denied."""
        found = dict(await self._backend.revocations())
        known, self._denied = self._denied, found
        fresh = {sub for sub, until in found.items() if known.get(sub) != until}
        if fresh:  # a scan of the pool only when the list changed
            self.sweep(fresh)

    def sweep(self, subs: set[str] | None = None) -> int:
        """Close (4403) every local connection of a denied subject (of ``subs``, when given); returns how many.

        Catches what a message could not: one missed while cut from Redis, a handshake
        that verified its token just before the deny arrived. One scan of the pool.
        """
        now, denied, closed = now_ms(), self._denied, 0
        if not denied:
            return 0
        for conn in list(self._pool.connections.values()):
            user = conn.user
            if user is not None and not conn.closing and denied.get(user, 0) > now and (subs is None or user in subs):
                conn.close(DEFAULT_CODE, DEFAULT_REASON)
                closed += 1
        self.closed += closed
        return closed

    def refusal(self, sub: str) -> str | None:
        """``refuse_subject`` of the Authenticator: why ``sub``'s tokens are refused now, or None."""
        until = self._denied.get(sub)
        if until is None:
            return None
        if until <= now_ms():
            self._denied.pop(sub, None)
            return None
        return f"user revoked until {iso_ms(until)}"

    def on_control(self, message: dict[str, Any]) -> None:
        """The control listener: act on ``disconnect`` and ``lift`` messages, ignore every other kind."""
        kind = message.get("kind")
        if kind == LIFT:
            sub = message.get("sub")
            if isinstance(sub, str) and self._denied.pop(sub, None) is not None:
                log.info("revocation of %r lifted", sub)
            return
        if kind != KIND:
            return
        wanted = Disconnect.from_message(message)
        if wanted is None:
            return
        self.messages += 1
        if wanted.until is not None and wanted.sub is not None and wanted.until > now_ms():
            self._denied[wanted.sub] = wanted.until  # replaces an earlier entry, as Backend.revoke does
            asyncio.get_running_loop().call_later(SWEEP_DELAY, self.sweep, {wanted.sub})
        closed = self.close_matching(wanted)
        log.info("disconnect %.200r: closed %d connection(s) with %d", message, closed, wanted.code)

    def close_matching(self, wanted: Disconnect) -> int:
        """Close every local connection ``wanted`` names; returns how many."""
        closed = 0
        for conn in list(self._pool.connections.values()):
            if conn.closing:
                continue
            if wanted.sub is not None and conn.user != wanted.sub:
                continue
            if wanted.conv_id is not None and wanted.conv_id not in conn.convs:
                continue
            conn.close(wanted.code, wanted.reason)
            closed += 1
        self.closed += closed
        return closed


class _Collector(Collector):
    """``broadcaster_revocation_closes``, ``broadcaster_disconnect_messages``, ``broadcaster_denied_subjects``."""

    def __init__(self, revocations: Revocations) -> None:
        self._revocations = revocations

    def collect(self) -> Iterator[Metric]:
        r = self._revocations
        yield CounterMetricFamily("broadcaster_revocation_closes", "Connections closed by a disconnect or a deny",
                                  value=r.closed)
        yield CounterMetricFamily("broadcaster_disconnect_messages", "Disconnect control messages received",
                                  value=r.messages)
        yield GaugeMetricFamily("broadcaster_denied_subjects", "Subjects in the deny list as this gateway knows it",
                                value=len(r._denied))
