"""Short full garbage collections on a big heap: each one's survivors frozen, the whole heap walked rarely.

CPython's cycle collector walks every tracked object on a full (generation 2) collection,
and the event loop runs nothing meanwhile. An idle websocket is ~57 tracked objects
(coroutines, bound methods, lists of uvicorn and websockets): at 18,000 sockets 1.25 M
objects, and a full collection took 1.0-1.1 s of CPU on the bench VM (1.3-1.7 s of wall
time under load; bench/many_sockets.py) - long enough for a Redis pub/sub probe to miss
its PONG; with those survivors frozen, the next full collection took 0.1 ms. Full
collections come each time the heap grew by a quarter (a ramp of connections, a reconnect
storm) and from objects promoted while idle.

:class:`FrozenSurvivors`: after every full collection its survivors move to the permanent
generation (``gc.freeze``), so the next full collections walk only what is newer than the
last one. A cycle among frozen objects that later becomes garbage is not freed by those -
and a closed socket is such a cycle (its protocol, transport, the scope's bound methods and
websockets' parser generator refer to each other: ~30 objects, ~10 KB, freed only by the
cycle collector). So the permanent generation is unfrozen, and the next full collection
walks and frees everything once, when either comes first: ``rescan`` seconds passed, or
the connections closed since the last whole-heap walk reach ``turnover`` of those open at
it (the frozen dead then stay under about a quarter of the live ones, as CPython's own rule keeps
them without freezing). So a ramp or a reconnect storm (the heap growing) costs short full
collections only, and steady churn costs what it costs without the policy.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("gateway.gc")

RESCAN_SECONDS = 600.0
"""Default seconds between full collections that walk the whole heap."""
TURNOVER = 0.25
"""Connections closed since the last freeze, as a share of those open then, that make the next full
collection walk the whole heap (CPython starts a full collection when the heap grew by a quarter)."""
MIN_SOCKETS = 1_000
"""The open count the turnover applies to at least: below it a whole-heap walk is short anyway."""


GC_GEN0_THRESHOLD = 10_000
"""Allocations between young-generation collections (CPython's default: 700).

Every websocket a gateway accepts leaves a few hundred tracked objects alive (protocol, scope,
session, subscription, buffers). At 700 the young collections promoted them fast enough to
start a full collection about every 1,000 connects, each walking every live socket's objects
and stalling the event loop meanwhile: 10,000 resumes onto 5,000 held sockets (Redis, JWT,
bench/connect_cost.py) ran 10 full collections of ~200 ms, 16 % of the gateway's CPU in the
collector. At 10,000: one full collection, 8 % of the CPU in all. Cyclic garbage waits a
little longer; reference counting frees everything else at once, as before."""


def tune_young(gen0: int = GC_GEN0_THRESHOLD) -> None:
    """Raise the collector's young-generation threshold to ``gen0`` (never lower it, nor turn on a
    collector set to 0); the older generations' thresholds stay as they are. Process-wide."""
    current, gen1, gen2 = gc.get_threshold()
    if 0 < current < gen0:
        gc.set_threshold(gen0, gen1, gen2)


class FrozenSurvivors:
    """The gc callback of the policy (see the module docstring); :meth:`install` / :meth:`uninstall` it."""

    def __init__(self, rescan: float = RESCAN_SECONDS, clock: Callable[[], float] = time.monotonic, *,
                 sockets: Callable[[], tuple[int, int]] | None = None, turnover: float = TURNOVER) -> None:
        """``sockets``: (connections closed so far, connections open now), read at each full collection;
        None: rescan by time only."""
        self.rescan, self.clock = rescan, clock
        self.rescan_at = clock() + rescan
        self.sockets, self.turnover = sockets, turnover
        self._closed_at_freeze, self._open_at_freeze = 0, 0
        self._walked_all = True
        """Nothing is frozen: the next full collection walks the whole heap (the counts are taken then)."""
        self.frozen = 0
        """Full collections whose survivors were frozen."""
        self.rescans = 0
        """Times the permanent generation was unfrozen for a whole-heap collection."""

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or info.get("generation") != 2:
            return
        closed, opened = self.sockets() if self.sockets is not None else (0, 0)
        if not self._walked_all:
            now = self.clock()
            churned = (self.sockets is not None and closed - self._closed_at_freeze
                       >= self.turnover * max(self._open_at_freeze, MIN_SOCKETS))
            if now >= self.rescan_at or churned:
                # The next full collection walks everything (and frees the cycles frozen since the last
                # whole-heap walk); its survivors are frozen after it.
                self.rescan_at = now + self.rescan
                self.rescans += 1
                self._walked_all = True
                gc.unfreeze()
                return
        gc.freeze()  # safe in a "stop" callback: the collection is over, freeze only moves lists
        self.frozen += 1
        if self._walked_all:  # this collection walked the whole heap: what dies from now on is held
            self._walked_all = False
            self._closed_at_freeze, self._open_at_freeze = closed, opened

    def install(self) -> FrozenSurvivors:
        if self not in gc.callbacks:
            gc.callbacks.append(self)
        return self

    def uninstall(self) -> None:
        """Stop freezing and unfreeze what was frozen (the next full collection walks it again)."""
        if self in gc.callbacks:
            gc.callbacks.remove(self)
        gc.unfreeze()


def install(rescan: float = RESCAN_SECONDS, sockets: Callable[[], tuple[int, int]] | None = None) -> FrozenSurvivors:
    """Freeze each full collection's survivors from now on in this process; rescan every ``rescan`` s or
    after a turnover of ``sockets`` (see :class:`FrozenSurvivors`).

    Meant for a gateway once it started (its imported modules and start-up state are frozen by
    the first full collection). ``rescan`` <= 0: do nothing (the interpreter's own behaviour)."""
    policy = FrozenSurvivors(rescan, sockets=sockets)
    if rescan > 0:
        policy.install()
        log.debug("gc: survivors of full collections frozen, whole heap walked every %.0fs", rescan)
    return policy
