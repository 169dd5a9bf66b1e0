"""Authentication and authorisation end to end: JWTs on /ws and HTTP reads, publish keys, origins, CORS.

Every gateway is a real uvicorn server (in process, or a ``broadcaster-gateway``
subprocess) and every client a real websocket or HTTP client.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from broadcaster.profiles import ProfileRegistry
from gateway.auth import Authenticator, AuthError, PublishKeys
from gateway.settings import Settings
from tests.support.gateway import GatewayProcess, InProcessGateway
from tests.support.polling import async_wait_until
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cret-for-tests-" + "x" * 32


def token(claims: dict[str, Any] | None = None, *, key: Any = SECRET, algorithm: str = "HS256",
          ttl: int = 300, **extra: Any) -> str:
    body: dict[str, Any] = {"sub": "tester", "exp": int(time.time()) + ttl, "convs": ["*"], "profiles": ["default"]}
    body.update(claims or {})
    body.update(extra)
    return jwt.encode(body, key, algorithm=algorithm)


def auth_settings(**kwargs: Any) -> Settings:
    return Settings(auth_secret=SECRET, **kwargs)


async def expect_hello(client: WsClient) -> dict[str, Any]:
    first = await client.next()
    assert first["type"] == "ws.hello", first
    return first


async def first_close(client: WsClient, *, refused: bool = False) -> tuple[int | None, list[dict[str, Any]]]:
    """Everything the server sent before closing, and the close code.

    With ``refused``, a ``ws.subscribed`` or an event means the refusal did not happen: fail at once
    rather than wait for a close that will not come.
    """
    got: list[dict[str, Any]] = []
    try:
        while True:
            obj = await client.next(timeout=5)
            if refused and (obj["type"] == "ws.subscribed" or not obj["type"].startswith("ws.")):
                raise AssertionError(f"expected a refusal, got {obj}")
            got.append(obj)
    except websockets.ConnectionClosed:
        rcvd = client.ws.protocol.close_rcvd
        return (rcvd.code if rcvd is not None else None), got


async def still_receives(gw: InProcessGateway, client: WsClient, conv: str) -> None:
    """``client`` (subscribed to ``conv``) gets an event published now."""
    result = await gw.gateway.backend.publish(conv, "chat.alive", {"t": time.monotonic()})
    events = await client.events(1)
    assert events[0]["seq"] == result.seq and events[0]["type"] == "chat.alive"


# ---- /ws tokens --------------------------------------------------------------------------------


async def test_ws_refuses_missing_expired_and_badly_signed_tokens_4401() -> None:
    now = int(time.time())
    bad_tokens = {
        "missing": None,
        "empty": "",
        "garbage": "not-a-jwt",
        "expired": token(exp=now - 5),
        "wrong secret": token(key="another-secret-" + "y" * 32),
        "alg none": jwt.encode({"exp": now + 60, "convs": ["*"]}, None, algorithm="none"),
        "no exp": jwt.encode({"sub": "x", "convs": ["*"]}, SECRET, algorithm="HS256"),
        "convs not a list": token(convs="*"),
        "bad conv glob": token(convs=["bad glob with spaces"]),
        "profiles not names": token(profiles=[1, 2]),
        "tampered payload": token()[:-3] + ("AAA" if not token().endswith("AAA") else "BBB"),
        "not yet valid": token(nbf=now + 600),
        "aud without --auth-audience": token(aud="someone"),
    }
    async with InProcessGateway(auth_settings()) as gw:
        for name, bad in bad_tokens.items():
            query = "conv_id=c1" + (f"&token={bad}" if bad is not None else "")
            client = await WsClient.connect(gw.ws_url(query))
            code, got = await first_close(client)
            assert code == 4401, (name, code, got)
            assert got == [], f"{name}: the server sent {got} before closing"
        assert len(gw.gateway.pool) == 0


async def test_token_in_query_or_bearer_header_and_glob_convs() -> None:
    async with InProcessGateway(auth_settings()) as gw:
        good = token({"convs": ["team-*", "exact"]})
        by_query = await WsClient.connect(gw.ws_url(f"conv_id=team-1&token={good}"))
        await expect_hello(by_query)
        assert (await by_query.expect("ws.subscribed"))["conv_id"] == "team-1"
        by_header = await WsClient.connect(gw.ws_url("conv_id=exact"),
                                           additional_headers={"Authorization": f"Bearer {good}"})
        await expect_hello(by_header)
        assert (await by_header.expect("ws.subscribed"))["conv_id"] == "exact"
        await still_receives(gw, by_query, "team-1")
        await still_receives(gw, by_header, "exact")
        # the header is only a fallback: a bad query token is not rescued by a good header
        mixed = await WsClient.connect(gw.ws_url("conv_id=exact&token=garbage"),
                                       additional_headers={"Authorization": f"Bearer {good}"})
        assert (await first_close(mixed))[0] == 4401


async def test_conversation_and_profile_not_allowed_close_4403_others_unaffected() -> None:
    async with InProcessGateway(auth_settings()) as gw:
        limited = token({"convs": ["a-*"], "profiles": ["default"]})
        watcher = await WsClient.connect(gw.ws_url(f"conv_id=a-1&token={limited}"))
        await watcher.expect("ws.subscribed")

        for query in (f"conv_id=b-1&token={limited}",            # conversation outside the grant
                      f"conv_id=a-1&profile=debug&token={limited}",  # profile outside the grant
                      f"profile=debug&token={limited}"):           # no conversation, still the profile
            client = await WsClient.connect(gw.ws_url(query))
            code, got = await first_close(client)
            assert code == 4403 and got == [], (query, code, got)

        # an allowed profile from the claim works; debug then shows debug.* events
        debug_ok = token({"convs": ["a-*"], "profiles": ["default", "debug"]})
        debug = await WsClient.connect(gw.ws_url(f"conv_id=a-1&profile=debug&token={debug_ok}"))
        await debug.expect("ws.subscribed")
        await gw.gateway.backend.publish("a-1", "debug.trace", {"x": 1})
        assert (await debug.events(1))[0]["type"] == "debug.trace"

        # a later ws.subscribe is checked the same way, on the same socket: a ws.error naming it (#16),
        # the socket and its other subscriptions stay
        late = await WsClient.connect(gw.ws_url(f"token={limited}"))
        await expect_hello(late)
        await late.send_json({"type": "ws.subscribe", "conv_id": "a-2"})
        assert (await late.expect("ws.subscribed"))["conv_id"] == "a-2"
        await late.send_json({"type": "ws.subscribe", "conv_id": "secret-room"})
        error = await late.next()
        assert (error["type"], error["code"], error["conv_id"]) == ("ws.error", "forbidden", "secret-room"), error
        await gw.gateway.backend.publish("secret-room", "chat.msg", {"hidden": True})
        await still_receives(gw, watcher, "a-1")
        await still_receives(gw, late, "a-2")
        assert "secret-room" not in gw.gateway.hub.conversations()


@pytest.fixture(scope="module")
def key_pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def pem(private: Any) -> str:
        return private.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    rsa_file = tmp_path_factory.mktemp("keys") / "rsa.pem"
    rsa_file.write_text(pem(rsa_key))
    return {"rsa": rsa_key, "ec": ec_key, "other": other_rsa, "rsa_pem": pem(rsa_key), "ec_pem": pem(ec_key),
            "rsa_file": str(rsa_file)}


@pytest.mark.parametrize("kind", ["rsa-file", "ec-text"])
async def test_public_key_tokens_and_no_algorithm_confusion(kind: str, key_pairs: dict[str, Any]) -> None:
    if kind == "rsa-file":
        settings, private, alg, public_pem = (Settings(auth_public_key=key_pairs["rsa_file"]), key_pairs["rsa"],
                                              "RS256", key_pairs["rsa_pem"])
    else:
        settings, private, alg, public_pem = (Settings(auth_public_key=key_pairs["ec_pem"]), key_pairs["ec"],
                                              "ES256", key_pairs["ec_pem"])
    async with InProcessGateway(settings) as gw:
        good = await WsClient.connect(gw.ws_url(f"conv_id=k1&token={token(key=private, algorithm=alg)}"))
        await good.expect("ws.subscribed")
        await still_receives(gw, good, "k1")
        forged = [
            token(key=key_pairs["other"], algorithm="RS256"),  # another key pair
            hs256_signed_with(public_pem, {"exp": int(time.time()) + 60, "convs": ["*"]}),  # alg confusion
            token(key=private, algorithm=alg, exp=int(time.time()) - 5),
        ]
        for bad in forged:
            client = await WsClient.connect(gw.ws_url(f"conv_id=k1&token={bad}"))
            assert (await first_close(client))[0] == 4401


def hs256_signed_with(secret: str, claims: dict[str, Any]) -> str:
    """A token signed HS256 with ``secret`` - here a public key PEM, which PyJWT itself refuses to sign with.

    A verifier that let the token's header choose the algorithm would check this
    HMAC with the public key it knows, and accept it: the classic confusion attack.
    """
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + b64(signature)).decode()


def test_algorithm_confusion_refused(key_pairs: dict[str, Any]) -> None:
    forged = hs256_signed_with(key_pairs["rsa_pem"], {"exp": int(time.time()) + 60, "convs": ["*"]})
    assert jwt.get_unverified_header(forged)["alg"] == "HS256"
    with pytest.raises(AuthError) as refused:
        Authenticator(public_key=key_pairs["rsa_pem"]).verify(forged)
    assert refused.value.status == 401 and "alg" in refused.value.message


def test_authenticator_configuration_errors(key_pairs: dict[str, Any], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"\xff\xfe not a key")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    for bad in ("/nonexistent/key.pem", str(garbage), "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----",
                small, p384):
        with pytest.raises(ValueError):
            Authenticator(public_key=bad)
    with pytest.raises(ValueError):  # a PEM given as the HS256 secret
        Authenticator(secret=key_pairs["rsa_pem"])
    with pytest.raises(ValueError):
        Authenticator(secret="a", public_key=key_pairs["rsa_pem"])
    assert Authenticator(public_key=key_pairs["rsa_file"]).algorithms == ("RS256",)
    assert Authenticator(public_key=key_pairs["ec_pem"]).algorithms == ("ES256",)
    assert not Authenticator().enabled


def test_gateway_with_unusable_public_key_exits_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "--auth-public-key", "/nonexistent/key.pem",
                           "--port", "1"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "--auth-public-key" in proc.stderr


async def test_audience_and_issuer_claims() -> None:
    async with InProcessGateway(auth_settings(auth_audience="gw", auth_issuer="https://idp")) as gw:
        ok = token(aud="gw", iss="https://idp")
        client = await WsClient.connect(gw.ws_url(f"conv_id=x&token={ok}"))
        await client.expect("ws.subscribed")
        for bad in (token(aud="other", iss="https://idp"), token(aud="gw", iss="https://evil"), token(iss="https://idp"),
                    token(aud="gw")):
            refused = await WsClient.connect(gw.ws_url(f"conv_id=x&token={bad}"))
            assert (await first_close(refused))[0] == 4401


# ---- the dev token command ---------------------------------------------------------------------


def _mint(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "token", *args], capture_output=True, text=True,
                          timeout=30, env={**os.environ, **(env or {})})


async def test_token_command_mints_usable_tokens() -> None:
    minted = await asyncio.to_thread(_mint, "--secret", SECRET, "--sub", "alice", "--convs", "room-*,lobby",
                                     "--profiles", "default,debug", "--ttl", "120")
    assert minted.returncode == 0, minted.stderr
    value = minted.stdout.strip()
    claims = jwt.decode(value, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["convs"] == ["room-*", "lobby"]
    assert claims["profiles"] == ["default", "debug"]
    assert 100 <= claims["exp"] - time.time() <= 121

    from_env = await asyncio.to_thread(_mint, "--convs", "lobby", env={"BROADCASTER_AUTH_SECRET": SECRET})
    assert from_env.returncode == 0, from_env.stderr
    assert jwt.decode(from_env.stdout.strip(), SECRET, algorithms=["HS256"])["convs"] == ["lobby"]
    no_secret = await asyncio.to_thread(_mint, env={"BROADCASTER_AUTH_SECRET": ""})
    assert no_secret.returncode == 2 and "--secret" in no_secret.stderr

    async with InProcessGateway(auth_settings()) as gw:
        client = await WsClient.connect(gw.ws_url(f"conv_id=room-7&profile=debug&token={value}"))
        await client.expect("ws.subscribed")
        await still_receives(gw, client, "room-7")
        refused = await WsClient.connect(gw.ws_url(f"conv_id=kitchen&token={value}"))
        assert (await first_close(refused))[0] == 4403


# ---- HTTP reads and publish keys ---------------------------------------------------------------


async def test_http_reads_need_a_token_allowing_the_conversation() -> None:
    async with InProcessGateway(auth_settings()) as gw:
        await gw.gateway.backend.publish("r-1", "chat.msg", {"n": 1}, key="k")
        await gw.gateway.backend.publish("r-1", "debug.x", {"n": 2})
        allowed = token({"convs": ["r-*"]})
        other = token({"convs": ["s-*"]})
        debug = token({"convs": ["r-1"], "profiles": ["debug"]})
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            for path in ("/v1/conversations/r-1/events", "/v1/conversations/r-1/state",
                         "/v1/conversations/r-1/presence"):
                missing = await http.get(path)
                assert missing.status_code == 401 and missing.json()["error"] == "unauthorized", path
                expired = await http.get(path, headers={"Authorization": f"Bearer {token(ttl=-10)}"})
                assert expired.status_code == 401, path
                wrong_conv = await http.get(path, headers={"Authorization": f"Bearer {other}"})
                assert wrong_conv.status_code == 403 and wrong_conv.json()["error"] == "forbidden", path
                wrong_profile = await http.get(path, params={"profile": "debug"},
                                               headers={"Authorization": f"Bearer {allowed}"})
                assert wrong_profile.status_code == 403, path
                assert (await http.get(path, headers={"Authorization": f"Bearer {allowed}"})).status_code == 200
                assert (await http.get(path, params={"token": allowed})).status_code == 200, path
            too_long = await http.get("/v1/conversations/r-1/events", params={"token": allowed + "x" * 9000})
            assert too_long.status_code == 401 and "longer" in too_long.json()["message"]
            history = (await http.get("/v1/conversations/r-1/events", params={"token": allowed})).json()
            assert [e["type"] for e in history["events"]] == ["chat.msg"]
            history = (await http.get("/v1/conversations/r-1/events",
                                      params={"token": debug, "profile": "debug"})).json()
            assert [e["type"] for e in history["events"]] == ["chat.msg", "debug.x"]
            state = (await http.get("/v1/conversations/r-1/state", params={"token": allowed})).json()
            assert list(state["entities"]) == ["k"]


async def test_publish_keys_several_at_once() -> None:
    async with InProcessGateway(auth_settings(publish_key=["old-key", "new-key"])) as gw:
        watcher = await WsClient.connect(gw.ws_url(f"conv_id=p&token={token()}"))
        await watcher.expect("ws.subscribed")
        url = "/v1/conversations/p/events"
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            for headers, status in [({}, 401), ({"Authorization": "Basic b2xkLWtleQ=="}, 401),
                                    ({"Authorization": "Bearer"}, 401), ({"Authorization": "Bearer old"}, 403),
                                    ({"Authorization": "Bearer old-key-and-more"}, 403),
                                    ({"Authorization": f"Bearer {token()}"}, 403)]:  # a read token cannot publish
                r = await http.post(url, json={"type": "chat.msg"}, headers=headers)
                assert r.status_code == status, (headers, r.text)
            for key in ("old-key", "new-key"):
                r = await http.post(url, json={"type": "chat.msg", "data": key},
                                    headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200
        got = await watcher.events(2)
        assert [e["data"] for e in got] == ["old-key", "new-key"]


def test_publish_key_check_compares_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.auth

    calls: list[tuple[bytes, bytes]] = []
    real = gateway.auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(gateway.auth.hmac, "compare_digest", counting)
    keys = PublishKeys(["k1", "a-much-longer-key-2", "k3"])
    keys.check("Bearer k1")  # matches the first key, still compares all three
    assert len(calls) == 3
    assert {len(a) for a, _ in calls} == {len(b) for _, b in calls} == {32}  # digests: lengths never differ
    with pytest.raises(AuthError) as wrong:
        keys.check("Bearer k")
    assert wrong.value.status == 403 and len(calls) == 6
    PublishKeys([]).check(None)  # no key configured: open


# ---- origins and CORS --------------------------------------------------------------------------


async def test_allowed_origins_for_sockets_and_cors() -> None:
    app_origin, evil = "https://app.example", "https://evil.example"
    async with InProcessGateway(Settings(allowed_origins=[app_origin])) as gw:
        browser = await WsClient.connect(gw.ws_url("conv_id=o1"), origin=app_origin)
        await browser.expect("ws.subscribed")
        service = await WsClient.connect(gw.ws_url("conv_id=o1"))  # no Origin: not a browser
        await service.expect("ws.subscribed")
        for origin in (evil, "null", "https://app.example.evil.example", "http://app.example"):
            with pytest.raises(websockets.InvalidStatus) as denied:
                await WsClient.connect(gw.ws_url("conv_id=o1"), origin=origin)
            assert denied.value.response.status_code == 403, origin
        await still_receives(gw, browser, "o1")

        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
            ok = await http.options("/v1/conversations/o1/events", headers={"Origin": app_origin, **preflight})
            assert ok.status_code == 200
            assert ok.headers["access-control-allow-origin"] == app_origin
            assert "authorization" in ok.headers["access-control-allow-headers"].lower()
            bad = await http.options("/v1/conversations/o1/events", headers={"Origin": evil, **preflight})
            assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
            simple = await http.get("/v1/conversations/o1/events", headers={"Origin": app_origin})
            assert simple.headers.get("access-control-allow-origin") == app_origin
            foreign = await http.get("/v1/conversations/o1/events", headers={"Origin": evil})
            assert "access-control-allow-origin" not in foreign.headers


async def test_without_allowed_origins_any_origin_connects_and_no_cors_headers() -> None:
    async with InProcessGateway() as gw:
        client = await WsClient.connect(gw.ws_url("conv_id=o2"), origin="https://anywhere.example")
        await client.expect("ws.subscribed")
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            r = await http.get("/v1/conversations/o2/events", headers={"Origin": "https://anywhere.example"})
            assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# ---- tokens stay out of the logs ---------------------------------------------------------------


@pytest.mark.timeout(40)
async def test_query_tokens_are_not_logged() -> None:
    secret_token = token({"convs": ["logs"]})
    proc = GatewayProcess("--auth-secret", SECRET, "--log-level", "debug")
    await asyncio.to_thread(proc.start)
    try:
        client = await WsClient.connect(proc.ws_url(f"conv_id=logs&token={secret_token}"))
        await client.expect("ws.subscribed")
        await client.close()
        refused = await WsClient.connect(proc.ws_url(f"conv_id=logs&token={secret_token}x"))
        assert (await first_close(refused))[0] == 4401
        await async_wait_until(lambda: "WebSocket /ws" in proc.output(), timeout=20,
                               message="uvicorn to log the websocket")
        output = proc.output()
        assert "token=***" in output
        assert secret_token.split(".")[2] not in output and secret_token.split(".")[1] not in output
    finally:
        await asyncio.to_thread(proc.stop)


# ---- property: nothing leaks across conversations or profiles ----------------------------------

CONVS = ["a1", "a2", "b1", "b2", "c3"]
GLOBS = ["a1", "a2", "b1", "a*", "b?", "?1", "[ab]2", "*", "c3"]
PROFILE_NAMES = ["default", "debug", "chat"]
TYPES = ["chat.msg", "llm.delta", "debug.trace", "timeline.upsert", "llm.thinking.delta"]
PROPERTY_PROFILES = ProfileRegistry.from_mapping({"profiles": {
    "chat": {"include": ["chat.*", "llm.*", "end.*"], "exclude": ["*.thinking.*"]}}})


def _glob_allows(globs: list[str], conv: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(conv, g) for g in globs)


def _profile_allows(profile: str, etype: str) -> bool:
    found = PROPERTY_PROFILES.get(profile)
    assert found is not None
    return found.allows(etype)


client_plan = st.fixed_dictionaries({
    "globs": st.lists(st.sampled_from(GLOBS), max_size=3, unique=True),
    "granted": st.lists(st.sampled_from(PROFILE_NAMES), min_size=1, max_size=3, unique=True),
    "profile": st.sampled_from(PROFILE_NAMES),
    "url_conv": st.none() | st.sampled_from(CONVS),
    "subscribes": st.lists(st.sampled_from(CONVS), max_size=4),
})


async def _run_leak_scenario(plans: list[dict[str, Any]], events: list[tuple[str, str]]) -> None:
    async with InProcessGateway(auth_settings(), profiles=PROPERTY_PROFILES) as gw:
        live: list[tuple[dict[str, Any], WsClient, set[str]]] = []
        for plan in plans:
            tok = token({"convs": plan["globs"], "profiles": plan["granted"]})
            query = f"profile={plan['profile']}&token={tok}" + (f"&conv_id={plan['url_conv']}"
                                                                 if plan["url_conv"] else "")
            client = await WsClient.connect(gw.ws_url(query))
            refused = plan["profile"] not in plan["granted"] or (
                plan["url_conv"] is not None and not _glob_allows(plan["globs"], plan["url_conv"]))
            if refused:
                code, got = await first_close(client, refused=True)
                assert code == 4403 and got == [], (plan, code, got)
                continue
            await expect_hello(client)
            subscribed: set[str] = set()
            if plan["url_conv"]:
                assert (await client.expect("ws.subscribed"))["conv_id"] == plan["url_conv"]
                subscribed.add(plan["url_conv"])
            for conv in plan["subscribes"]:
                await client.send_json({"type": "ws.subscribe", "conv_id": conv})
                if _glob_allows(plan["globs"], conv):
                    assert (await client.expect("ws.subscribed"))["conv_id"] == conv
                    subscribed.add(conv)
                else:  # refused alone (#16): the socket stays
                    error = await client.next()
                    assert (error["type"], error["code"], error["conv_id"]) == ("ws.error", "forbidden", conv), error
            live.append((plan, client, subscribed))

        for conv, etype in events:
            await gw.gateway.backend.publish(conv, etype, {"conv": conv})
        for conv in CONVS:  # a marker every profile shows, closing each conversation's stream
            await gw.gateway.backend.publish(conv, "end.marker", None)

        for plan, client, subscribed in live:
            await client.send_json({"type": "ws.ping"})

            def done(objs: list[dict[str, Any]], want: set[str] = subscribed) -> bool:
                ends = {o["conv_id"] for o in objs if o["type"] == "end.marker"}
                return ends >= want and any(o["type"] == "ws.pong" for o in objs)

            got = await client.until(done)
            received = [(o["conv_id"], o["type"]) for o in got
                        if not o["type"].startswith("ws.") and o["type"] != "end.marker"]
            for conv, etype in received:
                assert _glob_allows(plan["globs"], conv), f"{plan} received {conv}"
                assert _profile_allows(plan["profile"], etype), f"{plan} received {etype}"
            expected = [(c, t) for c, t in events if c in subscribed and _profile_allows(plan["profile"], t)]
            assert received == expected, plan
            await client.close()


@pytest.mark.timeout(90)
@settings(max_examples=20, derandomize=True, deadline=None,
          phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: each example runs a gateway
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plans=st.lists(client_plan, min_size=1, max_size=5),
       events=st.lists(st.tuples(st.sampled_from(CONVS), st.sampled_from(TYPES)), max_size=15))
def test_property_no_event_crosses_a_grant(plans: list[dict[str, Any]], events: list[tuple[str, str]]) -> None:
    asyncio.run(_run_leak_scenario(plans, events))
