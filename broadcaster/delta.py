"""Delta upserts (docs/streaming.md "Delta upserts"): a patch from one version of an entity's data to the next.

A patch is a JSON object, applied to an object ``T`` (anything else counts as ``{}``)
member by member, as RFC 7386 JSON merge patch does, with two escapes:

* ``null``: remove the member from ``T``;
* ``{"$append": s}`` (exactly that one member, ``s`` a string): ``T[name] += s``;
* ``{"$set": v}`` (exactly that one member): ``T[name] = v``, verbatim (``v`` may be null or an object);
* any other object: apply it, recursively, to ``T[name]`` (``{}`` if that is not an object);
* anything else (string, number, boolean, array): ``T[name] = value``.

:func:`make_patch` only recurses into objects whose member names do not start with
``$``, and writes every object that replaces something as ``{"$set": ...}``, so a patch
is never ambiguous whatever the data holds.
"""

from __future__ import annotations

from typing import Any

APPEND, SET = "$append", "$set"


def _plain(obj: dict[str, Any]) -> bool:
    return not any(name.startswith("$") for name in obj)


def make_patch(old: Any, new: Any) -> dict[str, Any] | None:
    """The patch taking ``old`` to ``new`` (both objects), or None when one of them is not an object."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None
    patch: dict[str, Any] = {name: None for name in old if name not in new}
    for name, value in new.items():
        if name in old:
            before = old[name]
            if before == value and type(before) is type(value):
                continue
            if isinstance(value, str) and isinstance(before, str) and before and value.startswith(before):
                patch[name] = {APPEND: value[len(before):]}
                continue
            if isinstance(value, dict) and isinstance(before, dict) and _plain(value) and _plain(before):
                patch[name] = make_patch(before, value)
                continue
        patch[name] = {SET: value} if value is None or isinstance(value, dict) else value
    return patch


def apply_patch(target: Any, patch: dict[str, Any]) -> dict[str, Any]:
    """``target`` with ``patch`` applied (a new object; ``target`` is left as it was)."""
    out = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            out.pop(name, None)
        elif isinstance(value, dict):
            if len(value) == 1 and isinstance(value.get(APPEND), str):
                before = out.get(name)
                out[name] = (before if isinstance(before, str) else "") + value[APPEND]
            elif len(value) == 1 and SET in value:
                out[name] = value[SET]
            else:
                out[name] = apply_patch(out.get(name), value)
        else:
            out[name] = value
    return out
