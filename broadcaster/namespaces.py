"""Namespaces: retention and limits per group of conversations, set once, on the gateways.

A namespaces file (``--namespaces FILE``) is TOML, one table per namespace, matched on
the conversation id by glob, first match in file order wins::

    [namespaces."support-*"]
    history_size = 200
    history_ttl = 3600
    state_max_entries = 500

    [namespaces."bulk-*"]
    history_size = 50
    max_data_bytes = 16384

A field a table leaves out, and every conversation no table matches (the *default
namespace*), takes the gateway's own option (``--history-size`` and friends).

``delta = true`` in a table lets its conversations' subscribers ask for delta upserts
(``delta=1``, docs/streaming.md); it is the gateways' delivery, not the storage policy,
so it is not part of the function library or its fingerprint. ``[namespaces."*"]``
(last) with ``delta = true`` allows them everywhere else.

``presence_users = true`` (the presence read lists the users watching, from their tokens'
``sub``) and ``join_leave = true`` (subscribers get ``ws.join`` / ``ws.leave``) are
gateway delivery too, outside the library and its fingerprint (docs/namespaces.md).

Globs: ``*`` (any run of characters), ``?`` (one), ``[abc]``, ``[a-z]``, ``[!abc]``, and
literal characters of conversation ids (``[A-Za-z0-9._:-]``). Each glob is compiled
twice from one parse: to an anchored Lua pattern (the publish function of
``scripts.build_library`` matches with it, on the Redis server) and to a Python regular
expression (the memory backend and the gateway's own checks), so both sides always
agree on which namespace a conversation is in.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

POLICY_FIELDS = ("history_size", "history_ttl", "state_max_entries", "state_max_bytes", "max_data_bytes")
"""The fields a namespace table may set (each a positive integer)."""

DELIVERY_FIELDS = ("delta", "presence_users", "join_leave")
"""Boolean fields of a namespace table: how the gateways deliver, not the storage policy (not fingerprinted)."""

DEFAULT_NAMESPACE = ""
"""The name of the default namespace (conversations no table matches)."""

_LITERAL = re.compile(r"[A-Za-z0-9._:-]")
_ALNUM = re.compile(r"[A-Za-z0-9]")
_LUA_MAGIC = set("^$()%.[]*+-?")


@dataclass(frozen=True, slots=True)
class Policy:
    """What a conversation's publishes apply: history kept, its TTL, state caps, largest data."""

    history_size: int
    history_ttl: int
    state_max_entries: int
    state_max_bytes: int
    max_data_bytes: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def with_overrides(self, overrides: Mapping[str, int]) -> Policy:
        return Policy(**{**self.as_dict(), **overrides})


@dataclass(frozen=True, slots=True)
class Namespace:
    """One table of the file: its glob, the fields it sets, and the glob compiled twice."""

    glob: str
    overrides: tuple[tuple[str, int], ...]
    lua_pattern: str
    regex: re.Pattern[str]
    delta: bool = False
    """Its subscribers may ask for delta upserts (docs/streaming.md)."""
    presence_users: bool = False
    """Its presence read lists the users watching (docs/namespaces.md)."""
    join_leave: bool = False
    """Its subscribers are told ``ws.join`` / ``ws.leave`` (docs/namespaces.md)."""

    @classmethod
    def build(cls, glob: str, overrides: Mapping[str, int], delta: bool = False, *,
              presence_users: bool = False, join_leave: bool = False) -> Namespace:
        lua, regex = compile_glob(glob)
        ordered = tuple((name, overrides[name]) for name in POLICY_FIELDS if name in overrides)
        return cls(glob, ordered, lua, re.compile(regex), delta, presence_users, join_leave)


class GlobError(ValueError):
    """A namespace glob that cannot be compiled."""


def _tokens(glob: str) -> Iterator[tuple[str, Any]]:
    """``("lit", c)``, ``("any", None)``, ``("one", None)``, ``("set", (negated, [(lo, hi)...]))``."""
    if not glob:
        raise GlobError("an empty glob matches nothing")
    i = 0
    while i < len(glob):
        c = glob[i]
        if c == "*":
            yield "any", None
        elif c == "?":
            yield "one", None
        elif c == "[":
            end = glob.find("]", i + 1)
            if end < 0:
                raise GlobError(f"'[' at {i} is not closed")
            body = glob[i + 1:end]
            negated = body.startswith("!")
            if negated:
                body = body[1:]
            if not body:
                raise GlobError(f"empty set at {i}")
            items: list[tuple[str, str]] = []
            j = 0
            while j < len(body):
                lo = body[j]
                if not _LITERAL.fullmatch(lo):
                    raise GlobError(f"{lo!r} cannot be in a conversation id")
                if j + 2 < len(body) and body[j + 1] == "-":
                    hi = body[j + 2]
                    if not (_ALNUM.fullmatch(lo) and _ALNUM.fullmatch(hi)) or lo > hi:
                        raise GlobError(f"range {lo}-{hi} must go from a letter or digit up to another")
                    items.append((lo, hi))
                    j += 3
                else:
                    items.append((lo, lo))
                    j += 1
            yield "set", (negated, items)
            i = end
        elif _LITERAL.fullmatch(c):
            yield "lit", c
        else:
            raise GlobError(f"{c!r} cannot be in a conversation id (only [A-Za-z0-9._:-] and * ? [...])")
        i += 1


def _lua_char(c: str) -> str:
    return "%" + c if c in _LUA_MAGIC else c


def compile_glob(glob: str) -> tuple[str, str]:
    """``glob`` as an anchored Lua pattern and an anchored Python regex; GlobError if it cannot be."""
    lua, py = ["^"], []
    for kind, value in _tokens(glob):
        if kind == "lit":
            lua.append(_lua_char(value))
            py.append(re.escape(value))
        elif kind == "any":
            lua.append(".*")
            py.append(".*")
        elif kind == "one":
            lua.append(".")
            py.append(".")
        else:
            negated, items = value
            lua_set = "".join(_lua_char(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in items)
            py_set = "".join(re.escape(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in items)
            lua.append(f"[{'^' if negated else ''}{lua_set}]")
            py.append(f"[{'^' if negated else ''}{py_set}]")
    lua.append("$")
    return "".join(lua), "(?s:" + "".join(py) + r")\Z"


@dataclass(frozen=True, slots=True)
class Resolved:
    """The namespace a conversation is in (``DEFAULT_NAMESPACE``: none matched) and its policy."""

    namespace: str
    policy: Policy
    delta: bool = False
    """The namespace allows delta upserts."""
    presence_users: bool = False
    """The presence read lists the users watching."""
    join_leave: bool = False
    """Subscribers are told ``ws.join`` / ``ws.leave``."""


class PolicyTable:
    """The namespaces in file order and the default policy; resolves a conversation id."""

    def __init__(self, default: Policy, namespaces: Sequence[Namespace] = ()) -> None:
        self.default = default
        self.namespaces = tuple(namespaces)
        self.policies = tuple(default.with_overrides(dict(ns.overrides)) for ns in self.namespaces)
        self._cache: dict[str, Resolved] = {}
        self._default = Resolved(DEFAULT_NAMESPACE, default)
        self.fingerprint = hashlib.sha1(self.describe().encode()).hexdigest()[:16]
        """Identifies the policy: equal tables, equal fingerprints (the library name is not part of it)."""

    def resolve(self, conv: str) -> Resolved:
        found = self._cache.get(conv)
        if found is not None:
            return found
        found = self._default
        for ns, policy in zip(self.namespaces, self.policies, strict=True):
            if ns.regex.match(conv):
                found = Resolved(ns.glob, policy, ns.delta, ns.presence_users, ns.join_leave)
                break
        if len(self._cache) >= 4096:
            self._cache.clear()
        self._cache[conv] = found
        return found

    def describe(self) -> str:
        """A canonical one-line text of the table: what the fingerprint hashes and a conflict report parses."""
        parts = ["default " + _fields_text(self.default.as_dict())]
        for ns, policy in zip(self.namespaces, self.policies, strict=True):
            parts.append(f"{ns.glob} " + _fields_text(policy.as_dict()))
        return "; ".join(parts)


def _fields_text(values: Mapping[str, int]) -> str:
    return " ".join(f"{name}={values[name]}" for name in POLICY_FIELDS)


def parse_description(text: str) -> dict[str, dict[str, str]]:
    """The inverse of :meth:`PolicyTable.describe`: ``{namespace ("default" or glob): {field: value}}``."""
    out: dict[str, dict[str, str]] = {}
    for part in text.split("; "):
        name, _, rest = part.partition(" ")
        out[name] = dict(item.partition("=")[::2] for item in rest.split())
    return out


def differences(mine: str, theirs: str) -> list[str]:
    """Human-readable differences between two descriptions: ``"support-* history_size: 200 here, 100 loaded"``."""
    a, b = parse_description(mine), parse_description(theirs)
    out = []
    for name in list(a) + [n for n in b if n not in a]:
        if name not in b:
            out.append(f"namespace {name} only here")
        elif name not in a:
            out.append(f"namespace {name} only in the loaded policy")
        else:
            for field in POLICY_FIELDS:
                if a[name].get(field) != b[name].get(field):
                    out.append(f"{name} {field}: {a[name].get(field)} here, {b[name].get(field)} loaded")
    if not out and list(a) != list(b):
        out.append(f"namespace order differs: {', '.join(a)} here, {', '.join(b)} loaded")
    return out


def load_namespaces(path: str) -> list[Namespace]:
    """Parse a namespaces file; ValueError naming the file, the table and the field on any mistake."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"--namespaces {path}: cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--namespaces {path}: not valid TOML: {exc}") from None
    return parse_namespaces(doc, f"--namespaces {path}")


def parse_namespaces(doc: Mapping[str, Any], where: str = "<namespaces>") -> list[Namespace]:
    """The namespaces of a parsed TOML document (see :func:`load_namespaces`)."""
    unknown = sorted(set(doc) - {"namespaces"})
    if unknown:
        raise ValueError(f"{where}: unknown top-level key(s) {unknown}; only [namespaces.\"GLOB\"] tables")
    tables = doc.get("namespaces", {})
    if not isinstance(tables, dict):
        raise ValueError(f"{where}: 'namespaces' must be tables: [namespaces.\"GLOB\"]")
    out = []
    for glob, table in tables.items():
        label = f'{where}: [namespaces."{glob}"]'
        if not isinstance(table, dict):
            raise ValueError(f"{label} must be a table of fields ({', '.join(POLICY_FIELDS)})")
        extra = sorted(set(table) - set(POLICY_FIELDS) - set(DELIVERY_FIELDS))
        if extra:
            raise ValueError(f"{label}: unknown field {extra[0]!r}; known: {', '.join(POLICY_FIELDS)}, "
                             f"{', '.join(DELIVERY_FIELDS)}")
        table = dict(table)
        flags = {name: table.pop(name, False) for name in DELIVERY_FIELDS}
        for name, flag in flags.items():
            if not isinstance(flag, bool):
                raise ValueError(f"{label}: {name} must be true or false, not {flag!r}")
        for name, value in table.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{label}: {name} must be a positive integer, not {value!r}")
            if value >= 2**53:
                raise ValueError(f"{label}: {name} is too large ({value})")
        try:
            out.append(Namespace.build(glob, table, flags["delta"], presence_users=flags["presence_users"],
                                       join_leave=flags["join_leave"]))
        except GlobError as exc:
            raise ValueError(f"{label}: bad glob: {exc}") from None
    return out
