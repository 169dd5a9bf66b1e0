"""Profiles: which events a connection sees and how they are shaped (CONTRACT §4).

A profile is applied once per event per gateway: the hub renders an event for a
profile once and hands the same bytes to every connection using that profile.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broadcaster.errors import ValidationError
from broadcaster.importing import import_callable
from broadcaster.validation import is_valid_name

EventObject = dict[str, Any]


@dataclass(slots=True, frozen=True)
class EnrichContext:
    """What an enrich hook knows besides the event."""

    profile: str
    conv_id: str
    gateway_id: str


Enricher = Callable[[EventObject, EnrichContext], EventObject | None]
"""Takes the event object (after drop_fields; its own copy) and returns it, a new one, or None to drop it."""

_GLOB_CHARS = re.compile(r"[A-Za-z0-9._:*?\[\]!-]{1,128}")
_CACHE_LIMIT = 4096
MAX_TYPE_GLOBS = 16


class ProfileError(ValueError):
    """A profile file or definition that cannot be used; the message names the file and key."""


class GlobSet:
    """A set of fnmatch patterns on event types, matched case-sensitively, results cached."""

    __slots__ = ("_cache", "_regex", "patterns")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        for pattern in self.patterns:
            if not isinstance(pattern, str) or not _GLOB_CHARS.fullmatch(pattern):
                raise ValueError(f"bad pattern {pattern!r}: 1-128 characters of [A-Za-z0-9._:-] and glob *?[]!")
        joined = "|".join(fnmatch.translate(p) for p in self.patterns)
        self._regex = re.compile(joined) if joined else None
        self._cache: dict[str, bool] = {}

    def matches(self, event_type: str) -> bool:
        hit = self._cache.get(event_type)
        if hit is None:
            hit = self._regex is not None and self._regex.match(event_type) is not None
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[event_type] = hit
        return hit


def parse_type_filter(raw: str | Iterable[str] | None) -> GlobSet | None:
    """The ``types`` narrowing of a subscription: comma-separated globs, at most 16; raises ValidationError."""
    if raw is None:
        return None
    items = [p.strip() for p in raw.split(",")] if isinstance(raw, str) else list(raw)
    if not items or len(items) > MAX_TYPE_GLOBS:
        raise ValidationError("types", f"give 1 to {MAX_TYPE_GLOBS} comma-separated patterns")
    try:
        return GlobSet(items)
    except ValueError as exc:
        raise ValidationError("types", str(exc)) from None


def _drop_path(obj: Any, path: tuple[str, ...]) -> Any:
    """``obj`` without the dotted ``path``; copies only the dicts along the path."""
    if not isinstance(obj, dict) or path[0] not in obj:
        return obj
    if len(path) == 1:
        return {k: v for k, v in obj.items() if k != path[0]}
    child = obj[path[0]]
    new_child = _drop_path(child, path[1:])
    if new_child is child:
        return obj
    out = dict(obj)
    out[path[0]] = new_child
    return out


@dataclass(slots=True)
class Profile:
    """One named profile: include/exclude globs, dropped data fields, enrich hooks."""

    name: str
    include: GlobSet = field(default_factory=lambda: GlobSet(["*"]))
    exclude: GlobSet = field(default_factory=lambda: GlobSet([]))
    drop_fields: tuple[tuple[str, ...], ...] = ()
    enrich: tuple[Enricher, ...] = ()
    _allowed: dict[str, bool] = field(default_factory=dict, init=False, repr=False, compare=False)
    """``allows`` by event type, as GlobSet caches ``matches``: one lookup per event and profile, not two."""

    def allows(self, event_type: str) -> bool:
        hit = self._allowed.get(event_type)
        if hit is None:
            hit = self.include.matches(event_type) and not self.exclude.matches(event_type)
            if len(self._allowed) >= _CACHE_LIMIT:
                self._allowed.clear()
            self._allowed[event_type] = hit
        return hit

    def shape(self, event: EventObject, ctx: EnrichContext) -> EventObject | None:
        """Apply drop_fields then enrich hooks to an event object this profile allows.

        ``event`` is not modified; the result may share unchanged parts with it.
        """
        if self.drop_fields:
            data = event.get("data")
            for path in self.drop_fields:
                data = _drop_path(data, path)
            if data is not event.get("data"):
                event = {**event, "data": data}
        for hook in self.enrich:
            result = hook(copy.deepcopy(event), ctx)
            if result is None:
                return None
            event = result
        return event


_ALLOWED_KEYS = {"include", "exclude", "drop_fields", "enrich"}


def _names(keys: Iterable[Any]) -> list[str]:
    """Keys for an error message, sortable whatever their types."""
    return sorted(repr(k) if not isinstance(k, str) else k for k in keys)


def _string_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProfileError(f"{where}: must be a list of strings")
    return value


def build_profile(name: str, spec: Mapping[str, Any], where: str = "profile") -> Profile:
    """Validate one ``[profiles.NAME]`` table; raises ProfileError naming ``where`` and the key."""
    if not is_valid_name(name):
        raise ProfileError(f"{where}: profile name {name!r} must be 1-128 characters of [A-Za-z0-9._:-]")
    if not isinstance(spec, Mapping):
        raise ProfileError(f"{where}: must be a table")
    unknown = set(spec) - _ALLOWED_KEYS
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {_names(unknown)}; allowed: {sorted(_ALLOWED_KEYS)}")
    include_patterns = _string_list(spec.get("include", ["*"]), f"{where}.include")
    exclude_patterns = _string_list(spec.get("exclude", []), f"{where}.exclude")
    # Only GlobSet's own ValueError is wrapped: a ProfileError already names where it is.
    try:
        include = GlobSet(include_patterns)
    except ValueError as exc:
        raise ProfileError(f"{where}.include: {exc}") from None
    try:
        exclude = GlobSet(exclude_patterns)
    except ValueError as exc:
        raise ProfileError(f"{where}.exclude: {exc}") from None
    paths = []
    for dotted in _string_list(spec.get("drop_fields", []), f"{where}.drop_fields"):
        parts = tuple(dotted.split("."))
        if not all(parts):
            raise ProfileError(f"{where}.drop_fields: bad dotted path {dotted!r}")
        paths.append(parts)
    hooks = []
    for target in _string_list(spec.get("enrich", []), f"{where}.enrich"):
        try:
            hooks.append(import_callable(target))
        except ValueError as exc:
            raise ProfileError(f"{where}.enrich: {exc}") from None
    return Profile(name, include, exclude, tuple(paths), tuple(hooks))


def builtin_profiles() -> dict[str, Profile]:
    """``default``: every event type but ``debug.*``; ``debug``: everything."""
    return {
        "default": Profile("default", exclude=GlobSet(["debug.*"])),
        "debug": Profile("debug"),
    }


class ProfileRegistry:
    """The profiles a gateway knows, by name."""

    def __init__(self, profiles: Mapping[str, Profile] | None = None) -> None:
        self._profiles = builtin_profiles()
        self._profiles.update(profiles or {})

    def get(self, name: str) -> Profile | None:
        return self._profiles.get(name)

    def names(self) -> list[str]:
        return sorted(self._profiles)

    @classmethod
    def from_mapping(cls, document: Mapping[str, Any], source: str = "<profiles>") -> ProfileRegistry:
        """Build from a parsed TOML document ``{"profiles": {name: spec}}``."""
        if not isinstance(document, Mapping):
            raise ProfileError(f"{source}: expected a table of [profiles.NAME] tables")
        unknown = set(document) - {"profiles"}
        if unknown:
            raise ProfileError(f"{source}: unknown top-level key(s) {_names(unknown)}; expected [profiles.NAME]")
        tables = document.get("profiles", {})
        if not isinstance(tables, dict):
            raise ProfileError(f"{source}: 'profiles' must be a table")
        profiles = {}
        for name, spec in tables.items():
            where = f"{source}: profiles.{name if isinstance(name, str) else repr(name)}"
            if not isinstance(spec, dict):
                raise ProfileError(f"{where}: must be a table")
            profiles[name] = build_profile(name, spec, where)
        return cls(profiles)

    @classmethod
    def from_file(cls, path: str | Path) -> ProfileRegistry:
        """Load and validate a TOML profiles file; raises ProfileError naming the file and key."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ProfileError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ProfileError(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ProfileError(f"{path}: invalid TOML: {exc}") from None
        except RecursionError:
            raise ProfileError(f"{path}: invalid TOML: nested too deeply") from None
        return cls.from_mapping(document, str(path))
