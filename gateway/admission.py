"""Admission of new websockets: how many initial handshakes may be in progress at once.

A reconnect storm (a gateway died; its clients all resume on the others) makes every
survivor accept, authenticate and replay history for thousands of sockets at once. Past
``limit`` handshakes in progress a new one is refused before the upgrade (HTTP 503,
``Retry-After: 1``): cheap for the gateway, and a load balancer may try another gateway
(nginx: ``proxy_next_upstream http_503``); clients retry with their jittered backoff.
"""

from __future__ import annotations


class AdmissionSlot:
    """One admitted handshake; :meth:`release` (idempotent) ends it."""

    __slots__ = ("_admission",)

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission.pending -= 1


class Admission:
    """At most ``limit`` handshakes in progress (0: no limit); ``refused`` counts the refusals."""

    __slots__ = ("limit", "pending", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = 0
        self.refused = 0

    def enter(self) -> AdmissionSlot | None:
        """A slot for one more handshake, or None (counted in ``refused``) when ``limit`` are in progress."""
        if self.limit and self.pending >= self.limit:
            self.refused += 1
            return None
        self.pending += 1
        return AdmissionSlot(self)
