"""A hub subscriber for tests that drive the hub directly: it keeps every object it is sent."""

from __future__ import annotations

from typing import Any

import orjson


class Sink:
    """A subscriber that keeps every object the hub queues for it."""

    def __init__(self, name: str = "sink") -> None:
        self.connection_id = name
        self.objects: list[dict[str, Any]] = []

    def send(self, data: bytes) -> None:
        self.objects.append(orjson.loads(data))

    @property
    def seqs(self) -> list[int]:
        """The seqs of the events, in the order sent (``ws.*`` controls left out)."""
        return [o["seq"] for o in self.objects if not o["type"].startswith("ws.")]

    def controls(self, kind: str) -> list[dict[str, Any]]:
        """Every object of type ``kind``."""
        return [o for o in self.objects if o["type"] == kind]
