"""Whole entities from a conversation's stream: ``ws.state``, upserts, appends and deletes (docs/streaming.md).

:class:`EntityMap` is I/O-free: feed it every object of one conversation's stream in
order (the event objects of CONTRACT §3 and ``ws.state`` / ``ws.reset``) and it keeps
each key's whole entity, so application code sees whole messages, never chunks:

* ``ws.state``: the map becomes its entities (a hydrate, or the reload after a reset);
* an event with a ``key``: replaces the entity (``data`` null: deletes it);
* an event with ``"op": "append"``: merges its chunk into the entity (each string field
  extends the entity's, any other field replaces it; an entity not held starts empty),
  taking the event's seq, id, type and ts - exactly what the server's state does;
* an event with ``"op": "delta"``: patches the entity it was sent against (``base``: the seq
  of that version; :func:`broadcaster.delta.apply_patch`), taking the event's seq and fields;
* ``ws.reset``: the map is emptied (what it held may have missed events); subscribe with
  ``hydrate`` to get it back whole from the next ``ws.state``.

``apply`` returns what changed, as ``(key, entity or None)`` pairs, for a callback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from broadcaster.delta import apply_patch

log = logging.getLogger("producers.entities")

APPEND = "append"

Entity = dict[str, Any]
"""One entity: an event object (``type``, ``conv_id``, ``seq``, ``id``, ``ts``, ``data``, ``key``...)."""
Change = tuple[str, Entity | None]
"""A key and its entity now (None: deleted)."""


def merge_append(data: Any, chunk: dict[str, Any]) -> dict[str, Any]:
    """``data`` after the append ``chunk`` (the rule of publish.lua's APPEND)."""
    merged = dict(data) if isinstance(data, dict) else {}
    for name, value in chunk.items():
        old = merged.get(name)
        merged[name] = old + value if isinstance(value, str) and isinstance(old, str) else value
    return merged


class EntityMap:
    """The entities of one conversation, by key; see the module docstring."""

    def __init__(self) -> None:
        self._entities: dict[str, Entity] = {}

    def get(self, key: str) -> Entity | None:
        return self._entities.get(key)

    def __getitem__(self, key: str) -> Entity:
        return self._entities[key]

    def __contains__(self, key: object) -> bool:
        return key in self._entities

    def __iter__(self) -> Iterator[str]:
        return iter(self._entities)

    def __len__(self) -> int:
        return len(self._entities)

    def snapshot(self) -> dict[str, Entity]:
        """A copy of every entity, by key."""
        return {k: dict(v) for k, v in self._entities.items()}

    def data(self) -> dict[str, Any]:
        """Each entity's ``data``, by key (what an application usually shows)."""
        return {k: v.get("data") for k, v in self._entities.items()}

    def apply(self, obj: dict[str, Any]) -> list[Change]:
        """Apply one object of the stream; returns the keys it changed and their entities now."""
        kind = obj.get("type")
        if kind == "ws.state":
            old = self._entities
            self._entities = {str(k): dict(v) for k, v in dict(obj.get("entities") or {}).items()}
            changes: list[Change] = [(k, None) for k in old if k not in self._entities]
            return changes + [(k, v) for k, v in self._entities.items() if old.get(k) != v]
        if kind == "ws.reset":
            gone = [(k, None) for k in self._entities]
            self._entities = {}
            return list(gone)
        if not isinstance(kind, str) or kind.startswith("ws.") or not isinstance(obj.get("key"), str):
            return []
        key = obj["key"]
        if obj.get("op") == "delta":
            held = self._entities.get(key)
            if held is None or held.get("seq") != obj.get("base"):  # the server never sends this
                log.warning("delta for %r against seq %s, but the entity held is %s: dropped", key,
                            obj.get("base"), None if held is None else held.get("seq"))
                return [(key, None)] if self._entities.pop(key, None) is not None else []
            entity = {k: v for k, v in obj.items() if k not in ("op", "base")}
            patch = obj.get("data")
            entity["data"] = apply_patch(held.get("data"), patch if isinstance(patch, dict) else {})
        elif obj.get("op") == APPEND:
            held = self._entities.get(key)
            chunk = obj.get("data")
            entity = {k: v for k, v in obj.items() if k != "op"}
            entity["data"] = merge_append(held.get("data") if held else None, chunk if isinstance(chunk, dict) else {})
        elif obj.get("data") is None:
            if self._entities.pop(key, None) is None:
                return []
            return [(key, None)]
        else:
            entity = dict(obj)
        self._entities[key] = entity
        return [(key, entity)]
