"""The server-side Lua scripts and the pure (I/O-free) helpers around them.

Everything here is shared by the asyncio :class:`RedisBackend`, the async SDK and
the blocking SDK: they only differ in how they send a command and await its reply.

* ``PUBLISH``, ``READ``, ``PRESENCE_REPORT``, ``PRESENCE``, ``PRESENCE_USERS_REPORT``,
  ``PRESENCE_USERS``: the ``.lua`` sources
  shipped as package data, with their SHA1 for ``EVALSHA``;
* ``publish_batch_call`` / ``parse_publish_batch_reply`` and friends: build a script's
  KEYS and ARGV, and turn its reply into the core dataclasses;
* :class:`PublishBatch`: the retry-safe bookkeeping of one ``publish_many``;
* :func:`build_library`: the Redis Function library the gateways load (FUNCTION LOAD
  REPLACE): the publish core of ``publish.lua`` plus the namespaces' policy, so every
  producer's publish gets its conversation's policy without carrying it (see
  docs/namespaces.md);
* :func:`parse_redis_url`: ``redis://``, ``rediss://``, ``redis+cluster://``, ``rediss+cluster://``,
  ``redis+sentinel://`` and ``rediss+sentinel://`` URLs.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

from redis.exceptions import NoScriptError, ResponseError

from broadcaster.backend import (
    MAX_INFO_BYTES,
    MAX_REPORTED_USERS,
    MAX_TRANSITIONS,
    MAX_USER_FIELDS,
    BackendSettings,
    BackendStats,
    Head,
    HistoryPage,
    Presence,
    PresenceTransition,
    PresenceUsers,
    StateSnapshot,
    UserCounts,
    UserPresence,
    UserReport,
)
from broadcaster.backends.base import PreparedPublish, generated_id_ttl, new_event_id
from broadcaster.codec import decode_envelope, dumps, envelope_fields, envelope_fields_head, loads
from broadcaster.envelope import Envelope, PublishResult
from broadcaster.errors import PayloadDecodeError, ValidationError
from broadcaster.keys import KeyLayout
from broadcaster.namespaces import PolicyTable
from broadcaster.retry import is_transient_redis_error

log = logging.getLogger("broadcaster.backend")

Command = tuple[Any, ...]
"""Positional arguments of one Redis command, e.g. ``("EVALSHA", sha, 6, *keys, *argv)``."""


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A Lua script of this package: its source and the SHA1 ``EVALSHA`` calls it by."""

    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> LuaScript:
        source = importlib.resources.files("broadcaster.backends").joinpath(f"{name}.lua").read_text("utf-8")
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())

    def command(self, keys: Sequence[str], args: Sequence[Any]) -> Command:
        """The ``EVALSHA`` command running this script."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


PUBLISH = LuaScript.load("publish")
READ = LuaScript.load("read")
PRESENCE_REPORT = LuaScript.load("presence_report")
PRESENCE = LuaScript.load("presence")
PRESENCE_USERS_REPORT = LuaScript.load("presence_users_report")
PRESENCE_USERS = LuaScript.load("presence_users")
SCRIPTS = (PUBLISH, READ, PRESENCE_REPORT, PRESENCE, PRESENCE_USERS_REPORT, PRESENCE_USERS)


def is_noscript(reply: object) -> bool:
    """True for the error a server answers when it does not know a script's SHA (yet)."""
    return isinstance(reply, NoScriptError)


# --- the function library ------------------------------------------------------

LIBRARY_VERSION = 2
"""Bumped whenever the library's code changes in a way its fingerprint must show."""
_POLICY_LINE = "local POLICY = false -- @policy: this line is replaced in the function library\n"


class LibraryMissing(ResponseError):
    """Redis has no function library for this key prefix: no gateway has loaded its policy there (yet)."""

    def __init__(self, prefix: str, library: str) -> None:
        super().__init__(
            f"no broadcaster function library {library!r} for key prefix {prefix!r} on this Redis: a gateway "
            f"(broadcaster-gateway --redis-url ... --key-prefix {prefix}) must have started against it; it loads "
            "the namespaces' policy that every publish applies (docs/namespaces.md)")
        self.prefix, self.library = prefix, library


class DataTooLarge(ResponseError):
    """The publish function refused an event whose data is over its namespace's ``max_data_bytes``."""


def library_name(prefix: str) -> str:
    """The library's name for ``prefix``: function names are global in Redis and only ``[A-Za-z0-9_]``.

    ``broadcaster_p_<prefix>`` for a prefix of letters and digits, else ``broadcaster_h_<hex of the prefix>``
    (two forms that cannot collide: a hex form always follows ``h_``).
    """
    if re.fullmatch(r"[A-Za-z0-9]+", prefix):
        return f"broadcaster_p_{prefix}"
    return "broadcaster_h_" + prefix.encode().hex()


def _lua_str(text: str) -> str:
    """A Lua string literal for any text (every byte outside a safe set as a decimal escape)."""
    safe = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 ._:-*?^$%[]!=;,{}()+")
    return "'" + "".join(chr(b) if b in safe else f"\\{b:03d}" for b in text.encode()) + "'"


def _lua_policy(values: Mapping[str, int]) -> str:
    return "{" + ", ".join(str(values[name]) for name in
                           ("history_size", "history_ttl", "state_max_entries", "state_max_bytes",
                            "max_data_bytes")) + "}"


_DIGEST_LINE = "local digest = redis.sha1hex or hex48\n"
SCRIPTS_HAVE_SHA1 = ("EVAL", "return redis.sha1hex and 1 or 0", 0)
"""Whether this server's scripts have ``redis.sha1hex`` (fakeredis' do not, its functions do)."""


def library_code(library: FunctionLibrary, scripts_have_sha1: bool) -> str:
    """The code to load: where scripts lack ``redis.sha1hex``, the library hashes as they do.

    The unborn epoch ``read.lua`` (a script) announces must be the one the publish
    function adopts, so both must use the same digest.
    """
    if scripts_have_sha1:
        return library.code
    return library.code.replace(_DIGEST_LINE, "local digest = hex48 -- as this server's scripts must\n")


@dataclass(frozen=True, slots=True)
class FunctionLibrary:
    """One key prefix's function library: its code, and the fingerprint of the policy in it."""

    prefix: str
    name: str
    code: str
    fingerprint: str
    description: str
    """:meth:`PolicyTable.describe` of the policy compiled in (a conflict report names fields from it)."""

    @property
    def publish_function(self) -> str:
        return f"{self.name}_publish"

    @property
    def append_function(self) -> str:
        """The publish function under the name a call carrying appends uses (see build_library)."""
        return f"{self.name}_publish_append"

    @property
    def policy_function(self) -> str:
        return f"{self.name}_policy"


def build_library(prefix: str, table: PolicyTable) -> FunctionLibrary:
    """The function library of ``prefix`` applying ``table``.

    Two functions: ``<name>_publish`` takes exactly ``publish.lua``'s KEYS and ARGV (both
    forms), looks up the conversation's namespace from KEYS[1] and applies its policy,
    ignoring the policy arguments; ``<name>_policy`` (read-only, FCALL_RO) answers
    ``{fingerprint, namespace, history_size, history_ttl, state_max_entries, state_max_bytes,
    max_data_bytes}`` for a conversation id, or ``{fingerprint, description}`` for ``""``.
    """
    name = library_name(prefix)
    fingerprint = f"v{LIBRARY_VERSION}-{table.fingerprint}"
    body = PUBLISH.source
    if body.count(_POLICY_LINE) != 1:
        raise RuntimeError("publish.lua lost its @policy line")
    body = body.replace(_POLICY_LINE, "-- POLICY: the conversation's namespace policy, from the library\n")
    namespaces = ",\n  ".join(
        "{" + f"{_lua_str(ns.glob)}, {_lua_str(ns.lua_pattern)}, {_lua_policy(policy.as_dict())}" + "}"
        for ns, policy in zip(table.namespaces, table.policies, strict=True))
    code = f"""#!lua name={name}
-- broadcaster function library for key prefix {prefix!r} (generated: broadcaster/backends/scripts.py)
local PREFIX = {_lua_str(prefix)}
local FINGERPRINT = {_lua_str(fingerprint)}
local DESCRIPTION = {_lua_str(table.describe())}
local DEFAULT = {_lua_policy(table.default.as_dict())}
local NAMESPACES = {{
  {namespaces}
}}

local function resolve(conv)
  for i = 1, #NAMESPACES do
    local ns = NAMESPACES[i]
    if string.find(conv, ns[2]) then
      return ns[1], ns[3]
    end
  end
  return '', DEFAULT
end

local META = {_lua_str("^" + "".join("%" + ch if ch in "^$()%.[]*+-?" else ch for ch in prefix) + ":{(.*)}:meta$")}

local function publish_script(KEYS, ARGV, POLICY)
{body}
end

local function publish(keys, args)
  local conv = string.match(keys[1] or '', META)
  if not conv then
    return redis.error_reply('ERR KEYS[1] is not the meta key of a conversation of key prefix ' .. PREFIX)
  end
  local policy = DEFAULT
  if #NAMESPACES > 0 then
    local _
    _, policy = resolve(conv)
  end
  return publish_script(keys, args, policy)
end
redis.register_function('{name}_publish', publish)
-- The same function under the name calls with appends use: a library from before appends
-- (version 1) has no such function, so they fail as "function not found" (the caller waits
-- for a current gateway to load its library) instead of running where an append's event
-- code would read as a delete.
redis.register_function('{name}_publish_append', publish)

redis.register_function{{function_name = '{name}_policy', flags = {{'no-writes'}}, callback = function(keys, args)
  local conv = args[1] or ''
  if conv == '' then
    return {{FINGERPRINT, DESCRIPTION}}
  end
  local ns, p = resolve(conv)
  return {{FINGERPRINT, ns, p[1], p[2], p[3], p[4], p[5]}}
end}}
"""
    return FunctionLibrary(prefix, name, code, fingerprint, table.describe())


def is_library_missing(reply: object) -> bool:
    """True for the error FCALL answers when the function is not loaded (a fresh or flushed server)."""
    return isinstance(reply, ResponseError) and "function not found" in str(reply).lower()


def is_too_large(reply: object) -> bool:
    return isinstance(reply, ResponseError) and str(reply).startswith("TOOLARGE")


def transient_or_missing_library(exc: BaseException) -> bool:
    """A producer's retry predicate: transient errors, and a library no gateway has loaded yet."""
    return is_transient_redis_error(exc) or isinstance(exc, LibraryMissing)


def policy_call(library: FunctionLibrary, layout: KeyLayout, conv: str) -> Command:
    """FCALL_RO of the library's policy function for ``conv`` (its meta key routes it to the conversation's node)."""
    return ("FCALL_RO", library.policy_function, 1, layout.meta(conv), conv)


def policy_fingerprint_call(library: FunctionLibrary) -> Command:
    return ("FCALL_RO", library.policy_function, 0, "")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- publish -----------------------------------------------------------------


MAX_BATCH_EVENTS = 256
"""Events per publish script call: bounds how long one call holds Redis (roughly 10 µs an event)."""

_NIL = b"\xc0"
# Per-event codes of the batch form (see publish.lua): 64 plus these bits.
_CODE_BASE, _CODE_ID, _CODE_STATE, _CODE_STATE_DELETE, _CODE_APPEND = 64, 1, 2, 2 + 4, 2 + 8


def publish_call(
    layout: KeyLayout, prepared: PreparedPublish, settings: BackendSettings, epoch: str, sharded: bool
) -> tuple[list[str], list[bytes | str | int]]:
    """KEYS and ARGV of ``publish.lua``'s one-event form (the README's; see the script's header).

    ``epoch`` fills the argument older scripts created a conversation with; the script
    now ignores it (a new conversation adopts the epoch reads announced, see EPOCHS in
    ``publish.lua``), and it stays in place so every caller's argument layout still works.
    """
    conv = prepared.conv
    keys = [*_conversation_keys(layout, conv), layout.idempotency(conv, prepared.id)]
    args: list[bytes | str | int] = [
        conv,
        prepared.id,
        prepared.type,
        prepared.data,
        prepared.key or "",
        settings.history_size,
        settings.history_ttl,
        prepared.id_ttl,
        epoch,
        settings.state_max_entries,
        "1" if sharded else "0",
        settings.state_max_bytes,
    ]
    if prepared.op is not None:
        args.append(prepared.op)
    return keys, args


def publish_batch_call(
    layout: KeyLayout, batch_id: str, events: Sequence[PreparedPublish], settings: BackendSettings, epoch: str,
    sharded: bool, retry: bool, function: str | None = None,
) -> Command:
    """``publish.lua``'s batch form for ``events``, all of one conversation, in order.

    ``retry``: this batch id may have been sent before, so the script first looks
    for its batch key; a fresh batch id skips that lookup. ``epoch`` is ignored by the
    script, as in :func:`publish_call`. ``function``: FCALL the library's publish
    function (which applies the namespace's policy, not ``settings``) instead of EVALSHA.
    """
    conv = events[0].conv
    keys = [*_conversation_keys(layout, conv), layout.batch(conv, batch_id)]
    args: list[bytes | str | int] = [
        "", settings.history_size, settings.history_ttl, generated_id_ttl(settings.history_ttl), epoch,
        settings.state_max_entries, "1" if sharded else "0", settings.state_max_bytes, "1" if retry else "0",
    ]
    codes = bytearray()
    fields: list[bytes] = []
    state_keys: list[str] = []
    heads: dict[str, bytes] = {}
    for event in events:
        code = _CODE_BASE
        if event.chosen_id:
            keys.append(layout.idempotency(conv, event.id))
            code += _CODE_ID
        if event.key is not None:
            state_keys.append(event.key)
            code += (_CODE_APPEND if event.op is not None else _CODE_STATE_DELETE if event.data == _NIL
                     else _CODE_STATE)
        head = heads.get(event.type)
        if head is None:
            head = heads[event.type] = envelope_fields_head(conv, event.type)
        codes.append(code)
        fields.append(envelope_fields(head, event.id, event.data, event.key, event.op))
    if function is not None:
        if any(event.op is not None for event in events):
            function += "_append"  # FunctionLibrary.append_function: absent from libraries that cannot append
        return ("FCALL", function, len(keys), *keys, *args, bytes(codes), *fields, *state_keys)
    return PUBLISH.command(keys, [*args, bytes(codes), *fields, *state_keys])


def parse_publish_batch_reply(events: Sequence[PreparedPublish], reply: Any) -> list[PublishResult]:
    """One :class:`PublishResult` per event from a batch reply ``[epoch, seq, duplicate, evicted, ...]``."""
    epoch = _text(reply[0])
    if len(reply) != 1 + 3 * len(events):
        raise ValueError(f"publish script answered {len(reply) - 1} values for {len(events)} events")
    return [
        PublishResult(event.conv, reply[i], event.id, epoch, reply[i + 1] == 1, reply[i + 2])
        for event, i in zip(events, range(1, len(reply), 3), strict=True)
    ]


def _conversation_keys(layout: KeyLayout, conv: str) -> list[str]:
    return [layout.meta(conv), layout.log(conv), layout.live(conv), layout.state(conv), layout.state_order(conv)]


class PublishBatch:
    """The publishes of one ``publish_many`` call, free of I/O.

    Events are grouped by conversation (in order within each; at most
    ``MAX_BATCH_EVENTS`` per call), one batch-form script call per group. A driver
    loops: ``commands()`` gives the calls still without a reply; it sends them (one
    pipeline, one round trip) and hands the replies to ``feed()``. A ``NOSCRIPT``
    reply leaves its group pending and sets ``needs_script`` (load
    ``PUBLISH.source``, then loop), a missing function library ``needs_library``
    (a gateway loads its library; a producer cannot: it waits for a gateway to);
    a ``TOOLARGE`` refusal is raised as :class:`DataTooLarge`; another error reply is raised once the successes
    next to it are recorded. Each group keeps its batch id, event ids and epoch
    across attempts, so a driver may retry after any failure: a group applied by an
    attempt whose reply was lost is answered from its batch key, every event a
    ``duplicate``; a group that failed part way (an error reply) records the events it
    applied there too, so its retry answers those as duplicates and publishes the rest.
    ``epoch`` is not used by the script any more (see :func:`publish_call`).
    """

    def __init__(
        self, layout: KeyLayout, prepared: Sequence[PreparedPublish], settings: BackendSettings, epoch: str,
        sharded: bool, function: str | None = None,
    ) -> None:
        self._layout, self._settings, self._epoch, self._sharded = layout, settings, epoch, sharded
        self._function = function
        by_conv: dict[str, list[int]] = {}
        for index, event in enumerate(prepared):
            by_conv.setdefault(event.conv, []).append(index)
        self._groups: list[tuple[list[int], list[PreparedPublish], str]] = []
        for indices in by_conv.values():
            for start in range(0, len(indices), MAX_BATCH_EVENTS):
                chunk = indices[start : start + MAX_BATCH_EVENTS]
                self._groups.append((chunk, [prepared[i] for i in chunk], new_event_id()))
        self._results: list[PublishResult | None] = [None] * len(prepared)
        self._pending = list(range(len(self._groups)))
        self._sent: list[int] = []
        self._attempts = 0
        self.needs_script = False
        self.needs_library = False

    @property
    def done(self) -> bool:
        return not self._pending

    def commands(self) -> list[Command]:
        """The calls to send now (those without a result yet), in publish order."""
        self._sent = list(self._pending)
        self.needs_script = self.needs_library = False
        retry = self._attempts > 0
        self._attempts += 1
        return [publish_batch_call(self._layout, batch_id, events, self._settings, self._epoch, self._sharded, retry,
                                   self._function)
                for _, events, batch_id in (self._groups[g] for g in self._sent)]

    def feed(self, replies: Sequence[Any]) -> None:
        """Record the replies to the last ``commands()``; raise the first non-NOSCRIPT error."""
        if len(replies) != len(self._sent):
            raise ValueError(f"{len(replies)} replies for {len(self._sent)} commands")
        pending: list[int] = []
        error: BaseException | None = None
        for group, reply in zip(self._sent, replies, strict=True):
            if isinstance(reply, BaseException):
                pending.append(group)
                if is_noscript(reply):
                    self.needs_script = True
                elif is_library_missing(reply):
                    self.needs_library = True
                elif is_too_large(reply):
                    error = error or DataTooLarge(str(reply))
                elif isinstance(reply, ResponseError) and str(reply).startswith("BADAPPEND"):
                    error = error or ValidationError("data", str(reply))
                else:
                    error = error or reply
                continue
            indices, events, _ = self._groups[group]
            for index, result in zip(indices, parse_publish_batch_reply(events, reply), strict=True):
                self._results[index] = result
        self._pending, self._sent = pending, []
        if error is not None:
            raise error

    def results(self) -> list[PublishResult]:
        """Every result, in request order (only once ``done``)."""
        if not self.done:
            raise RuntimeError("publish batch is not complete")
        return [r for r in self._results if r is not None]


# --- reads -------------------------------------------------------------------


def read_call(
    layout: KeyLayout, conv: str, op: str, epoch: str, history_ttl: int, since: int = 0, limit: int = 0
) -> Command:
    """The ``read.lua`` command for ``op`` in ``head``, ``history``, ``state``.

    The script is read-only: a conversation that does not exist is answered seq 0 and
    the epoch its first publish will get, and nothing is stored. ``epoch`` and
    ``history_ttl`` fill the arguments older scripts created that epoch with; they are ignored.
    """
    keys = [layout.meta(conv), layout.log(conv), layout.state(conv), layout.state_order(conv)]
    return READ.command(keys, [op, epoch, history_ttl, since, limit])


def parse_head(reply: Any) -> Head:
    return Head(_text(reply[0]), int(reply[1]))


def _decode(payload: Any, stats: BackendStats) -> Envelope | None:
    try:
        return decode_envelope(payload)
    except PayloadDecodeError as exc:
        stats.decode_errors += 1
        log.debug("dropped an undecodable stored payload: %s", exc)
        return None


def parse_history(reply: Any, since: int, stats: BackendStats) -> HistoryPage:
    """A :class:`HistoryPage` from ``[epoch, seq, first seq, payload...]``; bad payloads are counted and skipped."""
    epoch, seq, first = _text(reply[0]), int(reply[1]), int(reply[2])
    events = [env for env in (_decode(p, stats) for p in reply[3:]) if env is not None]
    truncated = since < seq and (first == 0 or first > since + 1)
    return HistoryPage(epoch, seq, events, truncated)


def parse_state(reply: Any, stats: BackendStats) -> StateSnapshot:
    """A :class:`StateSnapshot` from ``[epoch, seq, key, payload, ...]``; bad payloads are counted and skipped."""
    entities: dict[str, Envelope] = {}
    flat = reply[2:]
    for key, payload in zip(flat[::2], flat[1::2], strict=True):
        env = _decode(payload, stats)
        if env is not None:
            entities[_text(key)] = env
    return StateSnapshot(_text(reply[0]), int(reply[1]), entities)


# --- presence ----------------------------------------------------------------


def presence_report_calls(
    layout: KeyLayout, gateway_id: str, counts: Mapping[str, Mapping[str, int]], ttl: float
) -> list[Command]:
    """One ``presence_report.lua`` command per conversation of ``counts``."""
    ttl_ms = max(1, int(ttl * 1000))
    commands = []
    for conv, by_profile in counts.items():
        args: list[str | int] = [ttl_ms]
        for profile, count in by_profile.items():
            args += [f"{gateway_id}|{profile}", max(0, int(count))]
        commands.append(PRESENCE_REPORT.command([layout.presence(conv)], args))
    return commands


def presence_call(layout: KeyLayout, conv: str) -> Command:
    return PRESENCE.command([layout.presence(conv)], [])


def parse_presence(reply: Any) -> Presence:
    """A :class:`Presence` from ``[profile, count, ...]``."""
    by_profile = {_text(p): int(n) for p, n in zip(reply[::2], reply[1::2], strict=True)}
    return Presence(sum(by_profile.values()), by_profile)


USER_SWEEP_FIELDS = 1000
"""Fields of a users hash one report sweeps for expiry (HSCAN COUNT): a pass over the hash takes a few reports."""


def encode_info(info: Any) -> str:
    """A user's ``info`` as the users hash stores it: JSON text, '' for none or past ``MAX_INFO_BYTES``."""
    if info is None:
        return ""
    try:
        text = dumps(info).decode()
    except TypeError:
        return ""
    return text if len(text) <= MAX_INFO_BYTES else ""


def decode_info(raw: Any) -> Any:
    """The inverse of :func:`encode_info` (None for '' or text that is not JSON)."""
    text = _text(raw)
    if not text:
        return None
    try:
        return loads(text)
    except ValueError:
        return None


def presence_users_report_calls(
    layout: KeyLayout, gateway_id: str, reports: Mapping[str, UserCounts], ttl: float, leave_delay: float,
    announce: Collection[str], sweep: Collection[str] | None = None,
) -> list[Command]:
    """One ``presence_users_report.lua`` command per conversation of ``reports`` (at most
    ``MAX_REPORTED_USERS`` users each, the most connected; zeros first, they free fields)."""
    ttl_ms, delay_ms = max(1, int(ttl * 1000)), max(0, int(leave_delay * 1000))
    commands = []
    for conv, users in reports.items():
        ranked = sorted(users.items(), key=lambda item: (item[1][0] > 0, -item[1][0]))
        args: list[str | int] = [ttl_ms, gateway_id, delay_ms if conv in announce else -1, MAX_USER_FIELDS,
                                 MAX_TRANSITIONS, USER_SWEEP_FIELDS if sweep is None or conv in sweep else 0]
        live = 0
        for user, (count, info) in ranked:
            if count > 0:
                if live >= MAX_REPORTED_USERS:
                    continue
                live += 1
            args += [user, max(0, int(count)), encode_info(info) if count > 0 else ""]
        keys = [layout.presence_users(conv), layout.presence_announced(conv), layout.presence_leaving(conv),
                layout.presence_gateways(conv), layout.presence_sweep(conv)]
        commands.append(PRESENCE_USERS_REPORT.command(keys, args))
    return commands


def parse_user_report(conv: str, reply: Any) -> UserReport:
    """A :class:`UserReport` from ``[wait ms, kind, user, info, ...]``."""
    wait = int(reply[0])
    transitions = [PresenceTransition("join" if _text(kind) == "j" else "leave", conv, _text(user),
                                      decode_info(info))
                   for kind, user, info in zip(reply[1::3], reply[2::3], reply[3::3], strict=True)]
    return UserReport(transitions, None if wait < 0 else wait / 1000)


def presence_users_call(layout: KeyLayout, conv: str, limit: int) -> Command:
    return PRESENCE_USERS.command([layout.presence_users(conv)], [max(0, int(limit))])


def parse_presence_users(reply: Any) -> PresenceUsers:
    """A :class:`PresenceUsers` from ``[total, user, count, info, ...]``."""
    users = [UserPresence(_text(user), int(n), decode_info(info))
             for user, n, info in zip(reply[1::3], reply[2::3], reply[3::3], strict=True)]
    return PresenceUsers(users, int(reply[0]))


# --- URLs --------------------------------------------------------------------

CLUSTER_SCHEME = "redis+cluster"
CLUSTER_TLS_SCHEME = "rediss+cluster"
SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_TLS_SCHEME = "rediss+sentinel"
SENTINEL_PORT = 26379
"""The port of a sentinel named without one."""
SENTINEL_CREDENTIALS = ("sentinel_username", "sentinel_password")
"""Query parameters of a sentinel URL authenticating to the sentinels themselves (not to the master)."""
CLUSTER_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
"""Query parameters a ``rediss+cluster://`` URL accepts (the redis-py keyword arguments of the same names)."""
_CERT_REQS = ("none", "optional", "required")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where Redis is: a plain URL, or the startup nodes of a Redis Cluster.

    For a cluster, ``tls`` (scheme ``rediss+cluster``) and ``ssl_options`` (from the
    URL's query) apply to every node; :meth:`cluster_options` gives them, with the
    credentials, as redis-py ``RedisCluster`` keyword arguments.
    """

    url: str = field(repr=False)
    cluster_nodes: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ssl_options: tuple[tuple[str, str | bool], ...] = ()
    sentinel_nodes: tuple[tuple[str, int], ...] = ()
    service_name: str = ""
    db: int = 0
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    @property
    def is_cluster(self) -> bool:
        return bool(self.cluster_nodes)

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinel_nodes)

    def master_options(self) -> dict[str, Any]:
        """For a sentinel URL: database, credentials and TLS of the master (redis-py ``master_for`` arguments)."""
        options: dict[str, Any] = {"db": self.db, "username": self.username, "password": self.password}
        if self.tls:
            options["ssl"] = True
            options.update(self.ssl_options)
        return options

    def sentinel_options(self) -> dict[str, Any]:
        """For a sentinel URL: how to talk to the sentinels (their own credentials, the same TLS settings)."""
        options: dict[str, Any] = {"username": self.sentinel_username, "password": self.sentinel_password}
        if self.tls:
            options["ssl"] = True
            options.update(self.ssl_options)
        return options

    def cluster_options(self) -> dict[str, Any]:
        """Credentials and TLS settings as keyword arguments of redis-py's ``RedisCluster`` (sync or asyncio)."""
        options: dict[str, Any] = {"username": self.username, "password": self.password}
        if self.tls:
            options["ssl"] = True
            options.update(self.ssl_options)
        return options


def parse_redis_url(url: str) -> RedisTarget:
    """Parse ``redis://``, ``rediss://``, ``unix://``, a Redis Cluster or a Redis Sentinel URL.

    A sentinel URL is ``redis+sentinel://[user[:password]@]host[:port][,host[:port]...]/service_name[/db][?query]``
    (``rediss+sentinel://``: TLS to the sentinels and to the master): the hosts are the
    sentinels (port 26379 by default), the user info authenticates to the master,
    ``sentinel_username`` / ``sentinel_password`` in the query to the sentinels (if they
    need it); the TLS options are those of a cluster URL.

    A cluster URL is ``redis+cluster://[user[:password]@]host[:port][,host[:port]...][/0][?query]``
    (``rediss+cluster://`` for TLS to every node). Credentials are percent-decoded;
    the port defaults to 6379; a path other than ``/0`` is refused (a cluster only has
    database 0). The query accepts, on ``rediss+cluster://`` only, the TLS options
    ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` (file paths),
    ``ssl_cert_reqs`` (``none``, ``optional``, ``required``: the default) and
    ``ssl_check_hostname`` (``true``/``false``). Any other query key is refused
    rather than ignored.

    Raises :class:`ValidationError` (a ``ValueError``, field ``url``) for anything else.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValidationError("url", f"not a URL: {url!r}")
    if scheme in ("redis", "rediss", "unix"):
        return RedisTarget(url)
    if scheme in (SENTINEL_SCHEME, SENTINEL_TLS_SCHEME):
        return _parse_sentinel_url(url, scheme == SENTINEL_TLS_SCHEME, rest)
    if scheme not in (CLUSTER_SCHEME, CLUSTER_TLS_SCHEME):
        raise ValidationError("url", f"unsupported scheme {scheme!r} (redis, rediss, redis+cluster, rediss+cluster, "
                                     "redis+sentinel, rediss+sentinel)")
    tls = scheme == CLUSTER_TLS_SCHEME
    rest, _, query = rest.partition("#")[0].partition("?")
    authority, _, path = rest.partition("/")
    if path not in ("", "0"):
        raise ValidationError("url", f"a Redis Cluster has only database 0, not {path!r}")
    userinfo, _, hostlist = authority.rpartition("@")
    nodes = tuple(_host_port(item) for item in hostlist.split(",") if item)
    if not nodes:
        raise ValidationError("url", f"no cluster node in {url!r}")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    return RedisTarget(url, nodes, username, password, tls, _cluster_query(query, tls))


def _parse_sentinel_url(url: str, tls: bool, rest: str) -> RedisTarget:
    rest, _, query = rest.partition("#")[0].partition("?")
    authority, _, path = rest.partition("/")
    service, _, db_text = path.partition("/")
    service = unquote(service)
    if not service:
        raise ValidationError("url", "a sentinel URL names the master's service: "
                                     "redis+sentinel://host:port[,host:port...]/service_name[/db]")
    db_text = db_text.rstrip("/")
    if db_text and not db_text.isdigit():
        raise ValidationError("url", f"bad database number {db_text!r} in a sentinel URL")
    userinfo, _, hostlist = authority.rpartition("@")
    nodes = tuple(_host_port(item, SENTINEL_PORT) for item in hostlist.split(",") if item)
    if not nodes:
        raise ValidationError("url", "no sentinel in the URL")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    credentials: dict[str, str] = {}
    tls_query = []
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise ValidationError("url", "malformed query in a sentinel URL") from None
    for key, value in pairs:
        if key in SENTINEL_CREDENTIALS:
            if key in credentials:
                raise ValidationError("url", f"query parameter {key!r} given twice")
            credentials[key] = value
        else:
            tls_query.append((key, value))
    ssl_options = _cluster_query(urlencode(tls_query), tls, "sentinel", SENTINEL_CREDENTIALS)
    return RedisTarget(url, (), username, password, tls, ssl_options, sentinel_nodes=nodes, service_name=service,
                       db=int(db_text or 0), sentinel_username=credentials.get("sentinel_username") or None,
                       sentinel_password=credentials.get("sentinel_password"))


def _cluster_query(query: str, tls: bool, kind: str = "cluster",
                   also: tuple[str, ...] = ()) -> tuple[tuple[str, str | bool], ...]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise ValidationError("url", f"malformed query {query!r}") from None
    options: dict[str, str | bool] = {}
    for key, value in pairs:
        if key not in CLUSTER_TLS_OPTIONS:
            raise ValidationError("url", f"unknown query parameter {key!r} in a {kind} URL "
                                         f"(known: {', '.join(CLUSTER_TLS_OPTIONS + also)})")
        if not tls:
            raise ValidationError("url", f"{key!r} needs TLS: use rediss+{kind}://")
        if key in options:
            raise ValidationError("url", f"query parameter {key!r} given twice")
        if key == "ssl_cert_reqs" and value.lower() not in _CERT_REQS:
            raise ValidationError("url", f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, not {value!r}")
        if key == "ssl_check_hostname":
            if value.lower() not in _TRUE + _FALSE:
                raise ValidationError("url", f"ssl_check_hostname must be true or false, not {value!r}")
            options[key] = value.lower() in _TRUE
        elif key == "ssl_cert_reqs":
            options[key] = value.lower()
        else:
            options[key] = value
    return tuple(options.items())


def _host_port(item: str, default_port: int = 6379) -> tuple[str, int]:
    if item.startswith("["):  # [::1]:7000
        host, _, port = item[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValidationError("url", f"no host in {item!r}")
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise ValidationError("url", f"bad port in {item!r}") from None
