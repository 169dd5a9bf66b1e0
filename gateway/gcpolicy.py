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
last one. A cycle among frozen objects that later becomes garbage (the protocol, task and
bound methods of a closed socket) is not freed by those; every ``rescan`` seconds the
permanent generation is unfrozen, so the next full collection walks, and frees, everything
once. So: one long pause per ``rescan`` instead of one per quarter of heap growth, and
memory held in cycles by closed sockets waits up to ``rescan`` (plus one full collection)
to be freed.
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

    def __init__(self, rescan: float = RESCAN_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.rescan, self.clock = rescan, clock
        self.rescan_at = clock() + rescan
        self.frozen = 0
        """Full collections whose survivors were frozen."""
        self.rescans = 0
        """Times the permanent generation was unfrozen for a whole-heap collection."""

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or info.get("generation") != 2:
            return
        now = self.clock()
        if now >= self.rescan_at:
            # The next full collection walks everything (and frees the cycles frozen since the last rescan);
            # its survivors are frozen again after it.
            self.rescan_at = now + self.rescan
            self.rescans += 1
            gc.unfreeze()
            return
        gc.freeze()  # safe in a "stop" callback: the collection is over, freeze only moves lists
        self.frozen += 1

    def install(self) -> FrozenSurvivors:
        if self not in gc.callbacks:
            gc.callbacks.append(self)
        return self

    def uninstall(self) -> None:
        """Stop freezing and unfreeze what was frozen (the next full collection walks it again)."""
        if self in gc.callbacks:
            gc.callbacks.remove(self)
        gc.unfreeze()


def install(rescan: float = RESCAN_SECONDS) -> FrozenSurvivors:
    """Freeze each full collection's survivors from now on in this process; rescan every ``rescan`` s.

    Meant for a gateway once it started (its imported modules and start-up state are frozen by
    the first full collection). ``rescan`` <= 0: do nothing (the interpreter's own behaviour)."""
    policy = FrozenSurvivors(rescan)
    if rescan > 0:
        policy.install()
        log.debug("gc: survivors of full collections frozen, whole heap walked every %.0fs", rescan)
    return policy
