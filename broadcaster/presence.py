"""Reports this process's subscribers to the backend, so presence spans every gateway."""

from __future__ import annotations

import asyncio
import logging

from broadcaster.backend import Backend
from broadcaster.hub import Hub

log = logging.getLogger("broadcaster.presence")


class PresenceReporter:
    """Pushes ``{conv: {profile: n}}`` of a hub to the backend.

    Changes are flushed every ``flush_interval`` seconds; everything is refreshed
    every ``heartbeat`` seconds with a TTL of ``ttl``, so the counts of a gateway
    that dies expire by themselves.
    """

    def __init__(
        self, hub: Hub, backend: Backend, gateway_id: str, *, heartbeat: float = 5.0, ttl: float = 15.0,
        flush_interval: float = 0.2,
    ) -> None:
        self._hub, self._backend, self._gateway_id = hub, backend, gateway_id
        self._heartbeat, self._ttl, self._flush_interval = heartbeat, ttl, flush_interval
        self._reported: dict[str, set[str]] = {}  # conv -> profiles with a non-zero report
        self._slice = 1

    def _counts(self, convs: set[str]) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for conv in convs:
            now = self._hub.presence_counts(conv)
            for gone in self._reported.get(conv, set()) - set(now):
                now[gone] = 0
            if now:
                counts[conv] = now
        return counts

    async def report(self, convs: set[str]) -> None:
        """Report the current counts of ``convs`` (zero for profiles no longer watched)."""
        counts = self._counts(convs)
        if not counts:
            return
        await self._backend.report_presence(self._gateway_id, counts, self._ttl)
        for conv, by_profile in counts.items():
            live = {p for p, n in by_profile.items() if n > 0}
            if live:
                self._reported[conv] = live
            else:
                self._reported.pop(conv, None)

    async def run(self) -> None:
        """Flush changes and heartbeats until cancelled; backend errors are logged and retried.

        The heartbeat is spread over its interval: every flush refreshes the next slice
        of the watched conversations, so each is refreshed once per ``heartbeat`` and no
        tick sends more than its share. (Refreshing thousands of conversations in one
        burst stalls the event loop and Redis for everyone.)
        """
        pending: set[str] = set()
        rotation: list[str] = []
        while True:
            pending |= self._hub.take_dirty()
            if not rotation:
                rotation = list(set(self._hub.conversations()) | set(self._reported))
                ticks = max(1, int(self._heartbeat / self._flush_interval))
                self._slice = max(1, -(-len(rotation) // ticks))  # ceil: one pass per heartbeat
            pending.update(rotation[-self._slice:])
            del rotation[-self._slice:]
            if pending:
                try:
                    await self.report(pending)
                    pending = set()
                except Exception as exc:
                    log.warning("presence report failed: %s", exc)
            await asyncio.sleep(self._flush_interval)

    async def withdraw(self) -> None:
        """Report zero for everything this gateway reported (on shutdown)."""
        counts = {conv: dict.fromkeys(profiles, 0) for conv, profiles in self._reported.items()}
        if counts:
            await self._backend.report_presence(self._gateway_id, counts, self._ttl)
        self._reported.clear()
