"""gateway.gcpolicy on the real collector: full collections freeze their survivors, later ones walk only what
is newer, cycles frozen with them are freed after a rescan, and uninstall leaves the process as it was."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator

import pytest

from gateway.gcpolicy import FrozenSurvivors, install

pytestmark = pytest.mark.timeout(30)


class Node:
    """A cycle of one: freed only by the cycle collector."""

    def __init__(self) -> None:
        self.me = self


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Iterator[Clock]:
    clock = Clock()
    yield clock
    gc.unfreeze()


def _collect_timed() -> float:
    t0 = time.perf_counter()
    gc.collect()
    return time.perf_counter() - t0


def test_survivors_of_a_full_collection_are_frozen_and_the_next_walks_only_newer_objects(clock: Clock) -> None:
    policy = FrozenSurvivors(rescan=600, clock=clock).install()
    try:
        gc.disable()  # no automatic collection while the heap is built: the first full one is ours
        try:
            heap = [[i] for i in range(300_000)]  # long-lived, tracked: what idle sockets are
            whole = _collect_timed()  # walks everything, then freezes it
        finally:
            gc.enable()
        assert gc.get_freeze_count() >= len(heap) and policy.frozen == 1
        young = min(_collect_timed() for _ in range(3))
        assert young < whole / 3, (young, whole)  # the frozen heap is not walked again
    finally:
        policy.uninstall()
    assert gc.get_freeze_count() == 0 and policy not in gc.callbacks


def test_a_cycle_frozen_then_dropped_is_freed_after_the_rescan(clock: Clock) -> None:
    policy = FrozenSurvivors(rescan=600, clock=clock).install()
    try:
        node = Node()
        alive = weakref.ref(node)
        gc.collect()  # node survives: frozen
        del node
        gc.collect()
        assert alive() is not None  # garbage, but frozen: a closed socket's cycles wait for the rescan
        clock.now += 601
        gc.collect()  # due: this one unfreezes
        assert policy.rescans == 1
        frozen = policy.frozen
        gc.collect()  # the whole heap again
        assert alive() is None
        assert gc.get_freeze_count() > 0 and policy.frozen == frozen + 1  # and its survivors frozen again
    finally:
        policy.uninstall()


def test_a_quarter_of_the_sockets_closed_since_the_freeze_brings_the_rescan_forward(clock: Clock) -> None:
    counts = {"closed": 0, "open": 4_000}
    policy = FrozenSurvivors(rescan=600, clock=clock, sockets=lambda: (counts["closed"], counts["open"])).install()
    try:
        node = Node()  # stands for a socket open at the freeze
        alive = weakref.ref(node)
        gc.collect()  # frozen, with 4,000 sockets open
        del node
        counts.update(closed=999, open=3_001)
        gc.collect()
        assert alive() is not None and policy.rescans == 0  # 999 < a quarter of 4,000: still frozen
        counts.update(closed=1_000, open=3_000)
        gc.collect()  # a quarter closed: this one unfreezes (long before the 600 s)
        assert policy.rescans == 1
        gc.collect()
        assert alive() is None  # the dead socket's cycle freed by the whole-heap walk
        counts.update(closed=1_100)  # counted from the new freeze on: 100 of 3,000 is no turnover
        gc.collect()
        assert policy.rescans == 1
    finally:
        policy.uninstall()


def test_young_collections_and_a_disabled_policy_freeze_nothing(clock: Clock) -> None:
    policy = FrozenSurvivors(rescan=600, clock=clock).install()
    try:
        gc.collect(0)
        gc.collect(1)
        assert gc.get_freeze_count() == 0 and policy.frozen == 0
    finally:
        policy.uninstall()
    off = install(rescan=0)
    assert off not in gc.callbacks
    gc.collect()
    assert gc.get_freeze_count() == 0


def test_a_served_gateway_installs_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """gateway.server.serve (every gateway process and every --workers worker) installs it before serving."""
    from gateway import gcpolicy, server
    from gateway.app import create_app
    from gateway.settings import Settings

    order: list[str] = []
    monkeypatch.setattr(gcpolicy, "install", lambda rescan=gcpolicy.RESCAN_SECONDS, sockets=None:
                        order.append("install" if sockets is not None and sockets() == (0, 0) else "bad install"))
    monkeypatch.setattr(server.DrainingServer, "run", lambda self, sockets=None: order.append("run"))
    server.serve(create_app(Settings()), Settings())
    assert order == ["install", "run"]
