"""Hostile input: every parser answers with its own error type or a valid result, and nothing takes a gateway down.

Hypothesis runs with a fixed budget and ``derandomize=True``: the same examples on
every run. The end-to-end parts use real gateways (in-process uvicorn) and Redis.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import tempfile
import threading
import time
import tracemalloc
from typing import Any

import httpx
import jwt
import msgpack
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broadcaster.codec import decode_envelope, encode_envelope
from broadcaster.envelope import Envelope
from broadcaster.errors import PayloadDecodeError
from broadcaster.profiles import MAX_TYPE_GLOBS, GlobSet, ProfileError, ProfileRegistry
from broadcaster.validation import is_valid_name
from gateway.auth import Authenticator, AuthError, Grant
from gateway.protocol import (
    CLOSE_BAD_REQUEST,
    ConnectRequest,
    Ping,
    ProtocolError,
    Refresh,
    SubscribeRequest,
    Unsubscribe,
    parse_client_message,
    parse_connect_query,
)
from gateway.settings import Settings
from tests.support.gateway import InProcessGateway
from tests.support.polling import async_wait_until
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=300, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

PROFILE_FUZZ = settings(FUZZ, max_examples=150)  # imports of enrich targets make these the slow ones

# ---- strategies --------------------------------------------------------------------------------

def often(values: list[Any], junk: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly one of ``values`` (the interesting cases), sometimes ``junk``."""
    return st.one_of(st.sampled_from(values), st.sampled_from(values), st.sampled_from(values), junk)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
names = st.sampled_from(["c1", "conv-2", "a.b:c_d", "x" * 128, "x" * 129, "", " ", "bad id", "é", "c1\n", "*"])
since_values = often([0, 1, 10**18 - 1, 10**18, -1, "0", "12", "²", "٣", "1e3", " 1", "", True, 1.5, None, "9" * 19],
                     json_values)
epoch_values = often(["abc123", "x" * 64, "x" * 65, "", "ab-c", "ü", "é1", None], json_values)
hydrate_values = often([0, 1, "0", "1", "true", "false", True, False, None, 2, "yes", 0.0, []], json_values)
types_values = often(["chat.*", "a,b", "", ",", "*" * 129, ",".join(["x"] * 17), ",".join(["x"] * 16), "[", "a b",
                      ["chat.*"], [], [1], ["a"] * 17], st.lists(st.text(max_size=12) | json_scalars, max_size=20)
                     | json_values)


@st.composite
def structured_messages(draw: st.DrawFn) -> dict[str, Any]:
    """Messages shaped like the protocol, with each field valid, borderline or junk (valid ones often)."""
    message: dict[str, Any] = {
        "type": draw(often(["ws.subscribe", "ws.subscribe", "ws.unsubscribe", "ws.ping", "ws.nope", "ping",
                            "ws.refresh"],
                           json_values))}
    if draw(st.integers(0, 4)):
        message["conv_id"] = draw(often(["c1", "conv-2", "a.b:c_d"], names | json_values))
    for name, values in (("since", since_values), ("epoch", epoch_values), ("hydrate", hydrate_values),
                         ("types", types_values)):
        if draw(st.booleans()):
            message[name] = draw(values)
    if draw(st.integers(0, 3)) == 0:
        message.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
    return message


def _dumps_lenient(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # integers past 64 bits
        return json.dumps(value).encode()


raw_messages = (st.text(max_size=200) | st.binary(max_size=200) | json_values.map(_dumps_lenient)
                | structured_messages().map(_dumps_lenient)
                | structured_messages().map(lambda m: _dumps_lenient(m).decode())
                | st.sampled_from(["ping", " ping\n", "PING", "{}", "[]", "null", '"ws.ping"', "\ufeff{}", "\x00"]))


def assert_valid_subscribe(request: SubscribeRequest) -> None:
    assert is_valid_name(request.conv_id)
    assert request.since is None or (type(request.since) is int and 0 <= request.since < 10**18)
    assert request.epoch is None or (isinstance(request.epoch, str) and 1 <= len(request.epoch) <= 64
                                     and request.epoch.isascii() and request.epoch.isalnum())
    assert isinstance(request.hydrate, bool)
    assert request.types is None or (isinstance(request.types, GlobSet)
                                     and 1 <= len(request.types.patterns) <= MAX_TYPE_GLOBS)


# ---- the client message parser -----------------------------------------------------------------


@FUZZ
@given(raw=raw_messages)
def test_fuzz_client_message_parser(raw: str | bytes) -> None:
    try:
        message = parse_client_message(raw)
    except ProtocolError as exc:
        assert isinstance(exc.code, str) and exc.code and exc.message
        return
    assert isinstance(message, (Ping, SubscribeRequest, Unsubscribe))
    if isinstance(message, SubscribeRequest):
        assert_valid_subscribe(message)
    elif isinstance(message, Unsubscribe):
        assert is_valid_name(message.conv_id)


subscribe_messages = st.fixed_dictionaries(
    {"type": st.just("ws.subscribe"), "conv_id": st.sampled_from(["c1", "conv-2", "a.b:c_d", "x" * 128])},
    optional={"since": since_values, "epoch": epoch_values, "hydrate": hydrate_values, "types": types_values})


@FUZZ
@given(message=subscribe_messages)
def test_fuzz_subscribe_fields(message: dict[str, Any]) -> None:
    """Valid envelopes around hostile fields: each field's parser is reached, not just the first check."""
    try:
        request = parse_client_message(_dumps_lenient(message))
    except ProtocolError as exc:
        assert exc.code == "bad_subscribe" and exc.message
        return
    assert isinstance(request, SubscribeRequest) and request.conv_id == message["conv_id"]
    assert_valid_subscribe(request)


def test_client_message_parser_known_traps() -> None:
    """Inputs that broke or could break naive parsers, pinned."""
    subscribe = '{"type":"ws.subscribe","conv_id":"c",'
    for raw in [subscribe + '"since":"²"}', subscribe + '"epoch":"é"}', subscribe + '"since":1e400}',
                subscribe + '"types":[[]]}', subscribe + '"since":18446744073709551616}', b"\xff\xfe",
                '{"type":' * 2000, "[" * 100_000]:
        with pytest.raises(ProtocolError):
            parse_client_message(raw)
    ok = parse_client_message('{"type":"ws.subscribe","conv_id":"c","since":"7","hydrate":"0","types":"a.*,b"}')
    assert isinstance(ok, SubscribeRequest) and ok.since == 7 and ok.types is not None


# ---- the connect query -------------------------------------------------------------------------

query_values = (st.sampled_from(["c1", "default", "debug", "0", "1", "abc", "chat.*,llm.*", "", "bad id", "²", "-1",
                                 "x" * 129]) | st.text(max_size=40))
connect_queries = st.fixed_dictionaries({}, optional={
    "conv_id": often(["c1", "conv-2"], query_values), "profile": often(["default", "debug", "x y"], query_values),
    "since": often(["0", "5", "²", "٣", "-1", "1.0", "9" * 19, ""], query_values),
    "epoch": often(["abc", "é", "x" * 65, ""], query_values), "hydrate": often(["0", "1", "2", ""], query_values),
    "types": often(["chat.*", "a,,b", ",".join(["x"] * 17)], query_values), "token": query_values,
}).flatmap(lambda known: st.dictionaries(st.text(max_size=8), query_values, max_size=2).map(
    lambda extra: {**extra, **known}))


@FUZZ
@given(query=connect_queries)
def test_fuzz_connect_query(query: dict[str, str]) -> None:
    try:
        request = parse_connect_query(query)
    except ProtocolError as exc:
        assert exc.code == CLOSE_BAD_REQUEST and exc.message
        return
    assert isinstance(request, ConnectRequest) and is_valid_name(request.profile)
    assert request.token is None or (isinstance(request.token, str) and request.token)
    if request.subscribe is not None:
        assert_valid_subscribe(request.subscribe)
        assert request.subscribe.conv_id == query["conv_id"]


# ---- the envelope decoder ----------------------------------------------------------------------

msgpack_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
                   | st.floats() | st.text(max_size=20) | st.binary(max_size=20)
                   | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)))
msgpack_values = st.recursive(msgpack_scalars, lambda inner: st.lists(inner, max_size=4)
                              | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), inner, max_size=4),
                              max_leaves=12)
VALID_BODY: dict[str, Any] = {"v": 1, "id": "e1", "conv": "c1", "seq": 3, "type": "chat.msg", "ts": 1_700_000_000_000,
                              "data": {"text": "hi"}, "epoch": "ep1"}


@st.composite
def mutated_envelopes(draw: st.DrawFn) -> bytes:
    body = dict(VALID_BODY)
    for key in draw(st.lists(st.sampled_from([*VALID_BODY, "key", "extra"]), min_size=1, max_size=3)):
        if draw(st.booleans()):
            body.pop(key, None)
        else:
            body[key] = draw(msgpack_values | names)
    return msgpack.packb(body, use_bin_type=True)


def assert_valid_envelope(env: Envelope) -> None:
    assert is_valid_name(env.conv) and is_valid_name(env.type)
    assert type(env.seq) is int and env.seq >= 1 and type(env.ts) is int
    assert isinstance(env.id, str) and isinstance(env.epoch, str)
    assert env.key is None or is_valid_name(env.key)


def _decode_or_error(payload: bytes) -> None:
    try:
        env = decode_envelope(payload)
    except PayloadDecodeError:
        return
    assert_valid_envelope(env)


@FUZZ
@given(payload=st.binary(max_size=300))
def test_fuzz_decode_arbitrary_bytes(payload: bytes) -> None:
    _decode_or_error(payload)


@FUZZ
@given(payload=st.dictionaries(st.text(max_size=8) | st.sampled_from(list(VALID_BODY)), msgpack_values, max_size=10)
       .map(lambda d: msgpack.packb(d, use_bin_type=True)) | mutated_envelopes()
       | msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)))
def test_fuzz_decode_msgpack_maps(payload: bytes) -> None:
    _decode_or_error(payload)


@FUZZ
@given(payload=st.binary(min_size=1, max_size=200), cut=st.integers(0, 400), flip=st.integers(0, 255))
def test_fuzz_decode_damaged_valid_payloads(payload: bytes, cut: int, flip: int) -> None:
    valid = msgpack.packb({**VALID_BODY, "data": payload}, use_bin_type=True)
    _decode_or_error(valid[:cut])
    damaged = bytearray(valid)
    damaged[cut % len(damaged)] ^= flip
    _decode_or_error(bytes(damaged))
    _decode_or_error(valid + payload)  # trailing bytes


def test_decode_round_trip_of_a_valid_envelope() -> None:
    env = Envelope("c1", 3, "e1", "chat.msg", 1_700_000_000_000, {"text": "hi"}, "ep1", "k")
    assert decode_envelope(encode_envelope(env)) == env


@pytest.mark.parametrize("header", [
    b"\xdd\xff\xff\xff\xff",             # array32 claiming 4 G items
    b"\xdf\xff\xff\xff\xff",             # map32 claiming 4 G pairs
    b"\xdb\xff\xff\xff\xff",             # str32 of 4 GiB
    b"\xc6\xff\xff\xff\xff",             # bin32 of 4 GiB
    b"\xc9\xff\xff\xff\xff\x01",         # ext32 of 4 GiB
    b"\x81\xa4data\xdd\xff\xff\xff\xff",  # a map whose data claims 4 G items
    b"\xdd\x00\x01\x00\x00" * 1000,      # nested arrays of 65536 items each
    b"\x91" * 200_000,                   # nesting 200k deep
])
def test_decode_claims_of_huge_sizes_allocate_little(header: bytes) -> None:
    """msgpack bounds every length by the bytes actually received: a 5-byte header cannot ask for gigabytes."""
    tracemalloc.start()
    try:
        with pytest.raises(PayloadDecodeError):
            decode_envelope(header + b"\x00" * 64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"decoding {header[:8]!r}... peaked at {peak} bytes"


# ---- the profile loader ------------------------------------------------------------------------

NOT_CALLABLE = 42


def enrich_ok(event: dict[str, Any], ctx: object) -> dict[str, Any]:
    return event


toml_scalars = (st.text(max_size=12) | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
                | st.booleans() | st.datetimes() | st.dates() | st.times())
toml_values = st.recursive(toml_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
glob_lists = st.lists(st.sampled_from(["*", "chat.*", "*.thinking.*", "[ab]*", "[!x]", "[", "]", "a b", "", "x" * 129])
                      | st.text(max_size=12), max_size=5) | toml_values
enrich_targets = st.sampled_from(["tests.test_fuzz:enrich_ok", "tests.test_fuzz:NOT_CALLABLE", "tests.test_fuzz:nope",
                                  "zz_fuzz_missing.module:f", ".relative:f", "a..b:c", ":f", "mod:", "json:loads",
                                  "tests.test_fuzz:enrich_ok.__call__", "os:path:join"]) \
    | st.text(max_size=16).map(lambda t: "zz_fuzz_missing_" + t)


@st.composite
def profile_tables(draw: st.DrawFn) -> Any:
    """Mostly well-formed tables, so that every key's validation is reached, with hostile values mixed in."""
    table: dict[str, Any] = {}
    for key, values in (
            ("include", often([["*"], ["chat.*", "llm.*"], []], glob_lists)),
            ("exclude", often([["debug.*"], ["*.thinking.*"], []], glob_lists)),
            ("drop_fields", often([["raw"], ["usage.tokens"], []], st.lists(
                st.sampled_from(["raw", "a.b", "a..b", ".a", "", "usage.tokens"]) | st.text(max_size=10), max_size=4)
                | toml_values)),
            ("enrich", often([["tests.test_fuzz:enrich_ok"], []], st.lists(enrich_targets, max_size=2))
             | toml_values)):
        if draw(st.booleans()):
            table[key] = draw(values)
    if draw(st.integers(0, 4)) == 0:
        table[draw(st.text(max_size=8))] = draw(toml_values)
    return table if draw(st.integers(0, 6)) else draw(toml_values)


profile_documents = (st.fixed_dictionaries({"profiles": st.dictionaries(
                         often(["chat", "timeline", "default", "debug"], names | st.text(max_size=10)),
                         profile_tables(), max_size=4)})
                     | st.dictionaries(st.sampled_from(["profiles", "profile", "x"]) | st.text(max_size=6),
                                       toml_values, max_size=3))


def test_profiles_known_traps() -> None:
    for enrich in (".relative:f", "a..b:c", ":f", "mod:", "os:path:join", "zz_fuzz_missing:f",
                   "tests.test_fuzz:NOT_CALLABLE", "tests.test_fuzz:nope", "tests.test_fuzz:enrich_ok.", "a b:c"):
        with pytest.raises(ProfileError) as refused:
            ProfileRegistry.from_mapping({"profiles": {"p": {"enrich": [enrich]}}}, "traps.toml")
        assert "traps.toml: profiles.p.enrich" in str(refused.value)
    for document in ({1: {}}, {"profiles": {1: {}}}, {"profiles": []}, {"profiles": {"p": []}},
                     {"profiles": {"p": {2: 3, "x": 1}}}, ["profiles"]):
        with pytest.raises(ProfileError):
            ProfileRegistry.from_mapping(document)  # type: ignore[arg-type]
    registry = ProfileRegistry.from_mapping({"profiles": {"p": {"enrich": ["tests.test_fuzz:enrich_ok"]}}})
    assert registry.get("p") is not None


def _check_registry(build: Any) -> None:
    try:
        registry = build()
    except ProfileError as exc:
        assert str(exc)
        return
    assert isinstance(registry, ProfileRegistry)
    for name in registry.names():
        profile = registry.get(name)
        assert profile is not None and is_valid_name(name)
        profile.allows("chat.msg")


@PROFILE_FUZZ
@given(document=profile_documents)
def test_fuzz_profiles_from_mapping(document: dict[str, Any]) -> None:
    _check_registry(lambda: ProfileRegistry.from_mapping(document, "fuzz.toml"))


@PROFILE_FUZZ
@given(document=st.dictionaries(st.integers() | st.text(max_size=4), toml_values, max_size=3)
       | st.fixed_dictionaries({"profiles": st.dictionaries(st.integers() | st.text(max_size=4), toml_values)}))
def test_fuzz_profiles_from_mapping_with_odd_keys(document: dict[Any, Any]) -> None:
    _check_registry(lambda: ProfileRegistry.from_mapping(document, "fuzz"))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value) if value == value and value not in (float("inf"), float("-inf")) else "nan"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return value.isoformat() if hasattr(value, "isoformat") else json.dumps(str(value))


def to_toml(document: dict[str, Any]) -> str:
    lines = []
    for key, value in document.items():
        if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
            for name, table in value.items():
                lines.append(f"[{json.dumps(str(key))}.{json.dumps(str(name))}]")
                lines.extend(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in table.items())
        else:
            lines.insert(0, f"{json.dumps(str(key))} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


@PROFILE_FUZZ
@given(content=profile_documents.map(to_toml).map(str.encode) | st.text(max_size=300).map(str.encode)
       | st.binary(max_size=200)
       | st.sampled_from([b"a=" + b"[" * 50_000, b"[profiles.x]\ninclude = [" + b"[" * 5000, b"\xef\xbb\xbf[profiles]",
                          b"[profiles.chat]\ninclude = ['chat.*']\n"]))
def test_fuzz_profiles_from_file(content: bytes) -> None:
    fd, path = tempfile.mkstemp(suffix=".toml")
    try:
        os.write(fd, content)
        os.close(fd)
        _check_registry(lambda: ProfileRegistry.from_file(path))
    finally:
        os.unlink(path)


def test_profiles_from_file_that_is_not_a_file() -> None:
    with tempfile.TemporaryDirectory() as directory:
        for path in (directory, os.path.join(directory, "missing.toml")):
            with pytest.raises(ProfileError):
                ProfileRegistry.from_file(path)


# ---- JWT verification --------------------------------------------------------------------------

SECRET = "fuzz-secret-" + "z" * 32
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PEM = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
VERIFIERS = [Authenticator(secret=SECRET), Authenticator(public_key=RSA_PEM)]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _assert_only_auth_error(token: str | None) -> None:
    for verifier in VERIFIERS:
        try:
            grant = verifier.verify(token)
        except AuthError as exc:
            assert exc.status == 401 and exc.message
            continue
        assert isinstance(grant, Grant) and isinstance(grant.convs, GlobSet)
        assert grant.profiles is not None and all(is_valid_name(p) for p in grant.profiles)


headers_json = st.fixed_dictionaries({"alg": st.sampled_from(["HS256", "RS256", "ES256", "none", "PS256", "EdDSA",
                                                                "HS512", ""]) | json_values},
                                     optional={"typ": json_values, "kid": json_values, "crit": json_values,
                                               "b64": json_values, "jwk": json_values})
claims_json = st.fixed_dictionaries({}, optional={
    "exp": st.sampled_from([int(time.time()) + 600, 0, -1, 10**30, "soon", 1.5e9 + 1e9]) | json_values,
    "nbf": json_values, "iat": json_values, "sub": json_values, "aud": json_values, "iss": json_values,
    "convs": st.lists(st.sampled_from(["*", "c?", "[", "bad glob", ""]) | st.text(max_size=6), max_size=3)
    | json_values,
    "profiles": st.lists(st.sampled_from(["default", "debug", "", "bad name"]), max_size=3) | json_values})


@st.composite
def forged_tokens(draw: st.DrawFn) -> str:
    header = b64url(_dumps_lenient(draw(headers_json)))
    payload_raw = draw(st.one_of(claims_json.map(_dumps_lenient), st.binary(max_size=40),
                                 json_values.map(_dumps_lenient)))
    payload = b64url(payload_raw)
    signature = b64url(draw(st.binary(max_size=300)))
    parts = [header, payload, signature]
    if draw(st.integers(0, 5)) == 0:
        parts = parts[: draw(st.integers(0, 3))] + draw(st.lists(st.text("ABCabc012-_=.", max_size=8), max_size=3))
    return ".".join(parts)


@st.composite
def signed_tokens(draw: st.DrawFn) -> str:
    """Correctly signed (HS256 with the secret or RS256 with the key): only the claims are hostile."""
    payload = _dumps_lenient(draw(claims_json | json_values))  # signed as raw bytes: PyJWT's encoder is not asked
    extra_headers = draw(st.dictionaries(st.sampled_from(["kid", "typ", "cty", "x5u"]), st.text(max_size=8),
                                         max_size=2))
    signer = jwt.api_jws.PyJWS()
    if draw(st.booleans()):
        return signer.encode(payload, SECRET, algorithm="HS256", headers=extra_headers)
    return signer.encode(payload, RSA_KEY, algorithm="RS256", headers=extra_headers)


@FUZZ
@given(token=st.none() | st.text(max_size=200) | forged_tokens() | signed_tokens()
       | st.sampled_from(["a.b.c", "..", "....", "e30.e30.", "e30.e30.e30", "x" * 9000]))
def test_fuzz_jwt_verification(token: str | None) -> None:
    _assert_only_auth_error(token)


def test_signed_token_with_odd_claims_examples() -> None:
    good = jwt.encode({"exp": int(time.time()) + 60, "convs": ["c?"], "profiles": ["debug"]}, SECRET, algorithm="HS256")
    grant = VERIFIERS[0].verify(good)
    assert grant.convs is not None and grant.convs.matches("c1") and not grant.convs.matches("c10")
    assert grant.profiles == frozenset({"debug"})
    no_convs = jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert VERIFIERS[0].verify(no_convs).convs.matches("anything") is False  # type: ignore[union-attr]


# ---- a real gateway under a stream of junk -----------------------------------------------------

REPLY_TYPES = {"ws.pong", "ws.subscribed", "ws.unsubscribed", "ws.error"}


def _expected_reply(raw: str | bytes) -> str:
    try:
        message = parse_client_message(raw)
    except ProtocolError:
        return "ws.error"
    return {Ping: "ws.pong", SubscribeRequest: "ws.subscribed", Unsubscribe: "ws.unsubscribed",
            Refresh: "ws.error"}[type(message)]  # auth is off in the harness: a refresh is bad_refresh


class JunkHarness:
    """One gateway, one bystander and one fuzzed socket, served by a loop in a background thread.

    Hypothesis drives the test synchronously, example after example; every example
    sends its messages down the same socket, so one connection takes them all.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="junk-gateway", daemon=True)
        self.sent = 0

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> JunkHarness:
        self.thread.start()
        self.run(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    async def _start(self) -> None:
        self.gw = InProcessGateway(Settings(client_messages_per_second=100_000, max_subscriptions=10_000))
        await self.gw.__aenter__()
        self.bystander = await WsClient.connect(self.gw.ws_url("conv_id=calm"))
        await self.bystander.expect("ws.subscribed")
        self.fuzzed = await WsClient.connect(self.gw.ws_url())
        await self.fuzzed.expect("ws.hello")

    async def _stop(self) -> None:
        for client in (self.fuzzed, self.bystander):
            with contextlib.suppress(Exception):
                await client.close()
        await self.gw.__aexit__(None, None, None)

    async def exchange(self, messages: list[str | bytes]) -> None:
        """Send ``messages``; exactly one reply each, of the kind the parser predicts, in order."""
        for raw in messages:
            await self.fuzzed.ws.send(raw)
        self.sent += len(messages)
        replies = await self.fuzzed.until(lambda got: len(got) >= len(messages), timeout=20,
                                          keep=lambda o: o["type"] in REPLY_TYPES)
        assert [r["type"] for r in replies] == [_expected_reply(raw) for raw in messages]
        assert all(r["code"] and r["message"] for r in replies if r["type"] == "ws.error")

    async def still_serving(self) -> None:
        await self.fuzzed.send_json({"type": "ws.ping"})
        assert (await self.fuzzed.expect("ws.pong"))["type"] == "ws.pong"
        result = await self.gw.gateway.backend.publish("calm", "chat.after", {"ok": True})
        got = await self.bystander.events(1)
        assert got[0]["seq"] == result.seq and got[0]["data"] == {"ok": True}
        assert len(self.gw.gateway.pool) == 2


@pytest.mark.timeout(90)
def test_fuzz_gateway_keeps_serving_a_socket_sending_junk() -> None:
    with JunkHarness() as harness:

        @settings(max_examples=10, derandomize=True, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(messages=st.lists(raw_messages, min_size=20, max_size=40))
        def exchange(messages: list[str | bytes]) -> None:
            harness.run(harness.exchange(messages))

        exchange()
        assert harness.sent >= 200, f"only {harness.sent} messages were sent"
        harness.run(harness.still_serving())


# ---- garbage on a Redis channel ----------------------------------------------------------------


async def _metric(http: httpx.AsyncClient, name: str) -> float:
    text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.timeout(60)
async def test_garbage_on_a_redis_channel_is_counted_and_skipped(redis_url: str, key_prefix: str) -> None:
    import redis.asyncio as aioredis

    conv = "junk-1"
    channel = f"{key_prefix}:{{{conv}}}:live"
    garbage = [
        b"", b"\x00", b"\xc1", os.urandom(64), b"not msgpack at all", msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 2, **{k: v for k, v in VALID_BODY.items() if k != "v"}}),
        msgpack.packb({**VALID_BODY, "conv": conv, "seq": "1"}),
        msgpack.packb({**VALID_BODY, "conv": "another-conv", "seq": 1}),  # valid, but not this channel's
        b"\xdd\xff\xff\xff\xff",
    ]
    settings_ = Settings(redis_url=redis_url, key_prefix=key_prefix)
    async with InProcessGateway(settings_) as gw:
        client = await WsClient.connect(gw.ws_url(f"conv_id={conv}"))
        await client.expect("ws.subscribed")
        raw = aioredis.Redis.from_url(redis_url)
        try:
            async with httpx.AsyncClient(base_url=gw.http_url) as http:
                before = await _metric(http, "broadcaster_decode_errors_total")
                for payload in garbage:
                    receivers = await raw.publish(channel, payload)
                    assert receivers >= 1, "the gateway is not subscribed to the conversation's channel"
                await async_wait_until(lambda: _metric(http, "broadcaster_decode_errors_total"), timeout=15,
                                       message="the decode errors to be counted",
                                       until=lambda n: n >= before + len(garbage))
                published = await http.post(f"/v1/conversations/{conv}/events",
                                            json={"type": "chat.msg", "data": {"after": "garbage"}})
                assert published.status_code == 200
                first = await client.events(1)
                assert first[0]["seq"] == published.json()["seq"] == 1
                assert first[0]["data"] == {"after": "garbage"}
                assert (await http.get("/readyz")).status_code == 200
                drops = (await http.get("/metrics")).text
                assert 'broadcaster_drops_total{reason="undecodable"}' in drops
        finally:
            keys = [key async for key in raw.scan_iter(f"{key_prefix}:*")]
            if keys:
                await raw.delete(*keys)
            await raw.aclose()
        # Nothing made of the garbage was ever delivered: before the real event (checked above) nor
        # after it, up to a pong the connection sends in order after anything queued before it.
        await client.send_json({"type": "ws.ping"})
        got = await client.until(lambda objs: bool(objs) and objs[-1]["type"] == "ws.pong", timeout=10)
        assert [o["type"] for o in got] == ["ws.pong"], got
